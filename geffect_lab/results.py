"""The result contract: one xarray Dataset per measurement or run (DESIGN.md §4).

Dims ``step``, ``instance``, ``layer``, ``token``, ``term``, ``sample``, ``against``; every variable carries
``long_name`` and ``description``; attrs are flat and netCDF-safe (nested configuration as JSON strings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

__all__ = ["SCHEMA_VERSION", "SIGN_CONVENTION", "VARIABLES", "DIMS", "Axes", "make_dataset", "effects_dataset",
           "flat_attrs", "annotate", "save", "load", "combine", "SchemaError", "GEffectAccessor", "summarize"]

SCHEMA_VERSION = 1
SIGN_CONVENTION = "dR ≈ -lr * g_effect; g_effect < 0 raises the risk"

# name -> (long_name, description, units)
VARIABLES: dict[str, tuple[str, str]] = {
    "g_effect": ("G-effect", "e_{i,l} = <grad_{theta_l} R_i, grad_{theta_l} L_u(term)>: the inner product of "
                             "instance i's risk gradient with the objective term's gradient, restricted to the "
                             "parameters of layer group l. Sums over layer and term to the instance's G-effect."),
    "g_effect_token": ("token G-effect", "e_{i,k} = <grad r_{i,k}, grad L_u>: the G-effect of answer token k's "
                                         "NLL (all layers, all terms); its mean over tokens is the instance's "
                                         "G-effect."),
    "pg_effect": ("PG-effect", "pg_j = <grad R(D), grad l_j>: the forget term's per-sample gradient against the "
                               "mean risk gradient of the target set named by 'against' (the paper's Eq. 5)."),
    "update_effect": ("update effect", "<grad_{theta_l} R_i, -delta theta_t / lr>: the inner product with the "
                                       "optimiser's actual step; equals the G-effect under plain SGD."),
    "risk": ("risk", "R_i: mean negative log-likelihood of instance i's answer tokens."),
    "objective_loss": ("objective loss", "L_u: the unlearning objective's value (sum of its weighted terms)."),
    "term_loss": ("term loss", "weight * mean over samples of the term's per-sample loss."),
    "sample_loss": ("sample loss", "l_j: the forget term's loss on forget sample j (unweighted)."),
    "token_count": ("answer tokens", "number of answer tokens of the instance (the risk's denominator)."),
    "sample_weight": ("objective weight", "the forget term's per-sample gradient weight relative to plain ascent "
                                          "(NPO: 2 p^beta / (p^beta + p_o^beta); 1 means GA-like)."),
    "learning_rate": ("learning rate", "the optimiser's learning rate at the step (after warm-up)."),
    # TOFU metrics (geffect_lab.metrics)
    "probability": ("probability", "exp(-mean token NLL) of the answer (TOFU's normalised probability); on sets "
                                   "without paraphrases, normalised over the answer and its perturbed answers."),
    "truth_ratio": ("truth ratio", "R = P_perturbed / P_paraphrased = exp(NLL(paraphrase) - mean NLL(perturbed))."),
    "truth_ratio_score": ("truth-ratio score", "min(R, 1/R) on the forget set, max(0, 1 - R) elsewhere."),
    "rouge_l": ("ROUGE-L recall", "ROUGE-L recall of the greedy answer against the reference answer."),
    "exact_memorization": ("exact memorisation", "share of answer tokens predicted by the argmax (teacher "
                                                 "forcing)."),
    "extraction_strength": ("extraction strength", "1 - k*/|a|, k* the shortest answer prefix from which greedy "
                                                   "decoding reproduces the rest exactly."),
    "extraction_strength_similar": ("extraction strength (similar)", "as extraction_strength, the rest counted "
                                                                     "as reproduced at ROUGE-L recall >= threshold."),
    "generated_text": ("generated answer", "the greedy answer to the question."),
    "generation_truncated": ("generation truncated", "1 where greedy generation hit the length bound."),
    "forget_quality": ("forget quality", "KS-test p-value between the forget-set truth ratios of the model and "
                                         "of the retain model (1: indistinguishable)."),
    "log10_forget_quality": ("log10 forget quality", "log10 of the forget quality."),
    "model_utility": ("model utility", "harmonic mean of probability, ROUGE-L and truth-ratio score on the "
                                       "retain and general-knowledge sets."),
    "token_attribution": ("token attribution", "Captum attribution of the answer log-probability to each prompt "
                                               "token (baseline: the pad token), per method."),
    "layer_attribution": ("layer attribution", "Captum gradient x activation of the answer log-probability at each "
                                               "layer's output, summed over positions and hidden units."),
    "attribution_delta": ("IG convergence delta", "integrated gradients' completeness gap: sum of attributions "
                                                  "minus (F(x) - F(baseline))."),
}


def flat_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """netCDF-safe attrs: str/int/float stay, bools become ints, anything nested becomes a JSON string."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if isinstance(value, bool):
            out[key] = int(value)
        elif isinstance(value, (str, int, float, np.integer, np.floating)):
            out[key] = value.item() if isinstance(value, np.generic) else value
        elif value is None:
            out[key] = ""
        else:
            out[key] = json.dumps(value, default=str, sort_keys=True)
    return out


def annotate(ds: xr.Dataset) -> xr.Dataset:
    """Attach ``long_name``/``description`` to every known variable."""
    for name, (long_name, description) in VARIABLES.items():
        if name in ds:
            ds[name].attrs.update(long_name=long_name, description=description)
    return ds


@dataclass
class Axes:
    """The coordinates of a measurement: who the instances are, which layers, terms and samples."""

    instance_ids: list[str]
    splits: list[str]
    questions: list[str]
    answers: list[str]
    layer_names: list[str]
    layer_index: list[int]
    term_names: list[str]
    sample_ids: list[str]
    against: list[str]
    token_texts: list[list[str]]
    token_width: int
    prompt_token_texts: list[list[str]] | None = None   # for token attributions (prompt positions)
    methods: list[str] | None = None                    # attribution methods

    def coords(self, steps: Sequence[int]) -> dict[str, Any]:
        tok_text = np.full((len(self.instance_ids), self.token_width), "", dtype=object)
        for i, texts in enumerate(self.token_texts):
            for k, t in enumerate(texts[:self.token_width]):
                tok_text[i, k] = t
        extra = {}
        if self.prompt_token_texts is not None:
            width = max((len(t) for t in self.prompt_token_texts), default=0)
            texts = np.full((len(self.instance_ids), width), "", dtype=object)
            for i, row in enumerate(self.prompt_token_texts):
                texts[i, :len(row)] = row
            extra = {"prompt_token": ("prompt_token", np.arange(width, dtype=np.int64)),
                     "prompt_token_text": (("instance", "prompt_token"), texts),
                     "method": ("method", np.array(self.methods or [], dtype=object))}
        return extra | {
            "step": ("step", np.asarray(steps, dtype=np.int64)),
            "instance": ("instance", np.array(self.instance_ids, dtype=object)),
            "split": ("instance", np.array(self.splits, dtype=object)),
            "question": ("instance", np.array(self.questions, dtype=object)),
            "answer": ("instance", np.array(self.answers, dtype=object)),
            "layer": ("layer", np.array(self.layer_names, dtype=object)),
            "layer_index": ("layer", np.array(self.layer_index, dtype=np.int64)),
            "term": ("term", np.array(self.term_names, dtype=object)),
            "token": ("token", np.arange(self.token_width, dtype=np.int64)),
            "token_text": (("instance", "token"), tok_text),
            "sample": ("sample", np.array(self.sample_ids, dtype=object)),
            "against": ("against", np.array(self.against, dtype=object)),
        }


# the dims of every per-step variable
DIMS: dict[str, tuple[str, ...]] = {
    "g_effect": ("step", "instance", "layer", "term"),
    "g_effect_token": ("step", "instance", "token"),
    "pg_effect": ("step", "sample", "against"),
    "update_effect": ("step", "instance", "layer"),
    "risk": ("step", "instance"),
    "objective_loss": ("step",),
    "term_loss": ("step", "term"),
    "sample_loss": ("step", "sample"),
    "sample_weight": ("step", "sample"),
    "learning_rate": ("step",),
    **{name: ("step", "instance") for name in ("probability", "truth_ratio", "truth_ratio_score", "rouge_l",
                                               "exact_memorization", "extraction_strength", "generated_text")},
    **{name: ("step",) for name in ("forget_quality", "log10_forget_quality", "model_utility")},
    # Captum attributions (geffect_lab.attribution)
    "token_attribution": ("step", "instance", "prompt_token", "method"),
    "layer_attribution": ("step", "instance", "layer"),
    "attribution_delta": ("step", "instance"),
}


def make_dataset(axes: Axes, steps: Sequence[int], data: Mapping[str, np.ndarray], token_count: np.ndarray,
                 attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A results Dataset from per-step arrays (``data[name]`` shaped like :data:`DIMS` ``[name]``)."""
    data_vars = {name: (DIMS[name], np.asarray(values)) for name, values in data.items() if values is not None}
    data_vars["token_count"] = (("instance",), np.asarray(token_count, dtype=np.int64))
    ds = xr.Dataset(data_vars, coords=axes.coords(steps))
    base = {"schema_version": SCHEMA_VERSION, "sign_convention": SIGN_CONVENTION}
    ds.attrs.update(flat_attrs({**base, **(attrs or {})}))
    return annotate(ds)


def effects_dataset(effects, axes: Axes, step: int = 0, attrs: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A one-step Dataset from an engine's :class:`~geffect_lab.engine.core.Effects` (``data``: more per-step
    variables, e.g. ``{"learning_rate": 1e-3}``)."""
    values = {
        "g_effect": effects.g_effect[None],
        "g_effect_token": effects.g_effect_token[None],
        "risk": effects.risk[None],
        "objective_loss": np.array([effects.term_loss.sum()]),
        "term_loss": effects.term_loss[None],
        "sample_loss": effects.sample_loss[None],
        "pg_effect": None if effects.pg_effect is None else effects.pg_effect[None],
        "sample_weight": None if effects.sample_weight is None else effects.sample_weight[None],
        "update_effect": None if effects.extra is None else effects.extra[None, ..., 0],
        **{name: np.asarray(value)[None] for name, value in (data or {}).items()},
    }
    return make_dataset(axes, [step], values, effects.token_count, attrs)


# ------------------------------------------------------------------------------------------- save / load
class SchemaError(ValueError):
    """A results file written under another schema version, or not a geffect-lab file at all."""


def save(ds: xr.Dataset, path, *, atomic: bool = True) -> Path:
    """Write a results Dataset to netCDF (HDF5 via h5netcdf). With ``atomic`` the file appears complete or not
    at all (written beside it, then renamed). Returns the path."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    ds.attrs = flat_attrs(ds.attrs)
    for name in ds.variables:
        ds[name].attrs = flat_attrs(ds[name].attrs)
    if not atomic:
        ds.to_netcdf(path, engine="h5netcdf")
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path) -> xr.Dataset:
    """Read a results file written by :func:`save` (fully into memory; the file is closed). A file of
    another schema version is refused with both versions named."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results file")
    with xr.open_dataset(path, engine="h5netcdf") as opened:
        ds = opened.load()
    version = ds.attrs.get("schema_version")
    if version is None:
        raise SchemaError(f"{path} is not a geffect-lab results file (it has no schema_version attribute)")
    if int(version) != SCHEMA_VERSION:
        raise SchemaError(f"{path} was written with results schema version {int(version)}; this geffect-lab "
                          f"reads schema version {SCHEMA_VERSION}. Re-run it, or load it with the geffect-lab "
                          "release that wrote it.")
    return ds


# ------------------------------------------------------------------------------------------- combine
_MUST_AGREE = ("step", "instance", "layer", "token", "sample", "against")


def combine(runs, dim: str = "objective", labels: Sequence[str] | None = None) -> xr.Dataset:
    """Stack runs along a new dimension (``objective``, ``run``, ``seed`` …) when their coordinates agree.

    ``runs`` is a sequence of Datasets (labels from ``labels``, else each run's ``objective`` attr, made
    unique) or a mapping label → Dataset. ``step``, ``instance``, ``layer``, ``token``, ``sample`` and
    ``against`` must be identical (the error names the first mismatch); ``term`` may differ (``npo`` beside
    ``npo+gd``): the union is taken and missing terms are NaN. Per-run attrs that differ are kept as a JSON
    list in ``{dim}_attrs``.
    """
    if isinstance(runs, Mapping):
        labels, runs = [str(k) for k in runs], list(runs.values())
    runs = list(runs)
    if not runs:
        raise ValueError("nothing to combine: give at least one results Dataset")
    if labels is None:
        names = [str(r.attrs.get("objective", f"run{i}")) for i, r in enumerate(runs)]
        labels = [n if names.count(n) == 1 else f"{n}#{names[:i + 1].count(n)}" for i, n in enumerate(names)]
    labels = [str(x) for x in labels]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs")
    first = runs[0]
    for label, run in zip(labels[1:], runs[1:]):
        for name in _MUST_AGREE:
            a, b = first.coords.get(name), run.coords.get(name)
            if (a is None) != (b is None):
                raise ValueError(f"cannot combine {labels[0]!r} and {label!r}: only one of them has a {name!r} "
                                 "coordinate")
            if a is not None and (a.shape != b.shape or not np.array_equal(a.values, b.values)):
                diff = sorted(set(map(str, a.values)) ^ set(map(str, b.values)))[:3]
                detail = f" (e.g. {', '.join(diff)})" if diff else f" (sizes {a.size} and {b.size}, or order)"
                raise ValueError(f"cannot combine {labels[0]!r} and {label!r}: their {name!r} coordinates "
                                 f"differ{detail}. Runs combine only when measured on the same steps, "
                                 "instances and layers.")
    import pandas as pd

    stacked = xr.concat([r.assign_attrs({}) for r in runs], dim=pd.Index(labels, name=dim), join="outer",
                        data_vars="all", coords="minimal", compat="override", combine_attrs="drop")
    shared = {k: v for k, v in first.attrs.items() if all(r.attrs.get(k) == v for r in runs[1:])}
    differing = sorted({k for r in runs for k in r.attrs} - set(shared))
    per_run = {k: [r.attrs.get(k, "") for r in runs] for k in differing}
    stacked.attrs = flat_attrs({**shared, f"{dim}_attrs": per_run})
    return annotate(stacked)


# ------------------------------------------------------------------------------------------- accessor
@xr.register_dataset_accessor("geffect")
class GEffectAccessor:
    """Common views of a results Dataset: ``ds.geffect.unlearning()``, ``.retaining()``, ``.total()``,
    ``.coarse()``, ``.cumulative()``, ``.risk_change()``.

    Unlearning = the ``targeted`` instances, retaining = the ``non_targeted`` ones (the ``split`` coordinate).
    """

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    def total(self, var: str = "g_effect") -> xr.DataArray:
        """Each instance's G-effect summed over layers and terms: [step, instance] (plus any run dims)."""
        da = self._ds[var]
        return da.sum([d for d in ("layer", "term") if d in da.dims], min_count=1)

    def _mean_over(self, split: str, keep: Sequence[str], var: str) -> xr.DataArray:
        da = self._ds[var]
        drop = [d for d in ("layer", "term") if d in da.dims and d not in keep]
        da = da.sum(drop, min_count=1) if drop else da
        selected = da.where(self._ds["split"] == split, drop=True)
        if selected.sizes.get("instance", 0) == 0:
            raise KeyError(f"no {split!r} instances in this Dataset (splits: "
                           f"{', '.join(sorted(set(map(str, self._ds['split'].values))))})")
        out = selected.mean("instance")
        out.attrs = {**da.attrs, "long_name": f"{split.replace('_', '-')} {da.attrs.get('long_name', var)}"}
        return out

    def unlearning(self, keep: Sequence[str] = (), var: str = "g_effect") -> xr.DataArray:
        """e_u: the mean over targeted instances of the G-effect (summed over layers and terms unless named
        in ``keep``, e.g. ``keep=("layer",)``). Negative = the forget risk rises."""
        return self._mean_over("targeted", keep, var)

    def retaining(self, keep: Sequence[str] = (), var: str = "g_effect") -> xr.DataArray:
        """e_r: the mean over non-targeted instances. Negative = collateral damage."""
        return self._mean_over("non_targeted", keep, var)

    def coarse(self, var: str = "g_effect") -> xr.DataArray:
        """The G-effect on the paper's five layer groups (embed, shallow, middle, deep, lm), summed."""
        from .engine.groups import COARSE_GROUPS, coarse_map

        da = self._ds[var]
        mapping = coarse_map(list(map(str, da["layer"].values)))
        labels = xr.DataArray([mapping[str(x)] for x in da["layer"].values], dims="layer", name="coarse")
        out = da.groupby(labels).sum(min_count=1).rename(coarse="layer")
        out = out.reindex(layer=[g for g in COARSE_GROUPS if g in out["layer"].values])
        out.attrs = dict(da.attrs)
        return out

    def cumulative(self, var: str = "g_effect") -> xr.DataArray:
        """Σ_{s<t} lr_s · e_s along ``step``: by first order, the risk change up to step t is ``-cumulative``.
        Needs the run's ``learning_rate``; steps where nothing was recorded count as zero."""
        if "learning_rate" not in self._ds:
            raise KeyError("this Dataset has no learning_rate (a single g_effect measurement has no run to "
                           "accumulate over); use a Dataset from gl.unlearn")
        da = (self._ds[var] * self._ds["learning_rate"]).fillna(0.0)
        out = da.cumsum("step").shift(step=1, fill_value=0.0)
        out.attrs = {"long_name": f"cumulative lr-weighted {self._ds[var].attrs.get('long_name', var)}",
                     "description": "sum over earlier steps of learning_rate * " + var + "; the first-order "
                                    "predicted risk change is its negative"}
        return out

    def risk_change(self) -> xr.DataArray:
        """Measured ``R_t − R_0`` per instance."""
        risk = self._ds["risk"]
        out = risk - risk.isel(step=0)
        out.attrs = {"long_name": "risk change", "description": "R_t - R_0 per instance (measured)"}
        return out


# ------------------------------------------------------------------------------------------- summaries
def summarize(runs):
    """One row per run: mean unlearning / retaining G-effect over the recorded steps, their ratio, and the
    forget / retain risk at the start and the end. ``runs``: a Dataset, a list, or a mapping name → Dataset."""
    import pandas as pd

    if isinstance(runs, xr.Dataset):
        runs = [runs]
    items = list(runs.items()) if isinstance(runs, Mapping) else [(str(r.attrs.get("objective", i)), r)
                                                                  for i, r in enumerate(runs)]
    rows = []
    for name, ds in items:
        row: dict[str, Any] = {"run": name, "steps": int(ds.attrs.get("steps", ds.sizes.get("step", 0))),
                               "complete": int(ds.attrs.get("complete", 1))}
        acc = ds.geffect
        if "g_effect" in ds:
            e_u = acc.unlearning().mean("step", skipna=True)
            e_r = acc.retaining().mean("step", skipna=True)
            row.update(mean_e_u=float(e_u), mean_e_r=float(e_r),
                       ratio_abs_e_r_e_u=float(abs(e_r) / abs(e_u)) if float(e_u) else np.nan)
        risk = ds["risk"]
        for split, label in (("targeted", "forget"), ("non_targeted", "retain")):
            sel = risk.where(ds["split"] == split, drop=True)
            if sel.sizes.get("instance", 0):
                mean = sel.mean("instance")
                row[f"{label}_risk_start"] = float(mean.isel(step=0))
                row[f"{label}_risk_end"] = float(mean.isel(step=-1))
        if "sample_weight" in ds:
            w = ds["sample_weight"].mean("sample", skipna=True).dropna("step")
            if w.sizes["step"]:
                row["weight_end"] = float(w.isel(step=-1))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
