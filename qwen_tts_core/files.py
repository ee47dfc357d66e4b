"""Reading a file a caller names, bounded: only a regular file, and never more than a limit, whatever its size says.

    data = read_capped(path, limit)      # NotRegularFile | FileTooLarge (ValueErrors) | OSError
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


class NotRegularFile(ValueError):
    """A device reads without end (/dev/zero: st_size 0), a FIFO waits for ever: neither is read."""


class FileTooLarge(ValueError):
    """Over `limit` bytes: `size` as stat gave it, or None when the file grew past the limit while it was read."""

    def __init__(self, size: int | None, limit: int) -> None:
        super().__init__(f"larger than {limit} bytes")
        self.size, self.limit = size, limit


def read_capped(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed), at most `limit` of them."""
    # open first, without blocking (a FIFO's open would wait for a writer), then check what was opened: a file
    # swapped for a FIFO or a device between a stat and the open is still refused
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)   # not inherited by children: Python opens so by default
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile("not a regular file")
        if st.st_size > limit:
            raise FileTooLarge(st.st_size, limit)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        data = f.read(limit + 1)   # one byte past the limit at most, whatever the size said
    if len(data) > limit:
        raise FileTooLarge(None, limit)
    return data
