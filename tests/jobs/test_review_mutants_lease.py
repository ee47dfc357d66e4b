"""Behaviour of the catalog lease (jobs/lease.py), the pending journal (jobs/pending.py) and the manifest
(jobs/manifest.py) the suite did not pin, found by hand mutation testing of those modules: each test names the
mutant(s) it kills and was seen failing on them and passing on the real code. Plain functions, no Ray, no sleeps:
an in-process S3 stand-in (`_Store`, with its own clock) plays the bucket, and the lease's renewal loop and wait
loop are driven step by step through a scripted stop event and clock."""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from jobs import lease, pending
from jobs.manifest import ManifestRecord
from jobs.storage import LocalSink, RetryPolicy, S3Sink, StorageError

OBJ = "prompts/welcome-0123456789abcdef0123.wav"
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


class _Code(Exception):
    """A botocore-like client error carrying an S3 error code."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class _Store:
    """An in-process S3 client with conditional writes (If-None-Match / If-Match on the ETag) and a clock of its
    own (`now`: what LastModified and the Date header say). `fail[op]`: errors raised, in turn, by the next calls
    of `op`; a callable is called with the store and the call's arguments and what it returns raised, None for a
    call that goes through). `took`: a put whose error comes after the write took (a reply lost, botocore's retry
    refused)."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, str, datetime]] = {}
        self.now, self.n, self.calls = T0, 0, []
        self.fail: dict[str, list] = {}
        self.took: list[str | None] = []

    def _fault(self, op: str, **kw) -> None:
        queue = self.fail.get(op)
        if queue:
            e = queue.pop(0)
            e = e(self, **kw) if callable(e) and not isinstance(e, Exception) else e
            if e is not None:
                raise e

    def put_object(self, Bucket, Key, Body, ContentType=None, IfNoneMatch=None, IfMatch=None):
        self.calls.append(("put", Key, {"IfNoneMatch": IfNoneMatch, "IfMatch": IfMatch}))
        self._fault("put", Key=Key, IfNoneMatch=IfNoneMatch, IfMatch=IfMatch)
        have = self.objects.get(Key)
        if IfNoneMatch == "*" and have is not None:
            raise _Code("PreconditionFailed")
        if IfMatch is not None and (have is None or have[1] != IfMatch):
            raise _Code("PreconditionFailed" if have is not None else "NoSuchKey")
        self.n += 1
        etag = f'"e{self.n}"'
        self.objects[Key] = (bytes(Body), etag, self.now)
        if self.took and (code := self.took.pop(0)):
            raise _Code(code)
        return {"ETag": etag}

    def get_object(self, Bucket, Key):
        self.calls.append(("get", Key, {}))
        self._fault("get")
        if Key not in self.objects:
            raise _Code("NoSuchKey")
        body, etag, stamp = self.objects[Key]
        return {"Body": io.BytesIO(body), "ETag": etag, "LastModified": stamp,
                "ResponseMetadata": {"HTTPHeaders": {"date": format_datetime(self.now, usegmt=True)}}}

    def head_object(self, Bucket, Key):
        if Key not in self.objects:
            raise _Code("404")
        return {"ContentLength": len(self.objects[Key][0])}

    def delete_object(self, Bucket, Key, IfMatch=None):
        self.calls.append(("delete", Key, {"IfMatch": IfMatch}))
        self._fault("delete", IfNoneMatch=None, IfMatch=IfMatch)
        have = self.objects.get(Key)
        if IfMatch is not None and have is not None and have[1] != IfMatch:
            raise _Code("PreconditionFailed")
        self.objects.pop(Key, None)


def _sink(store: _Store | None = None) -> S3Sink:
    sink = S3Sink("b", "ivr", RetryPolicy(attempts=2, base_delay=0.0, max_delay=0.0))
    sink._client = store or _Store()
    return sink


KEY = "ivr/" + lease.LEASE_KEY


def _other(store: _Store, age_s: float = 0.0, token: str = "theirs") -> None:
    """Another run's lease, last written `age_s` ago by the store's clock."""
    store.objects[KEY] = (json.dumps({"host": "other", "pid": 7, "token": token}).encode(), '"x1"',
                          store.now - timedelta(seconds=age_s))


class _Steps:
    """A stop event for the renewal loop: `wait` returns False (keep going) `n` times, then True (stop); each wait
    advances `clock` (a `_Clock`) when one is given."""

    def __init__(self, n: int, clock=None) -> None:
        self.n, self.clock, self.waits = n, clock, []

    def wait(self, t: float) -> bool:
        self.waits.append(t)
        if self.clock is not None:
            self.clock.now += t
        self.n -= 1
        return self.n < 0

    def set(self) -> None:
        self.n = -1

    def is_set(self) -> bool:
        return self.n < 0


def _acquired(store: _Store, ttl_s: float = 90.0) -> lease._S3Lease:
    """A lease acquired on `store` whose renewal thread is not running (tests drive `_renew` themselves)."""
    held = lease._S3Lease(_sink(store), ttl_s)
    held._stop.set()   # the thread acquire starts ends at once
    held.acquire()
    held._thread.join(timeout=10)
    return held


# --- hold(): waiting for a held lease --------------------------------------------------------------------------------
class _Clock:
    """time.monotonic for jobs.lease, and a stop event whose `wait` advances it (no real waiting); `on_wait` runs
    at each wait, whose result `wait` returns."""

    def __init__(self, on_wait=None) -> None:
        self.now, self.waits, self.on_wait = 100.0, [], on_wait

    def monotonic(self) -> float:
        return self.now

    def sleep(self, t: float) -> None:
        raise AssertionError("hold() with a stop event waits on it, not in time.sleep")

    def wait(self, t: float) -> bool:
        assert len(self.waits) < 10, f"still waiting after {self.waits}"
        self.waits.append(t)
        self.now += t
        return bool(self.on_wait and self.on_wait())

    def is_set(self) -> bool:
        return False


def _clocked(monkeypatch, clock: _Clock) -> None:
    from types import SimpleNamespace

    monkeypatch.setattr(lease, "time", SimpleNamespace(monotonic=clock.monotonic, sleep=clock.sleep))


def test_a_pass_waits_for_a_held_lease_no_longer_than_lease_wait(tmp_path, monkeypatch):
    """`--lease-wait 2` with POLL_S 5: the pass tries again once the 2 s are up and then gives up, never pausing
    past its deadline (mutants L04: the pause not capped, 2.5-7.5 s; L60: no wait at all; L02: `left < 0`, at the
    deadline it pauses 0 s and tries again and again)."""
    clock = _Clock()
    _clocked(monkeypatch, clock)
    sink = LocalSink(str(tmp_path))
    with lease.hold(sink), pytest.raises(lease.LeaseHeld, match="holds the lease"), \
            lease.hold(sink, wait_s=2.0, stop=clock):
        pass
    assert clock.waits == [2.0]


def test_a_pass_stopped_while_it_waits_does_not_take_the_lease(tmp_path, monkeypatch):
    """A stop (SIGTERM) that comes while the pass waits ends it with LeaseHeld, even when the lease came free
    meanwhile (mutant L05: it tried again, took the lease, and the stopped pass went on to render)."""
    import contextlib

    sink = LocalSink(str(tmp_path))
    holder = contextlib.ExitStack()
    holder.enter_context(lease.hold(sink))

    def freed_and_stopped() -> bool:
        holder.close()
        return True

    clock = _Clock(freed_and_stopped)
    _clocked(monkeypatch, clock)
    with pytest.raises(lease.LeaseHeld), lease.hold(sink, wait_s=60.0, stop=clock):
        pytest.fail("a stopped pass took the lease")
    assert len(clock.waits) == 1


def test_a_sink_with_no_lease_is_refused():
    """Only a local folder or S3 has a lease; anything else raises StorageError before the pass runs (mutant L07:
    a lease that holds nothing, two passes rendering over each other)."""
    with pytest.raises(StorageError, match="no lease for"), lease.hold(object()):
        pytest.fail("held a lease on a sink that has none")


def test_a_local_lease_names_its_holder_however_long_the_last_one_was(tmp_path):
    """The lease file is rewritten whole: a shorter owner record over a longer one left its tail behind, the file
    was not JSON and a refused pass named an "unknown holder" (mutant L09: no truncate)."""
    import os

    (tmp_path / lease.LEASE_KEY).write_text(json.dumps({"host": "h" * 300, "pid": 1, "since": "then"}))
    sink = LocalSink(str(tmp_path))
    with lease.hold(sink):
        assert json.loads((tmp_path / lease.LEASE_KEY).read_text())["pid"] == os.getpid()
        with pytest.raises(lease.LeaseHeld, match=f"pid {os.getpid()} since"), lease.hold(sink):
            pass


# --- S3: taking the lease ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("age_s, ours", [(61.0, False), (89.0, False), (90.0, True), (600.0, True)])
def test_a_lease_is_taken_over_once_ttl_old_by_the_stores_clock_and_only_with_if_match(age_s, ours):
    """Another run's lease is held until it is ttl_s old by the store's clock (the Date header, not this host's,
    which here is months off), then taken over with If-Match its ETag (mutants L13: this host's clock; L37: `<=`,
    a lease exactly ttl_s old still held; L38: taken at two thirds; L39: taken with an unconditional write)."""
    store = _Store()
    _other(store, age_s)
    held = lease._S3Lease(_sink(store), 90.0)
    held._stop.set()
    if not ours:
        with pytest.raises(lease.LeaseHeld, match=f"other pid 7 since None, renewed {age_s:.0f} s ago"):
            held.acquire()
        assert json.loads(store.objects[KEY][0])["token"] == "theirs"
        return
    held.acquire()
    assert json.loads(store.objects[KEY][0])["token"] == held.token
    assert store.calls[-1] == ("put", KEY, {"IfNoneMatch": None, "IfMatch": '"x1"'})
    held.release()


def test_a_takeover_that_loses_the_race_is_held_even_when_the_lease_is_gone_then():
    """Our If-Match takeover is refused (another run wrote first) and the lease read back is not ours - gone, as
    when that run finished at once: LeaseHeld, this pass does nothing (mutant L41: a gone lease read as ours, the
    pass went on with no lease at all while a third run could take a fresh one)."""
    store = _Store()
    _other(store, 1000.0)

    def raced(s, **kw):
        if kw["IfMatch"]:
            s.objects.pop(KEY)
            return _Code("PreconditionFailed")
        return None

    store.fail["put"] = [None, raced]
    held = lease._S3Lease(_sink(store), 90.0)
    with pytest.raises(lease.LeaseHeld):
        held.acquire()


@pytest.mark.parametrize("where", ["create", "read", "takeover"])
def test_a_storage_error_while_taking_the_lease_is_a_storage_error_not_a_held_lease(where):
    """A refusal that is no lost race (AccessDenied, a 500) on the create, the read back or the takeover surfaces
    as StorageError naming it, never read as "another run holds it" (mutants L34, L35, L30, L40: swallowed, and the
    pass reported the lease held: exit 2 "did nothing", for ever, with nobody holding it)."""
    store = _Store()
    if where != "create":
        _other(store, 1000.0 if where == "takeover" else 0.0)
    if where == "create":
        store.fail["put"] = [_Code("AccessDenied")]
    elif where == "read":
        store.fail["get"] = [_Code("AccessDenied")]
    else:
        store.fail["put"] = [None, _Code("InternalError")]
    held = lease._S3Lease(_sink(store), 90.0)
    with pytest.raises(StorageError) as e:
        held.acquire()
    assert type(e.value) is StorageError
    assert ("AccessDenied" if where != "takeover" else "InternalError") in str(e.value)


def test_a_create_refused_three_times_with_nothing_to_read_is_a_held_lease():
    """The lease is there at each conditional create and gone at each read (three runs in a row releasing it
    between our two requests): after three tries the pass gives up as held (mutant L42: it went on without a
    lease)."""
    store = _Store()
    store.fail["put"] = [_Code("PreconditionFailed")] * 3
    held = lease._S3Lease(_sink(store), 90.0)
    with pytest.raises(lease.LeaseHeld):
        held.acquire()
    assert held._thread is None


def test_a_conflict_409_on_create_is_a_lost_race_judged_by_reading_back():
    """S3 answers a conditional write racing another with 409 ConditionalRequestConflict: a lost race like 412,
    judged by reading the lease back; ours (the write took, the reply was lost) is held (mutant L11: a 409 was a
    StorageError, the pass failed and its own lease blocked the next passes for ttl_s)."""
    store = _Store()
    store.took = ["ConditionalRequestConflict"]
    held = _acquired(store)
    held.check()
    assert held.etag == store.objects[KEY][1]
    held.release()
    assert KEY not in store.objects


def test_a_lease_whose_reply_was_lost_is_released_with_the_etag_read_back():
    """The create took but its reply was lost: the ETag read back is the one to renew and release with (mutant
    L27: not adopted, the release was refused and the lease blocked every next pass for ttl_s)."""
    store = _Store()
    store.took = ["PreconditionFailed"]
    held = _acquired(store)
    held.release()
    assert KEY not in store.objects


def test_a_lease_body_that_is_not_an_object_is_another_runs_lease():
    """A lease object holding JSON that is not an object (a list) is nobody's token: held, with an unknown holder
    (mutant L14: AttributeError out of acquire and out of every write's fence check)."""
    store = _Store()
    store.objects[KEY] = (b"[1, 2]", '"x1"', store.now)
    with pytest.raises(lease.LeaseHeld, match="unknown holder"):
        lease._S3Lease(_sink(store), 90.0).acquire()
    with pytest.raises(lease.LeaseLost, match="another run holds it now"):
        lease.Fence(KEY, "mine", 90.0).check(_sink(store))


def test_a_store_without_conditional_writes_gets_a_best_effort_lease_renewed_and_released():
    """NotImplemented for If-None-Match: a warning and a plain write; renewals and the release are plain too
    (mutants L33: renewed with If-Match, refused each time, and the lease counted lost by its age; L58: the
    best-effort write conditional again, out of acquire raw)."""
    store = _Store()

    def no_conditions(s, **kw):
        return _Code("NotImplemented") if kw["IfNoneMatch"] or kw["IfMatch"] else None

    store.fail["put"] = [no_conditions] * 3
    store.fail["delete"] = [no_conditions] * 2
    held = _acquired(store)
    assert not held.conditional
    held._stop = _Steps(1)
    held._renew()
    assert store.calls[-1] == ("put", KEY, {"IfNoneMatch": None, "IfMatch": None}) and not held.lost
    held.release()
    assert KEY not in store.objects


# --- S3: the lease's age, renewals and release -----------------------------------------------------------------------
def test_a_lease_taken_by_a_slow_write_counts_its_age_from_when_the_write_was_sent(monkeypatch):
    """The store stamps the lease some time after our write is sent: the lease's age is counted from the send,
    never from the reply (mutants L26, L43: counted from the reply, a write that took 70 s of a 90 s TTL left the
    pass believing its lease fresh for another minute, while another run could take it over in 20 s)."""
    clock = _Clock()
    _clocked(monkeypatch, clock)
    store = _Store()

    def slow(s, **kw):
        clock.now += 70.0
        return None

    store.fail["put"] = [slow]
    held = _acquired(store)
    with pytest.raises(lease.LeaseLost, match="not renewed within 90 s"):
        held.check()


@pytest.mark.parametrize("age_s, lost", [(59.9, False), (60.0, True)])
def test_a_lease_not_renewed_for_two_thirds_of_its_ttl_counts_as_lost(monkeypatch, age_s, lost):
    """check() counts the lease lost once it was not renewed for two thirds of ttl_s, by this host's clock
    (mutants L53: `>`, L52: only after the whole ttl_s, when another run may already hold it)."""
    clock = _Clock()
    _clocked(monkeypatch, clock)
    held = _acquired(_Store())
    clock.now += age_s
    if lost:
        with pytest.raises(lease.LeaseLost):
            held.check()
        assert held.lost
    else:
        held.check()


def test_renewals_come_every_third_of_the_ttl_and_soon_after_a_failure():
    """A renewal each ttl_s / 3, with If-Match the lease's ETag; one that did not reach the store is tried again
    after a tenth of that (at most POLL_S), not a third later, when every write's check would refuse the lease
    (mutants L45: every half; L48: a success followed by the short pause; L61: a failure retried a third later;
    L47: renewed unconditionally)."""
    store = _Store()
    held = _acquired(store)
    etag = held.etag
    store.fail["put"] = [ConnectionError("Could not connect to the endpoint URL")]
    held._stop = _Steps(2)
    held._renew()
    assert held._stop.waits == [30.0, 3.0, 30.0]
    assert store.calls[-1] == ("put", KEY, {"IfNoneMatch": None, "IfMatch": etag})
    assert held.etag == store.objects[KEY][1] != etag and not held.lost


@pytest.mark.parametrize("how", ["taken", "deleted"])
def test_a_renewal_refused_because_the_lease_is_not_ours_marks_it_lost_and_stops(how):
    """Another run holds the lease now (412), or it is gone (404 NoSuchKey): the renewal counts it lost at once and
    stops, and another run's lease is left alone (mutants L47: an unconditional renewal overwrote theirs, two runs
    each holding it; L49: a gone lease retried for ever; L51: not marked lost)."""
    store = _Store()
    held = _acquired(store)
    if how == "taken":
        _other(store)
    else:
        store.objects.pop(KEY)
    held._stop = _Steps(5)
    held._renew()
    assert held.lost and len(held._stop.waits) == 1
    with pytest.raises(lease.LeaseLost):
        held.check()
    if how == "taken":
        assert json.loads(store.objects[KEY][0])["token"] == "theirs"
    else:
        assert KEY not in store.objects


def test_a_lease_counted_lost_is_not_renewed_any_more():
    """Once check() counted the lease lost, the renewal loop writes nothing more (mutant L46: it kept renewing a
    lease the pass had given up, keeping every other run out)."""
    store = _Store()
    held = _acquired(store)
    held.lost = True
    n = len(store.calls)
    held._stop = _Steps(3)
    held._renew()
    assert store.calls[n:] == []


def test_a_renewal_whose_reply_was_lost_is_read_back_and_stamped(monkeypatch):
    """A renewal that took but whose retry was refused (412) is read back: ours, so the lease was renewed as of the
    renewal's send (mutant L50: not stamped, the lease counted lost two thirds of a TTL after the acquire) and its
    ETag adopted. A read back that fails is tried again soon, not taken for a loss (mutant L62)."""
    clock = _Clock()
    _clocked(monkeypatch, clock)
    store = _Store()
    held = _acquired(store)                   # at 100
    held._stop = _Steps(2, clock)
    store.took = ["PreconditionFailed"]       # the renewal sent at 130 took; its retry was refused
    store.fail["get"] = [ConnectionError("read timed out")]   # and the first read back failed
    held._renew()                             # read back at 133: ours
    assert held._stop.waits == [30.0, 3.0, 30.0] and not held.lost
    assert held.etag == store.objects[KEY][1]
    clock.now = 165.0
    held.check()                              # renewed as of 133, 32 s ago (the acquire was 65 s ago)


def test_a_lost_lease_is_not_deleted_at_release():
    """A pass that lost its lease leaves it alone when it ends: still ours in the store (lost by its age), it keeps
    other runs out until it is ttl_s old, the time a write that passed its fence check has to land (mutant L54:
    deleted, and another run started while this pass's last writes were in flight)."""
    store = _Store()
    held = _acquired(store)
    held.lost = True
    held.release()
    assert KEY in store.objects and ("delete", KEY, {"IfMatch": held.etag}) not in store.calls


def test_release_deletes_only_our_own_lease():
    """The release is If-Match our ETag: a lease another run took over meanwhile (before our renewal noticed) is
    theirs and stays (mutants L55: an unconditional delete; L57: a refused delete sent again unconditionally -
    either way their lease deleted, and a third run overlapping theirs)."""
    store = _Store()
    held = _acquired(store)
    _other(store)
    held.release()
    assert json.loads(store.objects[KEY][0])["token"] == "theirs"


def test_release_stops_the_renewals():
    """(mutant L56: the renewal thread kept running after the release; with its stop never set it renews the
    deleted lease, or waits out the 30 s join)"""
    store = _Store()
    held = lease._S3Lease(_sink(store), 90.0)
    held.acquire()
    held.release()
    assert held._stop.is_set() and not held._thread.is_alive() and KEY not in store.objects


# --- S3: the fence every write checks --------------------------------------------------------------------------------
def test_the_fence_is_the_leases_key_token_and_ttl():
    """(mutant L29: the fence's TTL longer than the lease's, so writes passed the check after the lease could be
    taken over)"""
    held = _acquired(_Store())
    assert held.fence() == lease.Fence(KEY, held.token, 90.0)
    held.release()


@pytest.mark.parametrize("age_s, ok", [(59.0, True), (60.0, False)])
def test_a_write_is_refused_once_the_lease_is_two_thirds_of_its_ttl_old(age_s, ok):
    """By the store's clock, a lease exactly two thirds of ttl_s old refuses writes (mutant L18: `>`)."""
    store = _Store()
    _other(store, age_s, token="mine")
    fence = lease.Fence(KEY, "mine", 90.0)
    if ok:
        fence.check(_sink(store))
    else:
        with pytest.raises(lease.LeaseLost, match="not renewed for 60 s of its 90 s"):
            fence.check(_sink(store))


def test_a_fence_that_cannot_read_the_lease_retries_then_raises_a_storage_error():
    """A read that fails once is tried again (the sink's retry policy: mutant L16, the first error refused the
    write raw); one that keeps failing is a StorageError, not a lost lease (mutant L15: taken as "it is gone")."""
    store = _Store()
    _other(store, token="mine")
    fence = lease.Fence(KEY, "mine", 90.0)
    store.fail["get"] = [ConnectionError("read timed out")]
    fence.check(_sink(store))
    store.fail["get"] = [_Code("InternalError")] * 2
    with pytest.raises(StorageError, match="read the catalog lease") as e:
        fence.check(_sink(store))
    assert type(e.value) is StorageError


def test_check_writes_checks_a_fenced_sink_only():
    """`check_writes` is what a pass calls before acting on what it rendered: a fenced sink whose lease is another
    run's raises LeaseLost (mutant L24: never), any other sink passes."""
    store = _Store()
    _other(store)
    sink = _sink(store)
    with pytest.raises(lease.LeaseLost, match="another run holds it now"):
        lease.check_writes(lease.fenced(sink, lease.Fence(KEY, "mine", 90.0)))
    lease.check_writes(sink)


# --- the pending journal (jobs/pending.py) ---------------------------------------------------------------------------
PKG = "asterisk/ulaw/sounds/en/welcome.ulaw"


def _cfg():
    from jobs.render import RenderConfig

    return RenderConfig(model="fake", key_prefix="prompts")


def _row(rid: str = "welcome", **kw):
    from jobs.inputs import Utterance

    return Utterance(id=rid, text=kw.pop("text", "Hello there."), voice="ryan", **kw)


def _key(row) -> str:
    from jobs.render import base_record

    return base_record(row, _cfg()).key


def _stored_journal(sink: LocalSink, name: str = "c", objects=(), packages=()) -> str:
    key = pending.journal_key(name)
    sink.put(key, json.dumps({"catalog": name, "objects": list(objects), "packages": list(packages)}).encode())
    return key


def _journal_of(sink: LocalSink, name: str = "c") -> dict | None:
    raw = sink.get(pending.journal_key(name))
    return None if raw is None else json.loads(raw)


def test_journal_keys_tell_apart_names_that_differ_in_case_or_in_undecodable_bytes():
    """Two catalogs' journals never share a key: names differing in case only (mutant P02), or a name holding an
    undecodable byte (a surrogate, from a file name) and the same name with "?" (mutant P01: 'replace') - each
    pass would find the other's journal, move it aside as damaged, and exit 1 from then on."""
    assert pending.journal_key("IVR") != pending.journal_key("ivr")
    assert pending.journal_key("menu\udcff") != pending.journal_key("menu?")


def test_every_key_a_record_lists_is_listed_whatever_its_status():
    """`listed`: a record's object, its earlier versions and its package files, of any status (mutants P03, P04,
    P05: one of them left out, and a pass journalled - then deleted - what a record still lists)."""
    old = "prompts/welcome-aaaaaaaaaaaaaaaaaaaa.wav"
    records = [ManifestRecord(id="welcome", key=OBJ, status="ok", previous_keys=[old], layout=[PKG]),
               ManifestRecord(id="gone", key="prompts/gone-bbbbbbbbbbbbbbbbbbbb.wav", status="retired"),
               ManifestRecord(id="failed", key=None, status="failed")]
    assert pending.listed(records) == {OBJ, old, PKG, "prompts/gone-bbbbbbbbbbbbbbbbbbbb.wav"}


def test_begin_journals_new_objects_and_package_files_only(tmp_path):
    """A pass journals the objects it may create - content keys no record claims that are not in storage yet - and
    with --layout the package files no record claims, under the row's language; nothing for a row that failed to
    parse or whose key cannot be made, each key once (mutants P19, P20, P21, P22, P23, P24, P53, P55)."""
    sink = LocalSink(str(tmp_path))
    new, there, claimed = _row("welcome"), _row("menu", text="Press one."), _row("bye", text="Goodbye.")
    sink.put(_key(there), b"someone's audio")
    rows = [new, _row("welcome"), there, claimed, _row("bad", error="no text"), _row("odd", format="bogus"),
            _row("willkommen", text="Hallo.", language="German")]
    j = pending.begin(sink, "c", rows, _cfg(), "none", {_key(claimed)})
    assert j.objects == [_key(new), _key(rows[-1])] and j.packages == []
    assert _journal_of(sink) == {"catalog": "c", "objects": j.objects, "packages": []}
    sink.delete(j.key)
    from jobs import layout as layouts

    taken = layouts.package_key("alaw", "en", "welcome")
    j = pending.begin(sink, "c", [new, rows[-1]], _cfg(), "asterisk", {taken})
    assert taken not in j.packages and layouts.package_key("ulaw", "en", "welcome") in j.packages
    assert layouts.package_key("ulaw", "de", "willkommen") in j.packages
    assert len(j.packages) == 2 * len(layouts.ASTERISK_CODECS) - 1 == len(set(j.packages))


def test_begin_merges_the_stored_journal_and_writes_what_it_adds(tmp_path):
    """What an earlier pass journalled stays journalled, objects and package files each in their own list, and a
    new key is added to the stored journal (mutants P16, P54: the earlier journal dropped, its objects never
    deleted; P10: packages read from `objects`; P25: the journal written only when there was none)."""
    sink = LocalSink(str(tmp_path))
    _stored_journal(sink, objects=[OBJ], packages=[PKG])
    j = pending.begin(sink, "c", [], _cfg(), "none", set())
    assert (j.objects, j.packages) == ([OBJ], [PKG])
    row = _row("menu", text="Press one.")
    j = pending.begin(sink, "c", [row], _cfg(), "none", set())
    assert _journal_of(sink) == {"catalog": "c", "objects": [OBJ, _key(row)], "packages": [PKG]}


@pytest.mark.parametrize("raw", [
    b"[" * 100_000,                                                             # too deep for json (P06)
    json.dumps({"catalog": "c", "objects": [1], "packages": []}).encode(),      # not a key (P08)
    json.dumps({"catalog": "c", "objects": [""], "packages": []}).encode(),     # an empty key (P09)
    json.dumps({"catalog": "c", "objects": [OBJ], "packages": [None]}).encode(),
])
def test_a_journal_that_is_not_one_this_job_writes_is_moved_aside_and_replaced(tmp_path, raw):
    """A journal that is not this job's (too deep to parse, a non-string or empty key) is added to the .damaged
    file after what is there already, its keys held, the pass told; the journal itself is replaced - deleted when
    this pass journals nothing - so the next pass does not move it aside again (mutants P06, P08, P09, P14, P15,
    P17, P18, P25, P26, P27)."""
    sink = LocalSink(str(tmp_path))
    key = pending.journal_key("c")
    sink.put(f"{key}.damaged", b"earlier")
    sink.put(key, raw)
    j = pending.begin(sink, "c", [], _cfg(), "none", set())
    assert sink.get(f"{key}.damaged") == b"earlier\n" + raw
    assert j.damaged == f"{key}.damaged" and sink.get(key) is None
    if OBJ.encode() in raw:
        assert {OBJ, f"{OBJ}.json", "prompts/welcome-0123456789abcdef0123.srt"} <= j.held


def test_a_damaged_journal_holds_its_keys_as_written_escaped_and_unescaped(tmp_path):
    """Every key-like string of a damaged journal is held, read as UTF-8 and with its JSON escapes read (mutants
    P11: `prompts/\\u6b22...` held only as spelt, the object itself deletable; P13: non-ASCII keys mangled; P12:
    the sidecar not held)."""
    sink = LocalSink(str(tmp_path))
    cn, raw_cn = "prompts/欢迎-0123456789abcdef0123.wav", "prompts/迎宾-0123456789abcdef0123.wav"
    escaped = json.dumps({"catalog": "other", "objects": [cn]})         # ensure_ascii: \\u escapes
    sink.put(pending.journal_key("c"), escaped.encode() + b"\n" + raw_cn.encode())
    j = pending.begin(sink, "c", [], _cfg(), "none", set())
    assert {cn, f"{cn}.json", raw_cn, f"{raw_cn}.json"} <= j.held


def _finish(sink, objects=(), packages=(), records=(), held=(), delete=True, jheld=()):
    j = pending.Journal(pending.journal_key("c"), "c", list(objects), list(packages), set(jheld))
    _stored_journal(sink, objects=objects, packages=packages)
    return pending.finish(sink, j, list(records), set(held), "prompts", delete)


def test_finish_drops_what_a_record_lists_and_keeps_what_it_lists_in_storage(tmp_path):
    """A journalled object or package file a record lists is the manifest's now: dropped from the journal, never
    deleted (mutants P34: a listed package file deleted by a delete pass; P35: listed keys journalled for ever)."""
    sink = LocalSink(str(tmp_path))
    sink.put(OBJ, b"audio")
    sink.put(PKG, b"ulaw")
    out = _finish(sink, [OBJ], [PKG], [ManifestRecord(id="welcome", key=OBJ, status="ok", layout=[PKG])])
    assert out == {} and sink.get(OBJ) == b"audio" and sink.get(PKG) == b"ulaw" and _journal_of(sink) is None


def test_a_mark_pass_keeps_journalled_what_is_in_storage_sidecar_or_package(tmp_path):
    """Without deletes, an object whose sidecar alone is in storage (its audio deleted, the sidecar not yet) and a
    package file in storage stay journalled, for a delete pass (mutants P29: only the object looked at; P30: a
    journal of package files only deleted; P50: `left` counts package files too)."""
    sink = LocalSink(str(tmp_path))
    sink.put(f"{OBJ}.json", b"{}")
    sink.put(PKG, b"ulaw")
    out = _finish(sink, [OBJ], [PKG], delete=False)
    assert out == {"left": 2} and _journal_of(sink) == {"catalog": "c", "objects": [OBJ], "packages": [PKG]}
    sink.delete(f"{OBJ}.json")
    assert _finish(sink, [], [PKG], delete=False) == {"left": 1}
    assert _journal_of(sink) == {"catalog": "c", "objects": [], "packages": [PKG]}


def test_a_delete_pass_deletes_the_captions_left_of_a_half_deleted_object(tmp_path):
    """An object whose audio and sidecar are gone but whose captions are not (a delete cut short) is deleted again,
    captions and all (mutant P36: a delete pass skipped what is not in storage, and the captions stayed for
    ever, listed by nothing)."""
    sink = LocalSink(str(tmp_path))
    srt = OBJ.removesuffix(".wav") + ".srt"
    sink.put(srt, b"1\n")
    assert _finish(sink, [OBJ]) == {"deleted": 1}
    assert sink.get(srt) is None and _journal_of(sink) is None


def test_a_delete_the_storage_refuses_is_counted_and_stays_journalled(tmp_path, monkeypatch):
    """(mutants P39, P40, P43, P44: a refused delete dropped from the journal - the object listed by nothing for
    ever - or not counted as failed, or out of finish raw)"""
    sink = LocalSink(str(tmp_path))
    sink.put(OBJ, b"audio")
    sink.put(PKG, b"ulaw")

    def refused(self, key):
        raise StorageError(f"delete {key}: AccessDenied")

    monkeypatch.setattr(LocalSink, "delete", refused)
    out = _finish(sink, [OBJ], [PKG])
    assert out == {"failed": 2, "left": 2}
    assert _journal_of(sink) == {"catalog": "c", "objects": [OBJ], "packages": [PKG]}


def test_a_package_file_held_or_matching_a_listed_one_ignoring_case_waits(tmp_path):
    """A package file a quarantined row names, or that matches a listed one ignoring case, is kept and stays
    journalled (mutant P41: deleted)."""
    sink = LocalSink(str(tmp_path))
    other = "asterisk/alaw/sounds/en/welcome.alaw"
    sink.put(PKG, b"ulaw")
    sink.put(other, b"alaw")
    rec = ManifestRecord(id="w", key=None, status="failed", layout=[other.upper()])
    out = _finish(sink, [], [PKG, other], [rec], held={PKG})
    assert sink.get(PKG) == b"ulaw" and sink.get(other) == b"alaw" and out == {"left": 2}


def _index(sink):
    return json.loads(sink.get("asterisk/index.json"))


def test_a_deleted_package_files_index_entry_goes_unless_a_kept_file_has_its_name(tmp_path):
    """Deleting a journalled package file drops its index entry (mutant P56: kept), unless a package file a record
    lists, or one that is held, has the same name (mutants P45, P46: the entry of a file still in use dropped)."""
    sink = LocalSink(str(tmp_path))
    gone, listed, held = PKG, "asterisk/alaw/sounds/en/menu.alaw", "asterisk/alaw/sounds/en/bye.alaw"
    doomed = ["asterisk/ulaw/sounds/en/menu.ulaw", "asterisk/ulaw/sounds/en/bye.ulaw", gone]
    for k in (*doomed, listed, held):
        sink.put(k, b"x")
    sink.put("asterisk/index.json", json.dumps({"en/welcome": {}, "en/menu": {}, "en/bye": {}, "en/x": {}}).encode())
    rec = ManifestRecord(id="menu", key=None, status="failed", layout=[listed])
    out = _finish(sink, [], doomed, [rec], held={held})
    assert out == {"deleted": 3} and all(sink.get(k) is None for k in doomed)
    assert _index(sink) == {"en/menu": {}, "en/bye": {}, "en/x": {}}


def test_an_index_the_storage_cannot_update_keeps_the_deleted_files_journalled(tmp_path, monkeypatch):
    """(mutants P47, P48: the deleted package files dropped from the journal, their index entries left for ever;
    or the StorageError out of finish)"""
    from jobs import layout as layouts

    sink = LocalSink(str(tmp_path))
    sink.put(PKG, b"x")

    def unreadable(sink):
        raise StorageError("get asterisk/index.json: unreachable")

    monkeypatch.setattr(layouts, "_read_index", unreadable)
    assert _finish(sink, [], [PKG]) == {"deleted": 1, "failed": 1, "left": 1}
    assert _journal_of(sink)["packages"] == [PKG]


def test_a_journal_the_storage_cannot_write_is_a_failure_counted(tmp_path, monkeypatch):
    """(mutant P49: the journal left as it was, the pass exiting 0)"""
    sink = LocalSink(str(tmp_path))
    sink.put(OBJ, b"audio")
    real = LocalSink.put

    def put(self, key, data, content_type="application/octet-stream"):
        if key == pending.journal_key("c") and b"prompts/" in data:
            raise StorageError("put: unreachable")
        return real(self, key, data, content_type)

    j = pending.Journal(pending.journal_key("c"), "c", [OBJ])
    monkeypatch.setattr(LocalSink, "put", put)
    assert pending.finish(sink, j, [], set(), "prompts", False) == {"failed": 1, "left": 1}


def test_a_damaged_journal_is_reported_even_when_it_holds_no_key(tmp_path):
    """(mutant P51: a .damaged file without key-like strings went unreported, and the pass exited 0 with it
    there)"""
    sink = LocalSink(str(tmp_path))
    j = pending.Journal(pending.journal_key("c"), "c", damaged=f"{pending.journal_key('c')}.damaged")
    assert pending.finish(sink, j, [], set(), "prompts", True) == {
        "damaged": f"{sink.uri}/{pending.journal_key('c')}.damaged"}


# --- the manifest (jobs/manifest.py) ---------------------------------------------------------------------------------
def _sidecar(**fields) -> bytes:
    rec = ManifestRecord(id="welcome", key=OBJ, status="ok").to_dict()
    return json.dumps({k: v for k, v in {**rec, **fields}.items() if v is not ...}).encode()


@pytest.mark.parametrize("fields", [
    {"voice": 5}, {"reused": 1}, {"attempts": 1.5}, {"duration_s": True}, {"flags": [1]}, {"key": None},
    {"attempts": None}, {"id": ...}, {"status": "retired"},
], ids=["str", "bool", "int-fraction", "float-bool", "list-item", "no-key", "null-int", "no-id", "status"])
def test_a_sidecar_with_a_field_of_the_wrong_type_is_not_a_record(fields):
    """Such an output counts as not done and is rendered again (mutants M02, M03, M05, M07, M08, M09, M10, M11,
    M12: each taken as a record, whose value then broke the manifest write or the summary, or out of from_sidecar
    raw)."""
    from jobs.manifest import from_sidecar

    assert from_sidecar(_sidecar(**fields)) is None


def test_a_sidecar_too_deep_for_json_is_not_a_record():
    """(mutant M13: RecursionError out of the reuse check, the whole pass failing on one sidecar)"""
    from jobs.manifest import from_sidecar

    assert from_sidecar(b"[" * 100_000) is None


def test_a_sidecar_record_keeps_its_values_with_whole_floats_as_integers():
    """JSON 3.0 for `attempts` is 3 (an int), `duration_s` 1.5 stays 1.5, an unknown field is ignored (mutants
    M48: floats made integers in the float columns, 1.5 s read as 1; M01: an unknown field a TypeError)."""
    from jobs.manifest import from_sidecar

    rec = from_sidecar(_sidecar(attempts=3.0, duration_s=1.5, future_field="x"))
    assert rec.attempts == 3 and type(rec.attempts) is int and rec.duration_s == 1.5
    assert ManifestRecord.from_dict({"id": "a", "key": None, "status": "failed", "later": 1}).id == "a"


def test_the_manifest_schema_is_fixed():
    """The stored column types are the contract other readers use; `bytes` is 64-bit (a 3 GB chapter) (mutants
    M14, M15)."""
    import pyarrow.parquet as pq

    from jobs.manifest import from_parquet, to_parquet

    data = to_parquet([ManifestRecord(id="a", key=OBJ, status="ok", bytes=3 << 30)])
    schema = pq.read_schema(io.BytesIO(data))
    assert (str(schema.field("attempts").type), str(schema.field("bytes").type)) == ("int32", "int64")
    assert from_parquet(data)[0].bytes == 3 << 30


def test_json_lines_are_in_id_order_one_per_line_and_take_any_value():
    """The fallback never fails on a value (mutant M18: a value JSON cannot hold raised) and ends with a newline
    (M19); lines in id order like the Parquet (M17)."""
    from jobs.manifest import to_jsonl

    records = [ManifestRecord(id=i, key=None, status="failed") for i in ("b", "a")]
    records[0].error = b"\xff"   # not JSON: written as its str()
    data = to_jsonl(records)
    assert data.endswith(b"}\n") and [json.loads(x)["id"] for x in data.splitlines()] == ["a", "b"]


def _table(**columns):
    import pyarrow as pa

    return pa.table(columns)


def _parquet(table) -> bytes:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_stored_columns_of_other_arrow_encodings_are_read():
    """Dictionary-encoded, large, null-typed columns hold our values (mutants M20, M21, M22, M27: refused as
    another schema, the catalog refusing to run); a manifest with no rows may have null-typed columns (M28)."""
    import pyarrow as pa

    from jobs.manifest import read_stored

    table = _table(id=pa.array(["a", "b"]).dictionary_encode(), key=pa.array([None, None], pa.null()),
                   status=pa.array(["failed", "failed"], pa.large_string()), error=pa.array([None, None], pa.null()))
    records, bad = read_stored(_parquet(table))
    assert [(r.id, r.key, r.status) for r in records] == [("a", None, "failed"), ("b", None, "failed")] and bad == []
    empty = _table(id=pa.array([], pa.null()), key=pa.array([], pa.null()), status=pa.array([], pa.null()))
    assert read_stored(_parquet(empty)) == ([], [])


@pytest.mark.parametrize("column", ["reused-int", "attempts-str", "flags-int"])
def test_a_stored_column_of_another_type_is_a_schema_error(column):
    """(mutants M23, M24, M25: such a column read row by row, every row quarantined, or a bool made of an int)"""
    import pyarrow as pa

    from jobs.manifest import ManifestSchemaError, read_stored

    base = {"id": pa.array(["a"]), "key": pa.array([OBJ]), "status": pa.array(["ok"])}
    extra = {"reused-int": ("reused", pa.array([1])), "attempts-str": ("attempts", pa.array(["1"])),
             "flags-int": ("flags", pa.array([[1]]))}[column]
    table = pa.Table.from_arrays([*base.values(), extra[1]], names=[*base, extra[0]])
    with pytest.raises(ManifestSchemaError, match=repr(extra[0])):
        read_stored(_parquet(table))


def test_stored_rows_are_records_or_quarantined_with_why_and_the_row_as_stored():
    """A row with no object (key null), null lists and a whole float count are records (mutants M33, M34: a null
    list as None, M35: 3.0 kept a float); an unknown status or a number out of its column's range is quarantined,
    the row kept as stored and why named (mutants M36, M46, M44, M30, M31)."""
    import pyarrow as pa

    from jobs.manifest import read_manifest, read_stored

    table = _table(id=pa.array(["a", "b", "c", "d"]), key=pa.array([None, OBJ, OBJ, OBJ]),
                   status=pa.array(["failed", "ok", "odd", "ok"]),
                   attempts=pa.array([3.0, 1.0, 1.0, 2.0**40]), flags=pa.array([None, ["x"], [], []]))
    data = _parquet(table)
    records, bad = read_stored(data)
    assert [r.id for r in records] == ["a", "b"]
    assert records[0].key is None and records[0].flags == [] and type(records[0].attempts) is int
    assert [row["id"] for _, row in bad] == ["c", "d"] and bad[0][1]["status"] == "odd"
    assert read_manifest(data)[1] == [why for why, _ in bad] and "status 'odd'" in bad[0][0]
    assert "field 'attempts'" in bad[1][0]


def test_summarize_counts_what_was_written_and_what_failed():
    """(mutants M37-M43: a status with no row missing from the counts, suspect rows not counted as synthesized or
    reused, failed rows' durations in the audio total, failed ids cut to 5, retry reasons counted once,
    `model_changed` for rows that did not fail)"""
    from jobs.manifest import summarize
    from jobs.serve_backend import MODEL_CHANGED

    changed = f"synthesis: {MODEL_CHANGED}"
    records = [ManifestRecord(id="s", key=OBJ, status="suspect", duration_s=2.0, retries=["replica lost"]),
               ManifestRecord(id="r", key=OBJ, status="suspect", duration_s=1.0, reused=True,
                              retries=["replica lost", "worker lost"]),
               ManifestRecord(id="k", key=OBJ, status="ok", duration_s=1.5, error=changed)]
    records += [ManifestRecord(id=f"f{i}", key=None, status="failed", duration_s=9.0) for i in range(7)]
    records[-1].error = changed
    out = summarize(records)
    assert {k: out[k] for k in ("total", "ok", "suspect", "failed", "retired", "reused", "synthesized",
                                "audio_seconds")} == {"total": 10, "ok": 1, "suspect": 2, "failed": 7,
                                                      "retired": 0, "reused": 1, "synthesized": 2,
                                                      "audio_seconds": 4.5}
    assert out["failed_ids"] == [f"f{i}" for i in range(7)]
    assert out["retried"]["reasons"] == {"replica lost": 2, "worker lost": 1}
    assert out["model_changed"] == {"rows": 1, "ids": ["f6"]}
