"""The dashboard's views as tables: a view's name → a function (run, selection) → matplotlib Figure.

Each function only turns the Explore tab's selection into the arguments of one plot of :mod:`geffect_lab.plots`;
a new view is one function and one row here, and the tabs never branch on a view's name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import xarray as xr

from .. import plots


@dataclass(frozen=True)
class Selection:
    """What the Explore tab shows: which run and view, and the split, instance, step and layers chosen."""

    run: str
    view: str
    split: str
    instance: str | None
    step: int
    coarse: bool
    layers: list[str] | None
    cumulative: bool


def recorded(ds: xr.Dataset, var: str, step) -> bool:
    """Whether ``var`` holds any value at ``step`` (steps where nothing was recorded hold NaN)."""
    return var in ds and bool(ds[var].sel(step=step).notnull().any())


def _step_or(ds: xr.Dataset, sel: Selection, fallback):
    return sel.step if recorded(ds, "g_effect", sel.step) else fallback


def _curves(ds, sel: Selection):
    return plots.g_effect_curves(ds, cumulative=sel.cumulative, coarse=sel.coarse,
                                 layers=None if sel.coarse else sel.layers)


Plot = Callable[[xr.Dataset, Selection], object]

VIEW_PLOTS: dict[str, Plot] = {
    "curves": _curves,
    "heatmap": lambda ds, sel: plots.layer_heatmap(ds, split=sel.split, coarse=sel.coarse),
    "distributions": lambda ds, sel: plots.instance_distributions(ds, step=_step_or(ds, sel, None)),
    "PG-effect scatter": lambda ds, sel: plots.pg_scatter(ds, step=_step_or(ds, sel, None)),
    "sample-effect scatter": lambda ds, sel: plots.pg_scatter(ds, step=_step_or(ds, sel, None), var="sample_effect"),
    "tokens": lambda ds, sel: plots.token_strip(ds, sel.instance, step=_step_or(ds, sel, 0)),
    "metrics": lambda ds, sel: plots.metric_curves(ds),
    "trajectory": lambda ds, sel: plots.trajectory(ds),
}
VIEWS = tuple(VIEW_PLOTS)

AttributionPlot = Callable[[xr.Dataset, Selection, str], object]

ATTRIBUTION_PLOTS: dict[str, AttributionPlot] = {
    "tokens": lambda ds, sel, method: plots.token_attribution(ds, instance=sel.instance, method=method),
    "layers vs G-effect": lambda ds, sel, method: plots.layer_attribution(
        ds, sel.instance, step=sel.step if recorded(ds, "layer_attribution", sel.step) else None),
    "before / after": lambda ds, sel, method: plots.attribution_change(ds, sel.instance, method=method),
}
