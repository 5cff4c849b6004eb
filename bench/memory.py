"""The peak of torch's CPU allocations during one call, shared by the benches.

torch.profiler(profile_memory=True) records every allocator alloc (+bytes) and free (-bytes); the
high-water mark of their running sum, in time order, is the call's own peak. Frees of memory
allocated before the call can only lower the sum, so what was live before does not count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def cpu_allocation_peak(thunk: Callable[[], T]) -> tuple[int, T]:
    """(peak bytes allocated by torch on the CPU during ``thunk()``, its return value)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = thunk()
    running = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        running += nbytes
        peak = max(peak, running)
    return peak, value
