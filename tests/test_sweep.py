"""gl.sweep on a LocalCluster of 2 worker processes: the same numbers as the runs done one by one, resume, a
failing task recorded while the rest finish, a worker killed mid-sweep, and clear errors before any task."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch

import geffect_lab as gl
from geffect_lab.sweep import SweepError, expand_grid, run_name
from geffect_lab.testing import relative_error

pytestmark = pytest.mark.slow

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


def test_a_failing_task_is_recorded_and_the_rest_finish(client, tmp_path):
    grid = [{"objective": "ga"}, {"objective": "ga", "attribute_at": [99]}]  # fails inside the run
    ds = gl.sweep(grid, base=BASE, out=tmp_path, client=client, retries=0, progress=False)
    index = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    failed = index[run_name({**BASE, **grid[1]})]
    assert failed["status"] == "failed" and "attribute_at must name steps between 0 and 2" in failed["error"]
    assert index[run_name({**BASE, **grid[0]})]["status"] == "done" and ds.sizes["run"] == 1


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
    with pytest.raises(SweepError, match="cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'"):
        gl.sweep({"seed": [0]}, out=tmp_path / "x", client="tcp://127.0.0.1:9", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_sweep_from_a_yaml_spec(client, tmp_path, capsys):
    from geffect_lab.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("base:\n  steps: 2\n  record: [g_effect]\n  batch_size: 4\n  forget: forget01\n"
                    "grid:\n  objective: [ga]\n  params.beta: []\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out")]) == 2
    assert "the grid gives no value for params.beta" in capsys.readouterr().err
    spec.write_text("base:\n  steps: 2\n  record: [g_effect]\n  batch_size: 4\n  forget: forget01\n"
                    "grid:\n  objective: [npo]\n  params.beta: [0.1, 0.5]\n")
    assert main(["sweep", str(spec), "-o", str(tmp_path / "out"), "--scheduler", client.scheduler.address]) == 0
    assert "2 run(s) done, 0 failed" in capsys.readouterr().out
    ds = gl.load_sweep(tmp_path / "out")
    assert sorted(ds.beta.values.tolist()) == [0.1, 0.5]
    fig = gl.plots.swept(ds, "beta")  # e_u and e_r against the swept β
    assert [ax.get_xlabel() for ax in fig.axes] == ["beta", "beta"]
    assert list(fig.axes[0].lines[0].get_xdata()) == [0.1, 0.5]
