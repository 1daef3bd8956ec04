"""``gl.g_effect``: the G-effects of an objective at the model's current parameters, as a Dataset."""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import xarray as xr

from .._batching import check_model, check_tokenizer_type, eval_mode, trainable_parameters
from .._version import __version__
from ..data import World, check_records, encode, example_field, example_id
from ..objectives import ObjectiveError, resolve_objective
from ..results import Axes, effects_dataset
from .core import Effects, ObjectiveGradient, fast_effects, reference_effects, target_risks, term_gradients
from .experts import check_experts_dtype
from .forward import (
    Samples,
    check_fits,
    encode_side,
    hidden_reading,
    reference_quantities,
    refusal_drawer,
    resolve_layers,
)
from .groups import LayerGroups, layer_groups
from .offload import is_offloaded, resident

__all__ = ["g_effect", "Measurement", "prepare_targets", "model_description", "make_axes", "check_chunk_size",
           "resolve_chunk_size"]

ENGINES = ("fast", "reference")
VERIFY = ("first", "always", "never")


def check_verify(verify: str) -> str:
    if verify not in VERIFY:
        raise ValueError(f"verify={verify!r} is not valid; use 'first' (check the fast engine against one plain "
                         "backward on the first measurement, the default), 'always' or 'never'")
    return verify


def model_description(model) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {
        "model_name": str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
        "model_type": str(getattr(cfg, "model_type", type(model).__name__)),
        "model_parameters": int(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())),
        "trainable_parameters": int(sum(p.numel() for p in trainable_parameters(model))),
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def prepare_targets(tokenizer, targets, template=None):
    """Encode the target sets into one batch: ``(batch, ids, split per instance, examples, set slices)``."""
    if targets is None:
        raise ObjectiveError("no targets: give targets={'targeted': forget_examples, 'non_targeted': retain_examples}")
    if isinstance(targets, World):
        raise ObjectiveError("targets is a whole World; give the sets to measure, e.g. {'targeted': "
                             "world['forget05'], 'non_targeted': world['retain_perturbed']}")
    if not isinstance(targets, Mapping):
        targets = {"targeted": check_records(targets, "target set 'targeted'")}
    if not targets:
        raise ObjectiveError("targets={} names no target set; give targets={'targeted': forget_examples, "
                             "'non_targeted': retain_examples}")
    examples, splits, slices = [], [], {}
    for name, items in targets.items():
        items = list(items)
        if not items:
            raise ObjectiveError(f"the target set {name!r} is empty; give at least one instance to measure")
        check_records(items, f"target set {name!r}")
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
             chunk_size: int | str | None = 16, template=None, step: int = 0, verify: str = "first"
             ) -> xr.Dataset:
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
        Also measure per-token G-effects (``g_effect_token``), and per forget sample the paper's PG-effect
        (``pg_effect``) and the sample's share of the forget term's G-effect (``sample_effect``): two passes over
        the forget samples.
    chunk_size:
        Target instances per pass (bounds memory; ``None``: all at once; ``"auto"``: the largest whose
        estimated peak fits 80 % of the device's free memory, see :func:`geffect_lab.estimate_memory`).
    verify:
        ``"first"`` (default) or ``"always"``: hold the fast engine's per-layer totals to one plain batched
        backward (random instance weights, so misattributed instances show too) and raise
        :class:`~geffect_lab.engine.core.EngineCheckError` naming the layer and its module types on a mismatch;
        costs one backward. ``"never"`` skips it.

    Returns
    -------
    xarray.Dataset
        One ``step``, DESIGN.md §4's names: ``g_effect`` [step, instance, layer, term], ``g_effect_token``
        [step, instance, token] (with ``token_text``), ``pg_effect`` [step, sample, against] (the paper's
        PG-effect), ``sample_effect`` [step, sample, against] (each forget sample's share of the forget term's
        G-effect), ``risk`` [step, instance], ``objective_loss`` [step], ``term_loss`` [step, term],
        ``sample_loss`` and ``sample_weight`` [step, sample], ``token_count`` [instance], ``sample_token_count``
        [sample]. Sign convention: ``dR ≈ -lr · g_effect``.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    m = Measurement(model, tokenizer, objective, params, forget=forget, targets=targets, retain=retain,
                    refusals=refusals, template=template, verify=verify)
    m.set_reference(model if reference is None else reference,
                    label="initial model" if reference is None else "given")
    return m.measure(model, step=step, engine=engine, per_token=per_token, pg=pg, chunk_size=chunk_size)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None or chunk_size == "auto":
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; use a whole number >= 1 (target instances per "
                         "pass), None (all at once) or 'auto' (the largest that fits in memory)")


def resolve_chunk_size(model, chunk_size, targets: dict, samples: Sequence[dict], *, per_token: bool, pg: bool,
                       n_terms: int, n_sets: int, verify: bool) -> int | None:
    """``chunk_size`` checked; ``"auto"``: the largest chunk of the ``targets`` batch whose estimated peak memory
    fits 80 % of the model device's free memory (:func:`geffect_lab.memory.auto_chunk_size`)."""
    check_chunk_size(chunk_size)
    if chunk_size != "auto":
        return chunk_size
    from ..memory import auto_chunk_size

    seq_len = int(max(b["attention_mask"].sum(1).max() for b in [targets, *samples]))
    return auto_chunk_size(model, int(targets["input_ids"].shape[0]), seq_len, per_token=per_token, pg=pg,
                           n_terms=n_terms, n_sets=n_sets, n_samples=int(samples[0]["input_ids"].shape[0]),
                           verify=verify)


class Measurement:
    """One G-effect measurement set up once and taken at any parameters: the objective resolved for the model,
    the forget (and retain) samples and the targets encoded, the reference quantities cached on first use.

    The one path every producer takes: :func:`g_effect` takes it once; :class:`geffect_lab.recorder.
    GEffectRecorder` at every step of someone else's training loop; :func:`geffect_lab.unlearn` at every step
    of its own, with the step's batch (:meth:`sides_for`), the gradient it is about to use and the optimiser's
    update as per-step inputs. Every step's Dataset has the same coordinates (``sample``: all forget samples)."""

    def __init__(self, model, tokenizer, objective="ga", params: Mapping[str, Any] | None = None, *,
                 forget: Sequence, targets, retain: Sequence | None = None, refusals: Sequence[str] | None = None,
                 template=None, verify: str = "first"):
        self.verify = check_verify(verify)
        check_model(model)
        check_experts_dtype(model)
        check_tokenizer_type(tokenizer)
        self._verified = False
        obj = resolve_objective(objective, params)
        self.objective = type(obj)(resolve_layers(model, obj.terms))
        self.groups = layer_groups(model)
        self._groups_model = weakref.ref(model)
        self.tokenizer, self.template = tokenizer, template
        roles = {t.spec.role for t in self.objective.terms}
        self.needs_refusals = "alt" in self.objective.forget_term.spec.needs
        if self.needs_refusals and refusals is None:
            from ..data import load_world

            refusals = load_world().refusals
        self.refusals = refusals
        # each encoding of samples is a fetch: "per_fetch" refusals are drawn anew there (the forget term's choice)
        self._draw_refusal = refusal_drawer(self.objective.forget_term, refusals)
        if "retain" in roles and not retain:
            regs = ", ".join(t.name for t in self.objective.terms if t.spec.role == "retain")
            raise ObjectiveError(f"the regulariser(s) {regs} need retain samples: pass retain=[...]")
        self.sides = self._encode(forget, retain if "retain" in roles else None)
        self.sample_ids = list(self.sides["forget"].ids)
        self.batch, self.ids, self.splits, self.examples, self.slices = prepare_targets(tokenizer, targets, template)
        check_fits(model, self.batch, self.ids, "target")
        for role, side in self.sides.items():
            check_fits(model, side.batch, side.ids, role)
            if side.refusal is not None:
                check_fits(model, side.refusal, side.ids, f"{role} (with its refusal answer)")
        self.token_count = (self.batch["labels"][:, 1:] != -100).sum(1).numpy()
        self.axes = make_axes(tokenizer, self.batch, self.ids, self.splits, self.examples, self.groups, self.objective,
                              self.sample_ids, list(self.slices), self.sides["forget"].batch)
        self.reference = None
        self.reference_label = ""

    def _encode(self, forget: Sequence, retain: Sequence | None) -> dict[str, Samples]:
        sides = {"forget": encode_side(self.tokenizer, forget if forget is not None else [],
                                       refusals=self.refusals, need_refusal=self.needs_refusals,
                                       template=self.template, draw=self._draw_refusal)}
        if retain is not None:
            sides["retain"] = encode_side(self.tokenizer, retain, template=self.template, role="retain")
        return sides

    def set_reference(self, reference, label: str = "given", *, precompute: bool = True) -> None:
        """Compute (and cache on the sides) what the objective needs from the frozen ``reference`` model, before
        any engine pass hooks a model. Later measurements read the cache, so ``reference`` may be the very model
        that is then trained: its quantities are those of the moment this was called. ``label`` goes into the
        Dataset's ``reference`` attribute. ``precompute=False``: only per-step samples (:meth:`sides_for`) will
        be measured, and ``reference`` stays frozen; nothing is computed on the measurement's own samples."""
        for side in self.sides.values():
            side.ref.clear()
        self.reference, self.reference_label = reference, label
        if precompute:
            self._reference_quantities(self.sides)

    def release_reference(self) -> None:
        """Drop the reference model once its quantities are cached on the measurement's samples (a replay then
        holds one model at a time); a later need for it (new samples) raises."""
        self.reference = ReleasedReference(self.reference_label)

    def _reference_quantities(self, sides: dict[str, Samples]) -> None:
        with torch.no_grad(), eval_mode(self.reference), resident(self.reference):
            for term in self.objective.terms:
                reference_quantities(self.reference, sides[term.spec.role], term.spec.needs, *hidden_reading(term))

    def sides_for(self, forget: Sequence, retain: Sequence | None = None) -> dict[str, Samples]:
        """One step's samples (a batch of the forget set, and of the retain set when the objective has
        regularisers), encoded like the measurement's own, with the reference's quantities on them."""
        sides = self._encode(forget, retain if "retain" in self.sides else None)
        self._reference_quantities(sides)
        return sides

    def gradient(self, model, sides: dict[str, Samples] | None = None) -> ObjectiveGradient:
        """The objective's gradient (term by term, with its losses) at the model's parameters, on ``sides``
        (default: the measurement's own samples)."""
        with resident(model):
            return term_gradients(model, self.objective, sides or self.sides, self.reference)

    def effects(self, model, *, engine: str = "fast", per_token: bool = True, pg: bool = True,
                chunk_size: int | None = 16, extra=(), sides: dict[str, Samples] | None = None,
                gradient: ObjectiveGradient | None = None) -> Effects:
        """The engine's :class:`~geffect_lab.engine.core.Effects` at the model's current parameters: of the
        objective on ``sides`` (default: the measurement's samples), reusing ``gradient`` when the caller has
        it, with ``extra`` directions (the optimiser's step) contracted in the same pass."""
        if self.reference is None:
            raise RuntimeError("call set_reference(model) first (the reference quantities are taken then)")
        chunk_size = self.chunk_size(model, chunk_size, per_token=per_token, pg=pg)
        if (extra or gradient is not None) and engine != "fast":
            raise ValueError("extra directions and a given gradient are fast-engine features")
        sides = sides or self.sides
        offloaded = is_offloaded(model)
        with resident(model):  # offloaded weights held on the model, as one set of parameters, for the pass
            groups = self._groups_for(model, again=offloaded)
            if engine == "reference":
                return reference_effects(model, groups, self.objective, sides, self.reference, self.batch,
                                         self.ids, self.slices, chunk_size=chunk_size, per_token=per_token, pg=pg)
            verify = self.verify == "always" or (self.verify == "first" and not self._verified)
            out = fast_effects(model, groups, self.objective, sides, self.reference, self.batch, self.ids,
                               self.slices, chunk_size=chunk_size, per_token=per_token, pg=pg, extra=extra,
                               verify=verify, gradient=gradient)
        self._verified = True
        return out

    def _groups_for(self, model, again: bool = False) -> LayerGroups:
        """The layer groups of ``model``'s parameters: those taken at set-up, or taken again for another model
        object (a replay's next checkpoint) or new parameter objects (offload); the layer names must agree."""
        params = trainable_parameters(model)
        # the same model object (a weak reference: ids of a freed model's parameters can be reused by a new one)
        if not again and self._groups_model() is model and all(id(p) in self.groups.of_param for p in params):
            return self.groups
        groups = layer_groups(model)
        if groups.names != self.groups.names:
            raise ValueError(f"the model's layer groups ({', '.join(groups.names)}) are not those this measurement "
                             f"was set up with ({', '.join(self.groups.names)})")
        return groups

    def risks(self, model, chunk_size: int | None = 16):
        """The targets' risks only (no G-effect), without gradients."""
        with resident(model):
            return target_risks(model, self.batch, self.chunk_size(model, chunk_size, per_token=False, pg=False))

    def chunk_size(self, model, chunk_size, *, per_token: bool, pg: bool) -> int | None:
        """``chunk_size`` checked, ``"auto"`` resolved (:func:`resolve_chunk_size`)."""
        return resolve_chunk_size(model, chunk_size, self.batch, [s.batch for s in self.sides.values()],
                                  per_token=per_token, pg=pg, n_terms=len(self.objective.terms),
                                  n_sets=len(self.slices), verify=self.verify == "always" or not self._verified)

    def attrs(self, model, engine: str = "fast") -> dict[str, Any]:
        """The attrs every Dataset of this measurement carries."""
        obj = self.objective
        return {"objective": obj.name, "objective_params": obj.params(), "objective_repr": repr(obj),
                "engine": engine, "package_version": __version__, "reference": self.reference_label,
                **model_description(model)}

    def dataset(self, model, effects: Effects, step: int, data=None, engine: str = "fast",
                samples: Sequence[str] | None = None) -> xr.Dataset:
        """A one-step Dataset from :meth:`effects` (taken on the forget ``samples``, by default all of them),
        with ``data`` (e.g. ``learning_rate``) added.

        Returns
        -------
        xarray.Dataset
            ``g_effect`` [step, instance, layer, term], ``g_effect_token`` [step, instance, token] (when
            measured), ``pg_effect`` and ``sample_effect`` [step, sample, against] (when measured), ``risk``
            [step, instance], ``objective_loss`` [step], ``term_loss`` [step, term], ``sample_loss`` [step, sample],
            and ``data``.
        """
        if samples is not None and list(samples) != self.sample_ids:
            effects = on_sample_axis(effects, samples, self.sample_ids)
        return effects_dataset(effects, self.axes, step=step, attrs=self.attrs(model, engine), data=data)

    def measure(self, model, step: int = 0, engine: str = "fast", data=None, **kwargs) -> xr.Dataset:
        """:meth:`effects` as a one-step Dataset.

        Returns
        -------
        xarray.Dataset
            As :meth:`dataset` (one ``step``): ``g_effect`` [step, instance, layer, term], ``risk``
            [step, instance], ``objective_loss`` [step], …
        """
        sides = kwargs.get("sides")
        samples = sides["forget"].ids if sides is not None else None
        return self.dataset(model, self.effects(model, engine=engine, **kwargs), step, data, engine, samples)


class ReleasedReference:
    """Stands for a reference model whose quantities were cached and which was then let go."""

    def __init__(self, label: str):
        self.label = label

    def __getattr__(self, name):
        raise RuntimeError(f"the reference model ({self.label}) was released after its quantities were cached; "
                           "quantities on new samples need it: set_reference(model) again")


def on_sample_axis(effects: Effects, samples: Sequence[str], sample_ids: Sequence[str]) -> Effects:
    """``effects`` taken on a batch of forget ``samples``, its per-sample values placed on the full
    ``sample_ids`` axis (NaN for the samples not in the batch)."""
    cols = [list(sample_ids).index(s) for s in samples]

    def place(values):
        if values is None:
            return None
        out = np.full((len(sample_ids),) + values.shape[1:], np.nan)
        out[cols] = values
        return out

    return replace(effects, sample_loss=place(effects.sample_loss), pg_effect=place(effects.pg_effect),
                   sample_effect=place(effects.sample_effect), sample_weight=place(effects.sample_weight))


def make_axes(tokenizer, batch, ids, splits, examples, groups, objective, sample_ids, against,
              sample_batch=None) -> Axes:
    """The :class:`~geffect_lab.results.Axes` of a measurement of the targets ``examples`` (encoded: ``batch``),
    with the forget samples' answer token counts when their encoding ``sample_batch`` is given."""
    answer_tokens = [row[row != -100].tolist() for row in batch["labels"][:, 1:]]
    width = max(max(len(a) for a in answer_tokens), 1)
    return Axes(instance_ids=list(ids), splits=list(splits),
                questions=[example_field(e, "question") for e in examples],
                answers=[example_field(e, "answer") for e in examples], layer_names=list(groups.names),
                layer_index=groups.index, term_names=objective.term_names, sample_ids=list(sample_ids),
                against=list(against), token_texts=[[tokenizer.decode([t]) for t in row] for row in answer_tokens],
                token_width=width,
                sample_token_count=None if sample_batch is None else
                (sample_batch["labels"][:, 1:] != -100).sum(1).tolist())
