"""gl.unlearn: what it records, how it stops, and what it leaves untouched."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.objectives import ObjectiveError
from geffect_lab.testing import relative_error


@pytest.fixture(scope="module")
def small_eval(world):
    return {"targeted": world["forget05"][:6], "non_targeted": world["retain_perturbed"][:6]}


@pytest.fixture(scope="module")
def npo_gd_run(target, world, small_eval):
    model, tok = target
    return gl.unlearn(model, tok, "npo+gd", forget="forget05", world=world, eval=small_eval, steps=4,
                      batch_size=8, progress=False)


def test_a_run_records_every_variable_at_every_step(npo_gd_run, world, small_eval):
    ds = npo_gd_run
    assert list(ds.step.values) == [0, 1, 2, 3, 4]  # 4 recorded steps + the risks after the last update
    assert ds.g_effect.dims == ("step", "instance", "layer", "term") and list(ds.term.values) == ["forget", "gd"]
    for name in ("g_effect", "g_effect_token", "pg_effect", "sample_effect", "update_effect", "sample_weight"):
        assert np.isfinite(ds[name].isel(step=slice(0, 4))).any(), name
        assert np.isnan(ds[name].isel(step=4)).all(), name
    assert np.isfinite(ds.risk).all() and np.isfinite(ds.objective_loss.isel(step=slice(0, 4))).all()
    assert list(ds.sample.values) == [e.id for e in world["forget05"]]
    # each step's per-sample effects cover exactly that step's forget batch
    for name in ("pg_effect", "sample_effect"):
        assert (np.isfinite(ds[name].isel(step=0, against=0)).sum() == 8).item(), name
    assert ds.attrs["complete"] == 1 and ds.attrs["objective"] == "npo+gd" and ds.attrs["steps"] == 4
    assert list(ds.instance.values) == [e.id for e in small_eval["targeted"] + small_eval["non_targeted"]]
    assert float(ds.sample_weight.isel(step=0).mean()) == pytest.approx(1.0)  # NPO's weight at the reference


def test_sample_effects_sum_to_the_forget_terms_unlearning_effect(npo_gd_run):
    ds = npo_gd_run
    for step in range(4):
        share = ds.sample_effect.isel(step=step).sel(against="targeted")
        e_forget = ds.g_effect.isel(step=step).sel(term="forget").sum("layer").where(
            ds.split == "targeted", drop=True).mean()
        assert float(share.sum(skipna=True)) == pytest.approx(float(e_forget), rel=1e-4)  # a float32 model
        # NPO's share is its weight times the paper's PG-effect over the batch size
        np.testing.assert_allclose(share, ds.sample_weight.isel(step=step) * ds.pg_effect.isel(step=step).sel(
            against="targeted") / 8, rtol=1e-4)


def test_the_callers_model_is_untouched_unless_inplace(target, world, small_eval):
    model, tok = target
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gl.unlearn(model, tok, "ga", world=world, eval=small_eval, steps=2, record=(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training
    copy, _ = gl.zoo.load("target")
    ds = gl.unlearn(copy, tok, "ga", world=world, eval=small_eval, steps=2, record=(), progress=False,
                    inplace=True)
    assert not all(torch.equal(v, copy.state_dict()[k]) for k, v in before.items())
    # the last row's risks are those of the model as it is now
    from geffect_lab.engine.forward import risk_and_tokens

    with torch.no_grad():
        risk, _, _ = risk_and_tokens(copy, gl.encode(tok, small_eval["targeted"] + small_eval["non_targeted"]))
    np.testing.assert_allclose(ds.risk.isel(step=-1).values, risk.double().numpy(), rtol=1e-5)


def test_update_effect_equals_the_g_effect_under_sgd(world, small_eval):
    model, tok = gl.zoo.load("target", dtype=torch.float64)
    ds = gl.unlearn(model, tok, "npo+gd", world=world, eval=small_eval, steps=3, batch_size=8, lr=0.05,
                    optimizer="sgd", record=("g_effect", "update_effect"), progress=False)
    steps = slice(0, 3)
    assert relative_error(ds.update_effect.isel(step=steps), ds.g_effect.isel(step=steps).sum("term")) < 1e-8
    adam = gl.unlearn(model, tok, "npo+gd", world=world, eval=small_eval, steps=3, batch_size=8,
                      optimizer="adam", record=("g_effect", "update_effect"), progress=False)
    # Adam's preconditioner changes the story: the step is not the gradient
    assert relative_error(adam.update_effect.isel(step=steps), adam.g_effect.isel(step=steps).sum("term")) > 0.1


def test_first_order_prediction_along_the_run(world, small_eval):
    """Σ_s lr_s·e_s (the cumulative view) predicts the measured risk change while steps stay small."""
    model, tok = gl.zoo.load("target-gpt2", dtype=torch.float64)
    ds = gl.unlearn(model, tok, "ga", world=world, eval=small_eval, steps=3, lr=1e-3, optimizer="sgd",
                    record=("g_effect",), progress=False)
    predicted = -ds.geffect.cumulative().sum(["layer", "term"])
    measured = ds.geffect.risk_change()
    np.testing.assert_allclose(predicted.isel(step=-1), measured.isel(step=-1), rtol=0.05)


def test_record_every_and_defaults(target, world):
    model, tok = target
    ds = gl.unlearn(model, tok, "ga", world=world, steps=5, record_every=2, record=("g_effect",), progress=False)
    assert list(ds.step.values) == [0, 2, 4, 5]
    assert (ds.split == "targeted").sum() == 32 and (ds.split == "non_targeted").sum() == 32
    import json

    sizes = json.loads(ds.attrs["data"])
    assert sizes["n_retain_train"] == len(world["retain95"]) - 32  # held-out non-targeted instances
    assert all(world["forget05"][i].id in set(ds.instance.values) for i in (0, 49))  # spread over the split


def test_each_variable_at_its_own_cadence(target, world, small_eval, npo_gd_run):
    """record_every={var: k}: per-token G-effects every 2nd step, the PG-effect every 3rd, the layer G-effects every
    step; the rest is NaN, the values where recorded are those of the run that records everything."""
    model, tok = target
    every = {"g_effect_token": 2, "pg_effect": 3, "sample_effect": 3}
    ds = gl.unlearn(model, tok, "npo+gd", forget="forget05", world=world, eval=small_eval, steps=4, batch_size=8,
                    record_every=every, progress=False)
    full = npo_gd_run
    assert list(ds.step.values) == [0, 1, 2, 3, 4] and ds.attrs["record_every"] == json.dumps(dict(sorted(
        every.items())))
    steps = [0, 1, 2, 3]

    def held(name):
        return [int(t) for t in steps if ds[name].sel(step=t).notnull().any()]

    assert held("g_effect") == held("update_effect") == steps
    assert held("g_effect_token") == [0, 2] and held("pg_effect") == held("sample_effect") == [0, 3]
    for name, at in (("g_effect", steps), ("g_effect_token", [0, 2]), ("pg_effect", [0, 3]), ("risk", steps)):
        assert relative_error(ds[name].sel(step=at).values, full[name].sel(step=at).values) <= 1e-5, name
    assert gl.RunConfig.from_dataset(ds).record_every == dict(sorted(every.items()))
    for bad, message in [({"g_effect_tokens": 2}, r"record_every names \['g_effect_tokens'\], which are not "
                                                  r"per-step variables"),
                         ({"g_effect": 0}, r"record_every\['g_effect'\]=0 is not valid"),
                         ({"pg_effect": 2, "sample_effect": 3}, r"different cadences \[2, 3\]")]:
        with pytest.raises(ValueError, match=message):
            gl.unlearn(model, tok, "ga", world=world, steps=1, record_every=bad, progress=False)


def test_a_run_is_deterministic(target, world, small_eval):
    model, tok = target
    args = dict(world=world, eval=small_eval, steps=3, record=("g_effect",), progress=False, seed=3)
    a, b = gl.unlearn(model, tok, "wga", **args), gl.unlearn(model, tok, "wga", **args)
    assert np.array_equal(a.g_effect.values, b.g_effect.values, equal_nan=True)


def test_the_stored_configuration_re_creates_the_run(target, world, small_eval, tmp_path):
    """A run's options are one frozen RunConfig in attrs["config"]; from a saved file it runs again to the same
    numbers (given the same model and data)."""
    model, tok = target
    ds = gl.unlearn(model, tok, "npo+gd", params={"beta": 0.2}, world=world, eval=small_eval, steps=3, lr=2e-3,
                    optimizer="sgd", warmup=2, seed=5, batch_size=4, record=("g_effect", "update_effect"),
                    progress=False)
    gl.save(ds, tmp_path / "run.nc")
    config = gl.RunConfig.from_dataset(gl.load(tmp_path / "run.nc"))
    assert config == gl.RunConfig(objective="npo+gd", params={"npo.weight": 1.0, "npo.beta": 0.2, "gd.weight": 1.0,
                                                              "gd.pooled": False},
                                  steps=3, lr=2e-3, optimizer="sgd", warmup=2, seed=5, batch_size=4,
                                  record=("g_effect", "update_effect"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    again = config.unlearn(model, tok, world=world, eval=small_eval, progress=False)
    for name in ("g_effect", "update_effect", "risk", "learning_rate", "sample_loss"):
        np.testing.assert_array_equal(again[name].values, ds[name].values)
    custom = gl.unlearn(model, tok, "ga", forget=world["forget05"][:4], retain=[], eval=small_eval, steps=1,
                        record=("g_effect",), progress=False)
    with pytest.raises(ValueError, match="given its own forget examples: pass them again as forget="):
        gl.RunConfig.from_dataset(custom).unlearn(model, tok)


def test_options_are_checked_before_any_work(target, world, tmp_path):
    """One error naming the option, its value and what is valid; nothing is created or trained first."""
    model, tok = target
    out = tmp_path / "not" / "made"
    for options, message in [({"lr": float("nan")}, r"lr=nan is not valid; use a finite number > 0"),
                             ({"warmup": -1}, r"warmup=-1 is not valid; use a whole number >= 0"),
                             ({"batch_size": 0}, r"batch_size=0 is not valid; use a whole number > 0"),
                             ({"chunk_size": -3}, r"chunk_size=-3 is not valid"),
                             ({"steps": 2.5}, r"steps=2.5 is not valid; use a whole number > 0 \(or None\)"),
                             ({"save_every": 0}, r"save_every=0 is not valid"),
                             ({"attribute_methods": ("saliency",)}, r"attribute_methods: unknown \['saliency'\]")]:
        with pytest.raises(ValueError, match=message):
            gl.unlearn(model, tok, "ga", world=world, out=out / "run.nc", progress=False, **options)
    assert not (tmp_path / "not").exists()


def test_callback_sees_partial_results_and_can_stop(target, world, small_eval):
    model, tok = target
    seen = []

    def callback(step, partial):
        seen.append((step, partial.sizes["step"]))
        return "stop" if step == 1 else None

    ds = gl.unlearn(model, tok, "ga", world=world, eval=small_eval, steps=6, record=("g_effect",),
                    callback=callback, progress=False)
    assert seen == [(0, 1), (1, 2)]
    assert list(ds.step.values) == [0, 1, 2] and ds.attrs["complete"] == 0
    assert "stopped by the callback after step 1" in ds.attrs["stop_reason"]


def test_keyboard_interrupt_returns_what_was_recorded(target, world, small_eval):
    model, tok = target

    def callback(step, partial):
        if step == 2:
            raise KeyboardInterrupt

    ds = gl.unlearn(model, tok, "ga", world=world, eval=small_eval, steps=6, record=("g_effect",),
                    callback=callback, progress=False)
    assert list(ds.step.values) == [0, 1, 2, 3] and ds.attrs["complete"] == 0
    assert ds.attrs["stop_reason"].startswith("interrupted")


def test_save_every_writes_loadable_partial_files(target, world, small_eval, tmp_path):
    model, tok = target
    out = tmp_path / "sub" / "run.nc"
    sizes = []

    def callback(step, partial):
        sizes.append(gl.load(out).sizes["step"] if out.exists() else 0)

    ds = gl.unlearn(model, tok, "ga", world=world, eval=small_eval, steps=4, record=("g_effect",),
                    save_every=2, out=out, callback=callback, progress=False)
    assert sizes == [0, 2, 2, 4]
    assert gl.load(out).identical(gl.load(out)) and gl.load(out).sizes["step"] == ds.sizes["step"]


def test_a_nan_loss_mid_run_keeps_the_recorded_steps(target, world, small_eval, scratch_objectives):
    model, tok = target
    calls = {"n": 0}

    @gl.objective("test_nan_later")
    def nan_later(x):
        calls["n"] += 1
        loss = -x.mean(x.nll)
        return loss * float("nan") if calls["n"] > 2 else loss

    with pytest.warns(RuntimeWarning, match="step 2.*'test_nan_later' returned a non-finite loss"):
        ds = gl.unlearn(model, tok, "test_nan_later", world=world, eval=small_eval, steps=5,
                        record=("g_effect",), progress=False)
    assert list(ds.step.values) == [0, 1, 2] and ds.attrs["complete"] == 0
    assert "step 2" in ds.attrs["stop_reason"]


def test_bad_input_fails_before_training(target, world, tmp_path):
    model, tok = target
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot write results to .*nothing was trained"):
        gl.unlearn(model, tok, "ga", world=world, steps=1, out=blocker / "run.nc", progress=False)
    with pytest.raises(ObjectiveError, match="unknown objective 'gaa'.*ga, wga"):
        gl.unlearn(model, tok, "gaa", world=world, steps=1, progress=False)
    with pytest.raises(ObjectiveError, match="parameter 'beta' must be float"):
        gl.unlearn(model, tok, "npo", params={"beta": "x"}, world=world, steps=1, progress=False)
    with pytest.raises(ObjectiveError, match="forget set is empty"):
        gl.unlearn(model, tok, "ga", forget=[], steps=1, progress=False)
    with pytest.raises(ObjectiveError, match="evaluation set 'non_targeted' is empty"):
        gl.unlearn(model, tok, "ga", world=world, eval={"targeted": world["forget05"][:2], "non_targeted": []},
                   steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        gl.unlearn(model, tok, "ga", world=world, steps=1, optimizer="lion", progress=False)
    with pytest.raises(ValueError, match="cannot record"):
        gl.unlearn(model, tok, "ga", world=world, steps=1, record=("g_efect",), progress=False)
