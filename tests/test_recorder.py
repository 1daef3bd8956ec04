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


# ------------------------------------------------------------------------------- faults inside an HF Trainer
def test_a_trainer_that_crashes_keeps_every_recorded_step(setting, tmp_path, ga_trainer):
    """The loss raises at the Trainer's 4th step: the steps recorded before it stay in the recorder and in its
    ``out`` file, marked incomplete."""
    from tests.conftest import ga_loss

    model, tok, forget, targets = setting
    out = tmp_path / "recorded.nc"
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False, out=out)
    trainer = ga_trainer(copy.deepcopy(model), tok, forget, [rec.trainer_callback()], output_dir=str(tmp_path),
                         max_steps=6, learning_rate=LR)
    calls = {"n": 0}

    def crashing_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("CUDA error: an illegal memory access (simulated)")
        return ga_loss(model, inputs)

    trainer.compute_loss = crashing_loss
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.train()
    ds = rec.dataset()
    assert list(ds.step.values) == [0, 1, 2, 3]  # step 3 was recorded at its start, before its loss raised
    assert ds.attrs["complete"] == 0 and "on_train_end" in ds.attrs["stop_reason"]
    saved = gl.load(out)
    np.testing.assert_array_equal(saved.g_effect.values, ds.g_effect.values)


def test_a_measurement_that_fails_inside_a_trainer_names_its_step(setting, tmp_path, ga_trainer, monkeypatch):
    """The measurement itself raises at the third record (say, out of memory): the Trainer stops with an error
    naming the step, and the two recorded steps are kept."""
    from geffect_lab.engine.api import Measurement
    from geffect_lab.recorder import RecordingError

    model, tok, forget, targets = setting
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False, out=tmp_path / "r.nc")
    original, calls = Measurement.measure, {"n": 0}

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("out of memory (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Measurement, "measure", failing)
    trainer = ga_trainer(copy.deepcopy(model), tok, forget, [rec.trainer_callback(update_effect=True)],
                         output_dir=str(tmp_path), max_steps=5, learning_rate=LR)
    with pytest.raises(RecordingError, match=r"at step 2 failed: MemoryError: out of memory \(simulated\) \(the 2 "
                                             r"recorded step\(s\) are in recorder.dataset\(\) and in .*r.nc\)"):
        trainer.train()
    assert list(rec.dataset().step.values) == [0, 1] and rec.dataset().attrs["complete"] == 0
    assert list(gl.load(tmp_path / "r.nc").step.values) == [0, 1]


def test_a_finished_trainer_run_is_complete(setting, tmp_path, ga_trainer):
    model, tok, forget, targets = setting
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False, every=2)
    ga_trainer(copy.deepcopy(model), tok, forget, [rec.trainer_callback()], output_dir=str(tmp_path),
               max_steps=3, learning_rate=LR).train()
    ds = rec.dataset()
    assert list(ds.step.values) == [0, 2] and ds.attrs["complete"] == 1 and "stop_reason" not in ds.attrs
