"""Replay of a folder as a default HF Trainer leaves it: no starting model, a decaying schedule with warm-up, the
learning rates in the Trainer's own convention. Replay equals the live recorder (G-effects, learning rates, the
first-order prediction) to 1e-8 in float64 when told the starting model, and refuses when it cannot know it."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest

import geffect_lab as gl
from geffect_lab.cli import main
from geffect_lab.replay import ReplayError, find_checkpoints
from geffect_lab.schedule import logged_rates, read_rates
from geffect_lab.testing import relative_error

LR = 0.05
STEPS = 5


@pytest.fixture(scope="module")
def setting(target, world):
    _, tok = target
    return tok, world["forget05"][:8], {"targeted": world["forget05"][20:24], "non_targeted": world["retain95"][:4]}


class _RateSeen:
    """The optimiser's rate at the start of each step: the one the coming update uses (what the recorder reads)."""

    def __init__(self):
        from transformers import TrainerCallback

        seen = self.seen = {}

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
                seen[state.global_step] = float(optimizer.param_groups[0]["lr"])

        self.callback = Callback()


@pytest.fixture(scope="module")
def trainer_run(setting, target, tmp_path_factory, ga_trainer):
    """SGD gradient ascent under the Trainer's defaults for saving (a checkpoint every step with everything a
    Trainer writes, no checkpoint-0), a linear schedule with 2 warm-up steps, logging every step; NPO's
    G-effects recorded live, with the initial model as NPO's reference. The starting model is saved elsewhere."""
    tok, forget, targets = setting
    root = tmp_path_factory.mktemp("trainer_run")
    model = copy.deepcopy(target[0]).double()
    model.save_pretrained(root / "start")
    rec = gl.GEffectRecorder(tok, "npo", forget=forget, targets=targets, per_token=False)
    ga_trainer(model, tok, forget, [rec.trainer_callback()], output_dir=str(root / "run"), max_steps=STEPS,
               learning_rate=LR, lr_scheduler_type="linear", warmup_steps=2, save_strategy="steps", save_steps=1,
               logging_strategy="steps", logging_steps=1).train()
    return root, rec.dataset()


def test_replay_of_a_trainer_folder_equals_the_live_record(trainer_run, setting):
    root, live = trainer_run
    tok, forget, targets = setting
    assert not (root / "run" / "checkpoint-0").exists() and (root / "run" / "checkpoint-1" / "optimizer.pt").exists()
    ds = gl.replay(root / "run", None, "npo", forget=forget, targets=targets, reference=root / "start",
                   per_token=False, pg=False, progress=False)
    steps = list(range(1, STEPS))  # checkpoints 1..5; the live record has steps 0..4
    assert list(ds.step.values) == [*steps, STEPS] and ds.attrs["reference"] == f"given ({root / 'start'})"
    assert relative_error(ds.g_effect.sel(step=steps).values, live.g_effect.sel(step=steps).values) < 1e-8
    assert relative_error(ds.risk.sel(step=steps).values, live.risk.sel(step=steps).values) < 1e-8
    # the rate of the update leaving each step, as the recorder read it from the optimiser; none after the last
    np.testing.assert_allclose(ds.learning_rate.sel(step=steps).values, live.learning_rate.sel(step=steps).values,
                               rtol=1e-12)
    assert np.isnan(ds.learning_rate.sel(step=STEPS)) and "step t to step t+1" in ds.attrs["learning_rate_convention"]
    assert ds.attrs["learning_rate_source"].startswith("the Trainer's schedule") and "agreeing" in \
        ds.attrs["learning_rate_source"]
    expected = LR * np.array([0.0, 0.5, 1.0, 2 / 3, 1 / 3])  # linear: 2 warm-up steps, then decay to 0 at step 5
    np.testing.assert_allclose(live.learning_rate.values, expected, rtol=1e-12)
    # the first-order prediction accumulated from step 1 on is the live one from step 1 on
    cum, live_cum = ds.geffect.cumulative().sel(step=steps), live.geffect.cumulative().sel(step=steps)
    assert relative_error(cum.values, (live_cum - live_cum.sel(step=1)).values) < 1e-8


def test_without_the_starting_model_an_npo_replay_is_refused(trainer_run, setting, capsys):
    root, _ = trainer_run
    tok, forget, targets = setting
    args = dict(forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    with pytest.raises(ReplayError, match=r"'npo' reads a frozen reference model .*first checkpoint is "
                                          r"checkpoint-1.*reference= .*--reference FOLDER_OR_ZOO_NAME"):
        gl.replay(root / "run", None, "npo", **args)
    with pytest.raises(ReplayError, match=r"reference='first' is gone"):
        gl.replay(root / "run", None, "npo", reference="first", **args)
    # an objective that reads no reference needs none
    ga = gl.replay(root / "run", None, "ga", **args)
    assert ga.attrs["reference"].startswith("none read")
    assert main(["replay", str(root / "run"), "-O", "npo", "--forget", "forget01", "--no-pg"]) == 2
    assert "--reference FOLDER_OR_ZOO_NAME" in capsys.readouterr().err


def test_checkpoint_zero_or_a_zoo_name_is_the_starting_model(trainer_run, setting, tmp_path):
    root, live = trainer_run
    tok, forget, targets = setting
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    shutil.copytree(root / "start", run / "checkpoint-0")
    ds = gl.replay(run, tok, "npo", forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    assert ds.attrs["reference"] == "the starting model (checkpoint-0)" and ds.step.values[0] == 0
    assert relative_error(ds.g_effect.sel(step=list(range(STEPS))).values, live.g_effect.values) < 1e-8
    np.testing.assert_allclose(ds.learning_rate.sel(step=list(range(STEPS))).values, live.learning_rate.values,
                               rtol=1e-12)
    # the zoo's target is the starting model (the run trained it in float64; replay loads the zoo's in float64)
    zoo = gl.replay(root / "run", tok, "npo", forget=forget, targets=targets, reference="target", per_token=False,
                    pg=False, progress=False, dtype="float64")
    assert zoo.attrs["reference"] == "given (target)"
    assert relative_error(zoo.g_effect.sel(step=[1, 2]).values, live.g_effect.sel(step=[1, 2]).values) < 1e-8


def test_the_cli_loads_the_tokenizer_and_the_reference_from_folders(trainer_run, tmp_path, capsys):
    """A Trainer given no processing_class saves no tokenizer: --tokenizer names its folder."""
    root, live = trainer_run
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    for path in run.glob("checkpoint-*/tokenizer*"):
        path.unlink()
    assert main(["replay", str(run), "-O", "npo", "--forget", "forget01", "--no-pg", "--no-per-token"]) == 2
    assert "--tokenizer FOLDER" in capsys.readouterr().err
    out = tmp_path / "r.nc"
    assert main(["replay", str(run), "-O", "npo", "--forget", "forget01", "--no-pg", "--no-per-token",
                 "--tokenizer", str(gl.data.data_dir() / "tokenizer"), "--reference", str(root / "start"),
                 "-o", str(out)]) == 0
    ds = gl.load(out)
    assert ds.attrs["reference"] == f"given ({root / 'start'})" and list(ds.step.values) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(ds.learning_rate.sel(step=[1, 2, 3, 4]).values,
                               live.learning_rate.sel(step=[1, 2, 3, 4]).values, rtol=1e-12)


def test_rates_from_the_log_alone_and_a_run_without_them(trainer_run, tmp_path, setting):
    root, live = trainer_run
    tok, forget, targets = setting
    run = tmp_path / "run"
    shutil.copytree(root / "run", run)
    for path in run.glob("checkpoint-*/training_args.bin"):
        path.unlink()
    rates = read_rates(sorted(run.glob("checkpoint-*")))
    assert rates.source.startswith("log_history")
    np.testing.assert_allclose([rates.at(s) for s in range(STEPS)], live.learning_rate.values, rtol=1e-12)
    # a rate missing from the log (step 3's: the update leaving step 2): cumulative() refuses to take it as zero
    import json

    def drop_logged_rates(steps):
        for state_path in run.glob("checkpoint-*/trainer_state.json"):
            state = json.loads(state_path.read_text())
            state["log_history"] = [{k: v for k, v in e.items() if k != "learning_rate" or e.get("step") not in steps}
                                    for e in state["log_history"]]
            state_path.write_text(json.dumps(state))

    drop_logged_rates({3})
    args = dict(forget=forget, targets=targets, per_token=False, pg=False, progress=False)
    ds = gl.replay(run, tok, "ga", **args)
    assert np.isnan(ds.learning_rate.sel(step=[2, STEPS])).all() and not np.isnan(ds.learning_rate.sel(step=3))
    with pytest.raises(ValueError, match=r"learning rate of the update leaving step\(s\) \[2\] is unknown.*"
                                         r"log_history.*training_args.bin.*logging_steps=1"):
        ds.geffect.cumulative()
    # none at all: the Dataset has no learning_rate, the source says why, and cumulative() says what is missing
    drop_logged_rates(set(range(STEPS + 1)))
    ds = gl.replay(run, tok, "ga", **args)
    assert "learning_rate" not in ds and ds.attrs["learning_rate_source"].startswith("unknown")
    with pytest.raises(KeyError, match=r"no per-step learning rates.*gl.replay from the Trainer's training_args.bin"):
        ds.geffect.cumulative()


def test_the_logged_rate_belongs_to_the_update_its_writer_says():
    """From transformers 4.51 the rate logged at step N is the update N-1 -> N's; before, the update N -> N+1's."""
    state = {"log_history": [{"step": 1, "learning_rate": 0.1}, {"step": 2, "learning_rate": 0.2},
                             {"step": 2, "eval_loss": 1.0}]}
    assert logged_rates(state, (5, 0)) == {0: 0.1, 1: 0.2} == logged_rates(state, (4, 51))
    assert logged_rates(state, (4, 50)) == {1: 0.1, 2: 0.2}
    assert logged_rates(state, None) is None and logged_rates({"log_history": []}, None) == {}


@pytest.mark.parametrize("schedule", ["cosine", "cosine_with_restarts", "linear"])
def test_the_schedule_is_rebuilt_as_the_trainer_runs_it(schedule, target, setting, tmp_path, ga_trainer):
    """The rebuilt schedule is the rate the optimiser held at the start of every step (what the recorder reads),
    also where nothing was logged (logging every 3rd step)."""
    tok, forget, _ = setting
    seen = _RateSeen()
    kwargs = {"num_cycles": 2} if schedule == "cosine_with_restarts" else {}
    ga_trainer(copy.deepcopy(target[0]), tok, forget, [seen.callback], output_dir=str(tmp_path), max_steps=7,
               learning_rate=LR, lr_scheduler_type=schedule, lr_scheduler_kwargs=kwargs, warmup_steps=0.3,
               save_strategy="steps", save_steps=3, logging_strategy="steps", logging_steps=3).train()
    checkpoints = find_checkpoints(tmp_path)
    assert [c.step for c in checkpoints] == [3, 6, 7]
    rates = read_rates([c.path for c in checkpoints])
    assert rates.source.startswith("the Trainer's schedule")
    np.testing.assert_allclose([rates.at(s) for s in range(7)], [seen.seen[s] for s in range(7)], rtol=1e-12)
    assert len(set(np.round(list(seen.seen.values()), 12))) >= 5  # a schedule that really moves
    assert [c.learning_rate for c in checkpoints[:2]] == [seen.seen[3], seen.seen[6]]
    assert np.isnan(checkpoints[2].learning_rate)
