"""Keep freed working memory in the process on CPU (glibc): a CPU engine's step allocates and frees the same large
activations every step (the codec's late layers: ~24 MB each for 8 rows x 4 frames). glibc's default policy hands
memory at the top of the heap back to the OS once ~2x the largest recent free block is free, so each step faulted
its buffers in again: ~300 MB of page faults per 8x4 codec call, about half of that call's time spent in the kernel
(2-core Zen 4: 1.9 s vs 0.95 s). Engines step in their own thread in a replica: that thread's glibc arena hands
its heaps back as well (8 sessions x 24 frames with audio, engine in a thread: ~400k faults per run, ~100 after).

`keep_freed_memory()` sets, once per process: blocks up to 32 MiB (glibc's largest heap block) come from the heap,
not fresh mmaps, and up to 1 GiB of free heap top stays mapped. The cost is that a process keeps its peak working
set of such buffers mapped, which a replica reaches again on its next busy step anyway. `QTTS_MALLOC_TUNE=0` turns
it off; it does nothing outside glibc (musl, macOS, Windows)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3                 # <malloc.h>
MMAP_THRESHOLD = 32 << 20                                     # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30

_lock = threading.Lock()
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the policy above once per process; True when it is in effect (glibc and not turned off)."""
    global _done
    with _lock:
        if _done is None:
            _done = _apply()
        return _done


def _apply() -> bool:
    if os.environ.get("QTTS_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt but another allocator
    except (OSError, AttributeError):
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(ok)


__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]
