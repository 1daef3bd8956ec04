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
    ("bench_sweep.py", ["--runs", "2", "--steps", "1"], "ratio sequential / sweep"),
])
def test_other_benchmarks_run(script, args, expect):
    out = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert expect in out.stdout


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu(tmp_path):
    """The GPU machine's one prepared check stays runnable: its steps on a tiny model, on the CPU."""
    import json

    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--repeats", "1",
                          "--out", str(tmp_path / "check.json")], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert max(report["exactness"]["float32 fast vs float64 oracle"].values()) < 1e-4
    assert max(report["exactness"]["bfloat16 fast vs float64 oracle"].values()) < 0.5
    ratios = report["speed (bfloat16)"]["ratio_to_plain"]
    assert ratios["plain f+b"] == 1.0 and ratios["reference"] > ratios["fast (layers)"] > 0
    assert report["memory (bfloat16)"]["measured_mib"] > 0 and report["memory (bfloat16)"]["estimated_mib"] > 0


@pytest.mark.slow
def test_half_precision_table_runs(tmp_path):
    out = subprocess.run([sys.executable, "benchmarks/half_precision.py", "--small", "--out", str(tmp_path / "h.md")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "h.md").read_text()
    assert "| zoo target (0.85 M, trained) | bfloat16 |" in table and "| float16 |" in table
