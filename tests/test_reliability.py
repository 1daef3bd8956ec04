"""Bad input gets one clear error before any work; a failing run loses no recorded step; files are written and
read safely; the CLI never shows a traceback for a user's mistake. The table of bad inputs is written to
docs/bad_inputs.md."""

from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import geffect_lab as gl
from geffect_lab.cli import main
from geffect_lab.data import RecordError, WorldFormatError
from geffect_lab.objectives import ObjectiveError
from geffect_lab.results import SchemaError
from geffect_lab.runs import RunError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(world):
    return {"forget": world["forget01"][:2],
            "targets": {"targeted": world["forget01"][2:4], "non_targeted": world["retain_perturbed"][:2]}}


def _example(i: int, **fields) -> dict:
    return {"id": f"x/{i}", "question": "Who wrote the book?", "answer": "Someone did.", **fields}


def _cases(model, tok, world, small, tmp: Path):
    """(what the user did, the call, the error it must raise, what the message must say)."""
    g = dict(forget=small["forget"], targets=small["targets"])
    run = dict(world=world, steps=1, progress=False)
    bad_nc, cut_nc = tmp / "garbage.nc", tmp / "truncated.nc"
    bad_nc.write_bytes(b"this is not a results file")
    gl.save(gl.g_effect(model, tok, "ga", **g), tmp / "whole.nc")
    cut_nc.write_bytes((tmp / "whole.nc").read_bytes()[:3000])
    bad_world = tmp / "world"
    bad_world.mkdir()
    (bad_world / "world.json").write_text("{questions_per_author: 20")
    small_model = gl.testing.tiny_causal_lm("llama", 64)
    long = _example(9, answer=" ".join(["word"] * 5000))
    return [
        ("g_effect: a negative chunk_size", lambda: gl.g_effect(model, tok, "ga", chunk_size=-1, **g),
         ValueError, r"chunk_size=-1 is not valid; use a whole number >= 1"),
        ("g_effect: an answer that is None", lambda: gl.g_effect(model, tok, "ga", forget=[_example(0, answer=None)],
                                                                 targets=small["targets"]),
         RecordError, r"forget example 0 \(id 'x/0'\): its answer is None; give a non-empty string"),
        ("g_effect: an empty question", lambda: gl.g_effect(model, tok, "ga", forget=small["forget"],
                                                            targets=[_example(1, question=" ")]),
         RecordError, r"its question is ' '"),
        ("g_effect: duplicate forget ids", lambda: gl.g_effect(model, tok, "ga", forget=[_example(2), _example(2)],
                                                               targets=small["targets"]),
         RecordError, r"forget examples 0 and 1 share the id 'x/2'"),
        ("g_effect: a NaN regulariser weight in params",
         lambda: gl.g_effect(model, tok, "npo+gd", {"gd.weight": float("nan")}, retain=small["forget"], **g),
         ObjectiveError, r"the weight of 'gd' is nan; give a finite number"),
        ("g_effect: NPO with beta = 0", lambda: gl.g_effect(model, tok, "npo", {"beta": 0}, **g),
         ObjectiveError, r"parameter beta=0.0 is out of range; use beta > 0"),
        ("g_effect: NPO with beta = NaN", lambda: gl.g_effect(model, tok, "npo", {"beta": math.nan}, **g),
         ObjectiveError, r"parameter 'beta' is nan; give a finite number"),
        ("g_effect: WGA with alpha < 0", lambda: gl.g_effect(model, tok, "wga", {"alpha": -1}, **g),
         ObjectiveError, r"alpha=-1.0 is out of range; use alpha >= 0"),
        ("g_effect: an infinite weight in the objective text", lambda: gl.g_effect(model, tok, "npo+1e999*gd", **g),
         ObjectiveError, r"the weight of 'gd' must be finite"),
        ("g_effect: RMU at a layer the model lacks", lambda: gl.g_effect(model, tok, "rmu", {"layer": 99}, **g),
         ObjectiveError, r"layer=99 is out of range for a model of 4 blocks"),
        ("g_effect: an answer longer than the model's positions",
         lambda: gl.g_effect(model, tok, "ga", forget=[long], targets=small["targets"]),
         ObjectiveError, r"forget instance 'x/9' is \d+ tokens long .*more than the model's \d+ positions"),
        ("g_effect: a tokenizer larger than the model's embedding",
         lambda: gl.g_effect(small_model, tok, "ga", **g),
         ObjectiveError, r"holds token id \d+, beyond the model's embedding of 64 rows"),
        ("unlearn: a negative warm-up", lambda: gl.unlearn(model, tok, "ga", warmup=-1, **run),
         ValueError, r"warmup=-1 is not valid; use a whole number >= 0"),
        ("unlearn: batch_size = 0", lambda: gl.unlearn(model, tok, "ga", batch_size=0, **run),
         ValueError, r"batch_size=0 is not valid; use a whole number > 0"),
        ("unlearn: an infinite learning rate", lambda: gl.unlearn(model, tok, "ga", lr=math.inf, **run),
         ValueError, r"lr=inf is not valid; use a finite number > 0"),
        ("unlearn: eval_every = 0", lambda: gl.unlearn(model, tok, "ga", eval_every=0, **run),
         ValueError, r"eval_every=0 is not valid"),
        ("unlearn: results into a path under a file", lambda: gl.unlearn(model, tok, "ga", out=bad_nc / "r.nc",
                                                                        **run),
         OSError, r"cannot write results to .*Choose another path \(nothing was trained\)"),
        ("GEffectRecorder: every = 0", lambda: gl.GEffectRecorder(tok, "ga", every=0, **g),
         ValueError, r"every=0 is not valid; use a whole number >= 1"),
        ("GEffectRecorder: an answer that is None",
         lambda: gl.GEffectRecorder(tok, "ga", forget=small["forget"], targets=[_example(3, answer=None)]),
         RecordError, r"target set 'targeted' example 0 \(id 'x/3'\): its answer is None"),
        ("evaluate: batch_size = 0", lambda: gl.evaluate(model, tok, world, batch_size=0),
         ValueError, r"batch_size=0 is not valid; use a whole number > 0"),
        ("attribution.tokens: n_steps = 0", lambda: gl.attribution.tokens(model, tok, small["forget"], n_steps=0),
         ValueError, r"n_steps=0 is not valid; use a whole number > 0"),
        ("estimate_memory: seq_len = 0", lambda: gl.estimate_memory(model, 8, 0),
         ValueError, r"seq_len=0 is not valid; use a whole number > 0"),
        ("zoo.load: a CUDA device this machine lacks", lambda: gl.zoo.load("target", device="cuda:7"),
         ValueError, r"device='cuda:7' does not exist here"),
        ("load_world: a malformed world.json", lambda: gl.load_world(bad_world),
         WorldFormatError, r"world.json: not valid JSON"),
        ("load: a file that is not netCDF", lambda: gl.load(bad_nc),
         SchemaError, r"garbage.nc cannot be read as a netCDF results file"),
        ("load: a truncated results file", lambda: gl.load(cut_nc),
         SchemaError, r"truncated.nc cannot be read as a netCDF results file"),
    ]


def test_bad_input_gets_one_clear_error_before_any_work(target, world, small, tmp_path):
    model, tok = target
    rows = []
    for label, call, kind, message in _cases(model, tok, world, small, tmp_path):
        before = sorted(p.name for p in tmp_path.rglob("*"))
        with pytest.raises(kind, match=message) as caught:
            call()
        assert sorted(p.name for p in tmp_path.rglob("*")) == before, f"{label}: created files"
        text = str(caught.value).replace(str(tmp_path), "<tmp>").replace("|", "\\|").splitlines()[0]
        text = re.sub(r"\(truncated file: [^)]*\)", "(truncated file: …)", text)  # byte counts vary by version
        rows.append(f"| {label} | `{type(caught.value).__name__}` | {text} |")
    page = ROOT / "docs" / "bad_inputs.md"
    page.write_text(
        "# What bad input gets\n\nWritten by `tests/test_reliability.py` (re-run it to regenerate). Each row is one "
        "mistake a user can make; the error is raised before any computation or file is made, and names the "
        "argument, the bad value and what is valid. The command line turns each into one line and exit code 2 "
        "(`--debug` shows the traceback).\n\n| input | error | message |\n|---|---|---|\n" + "\n".join(rows) + "\n")


# ------------------------------------------------------------------------------------------- runs keep steps
@pytest.fixture(scope="module")
def run_args(world):
    return dict(world=world, eval={"targeted": world["forget05"][:3], "non_targeted": world["retain_perturbed"][:3]},
                steps=5, record=("g_effect",), progress=False)


def test_an_exception_in_the_callback_keeps_every_recorded_step(target, run_args, tmp_path):
    model, tok = target

    def callback(step, partial):
        if step == 2:
            raise ValueError("my callback's bug")

    with pytest.raises(RunError, match=r"failed at step 2: ValueError: my callback's bug \(the 3 recorded step\(s\) "
                                       r"are in this error's \.partial, and written to") as caught:
        gl.unlearn(model, tok, "ga", callback=callback, out=tmp_path / "run.nc", **run_args)
    partial = caught.value.partial
    assert list(partial.step.values) == [0, 1, 2] and partial.attrs["complete"] == 0
    assert isinstance(caught.value.__cause__, ValueError)
    saved = gl.load(tmp_path / "run.nc")
    np.testing.assert_array_equal(saved.g_effect.values, partial.g_effect.values)
    assert "failed at step 2" in saved.attrs["stop_reason"]


@pytest.mark.parametrize("at", [0, 2, 4])  # the first, a middle and the last call (the step of the last update)
def test_an_exception_in_the_callback_at_any_step_keeps_what_was_recorded(target, run_args, at):
    model, tok = target

    def callback(step, partial):
        assert list(partial.step.values) == list(range(step + 1))  # it sees every step so far
        if step == at:
            raise KeyError("a slip in the user's callback")

    with pytest.raises(RunError, match=rf"failed at step {at}: KeyError") as caught:
        gl.unlearn(model, tok, "ga", callback=callback, **run_args)
    partial = caught.value.partial
    assert list(partial.step.values) == list(range(at + 1)) and partial.attrs["complete"] == 0
    assert np.isfinite(partial.g_effect.sel(step=at)).all()


def test_an_exception_in_the_objective_keeps_every_recorded_step(target, run_args, scratch_objectives):
    model, tok = target
    calls = {"n": 0}

    @gl.objective("test_breaks_later")
    def breaks(x):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("objective broke")
        return -x.mean(x.nll)

    with pytest.raises(RunError, match=r"RuntimeError: objective broke") as caught:
        gl.unlearn(model, tok, "test_breaks_later", **run_args)
    assert caught.value.partial.sizes["step"] >= 1


def test_a_metric_that_fails_keeps_every_recorded_step(target, run_args, monkeypatch):
    from geffect_lab import runs

    model, tok = target
    calls = {"n": 0}
    original = runs._Evaluator.__call__

    def flaky(self, model):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("out of memory in generation")
        return original(self, model)

    monkeypatch.setattr(runs._Evaluator, "__call__", flaky)
    with pytest.raises(RunError, match=r"failed at step 2: MemoryError") as caught:
        gl.unlearn(model, tok, "ga", eval_every=2, **run_args)
    assert list(caught.value.partial.step.values) == [0, 1]


def test_the_callback_cannot_change_the_run(target, run_args):
    model, tok = target
    tried = []

    def callback(step, partial):
        try:
            partial["risk"].values[:] = 0.0
        except ValueError as err:
            tried.append(str(err))

    ds = gl.unlearn(model, tok, "ga", callback=callback, **run_args)
    assert tried and all("read-only" in t for t in tried)
    assert (ds.risk.values > 0).all()


def test_a_run_killed_mid_way_leaves_a_loadable_file(tmp_path):
    out = tmp_path / "run.nc"
    script = textwrap.dedent(f"""
        import time
        import geffect_lab as gl
        world = gl.load_world()
        model, tok = gl.zoo.load("target")
        gl.unlearn(model, tok, "ga", world=world, steps=500, record=("g_effect",), progress=False,
                   eval={{"targeted": world["forget05"][:2], "non_targeted": world["retain_perturbed"][:2]}},
                   save_every=1, out={str(out)!r}, callback=lambda step, ds: time.sleep(0.05))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out.exists() and gl.load(out).sizes["step"] >= 3):
            time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    ds = gl.load(out)  # every step up to the last save, in a whole file
    assert ds.sizes["step"] >= 3 and ds.attrs["complete"] == 0
    assert list(ds.step.values) == list(range(ds.sizes["step"]))


# ------------------------------------------------------------------------------------------- files
def test_saves_are_atomic_with_normal_permissions(target, world, small, tmp_path, monkeypatch):
    model, tok = target
    ds = gl.g_effect(model, tok, "ga", forget=small["forget"], targets=small["targets"])
    path = tmp_path / "sub" / "m.nc"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".m.nc.abc.tmp").write_bytes(b"left by a killed save")
    gl.save(ds, path)
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in path.parent.iterdir()] == ["m.nc"]  # the stale temp file is gone

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(ds), "to_netcdf", crash)
    with pytest.raises(OSError, match="disk full"):
        gl.save(ds.assign_attrs(objective="changed"), path)
    assert [p.name for p in path.parent.iterdir()] == ["m.nc"]
    assert gl.load(path).attrs["objective"] == "ga"  # the old file is whole


def test_a_file_with_a_missing_or_foreign_variable_is_named(target, small, tmp_path):
    model, tok = target
    ds = gl.g_effect(model, tok, "ga", forget=small["forget"], targets=small["targets"])
    odd = ds.assign(surprise=ds.risk * 2)
    odd.to_netcdf(tmp_path / "odd.nc", engine="h5netcdf")
    with pytest.raises(SchemaError, match=r"variable 'surprise' is not in the schema .*odd.nc"):
        gl.load(tmp_path / "odd.nc")


# ------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("argv, message", [
    (["run", "-O", "ga", "--lr", "-1"], r"argument --lr: -1 is not valid; use a finite number > 0"),
    (["run", "-O", "ga", "--steps", "0"], r"argument --steps: 0 is not valid; use a whole number >= 1"),
    (["run", "-O", "ga", "--batch-size", "x"], r"argument --batch-size: 'x' is not a whole number"),
])
def test_cli_option_errors_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and "Traceback" not in err


def test_cli_user_errors_and_internal_errors(tmp_path, capsys, monkeypatch):
    assert main(["run", "-O", "npo", "--param", "beta=0", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("geffect-lab: error: objective 'npo': parameter beta=0.0 is out of range; use beta > 0")
    (tmp_path / "bad.nc").write_bytes(b"junk")
    assert main(["info", str(tmp_path / "bad.nc")]) == 2
    assert "bad.nc cannot be read as a netCDF results file" in capsys.readouterr().err
    assert main(["--import", "no_such_module_here", "objectives"]) == 2
    assert "--import no_such_module_here: ModuleNotFoundError" in capsys.readouterr().err

    from geffect_lab import cli

    def broken(args):
        raise TypeError("an internal slip")

    monkeypatch.setattr(cli, "_cmd_objectives", broken)
    assert main(["objectives"]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: an internal slip" in err and "bug in geffect-lab" in err and "--debug" in err
    with pytest.raises(TypeError, match="an internal slip"):
        main(["--debug", "objectives"])
