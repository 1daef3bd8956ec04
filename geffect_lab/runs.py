"""``gl.unlearn``: an unlearning run recorded step by step into one Dataset.

At every recorded step t, *before* the update, the engine measures on the evaluation instances — targeted
(forget) and non-targeted (held-out retain) — the G-effects of the objective per instance × layer × term,
per answer token, and per forget sample (the paper's PG-effect and the sample's share of the forget term's
G-effect), with the very gradient the optimiser is about to use. After the update it records the
``update_effect``: the same inner product with the optimiser's actual step ``-Δθ_t / lr_t``, measured at θ_t
in the same pass (under SGD it equals the G-effect; under Adam it shows what the preconditioner does). A last
step row holds the risks after the final update.

Defaults reproduce the paper's protocol in miniature (see :data:`PAPER_PROTOCOL`).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import xarray as xr

from ._batching import (
    check_model,
    check_number,
    check_tokenizer_type,
    swapped_parameters,
    trainable_parameters,
    update_direction,
)
from .data import encode, example_field, load_world, spread
from .engine.api import Measurement, check_chunk_size, check_verify
from .engine.groups import ModelStructureError
from .engine.offload import is_offloaded
from .objectives import ObjectiveError, resolve_objective
from .results import StepTable, check_output_path, save
from .schema import INSTANCE_METRICS

__all__ = ["unlearn", "RunConfig", "RECORD_ALL", "PAPER_PROTOCOL", "DEFAULTS", "select_eval", "RunStopped",
           "RunError"]

RECORD_ALL = ("g_effect", "g_effect_token", "pg_effect", "sample_effect", "update_effect")
PER_SAMPLE = ("pg_effect", "sample_effect")  # both come from the passes over the forget samples

# The paper's TOFU protocol (Llama-2-7B) beside this package's defaults on the bundled world.
PAPER_PROTOCOL = {
    "model": ("Llama-2-7B fine-tuned on TOFU", "zoo 'target': 0.85 M-parameter Llama trained on the world"),
    "forget": ("forget05: 10 authors, 200 QA", "forget05: 5 authors, 50 QA"),
    "optimizer": ("AdamW", "adamw"),
    "lr": ("1e-5", "3e-4 (a tiny model needs a larger step to move in a few dozen steps)"),
    "batch_size": ("32", "10"),
    "epochs": ("5", "5 (25 steps)"),
    "record_every": ("G-effects every step", "1"),
    "eval": ("the forget set and retain samples", "32 forget + 32 held-out retain instances"),
}
DEFAULTS = {"forget": "forget05", "optimizer": "adamw", "lr": 3e-4, "batch_size": 10, "epochs": 5,
            "weight_decay": 0.0, "warmup": 0, "record_every": 1}


def _check_cadence(record_every, record) -> int | dict[str, int]:
    """``record_every``: one whole number for every recorded variable, or ``{variable: k}`` (others every step)."""
    if not isinstance(record_every, Mapping):
        check_number("record_every", record_every, whole=True)
        return record_every
    unknown = sorted(set(record_every) - set(RECORD_ALL))
    if unknown:
        raise ValueError(f"record_every names {unknown}, which are not per-step variables; use some of "
                         f"{', '.join(RECORD_ALL)}, e.g. {{'g_effect': 1, 'g_effect_token': 5}}")
    for name, k in record_every.items():
        check_number(f"record_every[{name!r}]", k, whole=True)
    # the PG-effect and the sample effect come from the same passes: one cadence for both
    per_sample = {record_every[v] for v in PER_SAMPLE if v in record_every and v in record}
    if len(per_sample) > 1:
        raise ValueError(f"record_every gives pg_effect and sample_effect different cadences {sorted(per_sample)}; "
                         "they come from the same passes: give them one")
    return dict(sorted(record_every.items()))


class RunStopped(RuntimeError):
    """Raised inside the loop to stop a run early (by the callback or a non-finite loss)."""


class RunError(RuntimeError):
    """A run that failed part-way (an exception in a callback, an objective, a metric …). Nothing recorded is
    lost: ``partial`` is the Dataset of every step recorded before the failure (``attrs["complete"] = 0``), also
    written to ``out`` when the run was given one; the original exception is the ``__cause__``."""

    def __init__(self, message: str, partial: xr.Dataset | None):
        super().__init__(message)
        self.partial = partial


def select_eval(forget: Sequence, retain: Sequence, n: int = 32) -> dict[str, list]:
    """Default evaluation instances: up to ``n`` forget instances and ``n`` retain instances, evenly spread,
    the retain ones preferably with perturbed answers (so truth ratios can be taken on them)."""
    with_perturbed = [e for e in retain if example_field(e, "perturbed_answer", ())]
    pool = with_perturbed if len(with_perturbed) >= n else list(retain)
    return {"targeted": spread(forget, n), "non_targeted": spread(pool, n)}


def _key(e) -> tuple[str, str]:
    return example_field(e, "question"), example_field(e, "answer")


class _Stream:
    """An endless stream of batches: each epoch a fresh seeded permutation, every batch full-sized."""

    def __init__(self, items: Sequence, batch_size: int, seed: int):
        self.items = list(items)
        self.batch_size = min(batch_size, len(self.items))
        self.gen = torch.Generator().manual_seed(seed)
        self.queue: list[int] = []

    def next(self) -> list:
        batch: list[int] = []
        deferred: list[int] = []  # at an epoch boundary, an item already in this batch waits for the next
        while len(batch) < self.batch_size:
            if not self.queue:
                self.queue = torch.randperm(len(self.items), generator=self.gen).tolist()
            i = self.queue.pop(0)
            (deferred if i in batch else batch).append(i)
        self.queue = deferred + self.queue
        return [self.items[i] for i in batch]


OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def _retain_reference(retain_model, retain_reference, world, forget, tokenizer):
    """The reference for forget quality: given, or the zoo's retain model for a bundled-world split."""
    from .metrics import RetainReference

    if retain_reference is not None:
        return RetainReference(retain_reference)
    if isinstance(retain_model, str) and retain_model == "auto":
        if not (isinstance(forget, str) and world is not None and world.name == "bundled"):
            return None
        from . import zoo

        model, tok = zoo.load(f"retain_{forget}")
        if tok.get_vocab() != tokenizer.get_vocab():
            return None  # another model family: no automatic reference
        return RetainReference((model, tok))
    if retain_model is None:
        return None
    return retain_model if isinstance(retain_model, RetainReference) else RetainReference(retain_model)


class _Evaluator:
    """TOFU's metrics on a run's evaluation instances, forget quality and model utility, at one θ."""

    def __init__(self, tokenizer, eval_sets, forget_examples, reference, general, template, max_new_tokens):
        self.tokenizer = tokenizer
        self.eval_sets = eval_sets
        self.fq_examples = [e for e in forget_examples if example_field(e, "perturbed_answer", ())]
        self.reference = reference
        self.general = general
        self.template = template
        self.max_new_tokens = max_new_tokens
        self.matched = 0  # forget questions the reference has a truth ratio for (a log may hold a subset)

    def __call__(self, model) -> dict:
        with warnings.catch_warnings():  # an unlearned model babbles: cut generations are expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._measure(model)

    def _measure(self, model) -> dict:
        from .metrics import (
            forget_quality,
            instance_metrics,
            log10_forget_quality,
            model_utility,
            truth_ratio,
            utility_values,
        )

        per_set = {name: instance_metrics(model, self.tokenizer, items, forget=name == "targeted",
                                          max_new_tokens=self.max_new_tokens, template=self.template,
                                          split_name=name)
                   for name, items in self.eval_sets.items()}
        out = {name: np.concatenate([np.asarray(m[name], dtype=object if name == "generated_text" else None)
                                     for m in per_set.values()])
               for name in INSTANCE_METRICS}
        fq = np.nan
        if self.reference is not None and self.fq_examples:
            rows, theirs = self.reference.pair(self.fq_examples, self.tokenizer)
            ours = truth_ratio(model, self.tokenizer, [self.fq_examples[i] for i in rows], template=self.template,
                               split_name="forget")
            fq, self.matched = forget_quality(ours, theirs), len(rows)
        out["forget_quality"] = fq
        out["log10_forget_quality"] = log10_forget_quality(fq)
        utility_sets = {k: v for k, v in per_set.items() if k != "targeted"}
        utility_sets.update({name: instance_metrics(model, self.tokenizer, items, forget=False, general=True,
                                                    max_new_tokens=self.max_new_tokens, template=self.template,
                                                    split_name=name)
                             for name, items in self.general.items()})
        out["model_utility"] = model_utility(utility_values(utility_sets))
        return out


class _Attributor:
    """Captum attributions of the evaluation instances' answers (tokens and layers), at one θ."""

    def __init__(self, tokenizer, examples, methods, n_steps, template):
        self.tokenizer, self.examples, self.methods = tokenizer, list(examples), list(methods)
        self.n_steps, self.template = n_steps, template

    def __call__(self, model) -> dict:
        from . import attribution

        tok = attribution.tokens(model, self.tokenizer, self.examples, methods=self.methods, n_steps=self.n_steps,
                                 template=self.template)
        layers = attribution.layers(model, self.tokenizer, self.examples, template=self.template)
        return {"token_attribution": tok.sel({"method": self.methods}).values, "layer_attribution": layers.values,
                "attribution_delta": tok["convergence_delta"].values}

    def prompt_texts(self) -> list[list[str]]:
        from .attribution import prompt_positions

        batch = encode(self.tokenizer, self.examples, self.template)
        prompt = prompt_positions(batch, self.tokenizer)
        return [[self.tokenizer.decode([t]) for t in batch["input_ids"][i][prompt[i]].tolist()]
                for i in range(len(self.examples))]


# ---------------------------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class RunConfig:
    """Everything that defines an unlearning run besides the model and the data, checked on creation and
    stored as JSON in the run's ``config`` attribute. ``RunConfig.from_dataset(run).unlearn(model, tok)``
    re-creates the run (pass ``forget=``/``eval=`` … again when the run was given its own examples:
    ``forget == "custom"``). Field meanings: :func:`unlearn`'s parameters of the same names."""

    objective: str = "npo"
    params: Mapping[str, Any] = field(default_factory=dict)
    forget: str = DEFAULTS["forget"]
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = DEFAULTS["batch_size"]
    lr: float = DEFAULTS["lr"]
    optimizer: str = DEFAULTS["optimizer"]
    weight_decay: float = DEFAULTS["weight_decay"]
    warmup: int = DEFAULTS["warmup"]
    seed: int = 0
    record_every: int | dict[str, int] = DEFAULTS["record_every"]
    record: tuple[str, ...] = RECORD_ALL
    chunk_size: int | str | None = 32
    eval_every: int | None = None
    max_new_tokens: int | None = None
    attribute_at: tuple[int, ...] = ()
    attribute_methods: tuple[str, ...] = ("integrated_gradients", "feature_ablation")
    attribute_n_steps: int = 32
    verify: str = "first"

    def __post_init__(self):
        for name in ("record", "attribute_at", "attribute_methods"):
            object.__setattr__(self, name, tuple(getattr(self, name) or ()))
        object.__setattr__(self, "params", dict(self.params or {}))
        unknown = set(self.record) - set(RECORD_ALL)
        if unknown:
            raise ValueError(f"cannot record {sorted(unknown)}; choose from {', '.join(RECORD_ALL)}")
        if str(self.optimizer).lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use 'sgd', 'adam' or 'adamw'")
        object.__setattr__(self, "record_every", _check_cadence(self.record_every, self.record))
        for name in ("batch_size", "attribute_n_steps"):
            check_number(name, getattr(self, name), whole=True)
        for name in ("steps", "eval_every", "max_new_tokens"):
            check_number(name, getattr(self, name), whole=True, optional=True)
        check_number("epochs", self.epochs, optional=True)
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"steps={self.steps} and epochs={self.epochs} both set the run's length; give one of them")
        check_number("lr", self.lr)
        check_number("weight_decay", self.weight_decay, zero=True)
        check_number("warmup", self.warmup, whole=True, zero=True)
        check_number("seed", self.seed, whole=True, zero=True)
        check_chunk_size(self.chunk_size)
        check_verify(self.verify)
        from .attribution import TOKEN_METHODS

        bad = set(self.attribute_methods) - set(TOKEN_METHODS)
        if bad:
            raise ValueError(f"attribute_methods: unknown {sorted(bad)}; use {', '.join(TOKEN_METHODS)}")

    def every(self, variable: str) -> int:
        """Record ``variable`` at steps ``0, k, 2k, …``: this ``k``."""
        cadence = self.record_every
        return cadence.get(variable, 1) if isinstance(cadence, dict) else cadence

    def due(self, t: int) -> set[str]:
        """The per-step variables recorded at step ``t``."""
        return {v for v in self.record if t % self.every(v) == 0}

    def n_steps(self, n_forget: int) -> int:
        """The run's length: ``steps``, or ``epochs`` passes over ``n_forget`` samples in full batches."""
        if self.steps is not None:
            return self.steps
        epochs = self.epochs if self.epochs is not None else DEFAULTS["epochs"]
        return max(1, math.ceil(epochs * n_forget / min(self.batch_size, n_forget)))

    def checked_length(self, n_forget: int) -> int:
        """:meth:`n_steps`, with ``attribute_at`` checked against it (the one check that needs the data)."""
        n = self.n_steps(n_forget)
        if any(int(t) < 0 or int(t) > n for t in self.attribute_at):
            raise ValueError(f"attribute_at={list(self.attribute_at)} must name steps between 0 and {n} (the "
                             "number of steps: after the last update)")
        return n

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        return cls(**json.loads(text))

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> RunConfig:
        """The configuration a run Dataset (or a file of one, loaded) was made with."""
        if "config" not in ds.attrs:
            raise ValueError("this Dataset has no run configuration (it was not made by gl.unlearn)")
        return cls.from_json(ds.attrs["config"])

    def unlearn(self, model, tokenizer, **data) -> xr.Dataset:
        """Run this configuration (``data``: the examples, world, reference and other non-config arguments).

        Returns
        -------
        xarray.Dataset
            As :func:`unlearn`: ``g_effect`` [step, instance, layer, term], ``risk`` [step, instance], …
        """
        options = asdict(self)
        if options["forget"] == "custom":
            options.pop("forget")
            if "forget" not in data:
                raise ValueError("this run was given its own forget examples: pass them again as forget=[...]")
        return unlearn(model, tokenizer, **{**options, **data})


# ---------------------------------------------------------------------------------------------- data
@dataclass
class RunData:
    """The examples of a run: what it forgets, what its regularisers train on, what it evaluates."""

    split: str                      # the forget split's name, or "custom"
    forget: list
    train_retain: list              # the retain examples minus the evaluation instances
    eval_sets: dict[str, list]
    refusals: Sequence[str] | None
    world: Any

    @classmethod
    def build(cls, forget, retain, eval_sets, world, refusals) -> RunData:
        split = forget if isinstance(forget, str) else "custom"
        if isinstance(forget, str):
            world = world if world is not None else load_world()
            forget_examples = list(world.forget(forget))
            retain = list(world.retain(forget)) if retain is None else list(retain)
            refusals = refusals if refusals is not None else world.refusals
        else:
            forget_examples = list(forget)
            retain = list(retain) if retain is not None else []
        if not forget_examples:
            raise ObjectiveError("the forget set is empty; give the examples to unlearn")
        eval_sets = {k: list(v) for k, v in eval_sets.items()} if eval_sets is not None else \
            select_eval(forget_examples, retain)
        for name, items in eval_sets.items():
            if not items:
                raise ObjectiveError(f"the evaluation set {name!r} is empty; give at least one instance, or eval=None")
        held_out = {_key(e) for items in eval_sets.values() for e in items}
        train_retain = [e for e in retain if _key(e) not in held_out]
        return cls(split, forget_examples, train_retain, eval_sets, refusals, world)

    def sizes(self) -> dict[str, Any]:
        return {"n_forget": len(self.forget), "n_retain_train": len(self.train_retain),
                "eval": {k: len(v) for k, v in self.eval_sets.items()}}


# ---------------------------------------------------------------------------------------------- the run
class _Run:
    """One unlearning run: a :class:`~geffect_lab.engine.api.Measurement` on the evaluation instances, an
    optimiser on the trainable parameters, and the steps recorded so far in a :class:`StepTable`."""

    def __init__(self, config: RunConfig, model, tokenizer, data: RunData, *, inplace: bool, reference,
                 template, retain_model, retain_reference):
        self.config, self.data = config, data
        if is_offloaded(model):
            raise ModelStructureError(
                f"{type(model).__name__} is offloaded by accelerate (its weights are swapped in at each call and "
                "dropped after): an update to them would not persist. unlearn trains the model, so load it in one "
                "piece (or with a device_map over devices that hold the weights); gl.g_effect measures an "
                "offloaded model")
        self.work = model if inplace else copy.deepcopy(model)
        needs_retain = any(t.spec.role == "retain" for t in resolve_objective(config.objective, config.params).terms)
        if needs_retain and not data.train_retain:
            raise ObjectiveError(f"the regularisers of {config.objective} need retain samples (after holding out the "
                                 "evaluation instances none are left): pass retain=[...]")
        self.m = Measurement(self.work, tokenizer, config.objective, config.params, forget=data.forget,
                             targets=data.eval_sets, retain=data.train_retain if needs_retain else None,
                             refusals=data.refusals, template=template, verify=config.verify)
        needs_ref = bool(self.m.objective.reference_needs)
        if reference is None and needs_ref:
            reference = copy.deepcopy(model) if inplace else model  # the caller's untouched model is the reference
        # the reference's quantities are taken on each step's batch (sides_for), not on the whole sets
        self.m.set_reference(reference if reference is not None else self.work,
                             "initial model" if needs_ref else "none", precompute=False)
        self.params = trainable_parameters(self.work)
        if not self.params:
            raise ObjectiveError("no parameter of the model requires grad: nothing to unlearn. Make the ones to "
                                 "unlearn trainable (p.requires_grad_(True); for a PEFT model, its adapter)")
        self.opt = OPTIMIZERS[config.optimizer.lower()](self.params, lr=config.lr, weight_decay=config.weight_decay)
        self._schedule(config, len(data.forget))
        self.forget_stream = _Stream(data.forget, config.batch_size, config.seed)
        self.retain_stream = _Stream(data.train_retain, config.batch_size, config.seed + 1) if needs_retain else None
        self.chunk_size = self.m.chunk_size(self.work, config.chunk_size, per_token="g_effect_token" in config.record,
                                            pg=bool(set(PER_SAMPLE) & set(config.record)))
        self._observers(tokenizer, template, retain_model, retain_reference)
        self.table = StepTable(self.m.axes, self.m.token_count)
        self.attrs = self._attrs(model)
        self.updates = 0

    def _schedule(self, config: RunConfig, n_forget: int) -> None:
        self.n_steps = config.checked_length(n_forget)
        self.record_set = {t for t in range(self.n_steps) if config.due(t)} if config.record else \
            set(range(0, self.n_steps, min(config.every(v) for v in RECORD_ALL)))
        self.eval_set = set(range(0, self.n_steps, config.eval_every)) if config.eval_every else set()
        self.attr_set = {int(t) for t in config.attribute_at}
        self.measuring = bool(set(config.record) & set(RECORD_ALL))

    def _observers(self, tokenizer, template, retain_model, retain_reference) -> None:
        """TOFU's metrics and Captum's attributions, when the run takes them."""
        config, data = self.config, self.data
        self.attributor = None
        if self.attr_set:
            self.attributor = _Attributor(tokenizer, self.m.examples, config.attribute_methods,
                                          config.attribute_n_steps, template)
            self.m.axes.prompt_token_texts = self.attributor.prompt_texts()
            self.m.axes.methods = list(config.attribute_methods)
        self.evaluator = None
        if config.eval_every:
            general = {name: list(data.world[name]) for name in ("real_authors", "world_facts")
                       if data.world is not None and name in data.world}
            reference = _retain_reference(retain_model, retain_reference, data.world, data.split, tokenizer)
            self.evaluator = _Evaluator(tokenizer, data.eval_sets, data.forget, reference, general, template,
                                        config.max_new_tokens)

    def _attrs(self, model) -> dict[str, Any]:
        c = self.config
        return {**self.m.attrs(model), "optimizer": c.optimizer, "learning_rate": c.lr,
                "weight_decay": c.weight_decay, "warmup": c.warmup, "batch_size": c.batch_size,
                "steps": self.n_steps, "seed": c.seed, "forget_split": self.data.split,
                "record_every": c.record_every if isinstance(c.record_every, int) else json.dumps(c.record_every),
                "config": c.to_json(), "data": self.data.sizes(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": 0}

    def lr_at(self, t: int) -> float:
        warmup = self.config.warmup
        return self.config.lr * min(1.0, (t + 1) / warmup) if warmup else self.config.lr

    def observe(self, t: int) -> dict[str, Any]:
        """Metrics and attributions at θ_t, when step t takes them."""
        out: dict[str, Any] = {}
        if self.evaluator is not None and t in self.eval_set:
            out.update(self.evaluator(self.work))
            self.attrs["forget_quality_instances"] = self.evaluator.matched
        if self.attributor is not None and t in self.attr_set:
            out.update(self.attributor(self.work))
        return out

    def step(self, t: int) -> xr.Dataset | None:
        """Step t: the batch's gradient, the update, and (when the step has a row) its measurements at θ_t."""
        observed = self.observe(t)  # before anything of this step touches the model
        sides = self.m.sides_for(self.forget_stream.next(),
                                 self.retain_stream.next() if self.retain_stream is not None else None)
        try:
            gradient = self.m.gradient(self.work, sides)
        except ObjectiveError as err:
            raise RunStopped(f"step {t}: {err}") from err
        if not np.isfinite(gradient.term_loss).all():
            bad = [n for n, v in zip(self.m.objective.term_names, gradient.term_loss) if not np.isfinite(v)]
            raise RunStopped(f"step {t}: the loss of term {', '.join(bad)} is not finite")
        rate = self.lr_at(t)
        for group in self.opt.param_groups:
            group["lr"] = rate
        total = gradient.total()
        for p in self.params:
            p.grad = total.get(id(p), torch.zeros_like(p)).clone()
        if not (t in self.record_set or observed):
            self._update()
            return None
        ds = self._measured(t, sides, gradient, rate)
        self.table.add_dataset(ds, **observed)
        return ds

    def _measured(self, t: int, sides, gradient, rate) -> xr.Dataset:
        """Step t's Dataset at θ_t; the update is taken on the way (before measuring, when its effect is wanted:
        the measurement then runs at the kept θ_t with the step's direction ``(θ_t − θ_{t+1}) / lr``)."""
        record, m = self.config.due(t), self.m
        lr = {"learning_rate": rate}
        if not (record and self.measuring):
            effects = _losses_only(gradient, m.risks(self.work, self.chunk_size), m.token_count)
            ds = m.dataset(self.work, effects, t, lr, samples=sides["forget"].ids)
            self._update()
            return ds
        kwargs = dict(per_token="g_effect_token" in record, pg=bool(set(PER_SAMPLE) & record),
                      chunk_size=self.chunk_size, sides=sides, gradient=gradient)
        if "update_effect" not in record:
            ds = m.measure(self.work, t, data=lr, **kwargs)
            self._update()
        else:
            before = [p.detach().clone() for p in self.params]
            self._update()
            direction = update_direction(self.params, before, rate)  # (θ_t − θ_{t+1}) / lr, before the swap
            with swapped_parameters(self.params, before):
                ds = m.measure(self.work, t, data=lr, extra=[direction], **kwargs)
        return ds.drop_vars([v for v in RECORD_ALL if v in ds and v not in record])

    def _update(self) -> None:
        self.opt.step()
        self.updates += 1
        self.opt.zero_grad(set_to_none=True)

    def snapshot(self) -> xr.Dataset:
        return self.table.dataset(self.attrs)

    def finish(self, stop_reason: str) -> xr.Dataset:
        """The row after the last update (risks, and the metrics and attributions the run tracks), and the
        whole run as one Dataset."""
        final = {"risk": self.m.risks(self.work, self.chunk_size)}
        if self.evaluator is not None:
            final.update(self.evaluator(self.work))
        if self.attributor is not None and self.updates in self.attr_set:
            final.update(self.attributor(self.work))
        self.table.add(self.updates, final)
        self.attrs.update(complete=int(not stop_reason), stop_reason=stop_reason)
        return self.snapshot()


def _losses_only(gradient, risks, token_count):
    """The engine's result for a step measured without G-effects: its risks and the gradient's losses."""
    from .engine.core import Effects

    return Effects(None, None, risks, token_count, None, gradient.term_loss, gradient.sample_loss,
                   sample_weight=gradient.sample_weight)


def _execute(run: _Run, *, callback, out_path, save_every, progress) -> xr.Dataset:
    """Step the run to its end (or its stop), saving and calling back as asked; every recorded step is kept,
    whatever happens: a failure raises :class:`RunError` carrying them."""
    from tqdm.auto import tqdm

    bar = tqdm(total=run.n_steps, desc=f"unlearn {run.m.objective.name}", disable=not progress, unit="step")
    stop_reason, t = "", 0
    try:
        for t in range(run.n_steps):
            ds = run.step(t)
            bar.update()
            if ds is None:
                continue
            e_u, e_r = _headline(ds)
            bar.set_postfix(loss=f"{float(ds['objective_loss'][0]):.4g}", e_u=f"{e_u:.3g}", e_r=f"{e_r:.3g}",
                            refresh=False)
            if save_every and len(run.table) % save_every == 0:
                save(run.snapshot(), out_path)
            if callback is not None and _stops(callback(t, read_only(run.snapshot()))):
                stop_reason = f"stopped by the callback after step {t}"
                break
    except KeyboardInterrupt:
        stop_reason = f"interrupted at step {t}"
    except RunStopped as err:
        if not len(run.table):
            raise ObjectiveError(str(err)) from None
        stop_reason = str(err)
        warnings.warn(f"unlearning run stopped: {err}; the {len(run.table)} recorded step(s) are returned",
                      RuntimeWarning, stacklevel=3)
    except Exception as err:  # noqa: BLE001 - any failure: keep what was recorded, then re-raise
        raise _failed(run, t, err, out_path) from err
    finally:
        bar.close()
    ds = run.finish(stop_reason)
    if out_path is not None:
        save(ds, out_path)
    return ds


def _stops(answer) -> bool:
    return answer is False or answer == "stop"


def _failed(run: _Run, t: int, err: Exception, out_path) -> RunError:
    """The error for a run that failed at step t, with every step recorded before it (saved to ``out_path``)."""
    run.attrs.update(complete=0, stop_reason=f"failed at step {t}: {type(err).__name__}: {err}")
    partial = run.snapshot() if len(run.table) else None
    where = ""
    if partial is not None and out_path is not None:
        save(partial, out_path)
        where = f", and written to {out_path}"
    kept = f"the {len(run.table)} recorded step(s) are in this error's .partial{where}" if partial is not None \
        else "no step had been recorded"
    return RunError(f"unlearning run failed at step {t}: {type(err).__name__}: {err} ({kept})", partial)


def read_only(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every array marked read-only: what a callback receives (an edit raises instead of reaching
    the run)."""
    for var in ds.variables.values():
        var.values.flags.writeable = False
    return ds


def _headline(ds: xr.Dataset) -> tuple[float, float]:
    """Mean G-effect of the step's targeted and non-targeted instances (NaN when not recorded)."""
    out = []
    for split in ("targeted", "non_targeted"):
        try:
            out.append(float(ds.geffect.split_mean(split)[0]))
        except KeyError:  # nothing recorded, or no instance of that split
            out.append(float("nan"))
    return out[0], out[1]


def unlearn(model, tokenizer, objective="npo", params: Mapping[str, Any] | None = None, *,
            forget: str | Sequence = DEFAULTS["forget"], retain: Sequence | None = None,
            eval: Mapping[str, Sequence] | None = None, world=None, steps: int | None = None,  # noqa: A002
            epochs: float | None = None, batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
            optimizer: str = DEFAULTS["optimizer"], weight_decay: float = DEFAULTS["weight_decay"],
            warmup: int = DEFAULTS["warmup"], seed: int = 0,
            record_every: int | Mapping[str, int] = DEFAULTS["record_every"],
            record: Sequence[str] = RECORD_ALL, callback: Callable[[int, xr.Dataset], Any] | None = None,
            inplace: bool = False, reference=None, refusals: Sequence[str] | None = None,
            chunk_size: int | None = 32, save_every: int | None = None, out: str | os.PathLike | None = None,
            progress: bool = True, template=None, eval_every: int | None = None, retain_model="auto",
            retain_reference=None, max_new_tokens: int | None = None, attribute_at: Sequence[int] | None = None,
            attribute_methods: Sequence[str] = ("integrated_gradients", "feature_ablation"),
            attribute_n_steps: int = 32, verify: str = "first") -> xr.Dataset:
    """Run an unlearning objective and record its G-effects step by step (every option is checked before any
    work; the options that define the run are kept as a :class:`RunConfig` in ``attrs["config"]``).

    Parameters
    ----------
    objective, params:
        As in :func:`geffect_lab.g_effect` (``"npo"``, ``"npo+gd"``, ``{"beta": 0.1}``, or objects).
    forget, retain:
        A forget split name of ``world`` (default the bundled world; ``retain`` then defaults to the matching
        retain split), or lists of examples. Regularisers train on ``retain`` minus the evaluation instances.
    eval:
        ``{"targeted": [...], "non_targeted": [...]}``; ``None`` picks up to 32 of each, deterministically
        (:func:`select_eval`), the non-targeted ones held out of training.
    steps, epochs:
        Length of the run (``epochs`` counts passes over the forget set; default 5 epochs).
    batch_size, lr, optimizer, weight_decay, warmup, seed:
        The optimisation (``"sgd"``, ``"adam"``, ``"adamw"``; linear warm-up over ``warmup`` steps, then a
        constant rate; batches from seeded permutations).
    record_every, record:
        Measure every k-th step, or each variable at its own cadence (``{"g_effect": 1, "g_effect_token": 5}``:
        the costly per-token G-effects every 5th step, the layer G-effects every step; variables not named are
        recorded every step); which per-step variables (default all of :data:`RECORD_ALL`). A variable is NaN
        at the steps it was not recorded at (``attrs["record_every"]`` says which cadence). ``risk``,
        ``objective_loss`` and ``learning_rate`` are always recorded.
    callback:
        ``callback(step, partial_dataset)`` after each recorded step; returning ``False`` or ``"stop"`` stops
        the run (the Dataset returned so far has ``attrs["complete"] = 0``), as does KeyboardInterrupt.
    inplace:
        Train the caller's model itself; by default a copy is trained and the caller's model is untouched.
    reference:
        The frozen reference for NPO-like terms: ``None`` is the model at step 0.
    chunk_size, save_every, out:
        Evaluation instances per pass (``"auto"``: the largest that fits in memory); write the partial Dataset
        to ``out`` every ``save_every`` recorded steps (atomically) and the whole one at the end.
    eval_every, retain_model, retain_reference, max_new_tokens:
        Every ``eval_every`` steps (and after the last update) record TOFU's metrics (:mod:`geffect_lab.metrics`)
        at θ_t: per evaluation instance ``probability``, ``truth_ratio``, ``truth_ratio_score``, ``rouge_l``,
        ``exact_memorization``, ``extraction_strength``, ``generated_text`` [step, instance], and
        ``forget_quality`` (over the whole forget set, against ``retain_model`` or a TOFU
        ``retain_reference`` log; ``"auto"`` takes the zoo's matching retain model on the bundled world),
        ``log10_forget_quality`` and ``model_utility`` (non-targeted instances and the world's general
        sets) [step].
    attribute_at, attribute_methods, attribute_n_steps:
        At these steps (before their update; the number of steps itself means after the last update) store
        Captum attributions of every evaluation instance's answer (:mod:`geffect_lab.attribution`):
        ``token_attribution`` [step, instance, prompt_token, method] with ``prompt_token_text``,
        ``layer_attribution`` [step, instance, layer] (the G-effect's layer names) and ``attribution_delta``.

    Returns
    -------
    xarray.Dataset
        The recorded steps (``step`` = the step before whose update each measurement is taken): ``g_effect``
        [step, instance, layer, term], ``g_effect_token`` [step, instance, token], ``pg_effect`` and
        ``sample_effect`` [step, sample, against], ``update_effect`` [step, instance, layer] (those named in
        ``record``);
        ``risk`` [step, instance], ``objective_loss`` [step], ``term_loss`` [step, term], ``sample_loss`` and
        ``sample_weight`` [step, sample], ``learning_rate`` [step], ``token_count`` [instance]; the metrics and
        attributions above when asked for. ``attrs["config"]`` is the run's :class:`RunConfig` as JSON.
    """
    obj = resolve_objective(objective, params)
    config = RunConfig(objective=obj.name, params=obj.params(), forget=forget if isinstance(forget, str) else "custom",
                       steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                       weight_decay=weight_decay, warmup=warmup, seed=seed, record_every=record_every,
                       record=tuple(record), chunk_size=chunk_size, eval_every=eval_every,
                       max_new_tokens=max_new_tokens, attribute_at=tuple(attribute_at or ()),
                       attribute_methods=tuple(attribute_methods), attribute_n_steps=attribute_n_steps, verify=verify)
    check_model(model)
    check_tokenizer_type(tokenizer)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback={callback!r} is not callable; give a function callback(step, partial_dataset)")
    if eval is not None and not isinstance(eval, Mapping):
        raise TypeError(f"eval must map set names to examples, e.g. {{'targeted': world['forget05'], "
                        f"'non_targeted': world['retain_perturbed']}}; got {type(eval).__name__}")
    if save_every is not None:
        check_number("save_every", save_every, whole=True)
        if out is None:
            raise ValueError("save_every needs out= (the file to write the partial results to)")
    out_path = check_output_path(out) if out is not None else None
    data = RunData.build(forget, retain, eval, world, refusals)
    run = _Run(config, model, tokenizer, data, inplace=inplace, reference=reference, template=template,
               retain_model=retain_model, retain_reference=retain_reference)
    return _execute(run, callback=callback, out_path=out_path, save_every=save_every, progress=progress)

