"""What rounding does to a step (docs/rounding.md is written here): under SGD the recorded update effect is the
G-effect in float64; in float32 it drifts from it as the step shrinks towards the spacing of the weights; in
bfloat16 at the paper's learning rate no weight moves at all."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _study():
    spec = importlib.util.spec_from_file_location("rounding_study", ROOT / "docs" / "rounding_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounding_of_the_step_and_the_page():
    study = _study()
    rows = {(r["dtype"], r["lr"]): r for r in study.measure()}
    exact = rows["float64", 1e-4]
    assert exact["e_u_gap"] < 1e-8 and exact["median_gap"] < 1e-8  # measured: 1e-10
    f32 = [rows["float32", lr] for lr in (1e-4, 1e-3, 1e-2)]
    assert f32[0]["e_u_gap"] > 0.05  # measured: 39 % at lr 1e-4
    assert f32[0]["e_u_gap"] > f32[1]["e_u_gap"] > f32[2]["e_u_gap"]  # a larger step, relatively less rounding
    assert f32[0]["unchanged_share"] > f32[1]["unchanged_share"] > f32[2]["unchanged_share"] > 0
    for lr in (1e-5, 1e-3):  # pure bfloat16: practically no weight moves (measured: all, or all but 3e-5), u ≈ 0
        assert rows["bfloat16", lr]["unchanged_share"] > 0.999 and abs(rows["bfloat16", lr]["e_u_gap"] - 1) < 0.01
    (ROOT / "docs" / "rounding.md").write_text(f"""# What rounding does to a step

Written by `tests/test_rounding.py` from `docs/rounding_study.py` (re-run either). The zoo's `target` takes 3
plain-SGD steps of GA (batch 10 of forget05, constant lr) with its weights stored in each dtype; each step
records the G-effect `e` (the first-order effect of the exact step `−lr·∇L`) and the update effect `u` (the
effect of the step the stored weights really took, `(θ_t − θ_(t+1))/lr`), on 8 targeted and 8 non-targeted
instances. In exact arithmetic `u = e` under SGD.

{study.table(list(rows.values()))}

**Why.** A stored weight changes only by multiples of the spacing of the numbers near it (about 1e-7 of the
weight in float32, 8e-3 in bfloat16). A step smaller than half that spacing is lost; the others are rounded to
it. The zoo model is saturated (its answers have p ≈ 1), so GA's gradients are small and at lr 1e-4 most float32
steps are lost or rounded: `u` and `e` differ by tens of percent. In bfloat16, at the paper's lr 1e-5 and even
at 1e-3, practically none of the weights a float64 step moves changes (the last column): the run does
next to nothing while its G-effects predict forgetting.

**What to do.**
- Read `update_effect` (record it: `record=(..., "update_effect")`, or `GEffectRecorder.update`) for what a run
  *did*; the G-effect says what the objective *asks for*. They agree only when the step survives rounding.
- Train with float32 master weights: keep the parameters and the optimiser in float32 and compute in bfloat16
  (autocast; the HF Trainer's `bf16=True` does this), not a model loaded in bfloat16 and stepped directly.
- A larger learning rate shrinks the relative rounding (the table's float32 rows), at the price of leaving the
  first-order regime sooner (`ds.geffect.cumulative()` against `ds.geffect.risk_change()` shows where).
- Measure in float64 when a number must be exact: `gl.zoo.load(..., dtype="float64")`, or `model.double()`.
""")
