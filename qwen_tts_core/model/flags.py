"""Per-thread switches the hot path reads (CPU packed linears, compiled fused ops): set for a block of code on one
thread, so an engine's step turns them on without touching another engine's thread."""

from __future__ import annotations

import contextlib
import threading


class ThreadFlag:
    """A boolean, False unless a `with flag(True):` block on this thread set it (blocks nest and restore)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __bool__(self) -> bool:
        return getattr(self._local, "on", False)

    @contextlib.contextmanager
    def __call__(self, on: bool = True):
        prev = bool(self)
        self._local.on = on
        try:
            yield
        finally:
            self._local.on = prev


__all__ = ["ThreadFlag"]
