"""``gl.replay``: the G-effects of a run someone else trained, measured afterwards on its saved checkpoints.

A run folder (an HF ``Trainer``'s ``output_dir``, an open-unlearning output folder) holds ``checkpoint-N/``
folders, each the model (full weights, or a PEFT adapter on a base model) after N optimiser steps. Replay
measures every checkpoint with one :class:`~geffect_lab.engine.api.Measurement` — the same path as
``gl.unlearn`` and the recorder, so the Dataset has the run schema — and, between consecutive checkpoints
``a < b``, the **interval update effect** ``⟨∇R_i(θ_a), θ_a − θ_b⟩`` per instance × layer and the measured
risk change ``R_i(θ_b) − R_i(θ_a)``: by first order the risk change is ``−Σ_l interval_effect``.

Memory: one model at a time, plus one copy of its trainable parameters (the later checkpoint's, to form the
direction ``θ_a − θ_b``) and the reference quantities. The checkpoints are therefore measured from the last
to the first (the reference, by default the first checkpoint, is read first).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._batching import check_device, check_dtype, check_tokenizer_type
from .data import spread
from .engine.api import Measurement, check_chunk_size
from .results import StepTable
from .schedule import CONVENTION, Rates, read_rates

__all__ = ["replay", "find_checkpoints", "Checkpoint", "ReplayError", "read_open_unlearning_run",
           "OpenUnlearningRun"]


class ReplayError(ValueError):
    """A run folder or checkpoint that cannot be replayed (the folder or file is named in the message). Raised
    part-way, ``partial`` holds the checkpoints measured before (``attrs["complete"] = 0``)."""

    partial: xr.Dataset | None = None


@dataclass(frozen=True)
class Checkpoint:
    """A saved model after ``step`` updates, and the rate of the update that left it (NaN: none, or unknown)."""

    step: int
    path: Path
    learning_rate: float = float("nan")

    @property
    def is_adapter(self) -> bool:
        return (self.path / "adapter_config.json").exists()


_NAME = re.compile(r"checkpoint-(\d+)$")


def _step_of(path: Path) -> int:
    """The global step of a checkpoint: ``trainer_state.json``'s, which must agree with the folder's name."""
    named = _NAME.search(path.name)
    state_path = path / "trainer_state.json"
    if state_path.exists():
        try:
            step = int(json.loads(state_path.read_text())["global_step"])
        except (ValueError, KeyError, TypeError) as err:
            raise ReplayError(f"{state_path}: cannot read its global_step ({type(err).__name__}: {err})") from None
        if named and int(named[1]) != step:
            raise ReplayError(f"{state_path} says global_step {step}, but the folder is named {path.name}: "
                              "which is right? Rename the folder or fix the file")
        return step
    if named:
        return int(named[1])
    raise ReplayError(f"{path}: no trainer_state.json and no checkpoint-N name, so its step is unknown")


def find_checkpoints(source) -> list[Checkpoint]:
    """The checkpoints of ``source`` in step order: a run folder (its ``checkpoint-*`` folders), one checkpoint
    folder, or a list of checkpoint folders."""
    return _checkpoints_and_rates(source)[0]


def _checkpoints_and_rates(source) -> tuple[list[Checkpoint], Rates]:
    """:func:`find_checkpoints`, and the run's learning rates with where they were read (one reading of the
    schedule and the log, for the checkpoints and the Dataset's attributes)."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if not root.is_dir():
            raise ReplayError(f"{root}: no such folder; give a run folder holding checkpoint-* folders")
        paths = sorted((p for p in root.iterdir() if p.is_dir() and _NAME.search(p.name)), key=_step_of)
        if not paths and ((root / "config.json").exists() or (root / "adapter_config.json").exists()):
            paths = [root]
        if not paths:
            raise ReplayError(f"{root}: no checkpoint-* folders (and not a checkpoint itself); save the run with "
                              "save_strategy='steps'")
    else:
        paths = [Path(p) for p in source]
        if not paths:
            raise ReplayError("no checkpoints given")
        missing = [p for p in paths if not p.is_dir()]
        if missing:
            raise ReplayError(f"{missing[0]}: no such checkpoint folder")
    steps = [_step_of(p) for p in paths]
    if len(set(steps)) != len(steps):
        dup = sorted({s for s in steps if steps.count(s) > 1})
        same = [str(p) for p, s in zip(paths, steps) if s == dup[0]]
        raise ReplayError(f"two checkpoints have the same step {dup[0]}: {', '.join(same)}")
    rates = read_rates(paths)
    return sorted((Checkpoint(s, p, rates.at(s)) for s, p in zip(steps, paths)), key=lambda c: c.step), rates


# ---------------------------------------------------------------------------------------------- loading
class _Loader:
    """Loads one checkpoint at a time: full weights with transformers, an adapter with peft on a fresh base."""

    def __init__(self, base_model, dtype, device):
        self.base_model, self.dtype, self.device = base_model, dtype, device
        self.architecture: dict[str, Any] | None = None

    def load(self, ckpt: Checkpoint, *, check_architecture: bool = True):
        from transformers import AutoModelForCausalLM

        from .zoo import quiet_hf

        with quiet_hf():
            if ckpt.is_adapter:
                from peft import PeftModel

                model = PeftModel.from_pretrained(self._base(ckpt), str(ckpt.path), is_trainable=True)
            else:
                model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto", attn_implementation="eager")
        if self.dtype is not None:
            model = model.to(self.dtype)
        if self.device is not None:
            model = model.to(self.device)
        if check_architecture:
            self._same_architecture(model, ckpt)
        return model.eval()

    def base_model_of(self, ckpt: Checkpoint):
        """The model an adapter checkpoint was trained on, in the replay's dtype and device."""
        model = self._base(ckpt)
        if self.dtype is not None:
            model = model.to(self.dtype)
        if self.device is not None:
            model = model.to(self.device)
        return model.eval()

    def _base(self, ckpt: Checkpoint):
        from transformers import AutoModelForCausalLM

        if self.base_model is not None and not isinstance(self.base_model, (str, os.PathLike)):
            return copy.deepcopy(self.base_model)  # peft wraps the base in place: each adapter gets its own copy
        source = self.base_model
        if source is None:
            source = json.loads((ckpt.path / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not source or not Path(source).exists():
                raise ReplayError(f"{ckpt.path} is a PEFT adapter whose base model {source!r} is not a folder here: "
                                  "pass base_model= (the base model, or its folder)")
        return AutoModelForCausalLM.from_pretrained(source, dtype="auto", attn_implementation="eager")

    def _same_architecture(self, model, ckpt: Checkpoint) -> None:
        cfg = model.config
        arch = {k: getattr(cfg, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")}
        arch["trainable"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        if self.architecture is None:
            self.architecture = arch
        elif arch != self.architecture:
            what = next(k for k in arch if arch[k] != self.architecture[k])
            raise ReplayError(f"{ckpt.path} is not the architecture of the run's other checkpoints (its {what} "
                              "differs): replay one run at a time")


def _named_trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- replay
def replay(source, tokenizer=None, objective=None, params: Mapping[str, Any] | None = None, *,
           forget: Sequence | None = None, targets=None, retain: Sequence | None = None, world=None,
           reference=None, base_model=None, refusals: Sequence[str] | None = None, template=None,
           per_token: bool = True, pg: bool = True, chunk_size: int | str | None = 16,
           dtype: torch.dtype | None = None, device=None, verify: str = "first", progress: bool = True
           ) -> xr.Dataset:
    """The G-effects of ``objective`` at every saved checkpoint of a run, and the interval update effects.

    Parameters
    ----------
    source:
        A run folder (its ``checkpoint-*`` folders, in step order), one checkpoint folder, or a list of them.
        A checkpoint holds full weights (``config.json``) or a PEFT adapter (``adapter_config.json``) on
        ``base_model`` (a model, or a folder; default: the adapter's own ``base_model_name_or_path``).
    tokenizer:
        The run's tokenizer, its folder or a zoo name (default: read from the first checkpoint, where a Trainer
        saves it when given ``processing_class``).
    objective, params, forget, retain, targets, refusals, template:
        What is measured, as in :func:`geffect_lab.g_effect`. For an open-unlearning output folder (it has
        ``.hydra/config.yaml``) each may be left out: the objective is its method with its ``method_args``
        (:func:`geffect_lab.objectives.from_open_unlearning`), the samples its ``forget_split`` of ``world``
        (default: real TOFU where ``gl.data.tofu_dir()`` holds it) with as many retain samples, spread over its
        retain split, the targets 32 + 32 as in ``gl.unlearn``.
    reference:
        The frozen reference for NPO-like terms (NPO, TNPO, WTNPO, DPO, KL): the run's
        *starting* model — a model, its folder, or a zoo name. ``None`` (default): ``checkpoint-0`` when the run
        has one, else the base model of adapter checkpoints, else an open-unlearning run's pretrained model;
        when none of these exists and the objective reads a reference, replay refuses (an HF Trainer does not
        save the model it starts from) rather than take a trained checkpoint for it.
    per_token, pg, chunk_size, verify:
        As in :func:`geffect_lab.g_effect`. ``dtype``/``device``: applied to each checkpoint after loading.

    Returns
    -------
    xarray.Dataset
        The run schema of :func:`geffect_lab.unlearn` (``step`` = each checkpoint's global step, from
        ``trainer_state.json`` or the folder name; ``learning_rate`` [step] = the rate of the update
        from that step to the next, as ``gl.unlearn`` stores it, read from the Trainer's schedule or its
        ``log_history``: ``attrs["learning_rate_source"]`` says which, NaN where unknown), plus
        ``interval_effect`` [step, instance, layer] =
        ``⟨∇_l R_i(θ_a), θ_a − θ_b⟩`` at each checkpoint ``a`` with the next one ``b`` (NaN at the last) and
        ``interval_risk_change`` [step, instance] = ``R_i(θ_b) − R_i(θ_a)`` (both at ``a``, over the
        interval to the next checkpoint; no learning rate enters them). Ctrl-C returns the checkpoints
        measured so far (``attrs["complete"] = 0``).
    """
    check_chunk_size(chunk_size)
    dtype = check_dtype(dtype)
    if device is not None:
        check_device(device)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    if tokenizer is not None:
        check_tokenizer_type(tokenizer)
    if isinstance(reference, str) and reference == "first":
        raise ReplayError("reference='first' is gone: the first checkpoint is a model after one update, not the "
                          "run's starting model. Pass the starting model (a model, its folder or a zoo name), or "
                          "leave reference=None to take checkpoint-0 or the adapters' base model")
    checkpoints, rates = _checkpoints_and_rates(source)
    ou = read_open_unlearning_run(source) if isinstance(source, (str, os.PathLike)) else None
    if base_model is None and ou is not None and ou.model_path and Path(ou.model_path).is_dir():
        base_model = ou.model_path
    loader = _Loader(base_model, dtype, device)
    first = loader.load(checkpoints[0])
    tok = tokenizer if tokenizer is not None else _tokenizer(checkpoints[0])
    if objective is None:
        if ou is None:
            raise ReplayError(f"{source}: not an open-unlearning folder (no .hydra/config.yaml): give objective=")
        try:
            objective, params = ou.objective(model=first), None
        except ValueError as err:  # a method or method_arg we cannot express
            raise ReplayError(f"{ou.config_path}: {err}") from None
    if forget is None or targets is None:
        data = _run_data(ou, source, world)
        forget = data.forget if forget is None else forget
        targets = data.eval_sets if targets is None else targets
        # as many retain samples as forget samples (a balanced batch), not the whole retain split
        retain = spread(data.train_retain, len(forget)) if retain is None else retain
        refusals = data.refusals if refusals is None else refusals
    m = Measurement(first, tok, objective, params, forget=forget, targets=targets, retain=retain or None,
                    refusals=refusals, template=template, verify=verify)
    ref, label = _starting_model(m, reference, checkpoints, loader, ou, source, first)
    m.set_reference(ref, label=label)
    m.release_reference()  # its quantities are cached: the model itself is not kept
    del ref
    del first
    measured: dict[int, xr.Dataset] = {}
    try:
        _measure_backwards(m, loader, checkpoints, measured, per_token=per_token, pg=pg, chunk_size=chunk_size,
                           progress=progress)
    except Exception as err:  # noqa: BLE001 - keep what was measured, then raise
        failure = err if isinstance(err, ReplayError) else ReplayError(f"replay failed: {type(err).__name__}: {err}")
        failure.partial = _dataset(m, checkpoints, measured, source, rates) if measured else None
        raise failure from (None if failure is err else err)
    return _dataset(m, checkpoints, measured, source, rates)


def _run_data(ou: OpenUnlearningRun | None, source, world):
    """The forget samples, retain samples and targets of an open-unlearning run, from its forget split."""
    from .data import load_world, tofu_dir
    from .runs import RunData

    if ou is None or not ou.forget_split:
        raise ReplayError(f"{source}: give forget= and targets= (the folder has no open-unlearning configuration "
                          "naming its forget split)")
    if world is None:
        if not (tofu_dir() / "full.json").exists():
            raise ReplayError(f"{ou.config_path} names the forget split {ou.forget_split!r}, but TOFU's files are "
                              f"not at {tofu_dir()}: pass world= (gl.load_world(folder)) or set GEFFECT_TOFU_DIR")
        world = load_world(tofu_dir())
    if ou.forget_split not in world:
        raise ReplayError(f"{ou.config_path} names the forget split {ou.forget_split!r}, which {world!r} lacks")
    return RunData.build(ou.forget_split, None, None, world, None)


def _tokenizer(ckpt: Checkpoint):
    for folder in (ckpt.path, ckpt.path.parent):
        if (folder / "tokenizer_config.json").exists():
            return _load_tokenizer(folder)
    raise ReplayError(f"{ckpt.path}: no tokenizer saved with the checkpoint (a Trainer saves it only when given "
                      "processing_class=tok): pass tokenizer= (a tokenizer, its folder or a zoo name; in the CLI "
                      "--tokenizer FOLDER)")


def _load_tokenizer(source):
    """A tokenizer from a folder (or a zoo name: the zoo model's own)."""
    from transformers import AutoTokenizer

    from .zoo import ZOO, entry_dir, tokenizer_dir

    folder = Path(source)
    if not folder.is_dir() and str(source) in ZOO:
        folder = entry_dir(str(source)) if (entry_dir(str(source)) / "tokenizer_config.json").exists() \
            else tokenizer_dir(ZOO[str(source)].world)
    if not (folder / "tokenizer_config.json").exists():
        raise ReplayError(f"tokenizer={str(source)!r}: not a folder holding a saved tokenizer (tokenizer_config.json)"
                          " nor a zoo name; give the folder the tokenizer was saved to (tok.save_pretrained)")
    return AutoTokenizer.from_pretrained(folder)


def _starting_model(m: Measurement, reference, checkpoints: list[Checkpoint], loader: _Loader,
                    ou: OpenUnlearningRun | None, source, first):
    """The frozen reference of NPO-like terms: the run's starting model, never guessed.

    Given (a model, a folder, a zoo name); else ``checkpoint-0``; else the base model of adapter checkpoints (an
    adapter trains on a frozen base, which is the starting model of the reference); else an open-unlearning run's
    ``pretrained_model_name_or_path``. An objective that reads no reference needs none. Otherwise: refused."""
    needed = m.objective.reference_needs
    if reference is not None:
        if not isinstance(reference, (str, os.PathLike)):
            return reference, "given"
        return _load_reference(reference, loader), f"given ({reference})"
    if not needed:
        return first, "none read (the objective reads no reference model)"
    if checkpoints[0].step == 0:
        return first, f"the starting model ({checkpoints[0].path.name})"
    if checkpoints[0].is_adapter:
        return loader.base_model_of(checkpoints[0]), "the adapters' base model (an adapter run's starting model)"
    if ou is not None and ou.model_path and Path(ou.model_path).is_dir():
        return _load_reference(ou.model_path, loader), f"the run's pretrained model ({ou.model_path})"
    names = ", ".join(sorted(needed))
    raise ReplayError(
        f"{source}: the objective {m.objective.name!r} reads a frozen reference model ({names}), which must be the "
        f"run's starting model, and the folder has none: its first checkpoint is {checkpoints[0].path.name} (an HF "
        "Trainer never saves the model it starts from). Pass it: reference= (the starting model, its folder or a "
        "zoo name) in Python, --reference FOLDER_OR_ZOO_NAME in the CLI; or, before training, save it as "
        "checkpoint-0 (model.save_pretrained(output_dir + '/checkpoint-0'))")


def _load_reference(source, loader: _Loader):
    """A reference model from a folder (full weights, or an adapter on its base) or a zoo name, in the replay's
    dtype and device."""
    from .zoo import ZOO
    from .zoo import load as zoo_load

    folder = Path(source)
    if folder.is_dir():
        return loader.load(Checkpoint(-1, folder), check_architecture=False)
    if str(source) in ZOO:
        model, _ = zoo_load(str(source), dtype=loader.dtype, device=loader.device)
        return model
    raise ReplayError(f"reference={str(source)!r}: neither a folder nor a zoo name; give the run's starting model "
                      f"(a model, the folder it was saved to, or one of the zoo's names: {', '.join(ZOO)})")


def _measure_backwards(m: Measurement, loader: _Loader, checkpoints: list[Checkpoint],
                       measured: dict[int, xr.Dataset], *, per_token, pg, chunk_size, progress) -> None:
    """Each checkpoint's one-step Dataset into ``measured``, from the last to the first, with the interval effect
    towards the next checkpoint (whose trainable parameters are the one copy kept). Ctrl-C keeps what was
    measured."""
    from tqdm.auto import tqdm

    later: dict[str, torch.Tensor] | None = None
    bar = tqdm(total=len(checkpoints), desc="replay", disable=not progress, unit="checkpoint")
    try:
        for ckpt in reversed(checkpoints):
            model = loader.load(ckpt)
            extra = []
            if later is not None:
                named = dict(model.named_parameters())
                extra = [{id(named[n]): named[n].detach() - v.to(named[n].device) for n, v in later.items()}]
            data = {} if np.isnan(ckpt.learning_rate) else {"learning_rate": ckpt.learning_rate}
            ds = m.measure(model, ckpt.step, data=data, per_token=per_token, pg=pg, chunk_size=chunk_size,
                           extra=extra)
            measured[ckpt.step] = ds.rename({"update_effect": "interval_effect"}) if extra else ds
            later = _named_trainable(model)
            del model
            bar.update()
    except KeyboardInterrupt:
        pass
    finally:
        bar.close()


def _dataset(m: Measurement, checkpoints: list[Checkpoint], measured: dict[int, xr.Dataset], source,
             rates: Rates) -> xr.Dataset:
    table = StepTable(m.axes, m.token_count)
    steps = [c.step for c in checkpoints if c.step in measured]
    for i, step in enumerate(steps):
        after = steps[i + 1] if i + 1 < len(steps) else None
        more = {}
        if after is not None:
            more["interval_risk_change"] = measured[after]["risk"].values[0] - measured[step]["risk"].values[0]
        table.add_dataset(measured[step], **more)
    if not steps:
        raise KeyboardInterrupt("replay interrupted before any checkpoint was measured")
    complete = len(steps) == len(checkpoints)
    origin = json.dumps([str(p) for p in source]) if isinstance(source, (list, tuple)) else str(source)
    attrs = {**measured[steps[0]].attrs, "replayed_from": origin, "checkpoints": len(checkpoints),
             "recorded_by": "replay", "complete": int(complete), "stop_reason": "" if complete else "interrupted",
             "learning_rate_convention": CONVENTION,
             "learning_rate_source": rates.source,
             "interval_convention": "interval_effect and interval_risk_change at step a: from checkpoint a to the "
                                    "next checkpoint b, <grad R_i(theta_a), theta_a - theta_b> and R_i(theta_b) - "
                                    "R_i(theta_a); NaN at the last checkpoint"}
    return table.dataset(attrs)


# ---------------------------------------------------------------------------------------------- open-unlearning
@dataclass(frozen=True)
class OpenUnlearningRun:
    """What an open-unlearning output folder says about its run (its saved Hydra configuration)."""

    config_path: Path
    method: str
    method_args: dict
    forget_split: str | None
    retain_split: str | None
    model_path: str | None

    def objective(self, model=None):
        from .objectives import from_open_unlearning

        return from_open_unlearning(self.method, self.method_args, model=model)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z0-9_.]+)\}")


def _resolve(value, root: dict):
    """Hydra's ``${a.b}`` references to other keys of the same configuration, resolved (others kept as text)."""
    if isinstance(value, dict):
        return {k: _resolve(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, root) for v in value]
    if isinstance(value, str):
        def lookup(match):
            node = root
            for key in match[1].split("."):
                if not isinstance(node, dict) or key not in node:
                    return match[0]
                node = node[key]
            return str(node)

        whole = _INTERPOLATION.fullmatch(value)
        if whole:
            node = root
            for key in whole[1].split("."):
                node = node.get(key) if isinstance(node, dict) else None
            return value if node is None else _resolve(node, root)
        return _INTERPOLATION.sub(lookup, value)
    return value


def read_open_unlearning_run(folder) -> OpenUnlearningRun | None:
    """The run described by an open-unlearning output folder's ``.hydra/config.yaml`` (None when there is none):
    the trainer's ``handler`` and ``method_args``, ``forget_split``/``retain_split``, the model's path."""
    import yaml

    path = Path(folder) / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ReplayError(f"{path}: not valid YAML ({err})") from None
    cfg = _resolve(raw, raw) if isinstance(raw, dict) else None
    trainer = (cfg or {}).get("trainer") or {}
    if not isinstance(trainer, dict) or not trainer.get("handler"):
        raise ReplayError(f"{path}: no trainer.handler, so the unlearning method is unknown")
    model_args = ((cfg.get("model") or {}).get("model_args") or {})
    return OpenUnlearningRun(path, str(trainer["handler"]), dict(trainer.get("method_args") or {}),
                             cfg.get("forget_split"), cfg.get("retain_split"),
                             model_args.get("pretrained_model_name_or_path"))
