"""Where outputs go: `file://` folders (the default) and `s3://bucket/prefix` (boto3), behind one small API.

Every write is all-or-nothing (local: temp file + rename; S3: a single PUT), transient errors are retried
with exponential backoff, and `preflight()` proves the target is writable before any work starts.
S3 endpoint, region and credentials come from the usual AWS settings (AWS_ENDPOINT_URL,
AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profiles, instance roles).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlparse

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries, or a non-retryable error)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max_delay, base_delay * 2**i) * U(0.5, 1)."""

    attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 5.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts!r}")


def content_key(fields: dict[str, Any], stem: str, ext: str, prefix: str = "audio") -> str:
    """A deterministic object key from everything that shapes the audio (text, voice, params, model...).

    Returns `"{prefix}/{stem}-{sha256(canonical json)[:20]}.{ext}"`; `stem` (the row id) is made
    filesystem/S3 safe and only aids humans: the hash alone identifies the content.
    """
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False,
                                       separators=(",", ":")).encode()).hexdigest()
    return f"{prefix}/{safe_stem(stem)}-{digest[:20]}.{ext}"


def safe_stem(stem: str, max_bytes: int | None = None) -> str:
    """A row id as the stem of its object keys: filesystem/S3 safe characters, at most 80 of them and
    `max_bytes` (default STEM_MAX_BYTES) bytes, no leading or trailing dots ('row' when nothing is left).
    `max_bytes=0`: no byte cut, the rule before the byte limit (commit 52c5de5), which made stems of up to 80
    characters of any UTF-8 length (80 CJK characters: 240 bytes); keys written then are still in storage and
    listed (`retire.refusal` accepts both)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
    limit = STEM_MAX_BYTES if max_bytes is None else max_bytes
    return (_cut_utf8(safe, limit) if limit else safe).strip(".") or "row"


# A file name is at most 255 bytes (NAME_MAX) and the longest one we write for a stem of S bytes is the temp file of
# a sidecar, f".{S}-{hash20}.{ext}.json.{8}.tmp": S + len(ext) + 41 bytes. 200 leaves room for a 14-byte extension;
# every stem of 80 characters that fits in 200 bytes (all ASCII ones) is cut exactly as before.
STEM_MAX_BYTES = 200


def _cut_utf8(text: str, limit: int) -> str:
    """The longest prefix of `text` whose UTF-8 encoding is at most `limit` bytes (never half a character)."""
    data = text.encode("utf-8", "surrogatepass")
    return text if len(data) <= limit else data[:limit].decode("utf-8", "ignore")


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()  # valid text: plain UTF-8


class Sink(Protocol):
    uri: str

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None: ...
    def get(self, key: str) -> bytes | None: ...
    def size(self, key: str) -> int | None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def preflight(self, need_delete: bool = True) -> None: ...
    def url(self, key: str) -> str: ...


def _retry(op: str, fn: Callable[[], T], policy: RetryPolicy, retryable: Callable[[Exception], bool]) -> T:
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not retryable(e) or attempt == policy.attempts - 1:
                raise StorageError(f"{op} failed after {attempt + 1} attempt(s): {e}") from e
            delay = min(policy.max_delay, policy.base_delay * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("%s failed (%s); retry %d/%d in %.2fs", op, e, attempt + 1, policy.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _local_retryable(e: Exception) -> bool:
    """Worth another try: not a refusal that will be the same next time (permissions, a name too long)."""
    return not isinstance(e, PermissionError) and getattr(e, "errno", None) not in (errno.ENAMETOOLONG, errno.EROFS)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX); file systems that cannot sync a folder are left as they are."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class LocalSink:
    """A local folder; keys are relative paths below `root`."""

    root: str
    retry: RetryPolicy = RetryPolicy()

    @property
    def uri(self) -> str:
        return f"file://{self.root}"

    def _path(self, key: str) -> Path:
        p = (Path(self.root) / key).resolve()
        if Path(self.root).resolve() not in p.parents:
            raise ValueError(f"key {key!r} escapes the output folder")
        return p

    def url(self, key: str) -> str:
        return f"file://{self._path(key)}"

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
            try:
                with open(tmp, "wb") as f:  # on disk before the rename: a crash cannot leave a named, hollow file
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
                _fsync_dir(path.parent)     # and the rename itself, so the manifest never names a missing object
            except BaseException:
                # a write cut short (disk full) leaves a partial temp file; each retry makes a new one, and
                # list() hides dot-files, so nothing else would ever remove them
                with contextlib.suppress(OSError):  # (never hide the write's own error)
                    tmp.unlink(missing_ok=True)
                raise

        _retry(f"write {path}", write, self.retry, _local_retryable)

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.is_file() else None

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def delete(self, key: str) -> None:
        path = self._path(key)   # (a refusal is a StorageError, as every sink's: callers record it and go on)
        _retry(f"delete {path}", lambda: path.unlink(missing_ok=True), self.retry, _local_retryable)

    def list(self, prefix: str = "") -> list[str]:
        base = Path(self.root)
        if not base.is_dir():
            return []
        keys = (p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not Path(k).name.startswith("."))

    def preflight(self, need_delete: bool = True) -> None:
        """Fail fast, before any work: the folder must take a write (and a delete, when `need_delete`; see
        S3Sink.preflight)."""
        base = Path(self.root)
        try:
            base.mkdir(parents=True, exist_ok=True)
            probe = base / f".qtts-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
        except OSError as e:
            raise StorageError(f"output {self.uri} is not writable: {e}") from e
        try:
            probe.unlink()
        except OSError as e:
            _probe_left(self.uri, str(probe), e, need_delete)


_FATAL_S3_CODES = {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                   "403", "404", "InvalidBucketName", "AllAccessDisabled"}


def _s3_retryable(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
    return code not in _FATAL_S3_CODES


class S3Sink:
    """`s3://bucket/prefix`; keys are joined below the prefix. Picklable (the client is made lazily)."""

    def __init__(self, bucket: str, prefix: str = "", retry: RetryPolicy = RetryPolicy()) -> None:
        if not bucket:
            raise ValueError("output: s3 URI needs a bucket, e.g. s3://my-bucket/narration")
        self.bucket, self.prefix, self.retry = bucket, prefix.strip("/"), retry
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "retry": self.retry, "_client": None}

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", config=Config(
                connect_timeout=5, read_timeout=60, retries={"max_attempts": 2, "mode": "standard"}))
        return self._client

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._k(key)}"

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        _retry(f"put {self.url(key)}", lambda: self.client.put_object(
            Bucket=self.bucket, Key=self._k(key), Body=data, ContentType=content_type),
            self.retry, _s3_retryable)

    def _missing(self, e: Exception) -> bool:
        code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
        return code in ("404", "NoSuchKey", "NotFound")

    def get(self, key: str) -> bytes | None:
        def fetch() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
            except Exception as e:
                if self._missing(e):
                    return None
                raise

        return _retry(f"get {self.url(key)}", fetch, self.retry, _s3_retryable)

    def size(self, key: str) -> int | None:
        def head() -> int | None:
            try:
                return int(self.client.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"])
            except Exception as e:
                if self._missing(e):
                    return None
                raise

        return _retry(f"head {self.url(key)}", head, self.retry, _s3_retryable)

    def delete(self, key: str) -> None:
        _retry(f"delete {self.url(key)}", lambda: self.client.delete_object(
            Bucket=self.bucket, Key=self._k(key)), self.retry, _s3_retryable)

    def list(self, prefix: str = "") -> list[str]:
        keys: list[str] = []
        full = self._k(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(o["Key"][strip:] for o in page.get("Contents", []))
        return sorted(keys)

    def preflight(self, need_delete: bool = True) -> None:
        """Fail fast, before any work: the bucket must exist and accept a write, and a delete when `need_delete`
        (a catalog that retires by deleting). A job that never deletes (narrate: `need_delete=False`) runs on a
        write-only or delete-denied bucket; its probe object then stays, named in a warning."""
        probe = self._k(f".qtts-probe-{uuid.uuid4().hex}")
        try:
            self.client.head_bucket(Bucket=self.bucket)
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
        except Exception as e:  # noqa: BLE001 - botocore has many error types; all mean "not usable"
            raise StorageError(f"output {self.uri}: {_s3_hint(e)} ({type(e).__name__}: {e})") from e
        try:
            self.client.delete_object(Bucket=self.bucket, Key=probe)
        except Exception as e:  # noqa: BLE001 - as above
            _probe_left(self.uri, f"s3://{self.bucket}/{probe}", e, need_delete)


def _s3_hint(e: Exception) -> str:
    """A few words on what an S3 error code means for the output."""
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "") if hasattr(e, "response") else ""
    return {"404": "bucket does not exist", "NoSuchBucket": "bucket does not exist",
            "403": "access denied", "AccessDenied": "access denied"}.get(code, "unreachable or not writable")


def _probe_left(uri: str, probe: str, e: Exception, need_delete: bool) -> None:
    """The preflight probe could not be deleted: StorageError when the job needs deletes, else a warning naming
    the probe object that stays (it is harmless: a dot-name that no manifest lists)."""
    if need_delete:
        raise StorageError(f"output {uri}: deletes are refused and this job deletes (the probe {probe} stays) "
                           f"({type(e).__name__}: {e})") from e
    log.warning("output %s refused to delete the preflight probe (%s: %s); this job never deletes, so it goes on, "
                "and the probe object %s stays", uri, type(e).__name__, e, probe)


def open_sink(uri: str, retry: RetryPolicy = RetryPolicy()) -> LocalSink | S3Sink:
    """`file:///abs/dir`, a plain path, or `s3://bucket/prefix` -> a sink.

    Raises:
        ValueError: for any other scheme.
    """
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file"):
        path = (parsed.netloc + parsed.path) if parsed.scheme == "file" else uri
        return LocalSink(str(Path(path).expanduser().resolve()), retry)
    if parsed.scheme == "s3":
        return S3Sink(parsed.netloc, parsed.path, retry)
    raise ValueError(f"output: unsupported URI scheme {parsed.scheme!r}; use file:// or s3://")
