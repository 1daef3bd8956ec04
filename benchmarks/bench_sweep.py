"""A sweep on a Dask LocalCluster against the same runs one after the other in one process, side by side.

    python benchmarks/bench_sweep.py                  # 8 small runs (GA/NPO x 4 seeds), 2 worker processes
    python benchmarks/bench_sweep.py --runs 4 --steps 2

Prints the wall-clock time of both, their ratio, and the overhead per task: the sweep's time beyond
``sequential / workers`` (starting the worker processes, loading the model and the world in each task, writing
each run's file), divided by the number of runs. With 2 cores, 2 single-threaded workers against one process
that may use both cores for torch: the ratio says what the process split buys on this machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import geffect_lab as gl  # noqa: E402
from geffect_lab.sweep import expand_grid, run_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep (a multiple of 2)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    grid = {"objective": ["ga", "npo"], "seed": list(range(max(1, args.runs // 2)))}
    base = {"steps": args.steps, "record": ["g_effect"], "batch_size": 4, "forget": "forget01"}
    configs = expand_grid(grid, base)

    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        for i, settings in enumerate(configs):  # what a Python loop in one process does: the same task each time
            run_task(settings, str(Path(folder) / f"seq-{i}.nc"), threads=args.workers)
        sequential = time.perf_counter() - start

        from distributed import Client, LocalCluster

        start = time.perf_counter()
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                          dashboard_address=None) as cluster, Client(cluster) as client:
            gl.sweep(grid, base=base, out=Path(folder) / "sweep", client=client, progress=False)
        swept = time.perf_counter() - start

    n = len(configs)
    print(f"{n} runs of {args.steps} steps (GA/NPO x {n // 2} seeds, zoo 'target', forget01)")
    print(f"  sequential, one process ({args.workers} torch threads): {sequential:7.1f} s")
    print(f"  gl.sweep, {args.workers} worker processes (1 thread each), cluster start included: {swept:7.1f} s")
    print(f"  ratio sequential / sweep: {sequential / swept:.2f}x")
    print(f"  overhead per task beyond sequential/{args.workers}: {(swept - sequential / args.workers) / n:+.2f} s")


if __name__ == "__main__":
    main()
