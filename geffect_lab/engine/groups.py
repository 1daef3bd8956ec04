"""Layer groups: every parameter of a causal LM in exactly one group, in model order.

Groups are ``embed`` (token and positional embeddings), ``layers.0`` … ``layers.{L-1}`` (the decoder blocks),
``norm`` (whatever sits between the last block and the output head, usually the final norm) and ``lm_head``.
A tied output embedding (GPT-2's ``lm_head`` = ``wte``) is one parameter: it belongs to ``embed`` and the
``lm_head`` group is then empty. One rule serves every HF causal LM whose blocks sit in a ``ModuleList``
(Llama, Mistral, Qwen, Phi, GPT-2, GPT-NeoX, OPT, …): parameters inside the block list go to their block;
the input embedding and parameters registered before the blocks go to ``embed``; the output embedding to
``lm_head``; the rest to ``norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._batching import check_model
from ..schema import COARSE_GROUPS, coarse_map  # noqa: F401  (re-exported: the engine's public names)

__all__ = ["LayerGroups", "layer_groups", "find_blocks", "ModelStructureError", "COARSE_GROUPS", "coarse_map"]


class ModelStructureError(ValueError):
    """The model does not have the structure the engine needs (named in the message)."""


@dataclass(frozen=True)
class LayerGroups:
    """``names`` in model order; ``of_param`` maps each parameter (by identity) to its group's index."""

    names: tuple[str, ...]
    param_names: dict[int, str]      # id(param) -> qualified name (first occurrence)
    of_param: dict[int, int]          # id(param) -> group index
    blocks_path: str
    n_blocks: int

    def group_of(self, param: torch.Tensor) -> int:
        return self.of_param[id(param)]

    def params(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The model's distinct parameters, in order, with their names."""
        return [(n, p) for n, p in model.named_parameters() if id(p) in self.of_param]

    @property
    def index(self) -> list[int]:
        """``layer_index``: -1 for embed, the block number for blocks, L for norm, L+1 for lm_head."""
        out = []
        for name in self.names:
            if name == "embed":
                out.append(-1)
            elif name.startswith("layers."):
                out.append(int(name.split(".")[1]))
            elif name == "norm":
                out.append(self.n_blocks)
            else:
                out.append(self.n_blocks + 1)
        return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: the one holding the most parameters, its children of one class."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or size > best[0]):
            best = (size, path, module)
    if best is None:
        raise ModelStructureError(
            f"{type(model).__name__} has no ModuleList of decoder blocks, so its parameters cannot be grouped "
            "by layer. geffect-lab supports HF causal LMs whose blocks sit in a ModuleList (model.layers, "
            "transformer.h, ...).")
    return best[1], best[2]


def layer_groups(model: nn.Module) -> LayerGroups:
    """Assign every parameter of ``model`` to one layer group (see the module's docstring)."""
    check_model(model)
    meta = next((n for n, p in model.named_parameters() if p.device.type == "meta"), None)
    if meta is not None:
        from .offload import is_offloaded

        if not is_offloaded(model):
            raise ModelStructureError(
                f"parameter {meta!r} of {type(model).__name__} is on the meta device and no accelerate offload hook "
                "brings its weights in (a model built under init_empty_weights and never loaded?): load the "
                "weights first (from_pretrained, or accelerate's load_checkpoint_and_dispatch)")
    blocks_path, blocks = find_blocks(model)
    n_blocks = len(blocks)
    names = ["embed"] + [f"layers.{i}" for i in range(n_blocks)] + ["norm", "lm_head"]
    index = {n: i for i, n in enumerate(names)}
    input_emb = {id(p) for p in model.get_input_embeddings().parameters()}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    output_ids = {id(p) for p in output.parameters()} if output is not None else set()
    prefix = blocks_path + "."
    of_param: dict[int, int] = {}
    param_names: dict[int, str] = {}
    seen_blocks = False
    for name, param in model.named_parameters():  # distinct parameters, first occurrence (ties deduplicated)
        pid = id(param)
        param_names[pid] = name
        if name.startswith(prefix):
            seen_blocks = True
            block = int(name[len(prefix):].split(".")[0])
            of_param[pid] = index[f"layers.{block}"]
        elif pid in input_emb:
            of_param[pid] = index["embed"]
        elif pid in output_ids:
            of_param[pid] = index["lm_head"]
        elif not seen_blocks:
            of_param[pid] = index["embed"]
        else:
            of_param[pid] = index["norm"]
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in of_param:  # cannot happen with the rule above; guard against odd models
            raise ModelStructureError(f"parameter {name!r} of {type(model).__name__} falls in no layer group")
    return LayerGroups(tuple(names), param_names, of_param, blocks_path, n_blocks)
