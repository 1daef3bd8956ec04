"""The paper's qualitative findings, reproduced on the bundled world with the zoo's `target` (seed 0).

Each test states its window and tolerance. The measured numbers, over four seeds, and the finding that does
not reproduce at this scale (WGA/TNPO's smaller |e_r|/|e_u|) are in docs/findings.md
(`docs/findings_study.py` prints them).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import geffect_lab as gl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(target, world):
    model, tok = target
    specs = {"ga": ("ga", {}), "npo": ("npo", {}), "po": ("po", {}), "npo+gd": ("npo+gd", {}),
             "npo+kl": ("npo+kl", {}), "rmu@0": ("rmu", {"layer": 0}), "rmu@3": ("rmu", {"layer": 3})}
    return {label: gl.unlearn(model, tok, obj, params=params, world=world, record=("g_effect",), progress=False)
            for label, (obj, params) in specs.items()}


def _e_u(ds):
    return ds.geffect.unlearning().values[:-1]


def _e_r(ds):
    return ds.geffect.retaining().values[:-1]


def test_npo_weight_decays_along_the_run(runs):
    """Window: the whole run (25 steps). NPO's weight 2p^β/(p^β+p_o^β) starts at exactly 1 and decays."""
    weight = runs["npo"].sample_weight.mean("sample").values[:-1]
    assert weight[0] == pytest.approx(1.0, abs=1e-6)
    assert weight[-1] < 0.1
    assert stats.spearmanr(np.arange(len(weight)), weight).statistic < -0.9


def test_ga_effects_are_negative_and_larger_than_npos(runs):
    """Window: the steps after NPO's mean weight has fallen below 0.1. There GA's unlearning and retaining
    G-effects are both negative and at least 1.5x NPO's in magnitude (seed 0: 2.3x and 2.8x)."""
    decayed = runs["npo"].sample_weight.mean("sample").values[:-1] < 0.1
    assert decayed.sum() >= 3
    ga_u, ga_r = _e_u(runs["ga"])[decayed].mean(), _e_r(runs["ga"])[decayed].mean()
    npo_u, npo_r = _e_u(runs["npo"])[decayed].mean(), _e_r(runs["npo"])[decayed].mean()
    assert ga_u < 0 and ga_r < 0 and npo_u < 0 and npo_r < 0
    assert abs(ga_u) > 1.5 * abs(npo_u) and abs(ga_r) > 1.5 * abs(npo_r)


def test_ga_is_driven_by_shallow_layers(runs):
    """Window: step 0. Embedding and the first block carry most of GA's unlearning G-effect."""
    ds = runs["ga"]
    by_layer = ds.geffect.unlearning(keep=("layer",)).isel(step=0)
    share = float(by_layer.sel(layer=["embed", "layers.0"]).sum() / by_layer.sum())
    assert share > 0.5


def test_po_is_weak_next_to_ga(runs):
    """Window: the whole run. PO's mean |e_u| is under 10 % of GA's, and it changes sign along the run."""
    po, ga = _e_u(runs["po"]), _e_u(runs["ga"])
    assert abs(po.mean()) < 0.1 * abs(ga.mean())
    assert (po > 0).any() and (po < 0).any()


@pytest.mark.parametrize("name", ["npo+gd", "npo+kl"])
def test_gd_and_kl_have_a_positive_retaining_effect(runs, name):
    """Window: steps 1 to the end (at step 0 KL's gradient is zero: the model is its own reference). The
    regulariser term's retaining G-effect is positive on average and at 80 % of the steps or more."""
    ds = runs[name]
    reg = name.split("+")[1]
    term = ds.g_effect.sel(term=reg).sum("layer").where(ds.split == "non_targeted").mean("instance").values[1:-1]
    assert term.mean() > 0 and (term > 0).mean() >= 0.8


def test_rmu_depends_on_its_layer(runs):
    """Window: the first 5 steps. RMU on block 3 moves the forget risk at least 4x harder than on block 0
    (seed 0: 19x)."""
    low, high = abs(_e_u(runs["rmu@0"])[:5].mean()), abs(_e_u(runs["rmu@3"])[:5].mean())
    assert high > 4 * low


def test_wga_and_tnpo_advantage_does_not_reproduce_consistently(target, world):
    """Not a finding of the paper reproduced, but what this scale shows instead (docs/findings.md): until the
    forget risk reaches 1 nat, WGA's |Σe_r|/|Σe_u| is 0.3x GA's with seed 0 and 2.9x with seed 1. The
    advantage the paper reports depends here on the order of the batches, not on the objective."""
    model, tok = target

    def ratio(name, seed):
        ds = gl.unlearn(model, tok, name, world=world, record=("g_effect",), seed=seed, progress=False)
        risk = ds.risk.where(ds.split == "targeted").mean("instance").values
        t = int(np.argmax(risk >= 1.0))
        return abs(_e_r(ds)[:t].sum()) / abs(_e_u(ds)[:t].sum())

    assert ratio("wga", 0) < 0.5 * ratio("ga", 0)
    assert ratio("wga", 1) > 2.0 * ratio("ga", 1)
