"""Results Datasets: building them from engine output, saving, loading, combining, and the ``ds.geffect``
accessor. What they may hold (dims, coordinates, variables) is :mod:`geffect_lab.schema`; attrs are flat and
netCDF-safe (nested configuration as JSON strings).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .schema import (
    COARSE_GROUPS,
    SCHEMA_VERSION,
    SIGN_CONVENTION,
    VARIABLES,
    SchemaError,
    annotate,
    coarse_map,
    upgrade,
    validate,
)

__all__ = ["SCHEMA_VERSION", "SIGN_CONVENTION", "Axes", "make_dataset", "effects_dataset", "StepTable",
           "flat_attrs", "annotate", "save", "load", "combine", "SchemaError", "GEffectAccessor", "summarize"]

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
    sample_token_count: list[int] | None = None         # answer tokens of each forget sample
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


def make_dataset(axes: Axes, steps: Sequence[int], data: Mapping[str, np.ndarray], token_count: np.ndarray,
                 attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A results Dataset from per-step arrays (``data[name]`` shaped like the schema's dims of ``name``),
    validated against :mod:`geffect_lab.schema`."""
    data_vars = {name: (VARIABLES[name].dims, np.asarray(values)) for name, values in data.items()
                 if values is not None}
    data_vars["token_count"] = (("instance",), np.asarray(token_count, dtype=np.int64))
    if axes.sample_token_count is not None:
        data_vars["sample_token_count"] = (("sample",), np.asarray(axes.sample_token_count, dtype=np.int64))
    ds = xr.Dataset(data_vars, coords=axes.coords(steps))
    base = {"schema_version": SCHEMA_VERSION, "sign_convention": SIGN_CONVENTION}
    ds.attrs.update(flat_attrs({**base, **(attrs or {})}))
    return validate(annotate(ds), where="make_dataset")


def effects_dataset(effects, axes: Axes, step: int = 0, attrs: Mapping[str, Any] | None = None,
                    data: Mapping[str, Any] | None = None) -> xr.Dataset:
    """A one-step Dataset from an engine's :class:`~geffect_lab.engine.core.Effects` (``data``: more per-step
    variables, e.g. ``{"learning_rate": 1e-3}``)."""
    values = {
        "g_effect": None if effects.g_effect is None else effects.g_effect[None],
        "g_effect_token": None if effects.g_effect_token is None else effects.g_effect_token[None],
        "risk": effects.risk[None],
        "objective_loss": np.array([effects.term_loss.sum()]),
        "term_loss": effects.term_loss[None],
        "sample_loss": effects.sample_loss[None],
        "pg_effect": None if effects.pg_effect is None else effects.pg_effect[None],
        "sample_effect": None if effects.sample_effect is None else effects.sample_effect[None],
        "sample_weight": None if effects.sample_weight is None else effects.sample_weight[None],
        "update_effect": None if effects.extra is None else effects.extra[None, ..., 0],
        **{name: np.asarray(value)[None] for name, value in (data or {}).items()},
    }
    return make_dataset(axes, [step], values, effects.token_count, attrs)


class StepTable:
    """Steps of one run gathered as they are measured and stacked on demand into one Dataset on shared
    :class:`Axes` (a variable missing at a step is NaN there, ``""`` for text). Every producer of a run —
    ``unlearn``, the recorder — keeps its steps here; :meth:`dataset` returns fresh arrays each time, so a
    callback that edits what it is given changes nothing here."""

    def __init__(self, axes: Axes, token_count: np.ndarray):
        self.axes, self.token_count = axes, np.asarray(token_count)
        self.steps: list[int] = []
        self.rows: list[dict[str, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self.steps)

    def add(self, step: int, values: Mapping[str, Any]) -> None:
        """A step's values, each shaped like the schema's dims of its name without ``step``."""
        if self.steps and step <= self.steps[-1]:
            raise ValueError(f"step {step} was given after step {self.steps[-1]}: steps must increase")
        self.steps.append(int(step))
        self.rows.append({name: np.asarray(v) for name, v in values.items()})

    def add_dataset(self, ds: xr.Dataset, **more: Any) -> None:
        """A one-step Dataset (from :meth:`~geffect_lab.engine.api.Measurement.measure`), with ``more`` values."""
        own = {name: da.values[0] for name, da in ds.data_vars.items() if "step" in da.dims}
        self.add(int(ds["step"].values[0]), {**own, **more})

    def dataset(self, attrs: Mapping[str, Any] | None = None) -> xr.Dataset:
        names = list(dict.fromkeys(name for row in self.rows for name in row))
        data = {}
        for name in names:
            shape = next(row[name].shape for row in self.rows if name in row)
            text = VARIABLES[name].kind == "text"
            out = np.full((len(self.rows), *shape), "" if text else np.nan, dtype=object if text else np.float64)
            for i, row in enumerate(self.rows):
                if name in row:
                    out[i] = row[name]
            data[name] = out
        return make_dataset(self.axes, self.steps, data, self.token_count, attrs)


# ------------------------------------------------------------------------------------------- save / load
def check_results_path(path) -> Path:
    """A results file's path: a file name ending in ``.nc`` (results are netCDF), not an existing folder."""
    path = Path(path)
    if path.is_dir():
        raise OSError(f"cannot write results to {path}: it is a folder; give a file name such as run.nc")
    if path.suffix != ".nc":
        raise ValueError(f"cannot write results to {path}: results are netCDF files; give a name ending in .nc "
                         f"(e.g. {path.with_suffix('.nc').name})")
    return path


def check_output_path(out) -> Path:
    """The results path, checked without leaving anything behind: a file name (not a folder) whose nearest
    existing parent folder takes a file (a probe written and removed). Missing folders are made when the first
    result is saved."""
    import tempfile

    path = check_results_path(out)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is not a folder")
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise OSError(f"cannot write results to {path}: {err.strerror or err}. Choose another path "
                      "(nothing was trained).") from None
    return path


def save(ds: xr.Dataset, path, *, atomic: bool = True) -> Path:
    """Write a results Dataset to netCDF (HDF5 via h5netcdf). With ``atomic`` the file appears complete or not
    at all (written beside it, then renamed). Returns the path."""
    import os
    import tempfile

    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"save() takes a results Dataset, not {type(ds).__name__}")
    path = check_results_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = ds.copy()
    ds.attrs = flat_attrs(ds.attrs)
    for name in list(ds.variables):
        ds[name].attrs = flat_attrs(ds[name].attrs)
        values = ds[name].values
        if values.dtype == object and any(isinstance(v, str) and "\x00" in v for v in values.ravel()):
            # HDF5 strings cannot hold NUL: a "\x00" (a model may generate one) is stored as U+FFFD
            cleaned = (ds[name].dims, np.vectorize(_storable, otypes=[object])(values), ds[name].attrs)
            ds = ds.assign_coords({name: cleaned}) if name in ds.coords else ds.assign({name: cleaned})
    if not atomic:
        ds.to_netcdf(path, engine="h5netcdf")
        return path
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a save that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # what a plain write would give (mkstemp makes it private)
    try:
        ds.to_netcdf(tmp, engine="h5netcdf")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _storable(value):
    return value.replace("\x00", "\ufffd") if isinstance(value, str) else value


def load(path) -> xr.Dataset:
    """Read a results file written by :func:`save` (fully into memory; the file is closed) and validate it
    against the schema. Every error names the path: no such file, not a netCDF/HDF5 file (or truncated), not a
    geffect-lab file, another schema version, or content that does not fit the schema. A file of an older
    version that can be read is read under this version's names, with a warning that says what moved
    (:func:`geffect_lab.schema.upgrade`).

    Returns
    -------
    xarray.Dataset
        What was saved, dims as :mod:`geffect_lab.schema` declares them (e.g. ``g_effect`` [step, instance,
        layer, term], ``risk`` [step, instance]).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results file")
    if path.is_dir():
        raise SchemaError(f"{path} is a folder, not a results file (a sweep folder loads with gl.load_sweep)")
    try:
        with xr.open_dataset(path, engine="h5netcdf") as opened:
            ds = opened.load()
    except (OSError, ValueError) as err:
        raise SchemaError(f"{path} cannot be read as a netCDF results file (damaged, truncated, or another "
                          f"format): {type(err).__name__}: {err}") from None
    version = ds.attrs.get("schema_version")
    if version is None:
        raise SchemaError(f"{path} is not a geffect-lab results file (it has no schema_version attribute)")
    return validate(annotate(upgrade(ds, where=str(path))), where=str(path))


# ------------------------------------------------------------------------------------------- combine
_MUST_AGREE = ("step", "instance", "layer", "token", "sample", "against")


def combine(runs, dim: str = "objective", labels: Sequence[str] | None = None) -> xr.Dataset:
    """Stack runs along a new dimension (``objective``, ``run``, ``seed`` …) when their coordinates agree.

    ``runs`` is a sequence of Datasets (labels from ``labels``, else each run's ``objective`` attr, made
    unique) or a mapping label → Dataset. ``step``, ``instance``, ``layer``, ``token``, ``sample`` and
    ``against`` must be identical (the error names the first mismatch); ``term`` may differ (``npo`` beside
    ``npo+gd``): the union is taken and missing terms are NaN. Per-run attrs that differ are kept as a JSON
    list in ``{dim}_attrs``.

    Returns
    -------
    xarray.Dataset
        Every variable with ``dim`` in front of its own dims: ``g_effect`` [objective, step, instance, layer,
        term], ``risk`` [objective, step, instance], … for the default ``dim="objective"``.
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
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise ValueError(f"labels {repeated} repeat: each run needs its own label along {dim!r} (or .sel would "
                         "pick several)")
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
    return validate(annotate(stacked), where="combine")


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

    def split_mean(self, split: str, var: str = "g_effect", keep: Sequence[str] = ()) -> xr.DataArray:
        """The mean over the instances of ``split`` of ``var`` (summed over layer and term unless kept); a
        KeyError names the splits there are when ``split`` has no instance."""
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
        return self.split_mean("targeted", var, keep)

    def retaining(self, keep: Sequence[str] = (), var: str = "g_effect") -> xr.DataArray:
        """e_r: the mean over non-targeted instances. Negative = collateral damage."""
        return self.split_mean("non_targeted", var, keep)

    def coarse(self, var: str = "g_effect") -> xr.DataArray:
        """The G-effect on the paper's five layer groups (embed, shallow, middle, deep, lm), summed."""

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
        ds = self._ds
        if "learning_rate" not in ds:
            raise KeyError("this Dataset has no per-step learning rates (learning_rate), so there is no run to "
                           "accumulate over: a gl.unlearn run has them; a GEffectRecorder gets them from "
                           "record(..., lr=...) or its Trainer callback; gl.replay from the Trainer's "
                           "training_args.bin or its logged rates (logging_steps=1)")
        lr, recorded = ds["learning_rate"], ds[var].notnull().any([d for d in ds[var].dims if d != "step"])
        missing = [int(s) for s in ds.step.values[:-1] if bool(recorded.sel(step=s)) and np.isnan(lr.sel(step=s))]
        if missing:
            source = ds.attrs.get("learning_rate_source")
            raise ValueError(f"the learning rate of the update leaving step(s) {missing[:8]} is unknown (NaN), so "
                             f"the {var} recorded there cannot be accumulated" +
                             (f"; the replay read its rates from: {source}" if source else "") +
                             ". Keep training_args.bin in the checkpoints or log every step (logging_steps=1), "
                             "or pass lr= to every record()")
        da = (ds[var] * lr).fillna(0.0)
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
        for split, label in (("targeted", "forget"), ("non_targeted", "retain")):
            if (ds["split"] == split).any():
                mean = acc.split_mean(split, "risk")
                row[f"{label}_risk_start"] = float(mean.isel(step=0))
                row[f"{label}_risk_end"] = float(mean.isel(step=-1))
        if "sample_weight" in ds:
            w = ds["sample_weight"].mean("sample", skipna=True).dropna("step")
            if w.sizes["step"]:
                row["weight_end"] = float(w.isel(step=-1))
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")
