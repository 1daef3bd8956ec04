"""gl.replay on runs an HF Trainer saved: the G-effects at each checkpoint equal what GEffectRecorder recorded
live, and one step's interval update effect is lr times the recorder's update effect (plain SGD)."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest

import geffect_lab as gl
from geffect_lab.cli import main
from geffect_lab.replay import ReplayError, find_checkpoints
from geffect_lab.testing import relative_error

LR = 0.05
STEPS = 3


def _train(make_trainer, model, tok, forget, targets, out):
    """SGD gradient ascent with an HF Trainer, a checkpoint every step (and the initial model as checkpoint-0),
    a GEffectRecorder recording live (with the update effect)."""
    model.save_pretrained(out / "checkpoint-0")
    tok.save_pretrained(out / "checkpoint-0")
    rec = gl.GEffectRecorder(tok, "ga", forget=forget, targets=targets, per_token=False)
    make_trainer(model, tok, forget, [rec.trainer_callback(update_effect=True)], output_dir=str(out),
                 max_steps=STEPS, learning_rate=LR, save_strategy="steps", save_steps=1, logging_strategy="steps",
                 logging_steps=1, save_only_model=True).train()
    return rec.dataset()


@pytest.fixture(scope="module")
def setting(target, world):
    model, tok = target
    return tok, world["forget05"][:8], {"targeted": world["forget05"][20:24], "non_targeted": world["retain95"][:4]}


@pytest.fixture(scope="module")
def full_run(setting, target, tmp_path_factory, ga_trainer):
    tok, forget, targets = setting
    out = tmp_path_factory.mktemp("full_run")
    live = _train(ga_trainer, copy.deepcopy(target[0]).double(), tok, forget, targets, out)
    return out, live


def test_replay_equals_what_was_recorded_live(full_run, setting):
    out, live = full_run
    tok, forget, targets = setting
    ds = gl.replay(out, None, "ga", forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    assert list(ds.step.values) == list(range(STEPS + 1)) and ds.attrs["complete"] == 1
    gl.schema.validate(ds)
    steps = list(range(STEPS))
    assert relative_error(ds.g_effect.sel(step=steps).values, live.g_effect.values) < 1e-9
    assert relative_error(ds.risk.sel(step=steps).values, live.risk.values) < 1e-9
    # one step of SGD: the interval update effect is lr times the live update effect
    assert relative_error(ds.interval_effect.sel(step=steps).values, LR * live.update_effect.values) < 1e-9
    assert np.isnan(ds.interval_effect.sel(step=STEPS).values).all()
    np.testing.assert_allclose(ds.interval_risk_change.sel(step=steps).values, np.diff(ds.risk.values, axis=0))
    # the rate of the update leaving each step (checkpoint-0 included), as the recorder stores it; none after the last
    np.testing.assert_allclose(ds.learning_rate.sel(step=steps).values, live.learning_rate.values, rtol=1e-12)
    assert np.allclose(ds.learning_rate.sel(step=steps), LR) and np.isnan(ds.learning_rate.sel(step=STEPS))
    # by first order, the interval effect predicts the measured risk change
    predicted = -ds.interval_effect.sel(step=steps).sum("layer").values
    assert relative_error(ds.interval_risk_change.sel(step=steps).values, predicted) < 0.02


def test_lora_adapter_checkpoints_replay_over_the_adapters(setting, target, tmp_path, ga_trainer):
    from peft import LoraConfig, get_peft_model

    tok, forget, targets = setting
    base = copy.deepcopy(target[0]).double()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    live = _train(ga_trainer, peft_model, tok, forget, targets, tmp_path)
    assert (tmp_path / "checkpoint-2" / "adapter_config.json").exists()
    ds = gl.replay(tmp_path, tok, "ga", forget=forget, targets=targets, base_model=base, per_token=False,
                   pg=False, progress=False)
    assert ds.attrs["trainable_parameters"] < ds.attrs["model_parameters"] / 10
    steps = list(range(STEPS))
    assert relative_error(ds.g_effect.sel(step=steps).values, live.g_effect.values) < 1e-9
    assert relative_error(ds.interval_effect.sel(step=steps).values, LR * live.update_effect.values) < 1e-9
    # without checkpoint-0, NPO's reference is the adapters' base model: the same numbers as passing it
    later = [tmp_path / f"checkpoint-{s}" for s in range(1, STEPS + 1)]
    args = dict(forget=forget, targets=targets, base_model=base, per_token=False, pg=False, progress=False)
    npo = gl.replay(later, tok, "npo", **args)
    assert npo.attrs["reference"] == "the adapters' base model (an adapter run's starting model)"
    np.testing.assert_array_equal(npo.g_effect.values, gl.replay(later, tok, "npo", reference=base,
                                                                 **args).g_effect.values)


def test_an_interrupted_replay_returns_what_it_measured(full_run, setting, monkeypatch):
    import sys

    replay_module = sys.modules["geffect_lab.replay"]  # gl.replay is the function
    out, _ = full_run
    tok, forget, targets = setting
    calls = {"n": 0}
    original = replay_module._Loader.load

    def load(self, ckpt):
        calls["n"] += 1
        if calls["n"] == 4:  # the first load sets up, then checkpoints 3, 2 … are measured
            raise KeyboardInterrupt
        return original(self, ckpt)

    monkeypatch.setattr(replay_module._Loader, "load", load)
    ds = gl.replay(out, tok, "ga", forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    assert list(ds.step.values) == [2, 3] and ds.attrs["complete"] == 0


def test_bad_run_folders_are_named(full_run, setting, target_gpt2, tmp_path):
    out, _ = full_run
    tok, forget, targets = setting
    args = dict(forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match=r"empty: no checkpoint-\* folders"):
        gl.replay(tmp_path / "empty", tok, "ga", **args)
    moved = tmp_path / "moved"
    shutil.copytree(out / "checkpoint-2", moved / "checkpoint-7")
    with pytest.raises(ReplayError, match=r"trainer_state.json says global_step 2, but the folder is named "
                                          r"checkpoint-7"):
        find_checkpoints(moved)
    mixed = tmp_path / "mixed"
    for step in (0, 2, 3):
        shutil.copytree(out / f"checkpoint-{step}", mixed / f"checkpoint-{step}")
    target_gpt2[0].save_pretrained(mixed / "checkpoint-1")
    with pytest.raises(ReplayError, match=r"checkpoint-1 is not the architecture of the run's other checkpoints") \
            as caught:
        gl.replay(mixed, tok, "ga", **args)
    assert list(caught.value.partial.step.values) == [2, 3]  # measured before the failure: kept
    assert caught.value.partial.attrs["complete"] == 0
    ou = tmp_path / "ou"
    shutil.copytree(out / "checkpoint-1", ou / "checkpoint-1")
    (ou / ".hydra").mkdir()
    (ou / ".hydra" / "config.yaml").write_text("forget_split: forget01\ntrainer:\n  handler: UNDIAL\n")
    with pytest.raises(ReplayError, match=r"ou/.hydra/config.yaml: .*UNDIAL.*mapped methods: GradAscent"):
        gl.replay(ou, tok, forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    adapter = tmp_path / "adapter" / "checkpoint-1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/not-here"}))
    with pytest.raises(ReplayError, match=r"is a PEFT adapter whose base model 'org/not-here' is not a folder here"):
        gl.replay(adapter.parent, tok, "ga", **args)


def test_cli_replay(full_run, tmp_path, capsys):
    out, _ = full_run
    result = tmp_path / "replay.nc"
    assert main(["replay", str(out), "--objective", "npo", "--param", "beta=0.2", "--forget", "forget01",
                 "--no-per-token", "-o", str(result)]) == 0
    ds = gl.load(result)
    assert list(ds.step.values) == list(range(STEPS + 1)) and "pg_effect" in ds and "interval_effect" in ds
    assert ds.attrs["objective"] == "npo" and "4 checkpoints replayed" in capsys.readouterr().out
    assert main(["replay", str(tmp_path), "-O", "ga"]) == 2
    assert "no checkpoint-* folders" in capsys.readouterr().err


OU_CONFIG = """forget_split: forget01
retain_split: retain99
model:
  model_args:
    pretrained_model_name_or_path: {model}
trainer:
  handler: NPO
  method_args:
    beta: 0.2
    alpha: 0.5
    gamma: 1.0
    retain_loss_type: NLL
data:
  forget:
    TOFU_QA_forget:
      args:
        hf_args:
          path: locuslab/TOFU
          name: ${{forget_split}}
"""


def test_an_open_unlearning_folder_replays_from_its_own_configuration(full_run, tmp_path, monkeypatch):
    """The method, its method_args and the forget split are read from .hydra/config.yaml; the data from the TOFU
    folder (here the bundled world, in TOFU's format: real TOFU's answers are longer than the zoo model's 128
    positions, which replay refuses by name)."""
    from geffect_lab.objectives import from_open_unlearning
    from geffect_lab.replay import read_open_unlearning_run
    from geffect_lab.runs import select_eval

    out, _ = full_run
    folder = tmp_path / "ou_run"
    shutil.copytree(out, folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text(OU_CONFIG.format(model=folder / "checkpoint-0"))
    run = read_open_unlearning_run(folder)
    assert (run.method, run.forget_split, run.method_args["beta"]) == ("NPO", "forget01", 0.2)
    monkeypatch.setenv("GEFFECT_TOFU_DIR", str(gl.data.data_dir() / "world"))
    ds = gl.replay(folder, per_token=False, pg=False, progress=False)
    assert ds.attrs["objective"] == "npo+0.5*gd" and '"gd.weight": 0.5' in ds.attrs["objective_params"]
    world = gl.load_world(gl.data.data_dir() / "world")
    forget, retain = list(world.forget("forget01")), list(world.retain("forget01"))
    targets = select_eval(forget, retain)
    explicit = gl.replay(folder, None, from_open_unlearning("NPO", {"beta": 0.2, "alpha": 0.5}), forget=forget,
                         targets=targets, retain=gl.data.spread([e for e in retain if e not in targets["non_targeted"]],
                                                                len(forget)),
                         per_token=False, pg=False, progress=False)
    np.testing.assert_array_equal(ds.g_effect.values, explicit.g_effect.values)
    assert main(["replay", str(folder), "--no-per-token", "--no-pg", "-o", str(tmp_path / "ou.nc")]) == 0
    assert gl.load(tmp_path / "ou.nc").attrs["objective"] == "npo+0.5*gd"
