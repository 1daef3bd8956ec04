"""gl.sweep on a LocalCluster of 2 worker processes: the same numbers as the runs done one by one, resume, a
failing task recorded while the rest finish, a worker killed mid-sweep, and clear errors before any task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import geffect_lab as gl
from geffect_lab.sweep import SweepError, SweepRunError, expand_grid, run_name
from geffect_lab.testing import relative_error

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

BASE = {"steps": 2, "record": ["g_effect"], "batch_size": 4, "forget": "forget01"}
GRID = {"objective": ["ga", "npo"], "seed": [0, 1]}


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    with Client(cluster) as c:
        yield c
    cluster.close()


def test_a_sweep_gives_the_numbers_of_the_runs_done_one_by_one(client, target, world, tmp_path):
    ds = gl.sweep(GRID, base=BASE, out=tmp_path, client=client, progress=False)
    assert ds.sizes["run"] == 4 and sorted(set(ds.objective.values)) == ["ga", "npo"]
    assert ds.sel(objective="npo").sizes["seed"] == 2 and ds.run_name.values[0].startswith("run-")  # runs by seed
    model, tok = target
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each worker: a float32 run under Adam amplifies another thread count's rounding
    try:
        for objective in ("ga", "npo"):
            for seed in (0, 1):
                alone = gl.unlearn(model, tok, objective, world=world, seed=seed, steps=2, record=("g_effect",),
                                   batch_size=4, forget="forget01", progress=False)
                got = ds.sel(objective=objective, seed=seed)  # the varied settings index the runs
                assert relative_error(got.g_effect.values, alone.g_effect.values) < 1e-12
                assert relative_error(got.risk.values, alone.risk.values) < 1e-12
    finally:
        torch.set_num_threads(threads)
    lazy = gl.load_sweep(tmp_path, lazy=True)  # what a large sweep gets: dask arrays, read when computed
    assert lazy.g_effect.chunks is not None and lazy.compute().identical(ds)
    # by seed, as a sweep is read
    assert set(ds.groupby("seed").groups) == {0, 1}
    by_objective = ds.groupby("objective").mean().geffect.unlearning()
    assert by_objective.dims == ("objective", "step") and by_objective.notnull().sum() == 4

    # resume: the same sweep again does nothing (the files are not rewritten) and gives the same Dataset
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("run-*.nc")}
    again = gl.sweep(GRID, base=BASE, out=tmp_path, client=client, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("run-*.nc")} == stamps
    assert again.identical(ds)
    with pytest.raises(SweepError, match="holds a different sweep"):
        gl.sweep({"objective": ["wga"]}, base=BASE, out=tmp_path, client=client, progress=False)


def test_a_failing_task_is_recorded_the_rest_finish_and_the_sweep_raises(client, tmp_path):
    broken = tmp_path / "broken"  # a checkpoint folder (the parent's check) that fails to load (in the worker)
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    grid = [{"objective": "ga"}, {"objective": "ga", "model": str(broken)}]
    out = tmp_path / "sweep"
    with pytest.raises(SweepRunError, match=r"^1 of 2 runs of the sweep failed after 0 retries: run-") as caught:
        gl.sweep(grid, base=BASE, out=out, client=client, retries=0, progress=False)
    index = json.loads((out / "sweep.json").read_text())["runs"]
    failed = index[run_name({**BASE, **grid[1]})]
    assert failed["status"] == "failed" and "config.json" in failed["error"]
    assert index[run_name({**BASE, **grid[0]})]["status"] == "done"
    err = caught.value
    assert list(err.failed) == [run_name({**BASE, **grid[1]})] and err.partial.sizes["run"] == 1
    assert f"tracebacks in {out / 'sweep.json'}" in str(err) and "the 1 finished run(s) are kept" in str(err)
    # every run failing raises too (it returned None before), with nothing to keep
    with pytest.raises(SweepRunError, match=r"^1 of 1 runs of the sweep failed .* no run finished") as caught:
        gl.sweep([grid[1]], base=BASE, out=tmp_path / "none", client=client, retries=0, progress=False)
    assert caught.value.partial is None


def test_a_parameter_for_some_objectives_is_written_with_its_term(client, tmp_path):
    grid = {"objective": ["ga", "npo", "npo+gd"], "params.npo.beta": [0.1, 1.0]}
    configs = expand_grid(grid, BASE)  # GA's two configurations are one run
    assert [(c["objective"], c.get("params.npo.beta")) for c in configs] == [
        ("ga", None), ("npo", 0.1), ("npo", 1.0), ("npo+gd", 0.1), ("npo+gd", 1.0)]
    ds = gl.sweep({"objective": ["ga", "npo"], "params.npo.beta": [0.1, 1.0]}, base=BASE, out=tmp_path,
                  client=client, progress=False)
    assert ds.sizes["run"] == 3 and sorted(ds.objective.values.tolist()) == ["ga", "npo", "npo"]
    npo = ds.sel(objective="npo")
    assert sorted(npo["npo.beta"].values.tolist()) == [0.1, 1.0]
    for beta in (0.1, 1.0):  # each run measured its own β
        name = npo.sel({"npo.beta": beta}).run_name.item()
        assert json.loads(gl.load(tmp_path / f"{name}.nc").attrs["config"])["params"]["npo.beta"] == beta
    assert np.isnan(ds.sel(objective="ga")["npo.beta"].item())


def test_a_killed_worker_has_its_task_run_again(client, tmp_path):
    grid = {"objective": ["ga"], "seed": [0, 1, 2, 3]}
    result = {}
    thread = threading.Thread(target=lambda: result.update(ds=gl.sweep(grid, base=BASE, out=tmp_path,
                                                                       client=client, progress=False)))
    thread.start()
    deadline = time.time() + 120
    while time.time() < deadline and not any(client.processing().values()):
        time.sleep(0.2)
    busy = next(addr for addr, tasks in client.processing().items() if tasks)
    pid = client.run(os.getpid, workers=[busy])[busy]
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert result["ds"].sizes["run"] == 4
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"].values()
    assert all(r["status"] == "done" for r in runs)


def test_bad_sweeps_are_refused_before_any_task(tmp_path):
    with pytest.raises(SweepError, match=r"unknown setting\(s\) \['learning_rate'\]"):
        expand_grid({"learning_rate": [1e-3]})
    with pytest.raises(SweepError, match="the grid gives no value for seed"):
        expand_grid({"objective": ["ga"], "seed": []})
    with pytest.raises(SweepError, match="the grid is empty"):
        expand_grid([])
    with pytest.raises(ValueError, match=r"lr=-1 is not valid"):
        expand_grid({"lr": [1e-3, -1]})
    # every combination is resolved, objective and parameters together: an error names both
    with pytest.raises(SweepError, match=r"objective='ga', params.beta=0.1: params.beta=0.1 does not apply to the "
                                         r"objective 'ga' \(its parameters: none\); .* here params.npo.beta, "):
        expand_grid({"objective": ["ga", "npo"], "params.beta": [0.1]})
    with pytest.raises(SweepError, match=r"params.alpha=1 does not apply to the objective 'ga' .* no objective of the "
                                         r"sweep takes 'alpha'"):
        expand_grid({"objective": ["ga"], "params.alpha": [1]})
    with pytest.raises(SweepError, match=r"params.beta=-1: objective 'npo': parameter beta=-1.0 is out of range; "
                                         r"use beta > 0"):
        expand_grid({"objective": ["npo"], "params.beta": [0.1, -1]})
    with pytest.raises(SweepError, match=r"objective='nop': unknown objective 'nop'; registered objectives are: ga"):
        expand_grid({"objective": ["ga", "nop"]})
    # and what the task will read: the forget split, the model's name, the length attribute_at refers to
    with pytest.raises(SweepError, match=r"'forget07' is not a forget split; choose one of forget01"):
        expand_grid({"forget": ["forget07"]})
    with pytest.raises(SweepError, match=r"model='targte' is neither a zoo model \(target, "):
        expand_grid({"model": ["targte"]})
    with pytest.raises(SweepError, match=r"attribute_at=\[99\] must name steps between 0 and 2"):
        expand_grid({"objective": ["ga"], "attribute_at": [[1], [99]]}, base={"steps": 2})
    with pytest.raises(SweepError, match=r"dtype='float8' is not valid; use one of float64"):
        expand_grid({"dtype": ["float8"]})
    with pytest.raises(SweepError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        gl.sweep({"seed": [0]}, out=tmp_path / "x", client="tcp://127.0.0.1:9", progress=False)
    assert not (tmp_path / "x").exists()


UNGUARDED = """import geffect_lab as gl

runs = gl.sweep({"objective": ["ga"]}, base={"steps": 1}, out="sweep_out")
"""


def test_a_script_without_the_main_guard_is_refused_before_the_cluster_starts(tmp_path):
    """Dask's LocalCluster spawns workers that re-import the script: without the guard each would start the
    sweep again, and all Dask says is "Nanny failed to start" (hundreds of lines). One line instead, at once."""
    script = tmp_path / "my_sweep.py"
    script.write_text(UNGUARDED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60
    last = done.stderr.strip().splitlines()[-1]
    assert last == (f"geffect_lab.sweep.SweepError: {script} calls gl.sweep at its top level (line 3): the local "
                    "Dask cluster's worker processes re-import the script and would each start the sweep again. "
                    'Put the sweep under `if __name__ == "__main__":` (docs/howto.md, Sweeps)')
    assert "Nanny" not in done.stderr and not (tmp_path / "sweep_out").exists()


def test_cli_sweep_from_a_yaml_spec(client, tmp_path, capsys):
    from geffect_lab.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("base:\n  steps: 2\n  record: [g_effect]\n  batch_size: 4\n  forget: forget01\n"
                    "grid:\n  objective: [ga]\n  params.beta: []\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out")]) == 2
    assert "the grid gives no value for params.beta" in capsys.readouterr().err
    spec.write_text("base:\n  steps: 2\ngrid:\n  objective: [ga, npo]\n  params.beta: [0.1]\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out")]) == 2  # refused before any cluster starts
    err = capsys.readouterr().err
    assert err.startswith("geffect-lab: error: the sweep's run with objective='ga', params.beta=0.1: params.beta=0.1 "
                          "does not apply to the objective 'ga'") and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    spec.write_text(f"base:\n  steps: 2\n  model: {tmp_path / 'broken'}\ngrid:\n  objective: [ga]\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "failing"), "--retries", "0", "--scheduler",
                 client.scheduler.address]) == 1  # the runs failed, not the input
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("geffect-lab: 1 of 1 runs of the sweep failed after 0 retries: "
                                                   "run-")  # after the progress bar
    spec.write_text("base:\n  steps: 2\n  record: [g_effect]\n  batch_size: 4\n  forget: forget01\n"
                    "grid:\n  objective: [npo]\n  params.beta: [0.1, 0.5]\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out"), "--scheduler", client.scheduler.address]) == 0
    assert "2 run(s) done; in " in capsys.readouterr().out
    ds = gl.load_sweep(tmp_path / "out")
    assert sorted(ds.beta.values.tolist()) == [0.1, 0.5]
    fig = gl.plots.swept(ds, "beta")  # e_u and e_r against the swept β
    assert [ax.get_xlabel() for ax in fig.axes] == ["beta", "beta"]
    assert list(fig.axes[0].lines[0].get_xdata()) == [0.1, 0.5]
