"""Shared measuring helpers for the benchmarks: wall time and incremental peak memory of a callable.

Peak memory on the CPU is the process's peak resident set size (Linux ``VmHWM``), reset before each
measurement through ``/proc/self/clear_refs``, minus the resident size at the reset; freed heap is returned
to the system first (``malloc_trim``) so that one measurement does not hide in another's leftovers. On a
GPU it is ``torch.cuda.max_memory_allocated`` above the memory allocated before the call.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")


def _kib(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_memory_mib(fn: Callable[[], object], device: str = "cpu", reserved: bool = False) -> float:
    """Peak memory the call adds on top of what was in use before it, in MiB (on a GPU, with ``reserved``, the
    caching allocator's reserved memory rather than the live tensors)."""
    _trim()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        now, peak = ((torch.cuda.memory_reserved, torch.cuda.max_memory_reserved) if reserved
                     else (torch.cuda.memory_allocated, torch.cuda.max_memory_allocated))
        before = now()
        fn()
        torch.cuda.synchronize()
        return (peak() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _kib("VmRSS")
    fn()
    return (_kib("VmHWM") - before) / 1024


def wall_time(fn: Callable[[], object], repeats: int = 3, device: str = "cpu") -> float:
    """Median wall time in seconds over ``repeats`` calls (after one warm-up call)."""
    def once():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))
