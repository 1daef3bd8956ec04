"""G-effects recorded from loops geffect-lab does not own: a hand-written PyTorch loop and an HF Trainer."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.testing import relative_error

LR = 0.05


@pytest.fixture(scope="module")
def setting(target, world):
    model, tok = target
    forget = world["forget05"][:8]
    targets = {"targeted": world["forget05"][20:26], "non_targeted": world["retain95"][:6]}
    return model, tok, forget, targets


def test_a_hand_written_loop_records_what_g_effect_measures_at_each_step(setting, hand_written_ga):
    model, tok, forget, targets = setting
    work, initial = copy.deepcopy(model), copy.deepcopy(model)
    rec = gl.GEffectRecorder(tok, "npo", forget=forget, targets=targets, pg=True)
    opt = torch.optim.SGD(work.parameters(), lr=0.5)
    batch = gl.encode(tok, forget)
    expected = []
    for step in range(3):
        rec.record(work, step, lr=0.5)
        expected.append(gl.g_effect(copy.deepcopy(work), tok, "npo", forget=forget, targets=targets,
                                    reference=initial, pg=True))
        opt.zero_grad()
        hand_written_ga(work, batch).backward()
        opt.step()
    ds = rec.dataset()
    assert list(ds.step.values) == [0, 1, 2] and len(rec) == 3
    assert ds.attrs["recorded_by"] == "GEffectRecorder" and ds.attrs["reference"] == "initial model"
    for step, exp in enumerate(expected):
        got = ds.sel(step=step)
        for var in ("g_effect", "g_effect_token", "pg_effect", "risk", "sample_weight"):
            assert relative_error(got[var].values, exp[var].isel(step=0).values) < 1e-10, (step, var)
    # NPO against the frozen initial model: weight exactly 1 at the start, moved once the loop has trained
    assert np.allclose(ds.sample_weight.sel(step=0), 1.0, rtol=0, atol=1e-12)
    assert not np.allclose(ds.sample_weight.sel(step=2), 1.0, rtol=0, atol=1e-6)
    assert np.allclose(ds.learning_rate, 0.5)
    # the schema is gl.unlearn's: the accessor and save/load work on it
    assert ds.geffect.cumulative().sizes["step"] == 3
    for name in ds.data_vars:
        assert ds[name].attrs.get("long_name"), name


def test_update_records_the_optimisers_actual_step(setting, hand_written_ga):
    """Plain SGD on the objective the recorder measures: the step is -lr·∇L_u, so update_effect = g_effect."""
    model, tok, forget, targets = setting
    work = copy.deepcopy(model).double()
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False)
    opt = torch.optim.SGD(work.parameters(), lr=LR)
    batch = gl.encode(tok, forget)
    for step in range(2):
        with rec.update(work, step, lr=LR):
            opt.zero_grad()
            hand_written_ga(work, batch).backward()
            opt.step()
    ds = rec.dataset()
    assert relative_error(ds.update_effect.values, ds.g_effect.sel(term="forget").values) < 1e-8
    # measured at θ_t, not θ_{t+1}: the risks recorded at step 1 are those after the first update
    assert not np.allclose(ds.risk.sel(step=0), ds.risk.sel(step=1), rtol=1e-9, atol=0)


def test_steps_must_increase_and_an_empty_recorder_says_so(setting):
    model, tok, forget, targets = setting
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False, every=2)
    with pytest.raises(ValueError, match="nothing recorded yet"):
        rec.dataset()
    assert rec.record(model, 1) is None  # not due
    rec.record(model, 2)
    with pytest.raises(ValueError, match="steps must increase"):
        rec.record(model, 2)


def test_hf_trainer_callback_records_each_global_step(setting, tmp_path, ga_trainer):
    model, tok, forget, targets = setting
    work, initial = copy.deepcopy(model).double(), copy.deepcopy(model).double()
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False)
    ga_trainer(work, tok, forget, [rec.trainer_callback(update_effect=True)], output_dir=str(tmp_path),
               max_steps=3, learning_rate=LR).train()
    ds = rec.dataset()
    assert list(ds.step.values) == [0, 1, 2]
    assert np.allclose(ds.learning_rate, LR)
    # step 0 is what g_effect measures on the initial model
    first = gl.g_effect(initial, tok, "ga", forget=forget, targets=targets, per_token=False, pg=False)
    assert relative_error(ds.g_effect.sel(step=0).values, first.g_effect.isel(step=0).values) < 1e-10
    # the Trainer trained GA on the same samples with SGD: its steps are exactly -lr·∇L_u ...
    assert relative_error(ds.update_effect.values, ds.g_effect.sel(term="forget").values) < 1e-8  # here: 1e-12
    # ... and the recorded G-effects predict its risk changes to first order
    predicted = -LR * ds.g_effect.sel(step=[0, 1]).sum(["layer", "term"]).values
    measured = ds.risk.diff("step").values
    assert relative_error(measured, predicted) < 0.01  # measured here: 0.3 %
