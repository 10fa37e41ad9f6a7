"""Peak memory of one call, shared by the demo (fusedloss/_demo.py) and the benchmarks (bench/common.py)."""

from __future__ import annotations

import os
import sys
from typing import Callable

import torch


class QuietStderr:
    """Silences fd 2 for a while: the profiler's C++ side prints start/stop and no-GPU notices there, and
    warns about every block freed that was allocated before it started."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self._null, 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        os.close(self._null)
        return False


def cpu_peak(fn: Callable[[], object]) -> int | None:
    """Peak bytes that PyTorch's CPU allocator holds during ``fn()`` above what it held before: the running
    sum of the allocation/free events it reports to the profiler. RSS cannot tell this: glibc keeps freed
    blocks, so after a first call RSS hardly moves whatever a call allocates. ``fn`` runs once in any case;
    None when the profiler or its event internals are missing (no number rather than a wrong one)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    except Exception:  # noqa: BLE001 - no profiler: run unmeasured
        fn()
        return None
    with QuietStderr():
        with prof:
            fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:  # noqa: BLE001
        return None
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return int(peak)


def peak_memory(fn: Callable[[], object], device: torch.device | str) -> int | None:
    """Peak bytes held during one call of ``fn()`` above what was held before it: CUDA from the caching
    allocator's peak statistic, CPU from :func:`cpu_peak`."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    return cpu_peak(fn)
