"""The session rules without Ray: the replica's session table (ownership, text limits, idle, deadline, leases), the
WebSocket message limiter, the session router's choices, and the scheduler loop (blocks while nothing can run;
a session the engine finished without a last chunk still ends)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from qwen_tts_core import AudioChunk, SynthesisRequest
from qwen_tts_core.errors import RequestError
from serve.routing import SessionRouter, new_session_id, owner_of, route_key
from serve.scheduler import Busy, Scheduler, SchedulerLimits, SynthesisFailed
from serve.schemas import ApiError
from serve.sessions import SessionLimits, SessionTable, UnknownSession
from serve.ws_session import MessageLimiter
from tests.serve.fakes import FakeEngine


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


_ADMITTED = object()


def _ticket(session=_ADMITTED):
    return SimpleNamespace(finished=False, failure=None, cancelled=False, session=session)


def test_session_ids_are_unique_and_name_their_owner():
    ids = {new_session_id("abc12345") for _ in range(1000)}
    assert len(ids) == 1000 and {owner_of(s) for s in ids} == {"abc12345"}
    assert owner_of(route_key("r1")) == "r1"
    assert owner_of("no-owner-") is None and owner_of("plain") is None and owner_of(None) is None


def test_unknown_or_foreign_ids_are_refused():
    a, b = SessionTable("replicaA"), SessionTable("replicaB")
    s = a.open(_ticket(), incremental=True, leased=False)
    assert a.get(s.sid) is s
    for bad in (s.sid.replace("replicaA", "replicaB"), new_session_id("replicaA"), "x", 7, None):
        with pytest.raises(UnknownSession):
            a.get(bad)
    with pytest.raises(UnknownSession):
        b.get(s.sid)      # another replica never holds it
    a.close(s.sid)
    with pytest.raises(UnknownSession):
        a.get(s.sid)
    import pickle

    e = pickle.loads(pickle.dumps(UnknownSession("r-1", "has ended")))
    assert e.session_id == "r-1" and "has ended" in str(e)
    b2 = pickle.loads(pickle.dumps(Busy("full", 7)))
    assert b2.retry_after_s == 7 and str(b2) == "full"
    f = pickle.loads(pickle.dumps(SynthesisFailed("deadline", "error", 504)))
    assert (f.message, f.status) == ("deadline", 504)


def test_text_limits_count_the_whole_session():
    t = SessionTable("r", SessionLimits(max_text_chars=10))
    s = t.open(_ticket(), incremental=True, leased=False)
    for _ in range(10):
        t.take_text(s, "a", False)
    with pytest.raises(RequestError) as e:
        t.take_text(s, "a", False)          # the 11th one-character message
    assert e.value.field == "text" and "10" in e.value.message
    s2 = t.open(_ticket(), incremental=True, leased=False)
    t.take_text(s2, "", False)
    t.take_text(s2, "   ", False)
    with pytest.raises(RequestError, match="end before any text"):
        t.take_text(s2, "", True)
    t.take_text(s2, "hi", True)
    with pytest.raises(RequestError, match="after end"):
        t.take_text(s2, "more", False)
    full = t.open(_ticket(), incremental=False, leased=False)
    with pytest.raises(RequestError, match="full text"):
        t.take_text(full, "x", False)


def test_a_character_cut_between_messages_counts_and_shows_as_one_character():
    """The table takes the text the WebSocket forwards as it came (one owner for joining surrogate halves: the core's
    PieceJoiner, used here). A lone high half is held, not fed and not counted; with its low half it is one visible
    character: a message of only an emoji, cut in two, is text, and `end` after it is accepted. A half still held
    at `end`, or a low half with no high one, is refused naming text."""
    t = SessionTable("r", SessionLimits(max_text_chars=4))
    s = t.open(_ticket(), incremental=True, leased=False)
    assert t.take_text(s, "\ud83d", False) == "" and s.text_chars == 0 and not s.has_text
    assert t.take_text(s, "\ude00", False) == "\U0001f600" and s.text_chars == 1 and s.has_text
    assert t.take_text(s, "ab\ud83d", False) == "ab" and s.text_chars == 3
    assert t.take_text(s, "\ude00", False) == "\U0001f600" and s.text_chars == 4   # 4 characters, 6 code units
    with pytest.raises(RequestError, match="longer than 4"):
        t.take_text(s, "\ud83d\ude00", True)
    held = t.open(_ticket(), incremental=True, leased=False)
    t.take_text(held, "hi \ud83d", False)
    with pytest.raises(RequestError, match="surrogate") as e:
        t.take_text(held, "", True)
    assert e.value.field == "text"
    lone = t.open(_ticket(), incremental=True, leased=False)
    with pytest.raises(RequestError, match="surrogate"):
        t.take_text(lone, "\ude00 there", False)


def test_idle_deadline_and_lease_expiry():
    clock = Clock()
    t = SessionTable("r", SessionLimits(idle_text_timeout_s=5, deadline_s=20, lease_s=3), clock=clock)
    idle = t.open(_ticket(), incremental=True, leased=False)
    leased = t.open(_ticket(), incremental=False, leased=True)
    ended = t.open(_ticket(), incremental=True, leased=False)
    t.take_text(ended, "all of it", True)
    parked = t.open(_ticket(session=None), incremental=False, leased=False)   # bulk waiting for a slot
    assert t.expired() == []
    clock.t += 2.5
    assert t.renew([leased.sid, "r-unknown"]) == ["r-unknown"]
    clock.t += 2.6          # idle: 5.1 s without text; leased: renewed 2.6 s ago
    out = t.expired()
    assert [(s is idle, f.status, f.field) for s, f in out] == [(True, 408, "text")]
    idle.ticket.failure = out[0][1]
    clock.t += 3.1          # the lease lapses (no renewal for 3.1 s)
    out = t.expired()
    assert [(s is leased, f) for s, f in out] == [(True, None)]
    assert t.lapsed(leased, consumer_alive=False)     # settled: the consumer is gone, cancel it
    leased.ticket.cancelled = True
    parked.ticket.session = object()   # admitted now: its deadline counts from here
    t.expired()
    clock.t += 12           # 20.2 s after opening: the deadline of the sessions in the engine since then
    out = t.expired()
    assert [s for s, _ in out] == [ended] and out[0][1].status == 504
    assert t.expired_counts == {"idle": 1, "deadline": 1, "lease": 1, "lease_late": 0}


def test_empty_text_messages_do_not_keep_a_session_from_its_idle_timeout():
    """{"type": "text", "text": ""} every few seconds reset the idle clock: a client holding an engine slot without
    saying anything until the session deadline. Blank messages (a space, a newline) did too; a space sent apart from
    its word still counts once the word comes."""
    clock = Clock()
    t = SessionTable("r", SessionLimits(idle_text_timeout_s=5, deadline_s=100), clock=clock)
    s, spaced, worded = (t.open(_ticket(), incremental=True, leased=False) for _ in range(3))
    for _ in range(3):
        clock.t += 2
        t.take_text(s, "", False)
        t.take_text(spaced, " \n\t\u200b\x00\u2060", False)   # no visible character: no text (the core's rule)
        t.take_text(worded, " ", False)
        t.take_text(worded, "word", False)
    out = t.expired()
    assert sorted((x is s, x is spaced, f.status, f.field) for x, f in out) == [
        (False, True, 408, "text"), (True, False, 408, "text")]
    assert worded.text_chars == 15


def test_a_lapsed_lease_whose_consumer_lives_is_extended_not_cancelled():
    """Found by CI on a loaded 2-core host: renewals delayed past a lease cut live streams. A lapse is settled by the
    consumer's liveness: alive -> the lease is extended (counted as late, not expired); gone -> cancel."""
    clock = Clock()
    t = SessionTable("r", SessionLimits(lease_s=3), clock=clock)
    s = t.open(_ticket(), incremental=False, leased=True, consumer={"id": "ingress-1"})
    plain = t.open(_ticket(), incremental=False, leased=False, consumer={"id": "x"})
    assert s.consumer == {"id": "ingress-1"} and plain.consumer is None
    clock.t += 3.1
    assert t.expired() == [(s, None)]
    assert t.lapsed(s, consumer_alive=True) is False
    assert t.expired() == []                       # extended by a full lease from the check
    clock.t += 2.9
    assert t.expired() == []
    clock.t += 0.2
    assert t.expired() == [(s, None)]              # still no renewal: asked again, one lease later
    assert t.lapsed(s, consumer_alive=False) is True
    assert t.expired_counts["lease_late"] == 1 and t.expired_counts["lease"] == 1


def test_a_stalled_replica_does_not_read_its_own_stall_as_a_consumer_gone():
    """Found by CI on a loaded 2-core host: when the replica's loop is not scheduled for longer than a lease, the
    renewals sent meanwhile wait unread; the stall is credited to the leases. A consumer that is really gone still
    expires once the replica checks on time."""
    clock = Clock()
    t = SessionTable("r", SessionLimits(lease_s=3), clock=clock)
    s = t.open(_ticket(), incremental=False, leased=True)
    assert t.expired(0.5) == []
    clock.t += 0.5
    assert t.expired(0.5) == []
    clock.t += 5.0          # the watchdog ran 4.5 s late: no renewal could be read meanwhile
    assert t.expired(0.5) == []
    waited, out = 0.0, []
    while not out:          # on time again, and still nobody renews: the lease lapses 3 s after the stall
        clock.t += 0.5
        waited += 0.5
        out = t.expired(0.5)
    assert [(x is s, f) for x, f in out] == [(True, None)] and t.lapsed(s, False) and t.expired_counts["lease"] == 1
    assert 2.5 <= waited <= 3.5, waited
    clock.t += 5.0
    assert t.expired() == [(s, None)]   # without a period nothing is credited (the old rule)


class _SlowRenew:
    """A replica handle whose renew answers after `delay_s`; records when each call started."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s, self.calls = delay_s, []

    def options(self, **_):
        return self

    @property
    def renew(self):
        return self

    def remote(self, sids):
        self.calls.append((asyncio.get_running_loop().time(), tuple(sids)))

        async def answer():
            await asyncio.sleep(self.delay_s)
            return []
        return answer()


def test_lease_rounds_keep_their_schedule_when_one_replica_is_slow():
    """A replica that takes 2 periods to answer must not delay the renewals of another replica, and its own
    calls must not pile up. Rounds run on a 0.2 s period, so a stall of the test process itself (a cyclic-GC pass
    over a large heap late in a full run: one gap of 0.47 s in CI) is kept out: the GC is off while it runs, and
    the schedule is judged by the median gap. Waiting on the slow replica would make every gap >= 0.45 s and leave
    at most 3 rounds in 1.1 s."""
    import gc

    from serve.streaming import Leases

    async def main():
        leases = Leases(0.6)                      # a round every 0.2 s
        slow, fast = _SlowRenew(0.45), _SlowRenew(0.0)
        leases.add("slowowner-1", "m", slow)
        leases.add("fastowner-1", "n", fast)
        await asyncio.sleep(1.1)
        leases.drop("slowowner-1")
        leases.drop("fastowner-1")
        await asyncio.sleep(0.5)
        return slow, fast, leases
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        slow, fast, leases = asyncio.run(main())
    finally:
        if gc_was_on:
            gc.enable()
    assert len(fast.calls) >= 4, fast.calls                       # ~5 rounds in 1.1 s
    assert 2 <= len(slow.calls) <= 3, slow.calls                  # one call in flight at a time
    gaps = sorted(b[0] - a[0] for a, b in zip(fast.calls, fast.calls[1:]))
    assert gaps[len(gaps) // 2] < 0.3, gaps
    assert leases._task.done() and not leases._in_flight


def test_message_limiter_count_and_rate():
    clock = Clock()
    lim = MessageLimiter(max_messages=100, per_s=10, burst=20, clock=clock)
    for _ in range(20):
        lim.take()
    with pytest.raises(ApiError) as e:
        lim.take()          # the burst is spent
    assert e.value.status == 429 and e.value.param == "message" and "per second" in e.value.message
    clock.t += 1.0          # ten more tokens
    for _ in range(10):
        lim.take()
    with pytest.raises(ApiError):
        lim.take()
    for _ in range(70):     # a steady 5 messages per second stays under the rate ...
        clock.t += 0.2
        lim.take()
    with pytest.raises(ApiError, match="100 messages"):
        lim.take()          # ... until the count limit


@dataclass
class _Replica:
    replica_id: object
    node_id: str = "n1"
    availability_zone: str | None = None


def _rid(unique_id):
    from ray.serve._private.common import DeploymentID, ReplicaID
    return ReplicaID(unique_id=unique_id, deployment_id=DeploymentID(name="m", app_name="a"))


def _router(self_node_id=None, replicas=()):
    """A SessionRouter built as Serve builds one (the real __init__ chain, LocalityMixin included)."""
    from ray.serve._private.common import DeploymentHandleSource, DeploymentID

    async def build():
        return SessionRouter(deployment_id=DeploymentID(name="m", app_name="a"),
                             handle_source=DeploymentHandleSource.UNKNOWN, self_node_id=self_node_id,
                             prefer_local_node_routing=self_node_id is not None)
    r = asyncio.run(build())
    r._update_colocated_replica_ids_with_replicas(list(replicas))   # what update_replicas does for the mixin
    r._replica_id_set = {x.replica_id for x in replicas}
    return r


def _pending(session_id: str = ""):
    return SimpleNamespace(metadata=SimpleNamespace(session_id=session_id),
                           routing_context=SimpleNamespace(should_backoff=False, tried_same_node=False,
                                                           tried_same_az=False))


def test_router_sends_keyed_calls_to_their_owner_and_balances_the_rest():
    reps = [_Replica(_rid(u)) for u in ("aaa", "bbb", "ccc")]
    router = _router(replicas=reps)

    def choose(pr):
        return asyncio.run(router.choose_replicas(reps, pr))
    for u, rep in zip(("aaa", "bbb", "ccc"), reps):
        for _ in range(20):
            pr = _pending(new_session_id(u))
            assert choose(pr) == [[rep]] and pr.routing_context.should_backoff
    picks = [tuple(r.replica_id.unique_id for r in choose(_pending())[0]) for _ in range(200)]
    assert all(len(p) == 2 and len(set(p)) == 2 for p in picks)
    assert {x for p in picks for x in p} == {"aaa", "bbb", "ccc"}
    gone = choose(_pending(new_session_id("zzz")))[0]   # the owner is gone: any replica, which will refuse it
    assert len(gone) == 2 and asyncio.run(router.choose_replicas([], _pending())) == []


def test_router_prefers_the_callers_node_for_unkeyed_calls_but_never_for_keyed_ones():
    reps = [_Replica(_rid(u), node_id=n) for u, n in (("aaa", "n1"), ("bbb", "n2"), ("ccc", "n2"))]
    router = _router(self_node_id="n1", replicas=reps)

    def choose(pr):
        return asyncio.run(router.choose_replicas(reps, pr))
    for _ in range(20):
        pr = _pending()
        assert choose(pr) == [[reps[0]]]                     # the local replica first ...
        assert not pr.routing_context.should_backoff        # ... and no backoff: the next try may go elsewhere
    pr = _pending()
    pr.routing_context.tried_same_node = True               # the local one was full: every replica
    assert {r.replica_id.unique_id for r in choose(pr)[0]} <= {"aaa", "bbb", "ccc"} and len(choose(pr)[0]) == 2
    assert choose(_pending(new_session_id("ccc"))) == [[reps[2]]]   # a session's owner wins over locality


def _req(text="hi", priority="interactive"):
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", priority=priority)


class WaitingEngine(FakeEngine):
    """Sessions whose text is 'wait' stay active without producing anything (like a session waiting for text)."""

    def step(self, emit=None):
        self.steps += 1
        out = []
        with self.lock:
            for q in self.queues.values():
                while q and len(self.active) < self.max_sessions:
                    self.active.append(q.popleft())
        for s in list(self.active):
            if s.cancelled:
                self.active.remove(s)
                out.append(AudioChunk(s.id, np.zeros(0, np.float32), s.frames, 0, True, "cancelled"))
        return out


class RunnableWaitingEngine(WaitingEngine):
    """The same, with the engine's own `runnable()` (the core's Engine has it): nothing runs until a cancel."""

    def runnable(self):
        return bool(self.num_queued) or any(s.cancelled for s in self.active)


@pytest.mark.parametrize("engine_cls", [WaitingEngine, RunnableWaitingEngine])
def test_loop_blocks_while_sessions_wait_for_text(engine_cls):
    async def main():
        eng = engine_cls(max_sessions=4)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            t = await sched.submit(_req("wait"))
            await asyncio.sleep(0.3)
            steps = eng.steps
            await asyncio.sleep(0.6)
            idle_steps = eng.steps - steps
            sched.fail(t, 408, "no text", "text")   # a state change wakes the loop at once
            chunks = await asyncio.wait_for(_collect(sched, t), 2)
        finally:
            sched.stop()
        return idle_steps, chunks, t
    idle_steps, chunks, t = asyncio.run(main())
    assert idle_steps <= 1, f"the loop must block, not spin ({idle_steps} steps in 0.6 s)"
    assert chunks[-1].is_last and t.failure.status == 408


async def _collect(sched, ticket):
    return [c async for c in sched.chunks(ticket)]


class PrefillFinishEngine(FakeEngine):
    """Finishes every session at admission without emitting its last chunk (the prefill-finish defect)."""

    def step(self, emit=None):
        self.steps += 1
        with self.lock:
            for q in self.queues.values():
                while q:
                    s = q.popleft()
                    s.done, s.finish_reason = True, "max_new_tokens"
        return []


def test_a_session_finished_without_its_last_chunk_still_ends():
    async def main():
        sched = Scheduler(PrefillFinishEngine())
        sched.start(asyncio.get_running_loop())
        try:
            t = await sched.submit(_req())
            return await asyncio.wait_for(_collect(sched, t), 5)
        finally:
            sched.stop()
    chunks = asyncio.run(main())
    assert [c.finish_reason for c in chunks] == ["max_new_tokens"]


def test_a_leased_stream_parked_past_the_deadline_fails_busy_and_a_job_row_waits_on():
    """An HTTP `priority: "bulk"` stream parked behind steady interactive load had no time limit: its deadline ran
    from entering the engine and the live ingress kept renewing its lease, so it held its key's place and one of
    `max_bulk_queue` places for ever. Now it fails 503 (retry later) `deadline_s` after it opened; `synthesize`
    (batch jobs, not leased) still waits, and a session admitted in time gets its deadline from then."""
    clock = Clock()
    t = SessionTable("r", SessionLimits(deadline_s=20, lease_s=3), clock=clock)
    parked = t.open(_ticket(session=None), incremental=False, leased=True)   # HTTP bulk, no slot for it
    late = t.open(_ticket(session=None), incremental=False, leased=True)     # gets a slot just in time
    job = t.open(_ticket(session=None), incremental=False, leased=False)     # a batch job's synthesize call

    def tick(dt):
        clock.t += dt
        t.renew([parked.sid, late.sid])   # the ingress lives and renews every lease_s / 3
        return t.expired()
    for _ in range(19):
        assert tick(1) == []
    late.ticket.session = object()
    assert tick(0.5) == []                # 19.5 s: not yet
    out = tick(1)                         # 20.5 s after opening, still parked
    assert [(s is parked, f.status, f.field) for s, f in out] == [(True, 503, None)]
    assert "retry later" in out[0][1].message
    parked.ticket.failure = out[0][1]
    out = tick(19.5)                      # 20.5 s after `late` entered the engine: the ordinary deadline
    assert [(s is late, f.status) for s, f in out] == [(True, 504)]
    late.ticket.failure = out[0][1]
    for _ in range(24):
        assert tick(3600) == []           # the job's row waits as long as it takes (the job bounds it)
    assert job.started is None and t.expired_counts["deadline"] == 2


def test_busy_failures_carry_retry_after():
    """A 503 failure (a parked stream past its wait, a bulk request the engine refused) says when to retry."""
    async def main():
        sched = Scheduler(FakeEngine(max_queue=0), SchedulerLimits(retry_after_s=7))
        sched.start(asyncio.get_running_loop())
        try:
            refused = await sched.submit(_req("refused", "bulk"))      # the engine's queue is full: EngineBusy
            await asyncio.wait_for(_collect(sched, refused), 5)
            sched.limits = SchedulerLimits(retry_after_s=7, interactive_reserve=4)   # no room for bulk
            parked, idle = await sched.submit(_req("parked", "bulk")), await sched.submit(_req("idle", "bulk"))
            sched.fail(parked, 503, "no slot", None)
            sched.fail(idle, 408, "no text", "text")
            return refused.failure, parked.failure, idle.failure
        finally:
            sched.stop()
    refused, parked, idle = asyncio.run(main())
    assert (refused.status, refused.retry_after_s) == (503, 7)
    assert (parked.status, parked.retry_after_s) == (503, 7)
    assert (idle.status, idle.retry_after_s) == (408, None)


def test_a_parked_bulk_stream_ends_503_while_a_parked_synthesize_waits_for_its_slot(model_factory):
    """In-process on the real engine: no room for bulk work (as under steady interactive load), a leased bulk
    stream ends with a 503 end item about `deadline_s` after it opened, a `synthesize` call waiting longer than
    that still gets its audio once a slot frees."""
    from serve.config import ModelConfig
    from serve.replica import ReplicaCore
    from serve.streaming import end_error

    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=2, interactive_reserve=1, max_queue=2,
                      max_new_tokens=8, default_max_new_tokens=8)
    # deadline_s also bounds the job once it runs: 1 s failed it on a loaded 2-core host (8 frames took longer)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None, limits=SessionLimits(deadline_s=3.0, lease_s=60))
    full = SchedulerLimits(max_queue=2, interactive_reserve=2, max_bulk_waiting=cfg.max_bulk_queue)

    async def main():
        loop = asyncio.get_running_loop()
        core.start(loop)
        roomy, core.scheduler.limits = core.scheduler.limits, full
        try:
            job = asyncio.ensure_future(core.synthesize({"input": "A bulk line.", "voice": "eric", "seed": 1}))
            t0 = loop.time()
            items = await asyncio.wait_for(
                _alist(core.stream({"input": "A parked line.", "voice": "ryan", "priority": "bulk"}, lease=True)), 10)
            waited = loop.time() - t0
            await asyncio.sleep(1.0)           # the job's row has waited well past deadline_s (4 s and more)
            job_waiting = not job.done()
            core.scheduler.limits = roomy      # a slot frees
            core.scheduler._wake.set()
            out = await asyncio.wait_for(job, 60)
            return items, waited, job_waiting, out, dict(core.sessions.expired_counts)
        finally:
            core.stop()
    items, waited, job_waiting, out, counts = asyncio.run(main())
    assert [x["type"] for x in items] == ["start", "end"], items
    end = items[-1]
    assert (end["status"], end["finish_reason"]) == (503, "error") and 3.0 <= waited < 6, (end, waited)
    err = end_error(end)                       # what the ingress answers the HTTP request
    assert (err.status, err.headers) == (503, {"Retry-After": str(end["retry_after"])}) and end["retry_after"] >= 1
    assert job_waiting and out["pcm"].size > 0 and counts["deadline"] == 1, (job_waiting, counts)


async def _alist(agen):
    return [x async for x in agen]


def test_one_text_message_is_bounded_by_the_sessions_limit_not_a_fixed_4096():
    """Review: the WebSocket text message's schema capped each message at 4096 characters, a second copy of the
    max_input_chars default: a service configured for 20,000 still refused any message over 4096."""
    from serve.schemas import WSText

    big = "word " * 2000
    assert WSText.model_validate({"type": "text", "text": big}).text == big
    roomy = SessionTable("r", SessionLimits(max_text_chars=20000))
    s = roomy.open(_ticket(), incremental=True, leased=False)
    roomy.take_text(s, big, False)
    assert s.text_chars == len(big)
    tight = SessionTable("r", SessionLimits(max_text_chars=4096))
    with pytest.raises(RequestError) as e:
        tight.take_text(tight.open(_ticket(), incremental=True, leased=False), big, False)
    assert e.value.field == "text"
