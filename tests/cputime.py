"""CPU time of a call, for the tests that check that work grows linearly with the input (a size and 4-8x that size,
compared). The thread's CPU time leaves out the time the machine gave to another process: the other test lane, a
Ray replica, a stall of the shared host. Wall-clock ratios measured those too (stop 37: a codec test read 1.77 for
a 1.0 ratio of work)."""

from __future__ import annotations

import time
from collections.abc import Callable


def cpu_seconds(fn: Callable[[], object], tries: int = 1) -> float:
    """The least CPU time this thread spent in one call of `fn()`, over `tries` calls."""
    best = float("inf")
    for _ in range(tries):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return best
