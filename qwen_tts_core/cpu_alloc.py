"""Keep freed working memory in the process on CPU (glibc): a CPU engine's step allocates and frees the same large
activations every step (the codec's late layers: ~24 MB each for 8 rows x 4 frames). glibc's default policy hands
them back to the OS (the main heap's top once ~2x the largest recent free block is free; a thread arena's extra
64 MiB heaps as soon as they empty), and the next step faults them in again: ~1600 page faults per generated frame
for 8 sessions with audio on the 0.6B (`benchmarks/cpu_alloc.py`), ~75k per 8-row x 4-frame codec call.

`keep_freed_memory()` sets, once per process: blocks up to 32 MiB (glibc's largest heap block) come from a heap, not
fresh mmaps; up to 1 GiB of free heap top stays mapped; heaps grow with 64 MiB to spare, which also keeps a thread
arena's emptied heaps (its size) instead of unmapping them. Measured on a 2-core Zen 4 (random 0.6B, 8 sessions x 24
frames with audio: `qtts make-checkpoint /tmp/ck06 --size 0.6b`, then `python benchmarks/cpu_alloc.py --checkpoint
/tmp/ck06` [--main-thread]; without --checkpoint it runs a tiny talker): faults 1588 -> 227 per frame; wall 1.11x
faster with the engine stepping in the main thread (sys time 9.6 -> 3.8 s), 1.02x in its own thread; in an earlier run the codec calls alone took half the time. The cost: a
process keeps its peak working set of such buffers mapped, which a replica reaches again on its next busy step
anyway. `QTTS_MALLOC_TUNE=0` turns it off; it does nothing outside glibc (musl, macOS, Windows)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # <malloc.h>
MMAP_THRESHOLD = 32 << 20                                     # glibc's maximum (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20                                            # a thread arena's heap size (HEAP_MAX_SIZE)

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
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) \
        and libc.mallopt(_M_TOP_PAD, TOP_PAD)
    return bool(ok)


__all__ = ["MMAP_THRESHOLD", "TOP_PAD", "TRIM_THRESHOLD", "keep_freed_memory"]
