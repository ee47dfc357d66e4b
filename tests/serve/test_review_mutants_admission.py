"""Mutation review of admission and streaming (serve/scheduler.py, streaming.py, ws_session.py, sessions.py): each
test here fails on a hand-made mutant that the rest of the non-Ray suite let through (named in its docstring) and
passes on the code as it is. What a client observes: the failure a ticket ends with, how a body or an SSE stream
ends, the WebSocket's last message and close code, which slots and leases are given back."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from fastapi import WebSocketDisconnect

from qwen_tts_core import AudioChunk, SynthesisRequest
from qwen_tts_core.errors import RequestError
from serve.metrics import ClientStreams
from serve.scheduler import Busy, Scheduler, SchedulerLimits
from serve.schemas import ApiError
from serve.sessions import SessionLimits
from serve.streaming import ReplicaStream, StreamAborted, audio_body, sse_body
from serve.ws_session import MessageLimiter, WSSession
from tests.serve.fakes import FakeEngine
from tests.serve.helpers import FakeReplicaGen
from tests.serve.test_failures import _audio, _drain, _end, _Pcm
from tests.serve.test_review_mutants import _Gen, _Handle
from tests.serve.test_ws_session_ends import EndedHandle, FakeSocket, FakeStream, Passthrough


def _req(priority: str = "interactive", text: str = "hi") -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", priority=priority)


async def _collect(sched: Scheduler, ticket) -> list:
    return [c async for c in sched.chunks(ticket)]


# --- scheduler ------------------------------------------------------------------------------------------------------
def test_an_interactive_request_the_engine_finds_full_is_busy_with_retry_after():
    """The engine's own queue is full (EngineBusy): the client gets Busy (503 + Retry-After) and no slot is held
    (mutant: EngineBusy turned into an exception the replica reports as its own failure)."""
    async def main():
        sched = Scheduler(FakeEngine(max_queue=0), SchedulerLimits(retry_after_s=5))
        with pytest.raises(Busy) as e:
            await sched.submit(_req())
        return e.value, sched
    busy, sched = asyncio.run(main())
    assert busy.retry_after_s == 5 and sched.stats.rejected_busy == 1 and sched.active_sessions == 0


def test_a_session_the_engine_ended_silently_and_without_a_reason_is_an_error_and_counted():
    """A session the engine finished with no last chunk and no finish reason ends as an error, counted in
    `errors` (mutant: read as `eos`, a success); a session failed by the service counts as an error, not as
    cancelled (mutant: a 408 counted as the client's cancel)."""
    class NoReason(FakeEngine):
        """Finishes every session at admission, with no last chunk and no finish reason."""

        def step(self, emit=None):
            out = []
            with self.lock:
                for q in self.queues.values():
                    while q:
                        s = q.popleft()
                        if s.cancelled:   # the service's failure: the engine ends it as cancelled
                            out.append(AudioChunk(s.id, np.zeros(0, np.float32), 0, 0, True, "cancelled"))
                        else:
                            s.done, s.finish_reason = True, None
            return out

    async def main():
        eng = NoReason()
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            t = await sched.submit(_req())
            silent = (await asyncio.wait_for(_collect(sched, t), 5))[-1]
            failed = await sched.submit(_req())
            sched.fail(failed, 408, "no text", "text")
            await asyncio.wait_for(_collect(sched, failed), 5)
        finally:
            sched.stop()
        return silent, sched.stats
    silent, stats = asyncio.run(main())
    assert silent.finish_reason == "error"
    assert (stats.errors, stats.cancelled, stats.completed) == (2, 0, 0)


def test_parked_bulk_requests_enter_in_the_order_they_came():
    """Bulk work waits first come, first served (mutant: the newest parked request entered first, so a steady
    stream of bulk requests could starve the oldest for ever)."""
    async def main():
        eng = FakeEngine(max_sessions=2, frames=1)
        sched = Scheduler(eng, SchedulerLimits(interactive_reserve=1))
        tickets = [await sched.submit(_req("bulk", f"text {i}")) for i in range(3)]
        sched.start(asyncio.get_running_loop())
        try:
            for t in tickets:
                await asyncio.wait_for(_collect(sched, t), 5)
        finally:
            sched.stop()
        return [s.request.text for s in sorted((t.session for t in tickets), key=lambda s: s.id)]
    assert asyncio.run(main()) == ["text 0", "text 1", "text 2"]


def test_a_slot_a_step_frees_goes_to_parked_bulk_work_at_once():
    """A bulk request waiting for the only bulk slot enters as soon as the step that ended the one before it
    returns, not after the loop's idle wait (mutant: no admission after the step; with the idle wait made long
    here, the second request never started)."""
    class Runnable(FakeEngine):   # as the real engine: the loop asks it whether anything can run
        def runnable(self) -> bool:
            return self.has_work()

    async def main():
        eng = Runnable(max_sessions=2, frames=1)
        sched = Scheduler(eng, SchedulerLimits(interactive_reserve=1))
        sched.IDLE_WAIT_S = 3600.0
        first, second = await sched.submit(_req("bulk")), await sched.submit(_req("bulk"))
        sched.start(asyncio.get_running_loop())
        try:
            await asyncio.wait_for(_collect(sched, first), 5)
            return await asyncio.wait_for(_collect(sched, second), 2)
        finally:
            sched.stop()
    assert asyncio.run(main())[-1].finish_reason == "eos"


def test_a_session_ended_by_its_last_chunk_is_let_go_and_not_ended_again(caplog):
    """The ticket of a session whose last chunk went out is dropped at once (mutant S34: kept; with sessions that
    report `done` as the real engine's do, the reaper then took every normal finish for a silent one and logged a
    false 'without a last chunk' warning per request, and finished tickets piled up in the step loop)."""
    class Done(FakeEngine):   # as the real engine: a session is `done` once its last chunk is out
        def add(self, req):
            s = super().add(req)
            s.done = False
            self.made[s.id] = s
            return s

        def step(self, emit=None):
            out = super().step(emit)
            for c in out:
                if c.is_last:
                    self.made[c.session_id].done = True
            return out

    async def main():
        eng = Done(frames=2)
        eng.made = {}
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            ends = []
            for _ in range(3):
                t = await sched.submit(_req())
                ends.append((await asyncio.wait_for(_collect(sched, t), 5))[-1].finish_reason)
            await asyncio.sleep(0.05)   # a few more loop turns after the last finish
        finally:
            sched.stop()
        return ends
    with caplog.at_level(logging.WARNING, logger="serve.scheduler"):
        assert asyncio.run(main()) == ["eos"] * 3
    assert not [r.getMessage() for r in caplog.records if r.name == "serve.scheduler"]


def test_parked_text_is_checked_when_it_comes_and_refused_once_the_session_ended():
    """A parked bulk session's text gets the engine's checks at once (mutant: a lone surrogate was kept and only
    failed, or not, when the session entered), and text for a parked session that was cancelled is refused
    (mutant: kept for a session that will never run)."""
    async def main():
        sched = Scheduler(FakeEngine(max_sessions=2), SchedulerLimits(interactive_reserve=2))   # no bulk slot
        sched.start(asyncio.get_running_loop())
        try:
            ticket = await sched.submit(_req("bulk"))
            with pytest.raises(RequestError) as bad:
                sched.append_text(ticket, "half \ud83d of it")
            cancelled = await sched.submit(_req("bulk"))
            sched.cancel(cancelled)
            with pytest.raises(RequestError) as late:
                sched.append_text(cancelled, "more")
        finally:
            sched.stop()
        return ticket, bad.value, late.value
    ticket, bad, late = asyncio.run(main())
    assert bad.field == "text" and ticket.parked_text == []
    assert late.field == "text" and "ended" in late.message


# --- streaming (HTTP raw audio and SSE) -----------------------------------------------------------------------------
async def _raw(items, counted=None):
    s = ReplicaStream(FakeReplicaGen(items), "r-1", "cv", None, None)
    return await _drain(audio_body(s, await s.first_output(), _Pcm(), counted)), s


async def _sse(items):
    s = ReplicaStream(FakeReplicaGen(items), "r-1", "cv", None, None)
    return [json.loads(e[6:]) for e in await _drain(sse_body(s, await s.first_output(), _Pcm()))]


def test_a_stream_that_stops_without_its_end_item_is_a_failure():
    """The replica's generator stopped with no end item (it was cut): raw audio aborts, SSE gets a 502 `error`
    event (mutant: read as a clean end)."""
    with pytest.raises(StreamAborted):
        asyncio.run(_raw([_audio(), _audio()]))
    events = asyncio.run(_sse([_audio()]))
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "502"


def test_a_failure_midway_is_counted_with_its_own_status():
    """(mutant: every mid-stream failure counted as stream_500, a client's 408 read as the service's fault)"""
    counted: list[str] = []
    with pytest.raises(StreamAborted):
        asyncio.run(_raw([_audio(), _end(408)], counted.append))
    assert counted == ["stream_408"]


def test_a_stream_closed_twice_counts_its_close_once():
    """A stream is closed by its body's end and again by its response's finalizer (`close_with`) or the WebSocket
    session: the open-stream count goes down once (mutant: each close counted, the gauge drifted below the streams
    really open)."""
    total = ClientStreams()

    async def main():
        s = ReplicaStream(FakeReplicaGen([_audio(), _end()]), "r-1", "cv", None, total)
        await _drain(audio_body(s, await s.first_output(), _Pcm()))
        s.close()
    asyncio.run(main())
    assert total.count == 0


def test_an_open_that_fails_cancels_the_replica_call():
    """The first item never came (the replica could not be reached): 502, and the call is cancelled (mutant: left
    running; an unreachable-for-a-while replica could still run it to full length, leased to this live ingress)."""
    gen = _Gen([], RuntimeError("unreachable"))
    with pytest.raises(ApiError) as e:
        asyncio.run(ReplicaStream.open("cv", _Handle(gen), {}, None))
    assert e.value.status == 502 and gen.cancelled


def test_a_full_replicas_refusal_names_it_so_the_ingress_asks_another():
    """A replica that answers 503 (full) names itself: the ingress then asks the other replicas before the client
    gets the 503 (Ingress._stream); the 503 carries Retry-After (mutant: the name dropped, so one full replica
    turned every request Serve's router sent it into a 503 while others had room)."""
    refusal = {"type": "error", "status": 503, "message": "replica busy", "param": None, "retry_after": 2,
               "replica": "rep-7"}
    with pytest.raises(ApiError) as e:
        asyncio.run(ReplicaStream.open("cv", _Handle(_Gen([refusal], RuntimeError("unused"))), {}, None))
    assert e.value.status == 503 and e.value.full_replica == "rep-7" and e.value.headers["Retry-After"] == "2"


# --- WebSocket session ----------------------------------------------------------------------------------------------
class _AcceptingHandle(EndedHandle):
    """A replica that takes every `feed` (test_ws_session_ends' handle, with a feed that succeeds)."""

    def remote(self, sid, text, end):
        self.feeds += 1

        async def call():
            return None
        return call()


def _ws(stream, handle, incoming, limiter=None) -> FakeSocket:
    ws = FakeSocket(incoming)
    session = WSSession(ws, ws.receive, handle, stream, Passthrough(), limiter or MessageLimiter(100, 100, 100),
                        {"type": "ready"})
    asyncio.run(asyncio.wait_for(session.run(), 10))
    return ws


@pytest.mark.parametrize(("status", "code"), [(503, 1013), (500, 1011), (502, 1011), (408, 1008)])
def test_close_codes_say_whose_fault_and_busy_says_when_to_retry(status, code):
    """A failed end: 503 -> 1013 Try Again Later with `retry_after_s`, 5xx -> 1011, 4xx -> 1008 (mutants: 503 as
    1011, 500 as 1008, no `retry_after_s`)."""
    end = {**_end(status), "retry_after": 4 if status == 503 else None}
    ws = _ws(FakeStream(0.0, end), _AcceptingHandle(), [{"type": "text", "text": "hi"}])
    last = [m for m in ws.sent if isinstance(m, dict)][-1]
    assert last["type"] == "error" and last["error"]["code"] == str(status) and ws.close_code == code
    assert last.get("retry_after_s") == (4 if status == 503 else None)


def test_a_session_over_its_message_limit_ends_429_naming_message():
    """The session's message limiter is applied to every client message: over it, a 429 naming `message` and close
    1008 (mutant: the limiter never consulted, one client could flood its replica with feeds)."""
    stream = FakeStream(None, {})   # audio that never ends: only the limit can end the session
    ws = _ws(stream, _AcceptingHandle(), [{"type": "text", "text": "a"}] * 3, MessageLimiter(2, 100, 100))
    last = [m for m in ws.sent if isinstance(m, dict)][-1]
    assert (last["type"], last["error"]["code"], last["error"]["param"]) == ("error", "429", "message")
    assert ws.close_code == 1008 and stream.closed


def test_a_client_gone_while_audio_is_sent_ends_the_session_quietly():
    """The socket closed under the writer (the client left mid-audio): the session ends without raising and its
    stream is closed (mutant: the writer's DISCONNECT was treated as an error to send, and `run` raised)."""
    class GoneSocket(FakeSocket):
        async def send_bytes(self, data: bytes) -> None:
            raise WebSocketDisconnect(1001)

    stream = FakeStream(None, {})
    ws = GoneSocket([{"type": "text", "text": "hi"}])
    session = WSSession(ws, ws.receive, _AcceptingHandle(), stream, Passthrough(), MessageLimiter(100, 100, 100),
                        {"type": "ready"})
    asyncio.run(asyncio.wait_for(session.run(), 10))
    assert stream.closed and [m["type"] for m in ws.sent] == ["ready"]


# --- session table --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["idle_text_timeout_s", "deadline_s", "lease_s"])
def test_a_zero_session_limit_is_refused(field):
    """(mutant: 0 accepted: a lease of 0 s cancels every leased stream at the first check, an idle timeout of 0 s
    every incremental session)"""
    with pytest.raises(ValueError, match="positive"):
        SessionLimits(**{field: 0})


def test_no_writer_message_leaves_once_the_session_is_closing():
    """After `_stop_writer` has marked the session closing, the writer's `_send` sends nothing and does not record
    `done` as sent (mutant W14: the check removed; the writer's cancellation right after also stops it today, so
    this pins the rule where `_send` states it: an error is never followed by audio or `done`)."""
    async def main():
        ws = FakeSocket([])
        session = WSSession(ws, ws.receive, _AcceptingHandle(), FakeStream(None, {}), Passthrough(),
                            MessageLimiter(100, 100, 100), {"type": "ready"})
        idle = asyncio.create_task(asyncio.sleep(3600))   # stands for the writer task
        await session._stop_writer(idle)
        await session._send(ws.send_bytes, b"\x01\x00")
        await session._send(ws.send_json, {"type": "done"}, done=True)
        return ws.sent, session.done_sent, idle.cancelled()
    assert asyncio.run(main()) == ([], False, True)
