"""The benchmarks stay runnable (a smoke run; their numbers are read from their output, not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_engine_runs_on_the_zoo_model():
    out = subprocess.run([sys.executable, "benchmarks/bench_engine.py", "--only", "zoo", "--repeats", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fast (layers)" in out.stdout and "faster than the reference loop" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("script,args,expect", [
    ("bench_run.py", ["--repeats", "1", "--steps", "2"], "g_effect, every 2"),
    ("bench_metrics.py", ["--repeats", "1"], "with them cached"),
])
def test_other_benchmarks_run(script, args, expect):
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout
