"""One catalog pass at a time per output: a lease under the output, held from reading the previous manifest to
writing the new one (two overlapping passes would reconcile against each other's objects and delete live ones).

Local folders: an exclusive `flock` on `<out>/.catalog-lease`; the kernel drops it when the holder exits, however it
exits, so a crashed run never blocks the next one (shared file systems: only as good as their flock support).
S3: a conditional PutObject (`If-None-Match: *`) creates `<prefix>/.catalog-lease`; the holder renews it every
`ttl_s / 3` (`If-Match` its ETag). A lease not renewed for `ttl_s` (by the store's clock) belongs to a run that died
and is taken over, again with `If-Match`, so two runs never both take it. A store without conditional writes gets
a warning and a best-effort lease. Each lease carries a token of its holder: a conditional write whose reply was
lost is sent again by botocore and refused (412) as if another run had written, so a refusal is judged by reading
the lease back (our token: the first write took, the lease is ours).

A pass that finds the lease held exits at once, or (`wait_s`, the catalog's `--lease-wait`) tries again every
POLL_S (with jitter, so passes started together do not retry in step) until that much time has passed.

Every write a pass makes while it renders (in the driver or in a Ray worker) checks the S3 lease first (`Fence`,
`FencedSink`): a pass whose lease lapsed writes nothing more, so the pass that took the output over never finds an
object written behind its back (after it journalled, reconciled or deleted what it saw).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from .storage import LocalSink, S3Sink, Sink, StorageError, _retry, _s3_retryable

log = logging.getLogger(__name__)
LEASE_KEY = ".catalog-lease"
TTL_S = 900.0  # S3: a lease nobody renewed for 15 minutes is stale
POLL_S = 5.0  # waiting for a held lease: tries about this often (x0.5..1.5)


class LeaseHeld(StorageError):
    """Another run holds the lease (exit 2: this pass did nothing)."""


class LeaseLost(StorageError):
    """This run's S3 lease was taken over (it was not renewed in time): it must not reconcile."""


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _held_message(where: str, raw: bytes | None, age_s: float | None = None) -> str:
    try:
        who = json.loads(raw or b"{}")
        holder = f"{who.get('host')} pid {who.get('pid')} since {who.get('since')}"
    except (ValueError, AttributeError):
        holder = "unknown holder"
    age = f", renewed {age_s:.0f} s ago" if age_s is not None else ""
    return (f"another catalog run holds the lease {where} ({holder}{age}); this pass did nothing - "
            "the next one runs when that run has finished")


@contextlib.contextmanager
def hold(sink: Sink, ttl_s: float = TTL_S, wait_s: float = 0.0, stop: threading.Event | None = None,
         ) -> Iterator[Any]:
    """Hold the output's catalog lease for the `with` block; raises LeaseHeld when another run holds it and still
    does after `wait_s` seconds (or when `stop` is set while waiting). Yields an object whose `check()` raises
    LeaseLost when the lease was lost meanwhile (S3 only), and whose `fence()` is what the pass's writes check
    (`Fence`; None for a local flock, which cannot lapse)."""
    deadline = time.monotonic() + max(wait_s, 0.0)
    with contextlib.ExitStack() as stack:
        while True:
            try:
                lease = stack.enter_context(_hold(sink, ttl_s))
                break
            except LeaseHeld as e:
                left = deadline - time.monotonic()
                if left <= 0 or (stop is not None and stop.is_set()):
                    raise
                log.info("%s; trying again for up to %.0f s", e, left)
                pause = min(left, POLL_S * random.uniform(0.5, 1.5))
                if stop.wait(pause) if stop is not None else time.sleep(pause):
                    raise
        yield lease


@contextlib.contextmanager
def _hold(sink: Sink, ttl_s: float) -> Iterator[Any]:
    if isinstance(sink, LocalSink):
        with _local(sink) as lease:
            yield lease
    elif isinstance(sink, S3Sink):
        lease = _S3Lease(sink, ttl_s)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
    else:
        raise StorageError(f"no lease for {type(sink).__name__}")


class _Held:
    def check(self) -> None:
        return None

    def fence(self) -> Fence | None:
        return None   # a flock is held until this process exits: it cannot lapse


@contextlib.contextmanager
def _local(sink: LocalSink) -> Iterator[_Held]:
    import fcntl

    path = Path(sink.root) / LEASE_KEY
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LeaseHeld(_held_message(str(path), path.read_bytes())) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_owner()).encode(), 0)
        yield _Held()
    finally:
        os.close(fd)  # drops the flock


_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")  # a conditional write lost the race


def _code(e: Exception) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", "")) if hasattr(e, "response") else ""


def _age(got: dict[str, Any]) -> float:
    """Seconds since the lease read back (`got`: get_object's answer) was written, by the store's clock."""
    date = got.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    now = parsedate_to_datetime(date) if date else datetime.now(timezone.utc)
    return (now - got["LastModified"]).total_seconds()


def _token(raw: bytes) -> Any:
    try:
        return json.loads(raw).get("token")
    except (ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class Fence:
    """A pass's S3 lease as each process that writes for the pass checks it before every write (the driver, and
    each Ray worker: it is picklable). The lease must still hold this pass's token and have been renewed within the
    last two thirds of `ttl_s` by the store's clock: another pass may take it over once it is `ttl_s` old, so a
    write that passes the check has a third of `ttl_s` to land before anyone else can own the output."""

    key: str       # the lease object's key in the output's bucket
    token: str
    ttl_s: float

    def check(self, sink: S3Sink) -> None:
        """Raises LeaseLost when the lease is not this pass's any more (or may soon not be); StorageError when it
        cannot be read (the write is not made either)."""
        where = f"s3://{sink.bucket}/{self.key}"

        def read() -> dict[str, Any] | None:
            try:
                got = sink.client.get_object(Bucket=sink.bucket, Key=self.key)
            except Exception as e:  # noqa: BLE001 - botocore error types vary
                if _code(e) in ("NoSuchKey", "404"):
                    return None
                raise
            return {**got, "Body": got["Body"].read()}

        got = _retry(f"read the catalog lease {where}", read, sink.retry, _s3_retryable)
        if got is None:
            why = "it is gone"
        elif _token(got["Body"]) != self.token:
            why = "another run holds it now"
        elif (age := _age(got)) >= self.ttl_s * 2 / 3:
            why = f"not renewed for {age:.0f} s of its {self.ttl_s:.0f} s"
        else:
            return
        raise LeaseLost(f"lost the catalog lease {where} ({why}); this pass writes nothing more and does not "
                        "reconcile: the outputs written are kept and the next pass reconciles them")


class FencedSink(S3Sink):
    """An S3 sink whose writes and deletes each check the pass's lease first (`Fence`): LeaseLost, nothing written,
    once the pass has lost it."""

    def __init__(self, sink: S3Sink, fence: Fence) -> None:
        super().__init__(sink.bucket, sink.prefix, sink.retry)
        self._client = sink._client
        self.fence = fence

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "fence": self.fence}

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        self.fence.check(self)
        super().put(key, data, content_type)

    def delete(self, key: str) -> None:
        self.fence.check(self)
        super().delete(key)


def check_writes(sink: Sink) -> None:
    """Raises LeaseLost when `sink`'s writes are fenced by a lease its pass no longer holds (a FencedSink); nothing for
    any other sink. StorageError when the lease cannot be read."""
    if isinstance(sink, FencedSink):
        sink.fence.check(sink)


def fenced(sink: Sink, fence: Fence | None) -> Sink:
    """`sink` with its writes checked against `fence` (an S3 pass's lease), or `sink` itself when there is none."""
    return FencedSink(sink, fence) if fence is not None and isinstance(sink, S3Sink) else sink


class _S3Lease:
    def __init__(self, sink: S3Sink, ttl_s: float) -> None:
        self.sink, self.ttl_s, self.key = sink, ttl_s, sink._k(LEASE_KEY)
        self.etag: str | None = None
        self.token = uuid.uuid4().hex   # this run's: a lease read back with it is ours
        self.lost = False
        self.conditional = True   # False on a store without conditional writes (a best-effort lease)
        self.renewed_at = 0.0     # time.monotonic() when the last write of the lease that took was SENT
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _put(self, **cond: str) -> str:
        body = json.dumps({**_owner(), "token": self.token}).encode()
        sent = time.monotonic()   # the store stamps the write later: an age counted from here is never less
        resp = self.sink.client.put_object(Bucket=self.sink.bucket, Key=self.key, Body=body,
                                           ContentType="application/json", **cond)
        self.renewed_at = sent
        return str(resp["ETag"])

    def _ours(self, raw: bytes, etag: str) -> bool:
        """Whether the lease read back (`raw`, `etag`) is this run's: then its ETag is the one to renew with."""
        if _token(raw) != self.token:
            return False
        self.etag = str(etag)
        return True

    def fence(self) -> Fence:
        """What every write of this pass checks first (the driver's and each worker's: FencedSink)."""
        return Fence(self.key, self.token, self.ttl_s)

    def _read(self) -> dict[str, Any] | None:
        """The lease object (get_object's answer), None when there is none."""
        try:
            return self.sink.client.get_object(Bucket=self.sink.bucket, Key=self.key)
        except Exception as e:  # noqa: BLE001 - botocore error types vary
            if _code(e) in ("NoSuchKey", "404"):
                return None
            raise

    def acquire(self) -> None:
        where = self.sink.url(LEASE_KEY)
        start = time.monotonic()   # before any write of ours that took (one read back as ours included)
        for _ in range(3):  # the holder may release between our two requests
            try:
                self.etag = self._put(IfNoneMatch="*")
                break
            except Exception as e:  # noqa: BLE001 - botocore error types vary
                code = _code(e)
                if code in ("NotImplemented", "501"):
                    log.warning("%s does not support conditional writes: the catalog lease is best-effort", where)
                    self.conditional = False
                    self.etag = self._put()
                    break
                if code not in _CONFLICT:
                    raise StorageError(f"lease {where}: {type(e).__name__}: {e}") from e
            try:
                got = self._read()
            except Exception as e:  # noqa: BLE001
                raise StorageError(f"lease {where}: {type(e).__name__}: {e}") from e
            if got is None:
                continue
            raw = got["Body"].read()
            if self._ours(raw, got["ETag"]):  # our write took; its reply was lost and the retry refused
                break
            age = _age(got)
            if age < self.ttl_s:
                raise LeaseHeld(_held_message(where, raw, age))
            log.warning("taking over the stale catalog lease %s (not renewed for %.0f s)", where, age)
            try:
                self.etag = self._put(IfMatch=got["ETag"])
                break
            except Exception as e:  # noqa: BLE001
                if _code(e) not in _CONFLICT:
                    raise StorageError(f"lease {where}: {type(e).__name__}: {e}") from e
                try:
                    again = self._read()
                except Exception as read_error:  # noqa: BLE001
                    raise StorageError(f"lease {where}: {type(read_error).__name__}: {read_error}") from read_error
                if again is None or not self._ours(again["Body"].read(), again["ETag"]):
                    raise LeaseHeld(_held_message(where, raw)) from None
                break
        else:
            raise LeaseHeld(_held_message(where, None))
        self.renewed_at = max(self.renewed_at, start)
        self._thread = threading.Thread(target=self._renew, name="qtts-catalog-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        # every third of the TTL; a renewal that did not reach the store is tried again soon, not a third later: the
        # next try on schedule would come when the lease is two thirds old, when every write's check refuses it
        every = max(self.ttl_s / 3, 1.0)
        soon = max(min(every / 10, POLL_S), 0.1)
        pause = every
        while not self._stop.wait(pause):
            if self.lost:   # counted as lost (check()): the pass gave it up; renewing would only keep others out
                return
            sent, pause = time.monotonic(), soon
            try:
                self.etag = self._put(IfMatch=str(self.etag)) if self.conditional else self._put()
                pause = every
            except Exception as e:  # noqa: BLE001
                if _code(e) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    try:
                        got = self._read()
                        if got is not None and self._ours(got["Body"].read(), got["ETag"]):
                            self.renewed_at, pause = sent, every
                            continue  # the renewal took; its reply was lost and the retry refused
                    except Exception as read_error:  # noqa: BLE001
                        log.warning("could not read the catalog lease back (%s); trying again", read_error)
                        continue
                    log.error("lost the catalog lease %s: another run took it over", self.sink.url(LEASE_KEY))
                    self.lost = True
                    return
                log.warning("could not renew the catalog lease (%s); trying again", e)

    def check(self) -> None:
        """Raises LeaseLost when another run took the lease over, or may have: renewals that could not reach the
        store (an outage, not a refusal) leave the lease unrenewed, and once it is `ttl_s` old another pass takes it
        over while this one would go on; so a lease not renewed for the last two thirds of `ttl_s` counts as lost
        (a healthy holder renews every third)."""
        age = time.monotonic() - self.renewed_at
        if not self.lost and age >= self.ttl_s * 2 / 3:
            log.error("the catalog lease %s was not renewed for %.0f s: another run may take it over",
                      self.sink.url(LEASE_KEY), age)
            self.lost = True
        if self.lost:
            raise LeaseLost(f"lost the catalog lease {self.sink.url(LEASE_KEY)} to another run (not renewed "
                            f"within {self.ttl_s:.0f} s); not reconciling: the outputs written are kept and the "
                            "next pass reconciles them")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.lost or self.etag is None:
            return
        try:
            self.sink.client.delete_object(Bucket=self.sink.bucket, Key=self.key, IfMatch=self.etag)
        except Exception as e:  # noqa: BLE001 - a lease left behind goes stale after ttl_s
            if _code(e) in ("NotImplemented", "501"):
                with contextlib.suppress(Exception):
                    self.sink.client.delete_object(Bucket=self.sink.bucket, Key=self.key)
                return
            log.warning("could not release the catalog lease %s (%s); it goes stale in %.0f s",
                        self.sink.url(LEASE_KEY), e, self.ttl_s)

