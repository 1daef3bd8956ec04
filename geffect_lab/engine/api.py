"""``gl.g_effect``: the G-effects of an objective at the model's current parameters, as a Dataset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xarray as xr

from .. import __version__
from .._batching import eval_mode
from ..data import encode, example_field, example_id
from ..objectives import ObjectiveError, resolve_objective
from ..results import Axes, effects_dataset
from .core import fast_effects, reference_effects
from .forward import encode_side, reference_quantities, resolve_layers
from .groups import layer_groups

__all__ = ["g_effect", "prepare_targets", "model_description", "make_axes"]

ENGINES = ("fast", "reference")


def model_description(model) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "model_name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "model_type": str(getattr(cfg, "model_type", type(model).__name__)),
        "model_parameters": int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def prepare_targets(tokenizer, targets, template=None):
    """Encode the target sets into one batch: ``(batch, ids, split per instance, examples, set slices)``."""
    if targets is None:
        raise ObjectiveError("no targets: give targets={'targeted': forget_examples, 'non_targeted': retain_examples}")
    if not isinstance(targets, Mapping):
        targets = {"targeted": targets}
    examples, splits, slices = [], [], {}
    for name, items in targets.items():
        items = list(items)
        if not items:
            raise ObjectiveError(f"the target set {name!r} is empty; give at least one instance to measure")
        slices[name] = slice(len(examples), len(examples) + len(items))
        examples += items
        splits += [name] * len(items)
    ids = [example_id(e, i) for i, e in enumerate(examples)]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ObjectiveError(f"instance ids must be unique across the target sets; repeated: {', '.join(dup[:5])}")
    batch = encode(tokenizer, examples, template)
    return batch, ids, splits, examples, slices


def g_effect(model, tokenizer, objective="ga", params: Mapping[str, Any] | None = None, *, forget: Sequence,
             targets, retain: Sequence | None = None, reference=None, engine: str = "fast",
             refusals: Sequence[str] | None = None, per_token: bool = True, pg: bool = True,
             chunk_size: int | None = 16, template=None, step: int = 0) -> xr.Dataset:
    """G-effects of an unlearning objective at the model's current parameters (one ``step``).

    Parameters
    ----------
    objective, params:
        A registered name (``"npo"``), a composite (``"npo+0.5*gd"``) or objects (``npo(beta=0.1) + gd()``);
        ``params`` sets a string objective's parameters (``{"beta": 0.1}`` or ``{"gd.weight": 0.5}``).
    forget:
        The forget samples that feed the objective's forget term (``retain``: its regularisers' samples).
    targets:
        The instances whose risk gradients are measured: ``{"targeted": [...], "non_targeted": [...]}``
        (any names; a plain list is ``targeted``). Each becomes an ``instance`` with its ``split``.
    reference:
        The frozen reference model for NPO-like terms; ``None`` is the model as given (NPO's weight is 1).
    engine:
        ``"fast"`` (ghost dot products and forward-mode tangents) or ``"reference"`` (the per-instance
        autograd loop, the oracle). Both give the same numbers to rounding.
    refusals:
        Refusal answers for ``po``/``dpo`` (default: the bundled world's).
    per_token, pg:
        Also measure per-token G-effects (``g_effect_token``) and the PG-effect per forget sample.
    chunk_size:
        Target instances per pass (bounds memory; ``None``: all at once).

    Returns an xarray Dataset with DESIGN.md §4's names: ``g_effect`` [step, instance, layer, term],
    ``g_effect_token`` [step, instance, token], ``pg_effect`` [step, sample, against], ``risk``,
    ``objective_loss``. Sign convention: ``dR ≈ -lr · g_effect``.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    obj = resolve_objective(objective, params)
    obj = type(obj)(resolve_layers(model, obj.terms))
    groups = layer_groups(model)
    roles = {t.spec.role for t in obj.terms}
    needs_alt = "alt" in obj.forget_term.spec.needs
    if needs_alt and refusals is None:
        from ..data import load_world

        refusals = load_world().refusals
    forget = list(forget) if forget is not None else []
    sides = {"forget": encode_side(tokenizer, forget, refusals=refusals, need_alt=needs_alt, template=template)}
    if "retain" in roles:
        if not retain:
            regs = ", ".join(t.name for t in obj.terms if t.spec.role == "retain")
            raise ObjectiveError(f"the regulariser(s) {regs} need retain samples: pass retain=[...]")
        sides["retain"] = encode_side(tokenizer, list(retain), template=template, role="retain")
    ref_model = model if reference is None else reference
    with torch.no_grad(), eval_mode(ref_model):
        for term in obj.terms:  # reference quantities first, before any pass hooks the model
            reference_quantities(ref_model, sides[term.spec.role], term.spec.needs, term.params.get("layer"))
    batch, ids, splits, examples, slices = prepare_targets(tokenizer, targets, template)
    run = fast_effects if engine == "fast" else reference_effects
    effects = run(model, groups, obj, sides, ref_model, batch, ids, slices, chunk_size=chunk_size,
                  per_token=per_token, pg=pg)
    attrs = {
        "objective": obj.name, "objective_params": obj.params(), "objective_repr": repr(obj),
        "engine": engine, "package_version": __version__, "reference": "initial model" if reference is None
        else "given", **model_description(model),
    }
    axes = make_axes(tokenizer, ids, splits, examples, groups, obj, sides["forget"].ids, list(slices),
                     effects.answer_tokens, effects.g_effect_token.shape[1])
    return effects_dataset(effects, axes, step=step, attrs=attrs)


def make_axes(tokenizer, ids, splits, examples, groups, objective, sample_ids, against, answer_tokens, width):
    """The :class:`~geffect_lab.results.Axes` of a measurement."""
    return Axes(instance_ids=list(ids), splits=list(splits),
                questions=[example_field(e, "question") for e in examples],
                answers=[example_field(e, "answer") for e in examples], layer_names=list(groups.names),
                layer_index=groups.index, term_names=objective.term_names, sample_ids=list(sample_ids),
                against=list(against), token_texts=[[tokenizer.decode([t]) for t in row] for row in answer_tokens],
                token_width=width)
