"""A content digest of a resolved checkpoint folder: what batch jobs key their outputs on.

Two folders give the same digest exactly when the files that shape the output (configs, generation config,
tokenizer files, the talker/codec/speaker weights) have the same bytes. Hub snapshots cost nothing: their files are
links to blobs named by their own content hash (sha256 for LFS weights, git's sha1 for small files). Other files
are hashed in full (a fine-tune with the same tensor shapes must not share a digest), once per process and file
version (path, size, mtime).
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path

from .weights import CHECKPOINT_FILES

_BLOB = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _file_hash(path: Path) -> str:
    target = Path(os.path.realpath(path))
    if path.is_symlink() and _BLOB.match(target.name):  # hub cache: blobs/<content hash>
        return target.name
    st = target.stat()
    key = (str(target), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
    h = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    with _lock:
        _memo[key] = h.hexdigest()
    return _memo[key]


_PATTERNS = [pat.split("/") for pat in CHECKPOINT_FILES]
_DEPTH = max(len(p) for p in _PATTERNS)


def checkpoint_file(relpath: str) -> bool:
    """True for the files a checkpoint is loaded from (the patterns `resolve_checkpoint` downloads), matched one path
    segment at a time: `*.txt` is a top-level file, never `eval/results.txt`."""
    parts = relpath.split("/")
    return any(len(parts) == len(pat) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat))
               for pat in _PATTERNS)


def _walk(root: Path, prefix: str = "", depth: int = _DEPTH) -> Iterable[str]:
    """Relative paths of the files below `root` down to `depth` levels, following symlinked folders (a shared
    speech_tokenizer/ may be a link), skipping hidden names."""
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_file():
            yield prefix + p.name
        elif p.is_dir() and depth > 1:
            yield from _walk(p, f"{prefix}{p.name}/", depth - 1)


def digest_from_hashes(entries: Iterable[tuple[str, str]]) -> str:
    """'sha256:<16 hex>' of (relative path, content hash) pairs; the hub's file list gives the same value as the
    downloaded snapshot (LFS sha256 / git blob id per file), so a job can key on a revision it has not downloaded."""
    chosen = sorted((rel, fh) for rel, fh in entries if checkpoint_file(rel))
    if not chosen:
        raise ValueError("checkpoint: no config or weight files")
    h = hashlib.sha256()
    for rel, fh in chosen:
        h.update(rel.encode() + b"\0" + fh.encode() + b"\n")
    return f"sha256:{h.hexdigest()[:16]}"


def checkpoint_digest(folder: str | Path) -> str:
    """The digest of every file below `folder` that the checkpoint is loaded from.

    Raises:
        ValueError: `folder` is not a directory or holds no such file.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"checkpoint: {str(root)!r} is not a folder")
    rels = [r for r in _walk(root) if checkpoint_file(r)]
    try:
        return digest_from_hashes((r, _file_hash(root / r)) for r in rels)
    except ValueError:
        raise ValueError(f"checkpoint: {str(root)!r} has no config or weight files") from None
