"""`read_capped` (qwen_tts_core/files.py) checks the file it has opened, not a path it looked at before: a regular
file swapped for a named pipe between a look at the path and the open is refused or read as the file it was, never
waited on (an open of a FIFO for reading waits for a writer for ever). Children run the reads, so a hang fails the
test instead of stopping the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen_tts_core.files import FileTooLarge, NotRegularFile, read_capped

ROOT = Path(__file__).resolve().parents[2]

# every way the code could look at the path before opening it swaps the file for a FIFO right after that look
_SWAP = r"""
import os, pathlib, sys
from qwen_tts_core.files import NotRegularFile, read_capped
target = pathlib.Path(sys.argv[1])
swapped = []
def swap():
    if not swapped:
        swapped.append(1)
        os.unlink(target)
        os.mkfifo(target)
real_path_stat, real_os_stat, real_fstat = pathlib.Path.stat, os.stat, os.fstat
def path_stat(self, *a, **k):
    st = real_path_stat(self, *a, **k)
    if self == target:
        swap()
    return st
def os_stat(p, *a, **k):
    st = real_os_stat(p, *a, **k)
    if not isinstance(p, int) and pathlib.Path(p) == target:
        swap()
    return st
def fstat(fd):
    st = real_fstat(fd)
    swap()
    return st
pathlib.Path.stat, os.stat, os.fstat = path_stat, os_stat, fstat
try:
    print("read", read_capped(target, 100).decode())
except NotRegularFile:
    print("refused")
"""


def test_a_file_swapped_for_a_named_pipe_after_a_look_is_never_waited_on(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    try:
        run = subprocess.run([sys.executable, "-c", _SWAP, str(f)], capture_output=True, text=True, timeout=30,
                             cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        pytest.fail("read_capped opened a named pipe that replaced the file and waited for a writer")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() in ("read {}", "refused")
    assert f.is_fifo()   # the swap did happen


def test_what_is_opened_is_checked(tmp_path):
    """A directory, a FIFO and a file over the limit are refused as before; a file at the limit is read whole."""
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(NotRegularFile):
        read_capped(d, 10)
    p = tmp_path / "p"
    os.mkfifo(p)
    with pytest.raises(NotRegularFile):
        read_capped(p, 10)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 11)
    with pytest.raises(FileTooLarge) as e:
        read_capped(big, 10)
    assert e.value.size == 11 and e.value.limit == 10
    ok = tmp_path / "ok"
    ok.write_bytes(b"y" * 10)
    assert read_capped(ok, 10) == b"y" * 10


def test_no_descriptor_is_left_open(tmp_path):
    """Refusals close what they opened (a long-lived replica reading many files must not run out of descriptors)."""
    d = tmp_path / "d"
    d.mkdir()
    big = tmp_path / "big"
    big.write_bytes(b"x" * 11)
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc/self/fd")
    before = len(list(fds.iterdir()))
    for _ in range(50):
        with pytest.raises(NotRegularFile):
            read_capped(d, 10)
        with pytest.raises(FileTooLarge):
            read_capped(big, 10)
    assert len(list(fds.iterdir())) == before
