"""Figures of G-effect results: a Dataset in, a matplotlib Figure out.

Every function takes a results Dataset (from :func:`geffect_lab.g_effect`, :func:`geffect_lab.unlearn`,
:func:`geffect_lab.combine` or :func:`geffect_lab.load`) and returns a new :class:`matplotlib.figure.Figure`
(made without pyplot, so it is safe in threads and shows itself in a notebook). Axis labels come from the
variables' ``long_name`` attrs; colours are colour-blind safe: unlearning is gold, retaining navy, layer
groups and objectives come from seaborn's ``colorblind`` palette, diverging maps are centred on 0.

==========================  ==========================================================================
function                    shows
==========================  ==========================================================================
``g_effect_curves``         the paper's figure: e_u (gold) and e_r (navy) over steps, solid total, dashed
                            per coarse layer group; ``cumulative=True``: Σ lr·e beside the measured risk change
``layer_heatmap``           layer × step, diverging, centred on 0
``instance_distributions``  per-instance G-effects per split
``pg_scatter``              PG-effect per forget sample: unlearning vs retaining (the paper's Fig. 5b);
                            ``var="sample_effect"``: each sample's share of the objective's G-effect
``trajectory``              e_u against e_r along the run, one path per objective
``token_strip``             an answer's text, each token coloured by its G-effect
``compare``                 several objectives (a combined Dataset) with shared axes, facets or overlay
``metric_curves``           forget quality, model utility and per-split metrics over steps
``token_attribution``       Captum token attributions with the prompt's text (instances or steps as rows)
``layer_attribution``       layer attribution beside the layer G-effect, one instance and step
``attribution_change``      an instance's token attributions before and after unlearning
``swept``                   e_u, e_r (or a metric) against a swept setting, mean over seeds with a band
==========================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr
from matplotlib.colors import SymLogNorm, TwoSlopeNorm
from matplotlib.figure import Figure

from .schema import DIMS

__all__ = ["g_effect_curves", "layer_heatmap", "instance_distributions", "pg_scatter", "trajectory",
           "token_strip", "compare", "metric_curves", "token_attribution", "layer_attribution", "attribution_change",
           "swept",
           "UNLEARNING", "RETAINING", "figure_png", "label"]

UNLEARNING = "#D9A300"   # gold
RETAINING = "#1B2A6B"    # navy
SPLIT_COLORS = {"targeted": UNLEARNING, "non_targeted": RETAINING}
SPLIT_NAMES = {"targeted": "unlearning (targeted)", "non_targeted": "retaining (non-targeted)"}
DASHES = [(4, 2), (1, 1.5), (6, 2, 1, 2), (2, 2), (8, 3)]


def _palette(n: int) -> list:
    import seaborn as sns

    return sns.color_palette("colorblind", n)


def label(da: xr.DataArray, fallback: str = "") -> str:
    """An axis label from a DataArray's attrs (``long_name`` [``units``]), like xarray's ``label_from_attrs``."""
    name = da.attrs.get("long_name") or da.name or fallback
    units = da.attrs.get("units")
    return f"{name} [{units}]" if units else str(name)


def _new(rows: int = 1, cols: int = 1, *, width: float = 5.2, height: float = 3.6, sharey=False, sharex=False):
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=sharey, sharex=sharex, squeeze=False)
    return fig, axes


def _needs(ds, *variables: str, how: str = "", instance=None, step=None) -> None:
    """Check a plot's input once, before drawing: a Dataset holding ``variables`` (``how``: how to record
    them), and the ``instance``/``step`` asked for among its coordinates."""
    if not isinstance(ds, xr.Dataset):
        raise TypeError(f"plots take a results Dataset (gl.g_effect, gl.unlearn, gl.load …), not {type(ds).__name__}")
    missing = [v for v in variables if v not in ds]
    if missing:
        raise KeyError(f"this Dataset has no {', '.join(missing)}" + (f" ({how})" if how else ""))
    for dim, value in (("instance", instance), ("step", step)):
        if value is not None and (dim not in ds.coords or value not in set(ds[dim].values.tolist())):
            have = ds[dim].values.tolist()[:6] if dim in ds.coords else []
            raise KeyError(f"{dim}={value!r} is not in this Dataset; its {dim} values include {have}")


def _recorded(da: xr.DataArray) -> xr.DataArray:
    """Drop the steps where nothing was recorded (the run's last row holds only risks)."""
    other = [d for d in da.dims if d != "step"]
    keep = da.notnull().any(other) if other else da.notnull()
    return da.sel(step=keep.values) if "step" in da.dims else da


def _split_mean(ds: xr.Dataset, da: xr.DataArray, split: str) -> xr.DataArray:
    sel = da.where(ds["split"] == split, drop=True)
    if sel.sizes.get("instance", 0) == 0:
        raise KeyError(f"no {split!r} instances in this Dataset")
    return sel.mean("instance")


def _symlog(ax, values: np.ndarray, yscale: str) -> None:
    finite = np.abs(values[np.isfinite(values)])
    if yscale == "symlog" and finite.size and finite.max() > 0:
        nonzero = finite[finite > 0]
        linthresh = 10.0 ** np.floor(np.log10(max(float(np.percentile(nonzero, 10)), 1e-12)))
        ax.set_yscale("symlog", linthresh=linthresh, linscale=1.5)
    elif yscale not in ("symlog", "linear"):
        ax.set_yscale(yscale)
    ax.axhline(0, color="0.6", lw=0.8, zorder=0)


def g_effect_curves(ds: xr.Dataset, *, cumulative: bool = False, coarse: bool = True,
                    layers: Sequence[str] | None = None, yscale: str = "symlog", title: str | None = None) -> Figure:
    """The paper's figure: unlearning (gold) and retaining (navy) G-effect over steps.

    Left panel unlearning (mean over targeted instances), right panel retaining (non-targeted): the total as a
    solid line, each coarse layer group (embed, shallow, middle, deep, lm; or the chosen fine ``layers``)
    dashed. ``cumulative=True`` plots the first-order predicted risk change ``-Σ_{s<t} lr_s·e_s`` (solid)
    beside the measured ``R_t − R_0`` (dotted), which tells where the first-order picture holds.
    """
    _needs(ds, "g_effect", "risk" if cumulative else "g_effect")
    acc = ds.geffect
    if cumulative:
        total = -acc.cumulative().sum("term", min_count=1)
        measured = acc.risk_change()
    else:
        total = _recorded(ds["g_effect"].sum("term", min_count=1))
    if layers:
        parts = total.sel(layer=list(layers))
    elif coarse:
        parts = acc.coarse().sum("term", min_count=1) if not cumulative else xr.Dataset(
            {"g_effect": total}, coords=ds.coords).geffect.coarse()
    else:
        parts = total
    if not cumulative:
        parts = parts.sel(step=total["step"])
    fig, axes = _new(1, 2, sharey=False)
    for ax, split in zip(axes[0], ("targeted", "non_targeted")):
        color = SPLIT_COLORS[split]
        line = _split_mean(ds, total.sum("layer", min_count=1), split)
        ax.plot(line["step"], line, color=color, lw=2.2, label="total (predicted)" if cumulative else "total")
        values = [line.values]
        grouped = _split_mean(ds, parts, split)
        for i, layer in enumerate(grouped["layer"].values):
            series = grouped.sel(layer=layer)
            ax.plot(series["step"], series, color=color, lw=1.2, alpha=0.85, dashes=DASHES[i % len(DASHES)],
                    label=str(layer))
            values.append(series.values)
        if cumulative:
            m = _split_mean(ds, measured, split)
            ax.plot(m["step"], m, color="black", lw=1.6, ls=":", label="measured R_t - R_0")
            values.append(m.values)
            ax.set_ylabel("risk change (predicted: -Σ lr·e)")
        else:
            ax.set_ylabel(label(ds["g_effect"]))
        _symlog(ax, np.concatenate([np.ravel(v) for v in values]), yscale)
        ax.set_xlabel("step")
        ax.set_title(SPLIT_NAMES[split], color=color)
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(title or f"{ds.attrs.get('objective', '')} — G-effect{' (cumulative)' if cumulative else ''}")
    return fig


def layer_heatmap(ds: xr.Dataset, *, split: str = "targeted", coarse: bool = False, var: str = "g_effect",
                  symlog: bool = True, title: str | None = None) -> Figure:
    """Layer × step heatmap of the mean G-effect over a split's instances (diverging, centred on 0)."""
    import seaborn as sns

    _needs(ds, var, "split")
    da = ds.geffect.coarse(var) if coarse else ds[var]
    da = _recorded(da.sum("term", min_count=1) if "term" in da.dims else da)
    mean = _split_mean(ds, da, split).transpose("layer", "step")
    values = mean.values
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    norm = (SymLogNorm(linthresh=max(float(np.percentile(finite[finite > 0], 20)) if (finite > 0).any() else 1e-12,
                                     1e-12), vmin=-vmax, vmax=vmax)
            if symlog else TwoSlopeNorm(0.0, -vmax, vmax))
    fig, axes = _new(1, 1, width=min(3 + 0.35 * mean.sizes["step"], 12), height=0.45 * mean.sizes["layer"] + 1.8)
    ax = axes[0, 0]
    sns.heatmap(mean.to_pandas(), ax=ax, cmap="vlag", norm=norm, center=None,
                cbar_kws={"label": label(ds[var])}, linewidths=0.2, linecolor="white")
    ax.set_xlabel("step")
    ax.set_ylabel("layer group" if coarse else "layer")
    ax.set_title(title or f"{SPLIT_NAMES.get(split, split)}: {ds.attrs.get('objective', '')}",
                 color=SPLIT_COLORS.get(split, "black"))
    return fig


def instance_distributions(ds: xr.Dataset, *, step: int | None = None, title: str | None = None) -> Figure:
    """Per-instance G-effects (summed over layers and terms) per split: a strip plot over a box plot.
    ``step`` picks one recorded step; ``None`` averages each instance over the recorded steps."""
    import pandas as pd
    import seaborn as sns

    _needs(ds, "g_effect", "split", step=step)
    total = _recorded(ds.geffect.total())
    values = total.sel(step=step) if step is not None else total.mean("step")
    frame = pd.DataFrame({"G-effect": values.values, "split": ds["split"].values})
    order = [s for s in ("targeted", "non_targeted") if s in set(frame["split"])]
    order += sorted(set(frame["split"]) - set(order))
    palette = {s: SPLIT_COLORS.get(s, c) for s, c in zip(order, _palette(len(order)))}
    fig, axes = _new(1, 1, width=5.5, height=3.8)
    ax = axes[0, 0]
    sns.boxplot(frame, x="split", y="G-effect", hue="split", order=order, palette=palette, ax=ax,
                fliersize=0, boxprops={"alpha": 0.35}, legend=False)
    sns.stripplot(frame, x="split", y="G-effect", hue="split", order=order, palette=palette, ax=ax, size=4,
                  jitter=0.25, legend=False)
    _symlog(ax, frame["G-effect"].to_numpy(), "symlog")
    ax.set_ylabel(label(ds["g_effect"]) + " per instance")
    where = f"step {step}" if step is not None else "mean over steps"
    ax.set_title(title or f"{ds.attrs.get('objective', '')}: per-instance G-effects ({where})")
    return fig


def pg_scatter(ds: xr.Dataset, *, step: int | None = None, title: str | None = None,
               var: str = "pg_effect") -> Figure:
    """The paper's Fig. 5b: each forget sample's PG-effect (``pg_effect``, the G-effect of its own answer
    log-likelihood) on the targeted (x) against the non-targeted (y) risk, coloured by step. ``step`` keeps one
    step; ``var="sample_effect"`` plots each sample's weighted share of the objective's G-effect instead."""
    if var not in ("pg_effect", "sample_effect"):
        raise ValueError(f"var={var!r}: use 'pg_effect' (the paper's) or 'sample_effect'")
    old = "; this file, of results schema version 1, holds sample_effect only: measure again, or plot " \
          "var='sample_effect'" if var == "pg_effect" and isinstance(ds, xr.Dataset) and \
        ds.attrs.get("schema_upgraded_from") == 1 else ""
    _needs(ds, var, how=f"record it with record=(..., {var!r}){old}", step=step)
    pg = ds[var]
    if step is not None:
        pg = pg.sel(step=[step])
    frame = pg.to_dataset(dim="against").to_dataframe().dropna(subset=["targeted", "non_targeted"])
    fig, axes = _new(1, 1, width=5.2, height=4.2)
    ax = axes[0, 0]
    points = ax.scatter(frame["targeted"], frame["non_targeted"], c=frame.index.get_level_values("step"),
                        cmap="cividis", s=18, edgecolors="none")
    fig.colorbar(points, ax=ax, label="step")
    for axis in ("x", "y"):
        getattr(ax, f"set_{axis}scale")("symlog", **{"linthresh": max(float(np.nanpercentile(
            np.abs(frame["targeted" if axis == "x" else "non_targeted"]).replace(0, np.nan), 10)), 1e-12)})
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    what = "PG-effect" if var == "pg_effect" else "sample effect"
    ax.set_xlabel(f"{what} on the targeted risk (unlearning)", color=UNLEARNING)
    ax.set_ylabel(f"{what} on the non-targeted risk (retaining)", color=RETAINING)
    ax.set_title(title or f"{ds.attrs.get('objective', '')}: per-sample {what}s")
    return fig


def _runs(ds: xr.Dataset, dim: str | None) -> list[tuple[str, xr.Dataset]]:
    if dim and dim in ds.dims:
        return [(str(v), ds.sel({dim: v})) for v in ds[dim].values]
    return [(str(ds.attrs.get("objective", "run")), ds)]


def _run_dim(ds: xr.Dataset) -> str | None:
    extra = [d for d in ds.dims if d not in DIMS]  # a combine dim (objective, run, seed …)
    return extra[0] if extra else None


def trajectory(ds: xr.Dataset, *, dim: str | None = None, title: str | None = None) -> Figure:
    """e_u (x) against e_r (y) step by step, one path per objective of a combined Dataset."""
    _needs(ds, "g_effect", "split")
    dim = dim or _run_dim(ds)
    runs = _runs(ds, dim)
    fig, axes = _new(1, 1, width=5.4, height=4.4)
    ax = axes[0, 0]
    allx, ally = [], []
    for (name, run), color in zip(runs, _palette(len(runs))):
        e_u = _recorded(run.geffect.unlearning())
        e_r = run.geffect.retaining().sel(step=e_u["step"])
        ax.plot(e_u, e_r, "-o", color=color, ms=3, lw=1.2, label=name)
        ax.annotate("start", (float(e_u[0]), float(e_r[0])), fontsize=7, color=color)
        allx.append(e_u.values)
        ally.append(e_r.values)
    for axis, vals in (("x", allx), ("y", ally)):
        v = np.abs(np.concatenate(vals))
        v = v[np.isfinite(v) & (v > 0)]
        getattr(ax, f"set_{axis}scale")("symlog", linthresh=float(np.percentile(v, 10)) if v.size else 1e-12)
    ax.axhline(0, color="0.6", lw=0.8)
    ax.axvline(0, color="0.6", lw=0.8)
    ax.set_xlabel("unlearning G-effect e_u", color=UNLEARNING)
    ax.set_ylabel("retaining G-effect e_r", color=RETAINING)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title or "e_u against e_r along the run")
    return fig


def token_strip(ds: xr.Dataset, instance: str, *, step: int = 0, cmap: str = "vlag",
                title: str | None = None) -> Figure:
    """One answer's tokens in reading order, each on a patch coloured by its per-token G-effect (diverging,
    centred on 0; negative = the token's NLL rises under the update)."""
    import matplotlib as mpl

    _needs(ds, "g_effect_token", how="record it with record=(..., 'g_effect_token')", instance=instance, step=step)
    row = ds["g_effect_token"].sel(instance=instance, step=step)
    texts = ds["token_text"].sel(instance=instance).values
    n = int(ds["token_count"].sel(instance=instance))
    values = row.values[:n]
    vmax = float(np.nanmax(np.abs(values))) or 1.0
    norm = TwoSlopeNorm(0.0, -vmax, vmax)
    colormap = mpl.colormaps[cmap]
    fig = Figure(figsize=(9, 1.2 + 0.42 * (1 + n // 12)), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    x, y, line_h = 0.0, 1.0, 0.32
    for text, value in zip(texts[:n], values):
        shown = str(text).replace("\n", "⏎") or "∅"
        width = 0.012 * max(len(shown), 1) + 0.01
        if x + width > 1.0:
            x, y = 0.0, y - line_h
        ax.text(x, y, shown, fontsize=10, family="monospace", va="top", ha="left", transform=ax.transAxes,
                bbox={"boxstyle": "round,pad=0.25", "fc": colormap(norm(value)), "ec": "none"})
        x += width
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, orientation="horizontal",
                 fraction=0.08, pad=0.02, label=label(ds["g_effect_token"]))
    question = str(ds["question"].sel(instance=instance).values)
    ax.set_title(title or f"{instance} · step {step}\n{question}", fontsize=9, loc="left")
    return fig


def compare(ds: xr.Dataset, *, dim: str | None = None, cumulative: bool = False, kind: str = "overlay",
            yscale: str = "symlog", title: str | None = None) -> Figure:
    """Several objectives side by side (a Dataset from :func:`geffect_lab.combine`), shared axes.

    ``kind="overlay"``: one panel per split, one line per objective; ``kind="facet"``: one row per objective,
    unlearning and retaining in its two columns, every panel on the same y axis.
    """
    _needs(ds, "g_effect", "split", *(["risk"] if cumulative else []))
    dim = dim or _run_dim(ds)
    runs = _runs(ds, dim)
    colors = _palette(len(runs))

    def series(run, split):
        acc = run.geffect
        if cumulative:
            return _split_mean(run, -acc.cumulative().sum(["layer", "term"], min_count=1), split)
        return _recorded(_split_mean(run, acc.total(), split))

    if kind == "overlay":
        fig, axes = _new(1, 2, sharex=True)
        for ax, split in zip(axes[0], ("targeted", "non_targeted")):
            values = []
            for (name, run), color in zip(runs, colors):
                s = series(run, split)
                ax.plot(s["step"], s, color=color, lw=1.8, label=name)
                values.append(s.values)
            _symlog(ax, np.concatenate(values), yscale)
            ax.set_title(SPLIT_NAMES[split], color=SPLIT_COLORS[split])
            ax.set_xlabel("step")
            ax.set_ylabel("predicted risk change (-Σ lr·e)" if cumulative else label(ds["g_effect"]))
            ax.legend(fontsize=8, frameon=False)
    elif kind == "facet":
        fig, axes = _new(len(runs), 2, sharex=True, sharey=True, height=2.6)
        values = []
        for r, (name, run) in enumerate(runs):
            for c, split in enumerate(("targeted", "non_targeted")):
                s = series(run, split)
                axes[r, c].plot(s["step"], s, color=SPLIT_COLORS[split], lw=1.8)
                axes[r, c].set_title(f"{name}: {SPLIT_NAMES[split]}", fontsize=9)
                values.append(s.values)
        allv = np.concatenate(values)
        for ax in axes.ravel():
            _symlog(ax, allv, yscale)
        for ax in axes[-1]:
            ax.set_xlabel("step")
    else:
        raise ValueError(f"kind must be 'overlay' or 'facet', got {kind!r}")
    fig.suptitle(title or f"objectives compared{' (cumulative)' if cumulative else ''}")
    return fig


def metric_curves(ds: xr.Dataset, *, title: str | None = None) -> Figure:
    """Forget quality (log scale), model utility, and the per-split means of the per-instance metrics, over
    the steps where they were recorded (``gl.unlearn(..., eval_every=k)``)."""
    _needs(ds)
    scalars = [v for v in ("forget_quality", "model_utility") if v in ds and "step" in ds[v].dims]
    per_instance = [v for v in ("probability", "rouge_l", "truth_ratio_score", "extraction_strength")
                    if v in ds and "step" in ds[v].dims]
    if not scalars and not per_instance:
        raise KeyError("this Dataset has no metrics over steps; run gl.unlearn(..., eval_every=k)")
    panels = scalars + per_instance
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _new(rows, cols, width=4.2, height=3.0)
    for ax, name in zip(axes.ravel(), panels):
        da = ds[name]
        if name in scalars:
            s = da.dropna("step")
            ax.plot(s["step"], s, "-o", color="black", ms=3)
            if name == "forget_quality":
                ax.set_yscale("log")
                ax.axhline(0.05, color="0.6", ls="--", lw=0.8)
        else:
            for split in ("targeted", "non_targeted"):
                if split in set(map(str, ds["split"].values)):
                    s = _split_mean(ds, da, split).dropna("step")
                    ax.plot(s["step"], s, "-o", color=SPLIT_COLORS[split], ms=3, label=SPLIT_NAMES[split])
            ax.legend(fontsize=7, frameon=False)
        ax.set_title(label(da), fontsize=10)
        ax.set_xlabel("step")
    for ax in axes.ravel()[len(panels):]:
        ax.set_axis_off()
    fig.suptitle(title or f"{ds.attrs.get('objective', '')}: metrics along the run")
    return fig


def _attribution_rows(source, instance, step, method):
    """(values [row, prompt token], texts [row, prompt token], row labels) from a tokens() DataArray or a run."""
    if isinstance(source, xr.DataArray):
        da = source.sel({"method": method})
        if instance is not None:
            da = da.sel(instance=[instance] if isinstance(instance, str) else list(instance))
        return da.values, da["prompt_token_text"].values, [str(i) for i in da["instance"].values]
    _needs(source, "token_attribution", how="run gl.unlearn(..., attribute_at=[...])",
           instance=instance if isinstance(instance, str) else None, step=step)
    da = source["token_attribution"].sel({"method": method})
    attributed = da.notnull().any(["instance", "prompt_token"])
    steps = [int(s) for s in da["step"].values[attributed.values]]
    if instance is None:
        instance = str(source["instance"].values[0])
    if step is None:
        rows = da.sel(instance=instance, step=steps)
        labels = [f"step {s}" for s in steps]
    else:
        rows = da.sel(instance=instance, step=[step])
        labels = [f"step {step}"]
    texts = np.repeat(source["prompt_token_text"].sel(instance=instance).values[None], len(labels), axis=0)
    return rows.values, texts, labels


def token_attribution(source, *, instance=None, step: int | None = None, method: str = "integrated_gradients",
                      title: str | None = None) -> Figure:
    """A heatmap of token attributions with each cell labelled by its prompt token (diverging, centred on 0).

    ``source`` is a DataArray from :func:`geffect_lab.attribution.tokens` (rows: instances, or the one
    ``instance``) or a run with ``token_attribution`` (rows: the attributed steps of ``instance``, or ``step``).
    """
    import seaborn as sns

    values, texts, rows = _attribution_rows(source, instance, step, method)
    keep = ~np.isnan(values).all(0)
    values, texts = values[:, keep], texts[:, keep]
    finite = np.abs(values[np.isfinite(values)])
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig, axes = _new(1, 1, width=min(2 + 0.55 * values.shape[1], 18), height=0.5 * len(rows) + 1.6)
    ax = axes[0, 0]
    annot = np.where(np.isnan(values), "", texts.astype(str))
    sns.heatmap(values, ax=ax, cmap="vlag", norm=TwoSlopeNorm(0.0, -vmax, vmax), annot=annot, fmt="",
                annot_kws={"fontsize": 7, "rotation": 90}, cbar_kws={"label": f"attribution ({method})"},
                xticklabels=False, yticklabels=rows, linewidths=0.3, linecolor="white")
    ax.set_xlabel("prompt token")
    ax.set_title(title or f"token attribution of the answer ({method.replace('_', ' ')})")
    return fig


def layer_attribution(ds: xr.Dataset, instance: str, *, step: int | None = None, title: str | None = None) -> Figure:
    """For one instance and step: Captum's layer attribution of its answer (left) beside its layer G-effect
    (right), on the same layer axis. ``step`` defaults to the first attributed step."""
    _needs(ds, "layer_attribution", how="run gl.unlearn(..., attribute_at=[...])", instance=instance, step=step)
    attributed = ds["layer_attribution"].notnull().any(["instance", "layer"])
    steps = [int(s) for s in ds["step"].values[attributed.values]]
    step = steps[0] if step is None else step
    layer_names = [str(x) for x in ds["layer"].values]
    attr = ds["layer_attribution"].sel(instance=instance, step=step).values
    fig, axes = _new(1, 2, width=4.6, height=3.6)
    axes[0, 0].barh(layer_names, np.nan_to_num(attr), color=[_palette(1)[0]] * len(layer_names))
    axes[0, 0].set_title("layer attribution of the answer", fontsize=10)
    axes[0, 0].invert_yaxis()
    if "g_effect" in ds and ds["g_effect"].sel(step=step).notnull().any():
        g = ds["g_effect"].sel(instance=instance, step=step).sum("term").values
        split = str(ds["split"].sel(instance=instance).values)
        axes[0, 1].barh(layer_names, g, color=SPLIT_COLORS.get(split, "grey"))
        axes[0, 1].set_xscale("symlog", linthresh=max(float(np.nanpercentile(np.abs(g[g != 0]), 10))
                                                      if (g != 0).any() else 1e-12, 1e-12))
    else:
        axes[0, 1].text(0.5, 0.5, "no G-effect recorded at this step", ha="center", transform=axes[0, 1].transAxes)
    axes[0, 1].set_title(label(ds["g_effect"]) if "g_effect" in ds else "G-effect", fontsize=10)
    axes[0, 1].invert_yaxis()
    for ax in axes[0]:
        ax.axvline(0, color="0.6", lw=0.8)
    fig.suptitle(title or f"{instance} · step {step}")
    return fig


def attribution_change(ds: xr.Dataset, instance: str, *, method: str = "integrated_gradients",
                       title: str | None = None) -> Figure:
    """An instance's token attributions at its first and last attributed steps, and their difference."""
    values, texts, rows = _attribution_rows(ds, instance, None, method)
    if len(rows) < 2:
        raise KeyError("attribution_change needs attributions at two steps (attribute_at=[0, ..., steps])")
    before, after = values[0], values[-1]
    keep = ~(np.isnan(before) & np.isnan(after))
    stacked = np.stack([before[keep], after[keep], (after - before)[keep]])
    source = xr.DataArray(stacked[:, :, None], dims=("instance", "prompt_token", "method"),
                          coords={"instance": [rows[0], rows[-1], "after - before"], "method": [method],
                                  "prompt_token_text": (("instance", "prompt_token"),
                                                        np.repeat(texts[:1, keep], 3, axis=0))})
    return token_attribution(source, method=method, title=title or f"{instance}: attribution before and after")


def swept(ds: xr.Dataset, x: str, *, hue: str | None = None, seed: str = "seed", var: str = "g_effect",
          title: str | None = None) -> Figure:
    """A sweep (:func:`geffect_lab.load_sweep`) summarised against the swept setting ``x``: for ``var="g_effect"``
    the unlearning (gold) and retaining (navy) G-effect, each run's mean over its recorded steps; for a metric
    (``forget_quality``, ``model_utility`` …) its value after the last update. Lines are the mean over the
    ``seed`` coordinate's runs, bands ± 1.96 standard errors over seeds (a normal interval: with few seeds,
    read it as a spread); ``hue`` draws one line per value of another setting (e.g. ``objective``)."""
    import pandas as pd

    _needs(ds, var)
    if "run" not in ds.dims or x not in ds.coords:
        raise KeyError(f"swept() takes a sweep along 'run' with the setting {x!r} as a coordinate (gl.load_sweep)")
    if var == "g_effect":
        acc = ds.geffect
        panels = {"unlearning G-effect e_u": acc.unlearning().mean("step"),
                  "retaining G-effect e_r": acc.retaining().mean("step")}
    else:
        panels = {label(ds[var]): ds[var].isel(step=-1).mean([d for d in ds[var].dims if d not in ("run", "step")])}
    groups = [(None, None)] if hue is None else [(h, ds[hue] == h) for h in np.unique(ds[hue].values)]
    fig, axes = _new(1, len(panels), width=4.6)
    colours = [UNLEARNING, RETAINING] if hue is None else _palette(len(groups))
    for p, (name, per_run) in enumerate(panels.items()):
        ax = axes[0, p]
        for g, (value, chosen) in enumerate(groups):
            series = per_run if chosen is None else per_run.where(chosen, drop=True)
            frame = pd.DataFrame({"y": series.values.ravel(), x: series[x].values})
            stats = frame.groupby(x)["y"].agg(["mean", "sem", "count"]).sort_index()
            colour = colours[p] if hue is None else colours[g]
            band = 1.96 * stats["sem"].fillna(0.0)
            ax.plot(stats.index, stats["mean"], marker="o", color=colour, label=None if value is None else str(value))
            ax.fill_between(stats.index, stats["mean"] - band, stats["mean"] + band, color=colour, alpha=0.2, lw=0)
        ax.set_xlabel(x)
        ax.set_title(name, fontsize=10)
        ax.axhline(0, color="0.6", lw=0.8)
        if hue is not None:
            ax.legend(title=hue, fontsize=8)
    n_seeds = len(np.unique(ds[seed].values)) if seed in ds.coords else 1
    fig.suptitle(title or f"against {x}: mean over {n_seeds} seed(s), band ± 1.96 s.e.")
    return fig


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (for image widgets and files)."""
    from io import BytesIO

    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()
