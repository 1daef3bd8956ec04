"""``gl.unlearn``: an unlearning run recorded step by step into one Dataset.

At every recorded step t, *before* the update, the engine measures on the evaluation instances — targeted
(forget) and non-targeted (held-out retain) — the G-effects of the objective per instance × layer × term,
per answer token, and per objective sample (the PG-effect), with the very gradient the optimiser is about to
use. After the update it records the ``update_effect``: the same inner product with the optimiser's actual
step ``-Δθ_t / lr_t``, measured at θ_t in the same pass (under SGD it equals the G-effect; under Adam it
shows what the preconditioner does). A last step row holds the risks after the final update.

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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from . import __version__
from ._batching import eval_mode, swapped_parameters, trainable_parameters, update_direction
from .data import encode, example_field, example_id, load_world, spread
from .engine.api import (
    check_chunk_size,
    check_verify,
    make_axes,
    model_description,
    prepare_targets,
    resolve_chunk_size,
)
from .engine.core import fast_effects, term_gradients
from .engine.forward import check_fits, encode_side, reference_quantities, resolve_layers, risk_and_tokens
from .engine.groups import ModelStructureError, layer_groups
from .engine.offload import is_offloaded
from .objectives import Objective, ObjectiveError, resolve_objective
from .results import DIMS, make_dataset, save

__all__ = ["unlearn", "RECORD_ALL", "PAPER_PROTOCOL", "DEFAULTS", "select_eval", "RunStopped"]

RECORD_ALL = ("g_effect", "g_effect_token", "pg_effect", "update_effect")

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


class RunStopped(RuntimeError):
    """Raised inside the loop to stop a run early (by the callback or a non-finite loss)."""


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


def _optimizer(name: str, params, lr: float, weight_decay: float):
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd', 'adam' or 'adamw'")


def _check_writable(out) -> Path:
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OSError(f"cannot write results to {path}: {err.strerror or err}. Choose another path "
                      "(nothing was trained).") from None
    if path.exists() and path.is_dir():
        raise OSError(f"cannot write results to {path}: it is a folder; give a file name such as run.nc")
    return path


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

    def __call__(self, model) -> dict:
        with warnings.catch_warnings():  # an unlearned model babbles: cut generations are expected here
            warnings.simplefilter("ignore", RuntimeWarning)
            return self._measure(model)

    def _measure(self, model) -> dict:
        from .metrics import forget_quality, instance_metrics, model_utility, truth_ratio, utility_values

        per_set = {name: instance_metrics(model, self.tokenizer, items, forget=name == "targeted",
                                          max_new_tokens=self.max_new_tokens, template=self.template,
                                          split_name=name)
                   for name, items in self.eval_sets.items()}
        out = {name: np.concatenate([np.asarray(m[name], dtype=object if name == "generated_text" else None)
                                     for m in per_set.values()])
               for name in ("probability", "truth_ratio", "truth_ratio_score", "rouge_l", "exact_memorization",
                            "extraction_strength", "generated_text")}
        fq = np.nan
        if self.reference is not None and self.fq_examples:
            ours = truth_ratio(model, self.tokenizer, self.fq_examples, template=self.template, split_name="forget")
            fq = forget_quality(ours, self.reference.truth_ratios(self.fq_examples, self.tokenizer))
        out["forget_quality"] = fq
        out["log10_forget_quality"] = np.log10(fq) if fq > 0 else (-np.inf if fq == 0 else np.nan)
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
        from .attribution import _prompt_positions

        batch = encode(self.tokenizer, self.examples, self.template)
        prompt = _prompt_positions(batch, self.tokenizer)
        return [[self.tokenizer.decode([t]) for t in batch["input_ids"][i][prompt[i]].tolist()]
                for i in range(len(self.examples))]


class _Recorder:
    """Per-step arrays, preallocated, turned into a Dataset on demand (for callbacks and at the end)."""

    def __init__(self, n_rows: int, n_inst: int, n_layers: int, n_terms: int, width: int, n_samples: int,
                 n_against: int, record: set[str], weights: bool, metrics: bool = False,
                 attribution: tuple[int, int] | None = None):
        nan = np.nan

        def full(*shape):
            return np.full(shape, nan)

        self.steps: list[int] = []
        self.data: dict[str, np.ndarray] = {
            "risk": full(n_rows, n_inst), "objective_loss": full(n_rows), "term_loss": full(n_rows, n_terms),
            "sample_loss": full(n_rows, n_samples), "learning_rate": full(n_rows)}
        if "g_effect" in record:
            self.data["g_effect"] = full(n_rows, n_inst, n_layers, n_terms)
        if "g_effect_token" in record:
            self.data["g_effect_token"] = full(n_rows, n_inst, width)
        if "pg_effect" in record:
            self.data["pg_effect"] = full(n_rows, n_samples, n_against)
        if "update_effect" in record:
            self.data["update_effect"] = full(n_rows, n_inst, n_layers)
        if weights:
            self.data["sample_weight"] = full(n_rows, n_samples)
        if metrics:
            for name in ("probability", "truth_ratio", "truth_ratio_score", "rouge_l", "exact_memorization",
                         "extraction_strength"):
                self.data[name] = full(n_rows, n_inst)
            self.data["generated_text"] = np.full((n_rows, n_inst), "", dtype=object)
            for name in ("forget_quality", "log10_forget_quality", "model_utility"):
                self.data[name] = full(n_rows)
        if attribution is not None:
            prompt_width, n_methods = attribution
            self.data["token_attribution"] = full(n_rows, n_inst, prompt_width, n_methods)
            self.data["layer_attribution"] = full(n_rows, n_inst, n_layers)
            self.data["attribution_delta"] = full(n_rows, n_inst)

    def row(self, step: int) -> int:
        self.steps.append(step)
        return len(self.steps) - 1

    def dataset(self, axes, token_count, attrs) -> xr.Dataset:
        n = len(self.steps)
        return make_dataset(axes, self.steps, {k: v[:n] for k, v in self.data.items()}, token_count, attrs)


def unlearn(model, tokenizer, objective="npo", params: Mapping[str, Any] | None = None, *,
            forget: str | Sequence = DEFAULTS["forget"], retain: Sequence | None = None,
            eval: Mapping[str, Sequence] | None = None, world=None, steps: int | None = None,  # noqa: A002
            epochs: float | None = None, batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"],
            optimizer: str = DEFAULTS["optimizer"], weight_decay: float = DEFAULTS["weight_decay"],
            warmup: int = DEFAULTS["warmup"], seed: int = 0, record_every: int = DEFAULTS["record_every"],
            record: Sequence[str] = RECORD_ALL, callback: Callable[[int, xr.Dataset], Any] | None = None,
            inplace: bool = False, reference=None, refusals: Sequence[str] | None = None,
            chunk_size: int | None = 32, save_every: int | None = None, out: str | os.PathLike | None = None,
            progress: bool = True, template=None, eval_every: int | None = None, retain_model="auto",
            retain_reference=None, max_new_tokens: int | None = None, attribute_at: Sequence[int] | None = None,
            attribute_methods: Sequence[str] = ("integrated_gradients", "feature_ablation"),
            attribute_n_steps: int = 32, verify: str = "first") -> xr.Dataset:
    """Run an unlearning objective and record its G-effects step by step.

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
        Measure every k-th step; which per-step variables (default all of :data:`RECORD_ALL`). ``risk``,
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
    """
    record = set(record)
    unknown = record - set(RECORD_ALL)
    if unknown:
        raise ValueError(f"cannot record {sorted(unknown)}; choose from {', '.join(RECORD_ALL)}")
    if record_every < 1:
        raise ValueError("record_every must be 1 or more")
    check_verify(verify)
    check_chunk_size(chunk_size)
    verified = False
    out_path = _check_writable(out) if out is not None else None
    if save_every is not None and out_path is None:
        raise ValueError("save_every needs out= (the file to write the partial results to)")

    # ---- data
    split_name = forget if isinstance(forget, str) else "custom"
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
    eval_sets = dict(eval) if eval is not None else select_eval(forget_examples, retain)
    for name, items in eval_sets.items():
        if not list(items):
            raise ObjectiveError(f"the evaluation set {name!r} is empty; give at least one instance, or eval=None")
    held_out = {_key(e) for items in eval_sets.values() for e in items}
    train_retain = [e for e in retain if _key(e) not in held_out]

    obj = resolve_objective(objective, params)
    obj = Objective(resolve_layers(model, obj.terms))
    roles = {t.spec.role for t in obj.terms}
    if "retain" in roles and not train_retain:
        raise ObjectiveError(f"the regularisers of {obj.name} need retain samples (after holding out the "
                             "evaluation instances none are left): pass retain=[...]")
    needs_alt = "alt" in obj.forget_term.spec.needs
    if needs_alt and not refusals:
        refusals = load_world().refusals
    needs_ref = any(n.startswith("ref_") for t in obj.terms for n in t.spec.needs)

    # ---- models
    work = model if inplace else copy.deepcopy(model)
    if reference is None and needs_ref:
        reference = copy.deepcopy(model) if inplace else model  # the caller's untouched model is the reference
    if is_offloaded(work):
        raise ModelStructureError(
            f"{type(work).__name__} is offloaded by accelerate (its weights are swapped in at each call and dropped "
            "after): an update to them would not persist. unlearn trains the model, so load it in one piece (or "
            "with a device_map over devices that hold the weights); gl.g_effect measures an offloaded model")
    groups = layer_groups(work)
    params_list = trainable_parameters(work)
    if not params_list:
        raise ObjectiveError("no parameter of the model requires grad: nothing to unlearn")
    opt = _optimizer(optimizer, params_list, lr, weight_decay)

    # ---- schedule
    n_steps = steps if steps is not None else math.ceil((epochs if epochs is not None else DEFAULTS["epochs"])
                                                         * len(forget_examples) / min(batch_size,
                                                                                      len(forget_examples)))
    if n_steps < 1:
        raise ValueError("the run has no steps: give steps >= 1 or epochs > 0")
    record_set = {t for t in range(n_steps) if t % record_every == 0}
    if eval_every is not None and eval_every < 1:
        raise ValueError("eval_every must be 1 or more (or None: no metrics along the run)")
    eval_set = {t for t in range(n_steps) if t % eval_every == 0} if eval_every else set()
    attr_set = {int(t) for t in attribute_at or ()}
    if any(t < 0 or t > n_steps for t in attr_set):
        raise ValueError(f"attribute_at must name steps between 0 and {n_steps} (the number of steps: after the last "
                         "update)")
    n_rows = len(record_set | eval_set | (attr_set - {n_steps})) + 1

    def lr_at(t: int) -> float:
        return lr * min(1.0, (t + 1) / warmup) if warmup else lr

    forget_stream = _Stream(forget_examples, batch_size, seed)
    retain_stream = _Stream(train_retain, batch_size, seed + 1) if "retain" in roles else None

    # ---- the evaluation instances and the Dataset's axes
    targets, ids, splits, examples, slices = prepare_targets(tokenizer, eval_sets, template)
    check_fits(work, targets, ids, "eval")
    encoded = {}
    for role, examples_ in (("forget", forget_examples), ("retain", train_retain if retain_stream else [])):
        if examples_:
            side = encode_side(tokenizer, examples_, refusals=refusals, need_alt=needs_alt and role == "forget",
                               template=template, role=role)
            check_fits(work, side.batch, side.ids, role)
            encoded[role] = {k: v[:batch_size] for k, v in side.batch.items()}  # one step's samples
            if side.alt is not None:
                check_fits(work, side.alt, side.ids, f"{role} (with its refusal answer)")
    chunk_size = resolve_chunk_size(work, chunk_size, targets, list(encoded.values()), n_terms=len(obj.terms),
                                    per_token="g_effect_token" in record, pg="pg_effect" in record,
                                    n_sets=len(slices), verify=verify != "never")
    token_count = (targets["labels"][:, 1:] != -100).sum(1).numpy()
    width = max(int(token_count.max()), 1)
    sample_ids = [example_id(e, i) for i, e in enumerate(forget_examples)]
    sample_pos = {s: i for i, s in enumerate(sample_ids)}
    answer_tokens = [row[row != -100].tolist() for row in targets["labels"][:, 1:]]
    axes = make_axes(tokenizer, ids, splits, examples, groups, obj, sample_ids, list(slices), answer_tokens, width)
    attributor = None
    if attr_set:
        attributor = _Attributor(tokenizer, examples, attribute_methods, attribute_n_steps, template)
        axes.prompt_token_texts = attributor.prompt_texts()
        axes.methods = list(attribute_methods)
    measuring = bool(record & {"g_effect", "g_effect_token", "pg_effect", "update_effect"})
    rec = _Recorder(n_rows, len(ids), len(groups.names), len(obj.terms), width, len(sample_ids),
                    len(slices), record, any(t.spec.weight is not None for t in obj.terms
                                             if t.spec.role == "forget"), metrics=bool(eval_every),
                    attribution=(max(len(t) for t in axes.prompt_token_texts), len(axes.methods))
                    if attributor is not None else None)
    evaluator = None
    if eval_every:
        general = {name: list(world[name]) for name in ("real_authors", "world_facts")
                   if world is not None and name in world}
        evaluator = _Evaluator(tokenizer, eval_sets, forget_examples, _retain_reference(
            retain_model, retain_reference, world, forget, tokenizer), general, template, max_new_tokens)
    config = {
        "objective": obj.name, "objective_params": obj.params(), "forget": split_name, "steps": n_steps,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": optimizer,
        "weight_decay": weight_decay, "warmup": warmup, "seed": seed, "record_every": record_every,
        "record": sorted(record), "chunk_size": chunk_size, "n_forget": len(forget_examples),
        "eval_every": eval_every, "attribute_at": sorted(attr_set),
        "n_retain_train": len(train_retain), "eval": {k: len(v) for k, v in eval_sets.items()},
    }
    attrs: dict[str, Any] = {
        "objective": obj.name, "objective_params": obj.params(), "objective_repr": repr(obj),
        "optimizer": optimizer, "learning_rate": lr, "weight_decay": weight_decay, "warmup": warmup,
        "batch_size": batch_size, "steps": n_steps, "seed": seed, "forget_split": split_name,
        "record_every": record_every, "engine": "fast", "package_version": __version__,
        "reference": "initial model" if needs_ref else "none", "config": json.dumps(config, sort_keys=True),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **model_description(model), "complete": 0,
    }

    def snapshot() -> xr.Dataset:
        return rec.dataset(axes, token_count, attrs)

    from tqdm.auto import tqdm

    bar = tqdm(total=n_steps, desc=f"unlearn {obj.name}", disable=not progress, unit="step")
    stop_reason = ""
    step = updates = 0
    try:
        for step in range(n_steps):
            recorded = step in record_set
            has_row = recorded or step in eval_set or step in attr_set
            # the metrics and attributions at θ_t, before anything of this step touches the model
            metrics = evaluator(work) if evaluator is not None and step in eval_set else None
            if attributor is not None and step in attr_set:
                metrics = {**(metrics or {}), **attributor(work)}
            forget_batch = forget_stream.next()
            sides = {"forget": encode_side(tokenizer, forget_batch, refusals=refusals, need_alt=needs_alt,
                                           template=template)}
            if retain_stream is not None:
                sides["retain"] = encode_side(tokenizer, retain_stream.next(), template=template, role="retain")
            if reference is not None:
                with torch.no_grad(), eval_mode(reference):
                    for term in obj.terms:
                        reference_quantities(reference, sides[term.spec.role], term.spec.needs,
                                             term.params.get("layer"))
            try:
                gradient = term_gradients(work, obj, sides, reference)
            except ObjectiveError as err:
                raise RunStopped(f"step {step}: {err}") from err
            if not np.isfinite(gradient.term_loss).all():
                bad = [n for n, v in zip(obj.term_names, gradient.term_loss) if not np.isfinite(v)]
                raise RunStopped(f"step {step}: the loss of term {', '.join(bad)} is not finite")
            rate = lr_at(step)
            for group in opt.param_groups:
                group["lr"] = rate
            total = gradient.total()
            for p in params_list:
                p.grad = total.get(id(p), torch.zeros_like(p)).clone()
            if not has_row:
                opt.step()
                updates += 1
                opt.zero_grad(set_to_none=True)
                bar.update()
                continue
            measure = recorded and measuring
            theta_t = [p.detach().clone() for p in params_list] if measure and "update_effect" in record else None
            extra, at_theta_t = [], nullcontext()
            if theta_t is not None:
                opt.step()  # θ_{t+1}; then measure at θ_t with the step's direction -Δθ/lr
                updates += 1
                extra = [update_direction(params_list, theta_t, rate)]
                at_theta_t = swapped_parameters(params_list, theta_t)
            with at_theta_t:
                effects = fast_effects(work, groups, obj, sides, reference, targets, ids, slices,
                                       chunk_size=chunk_size, per_token="g_effect_token" in record,
                                       pg="pg_effect" in record, gradient=gradient, extra=extra,
                                       verify=verify == "always" or (verify == "first" and not verified)
                                       ) if measure \
                    else None
                verified = verified or measure
                risks = effects.risk if effects is not None else _risks(work, targets, chunk_size)
            if theta_t is None:
                opt.step()
                updates += 1
            opt.zero_grad(set_to_none=True)
            row = rec.row(step)
            _store(rec, row, effects, risks, gradient, rate, sides["forget"].ids, sample_pos)
            if metrics is not None:
                _store_metrics(rec, row, metrics)
            e_u, e_r = _headline(rec, row, splits)
            bar.set_postfix(loss=f"{gradient.term_loss.sum():.4g}", e_u=f"{e_u:.3g}", e_r=f"{e_r:.3g}",
                            refresh=False)
            bar.update()
            if save_every and len(rec.steps) % save_every == 0:
                save(snapshot(), out_path)
            if callback is not None:
                answer = callback(step, snapshot())
                if answer is False or answer == "stop":
                    stop_reason = f"stopped by the callback after step {step}"
                    break
    except KeyboardInterrupt:
        stop_reason = f"interrupted at step {step}"
    except RunStopped as err:
        if not rec.steps:
            raise ObjectiveError(str(err)) from None
        stop_reason = str(err)
        warnings.warn(f"unlearning run stopped: {err}; the {len(rec.steps)} recorded step(s) are returned",
                      RuntimeWarning, stacklevel=2)
    finally:
        bar.close()
    # the state after the last update: risks, and the metrics when they are tracked
    row = rec.row(updates)
    rec.data["risk"][row] = _risks(work, targets, chunk_size)
    if evaluator is not None:
        _store_metrics(rec, row, evaluator(work))
    if attributor is not None and updates in attr_set:
        _store_metrics(rec, row, attributor(work))
    attrs["complete"] = int(not stop_reason)
    attrs["stop_reason"] = stop_reason
    ds = snapshot()
    if out_path is not None:
        save(ds, out_path)
    return ds


def _risks(model, targets, chunk_size) -> np.ndarray:
    from ._batching import chunks

    out = []
    with torch.no_grad(), eval_mode(model):
        for _, part in chunks(targets, chunk_size):
            risk, _, _ = risk_and_tokens(model, part)
            out.append(risk.double().cpu().numpy())
    return np.concatenate(out)


def _store(rec: _Recorder, row: int, effects, risks, gradient, rate, batch_ids, sample_pos):
    d = rec.data
    d["learning_rate"][row] = rate
    d["objective_loss"][row] = gradient.term_loss.sum()
    d["term_loss"][row] = gradient.term_loss
    d["risk"][row] = risks
    cols = [sample_pos[s] for s in batch_ids]
    d["sample_loss"][row, cols] = gradient.sample_loss
    if "sample_weight" in d and gradient.sample_weight is not None:
        d["sample_weight"][row, cols] = gradient.sample_weight
    if effects is None:
        return
    if "g_effect" in d:
        d["g_effect"][row] = effects.g_effect
    if "g_effect_token" in d:
        d["g_effect_token"][row] = effects.g_effect_token
    if "pg_effect" in d and effects.pg_effect is not None:
        d["pg_effect"][row, cols] = effects.pg_effect
    if "update_effect" in d and effects.extra is not None:
        d["update_effect"][row] = effects.extra[..., 0]


def _store_metrics(rec: _Recorder, row: int, metrics: dict):
    for name, values in metrics.items():
        if name in rec.data:
            rec.data[name][row] = values


def _headline(rec: _Recorder, row: int, splits: Sequence[str]) -> tuple[float, float]:
    if "g_effect" not in rec.data:
        return float("nan"), float("nan")
    e = np.nansum(rec.data["g_effect"][row], axis=(1, 2))
    split = np.asarray(splits)
    e_u = float(e[split == "targeted"].mean()) if (split == "targeted").any() else float("nan")
    e_r = float(e[split == "non_targeted"].mean()) if (split == "non_targeted").any() else float("nan")
    return e_u, e_r


assert set(DIMS) >= set(RECORD_ALL)
