"""gl.plots: a Dataset in, a Figure out, showing the right selection."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

import geffect_lab as gl
from geffect_lab import plots


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_paper_figure_gold_unlearning_navy_retaining(short_runs):
    ds = short_runs[0]["npo+gd"]
    fig = plots.g_effect_curves(ds)
    assert isinstance(fig, Figure)
    left, right = fig.axes[:2]
    assert left.get_title().startswith("unlearning") and right.get_title().startswith("retaining")
    total = _lines(left)["total"]
    assert total.get_color() == plots.UNLEARNING and _lines(right)["total"].get_color() == plots.RETAINING
    assert total.get_linestyle() == "-"
    assert {"embed", "shallow", "middle", "deep", "lm"} <= set(_lines(left))
    assert all(_lines(left)[g].get_linestyle() == "--" for g in ("embed", "lm"))
    # the plotted total is the mean over targeted instances of the G-effect summed over layers and terms
    np.testing.assert_allclose(total.get_ydata(), ds.geffect.unlearning().values[:-1])
    assert left.get_ylabel() == "G-effect"


def test_cumulative_view_sets_prediction_beside_measurement(short_runs):
    ds = short_runs[0]["ga"]
    fig = plots.g_effect_curves(ds, cumulative=True)
    lines = _lines(fig.axes[0])
    predicted = -ds.geffect.cumulative().sum(["layer", "term"]).where(ds.split == "targeted").mean("instance")
    np.testing.assert_allclose(lines["total (predicted)"].get_ydata(), predicted.values)
    np.testing.assert_allclose(lines["measured R_t - R_0"].get_ydata(),
                               ds.geffect.risk_change().where(ds.split == "targeted").mean("instance").values)


def test_fine_layers_and_heatmap(short_runs):
    ds = short_runs[0]["ga"]
    fig = plots.g_effect_curves(ds, coarse=False, layers=["embed", "layers.0"])
    assert set(_lines(fig.axes[0])) == {"total", "embed", "layers.0"}
    heat = plots.layer_heatmap(ds, split="non_targeted")
    ax = heat.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(ds.layer.values)
    assert "retaining" in ax.get_title()
    mesh = ax.collections[0]
    assert mesh.norm.vmin == -mesh.norm.vmax  # centred on 0
    coarse = plots.layer_heatmap(ds, coarse=True)
    assert [t.get_text() for t in coarse.axes[0].get_yticklabels()] == ["embed", "shallow", "middle", "deep", "lm"]


def test_distributions_scatter_trajectory_tokens_compare_metrics(short_runs):
    runs = short_runs[0]
    ds = runs["npo+gd"]
    dist = plots.instance_distributions(ds, step=1)
    assert "step 1" in dist.axes[0].get_title()
    pg = plots.pg_scatter(ds)
    offsets = pg.axes[0].collections[0].get_offsets()
    assert len(offsets) == int(np.isfinite(ds.pg_effect.sel(against="targeted")).sum())
    both = gl.combine([runs["ga"], runs["wga"]])
    traj = plots.trajectory(both)
    assert set(_lines(traj.axes[0])) >= {"ga", "wga"}
    inst = str(ds.instance.values[0])
    strip = plots.token_strip(ds, inst, step=2)
    texts = [t.get_text() for t in strip.axes[0].texts]
    assert "".join(texts).replace("⏎", "\n") == "".join(ds.token_text.sel(instance=inst).values)
    overlay = plots.compare(both)
    assert set(_lines(overlay.axes[0])) >= {"ga", "wga"}
    facet = plots.compare(both, kind="facet", cumulative=True)
    assert len(facet.axes) == 4 and facet.axes[0].get_shared_y_axes().joined(facet.axes[0], facet.axes[3])
    metrics = plots.metric_curves(ds)
    assert any("forget quality" in ax.get_title() for ax in metrics.axes)
    assert plots.figure_png(metrics)[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_variables_are_named(short_runs, target, world):
    model, tok = target
    bare = gl.unlearn(model, tok, "ga", world=world, steps=2, record=("g_effect",), progress=False,
                      eval={"targeted": world["forget05"][:3], "non_targeted": world["retain_perturbed"][:3]})
    with pytest.raises(KeyError, match="no pg_effect"):
        plots.pg_scatter(bare)
    with pytest.raises(KeyError, match="eval_every"):
        plots.metric_curves(bare)


@pytest.mark.slow
def test_the_readme_figure(target, world):
    """The README's figure: GA with gl.unlearn's defaults on forget05, the paper's two panels (written to
    docs/figure_g_effect.png)."""
    from pathlib import Path

    model, tok = target
    ds = gl.unlearn(model, tok, "ga", world=world, record=("g_effect",), progress=False)
    fig = plots.g_effect_curves(ds, title="GA on forget05 (the zoo's target, gl.unlearn's defaults)")
    left, right = fig.axes[:2]
    assert (_lines(left)["total"].get_ydata() < 0).all()  # GA raises the forget risk at every step
    png = plots.figure_png(fig, dpi=110)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    (Path(__file__).resolve().parents[1] / "docs" / "figure_g_effect.png").write_bytes(png)
