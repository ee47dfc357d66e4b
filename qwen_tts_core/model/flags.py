"""Per-thread switches the hot path reads (CPU packed linears, compiled fused ops, the decode attention layout): set
for a block of code on one thread, so an engine's step turns them on without touching another engine's thread or
the model other engines share."""

from __future__ import annotations

import contextlib
import threading
from typing import Any


class _Local(threading.local):
    """A thread's value: every thread starts from `default` (a compiled step's guard reads the value itself, the
    same on a thread that never set it as on one that set the default)."""

    def __init__(self, default: Any) -> None:
        self.value = default


class ThreadValue:
    """A value, `default` unless a `with value(x):` block on this thread set it (blocks nest and restore)."""

    def __init__(self, default: Any = None) -> None:
        self._default = default
        self._local = _Local(default)

    def get(self) -> Any:
        return self._local.value

    @contextlib.contextmanager
    def __call__(self, value: Any):
        prev = self.get()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = prev


class ThreadFlag(ThreadValue):
    """A boolean, False unless a `with flag(True):` block on this thread set it."""

    def __init__(self) -> None:
        super().__init__(False)

    def __bool__(self) -> bool:
        return bool(self.get())

    def __call__(self, on: bool = True):
        return super().__call__(on)


__all__ = ["ThreadFlag", "ThreadValue"]
