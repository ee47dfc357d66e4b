"""The replica's scheduler: one Engine, one step-loop thread, one asyncio queue per session (no Ray here).

    sched = Scheduler(engine, SchedulerLimits(max_queue=16, interactive_reserve=2))
    sched.start(asyncio.get_running_loop())
    ticket = await sched.submit(request)          # RequestError (bad input) | Busy (full: answer 503 + Retry-After)
    async for chunk in sched.chunks(ticket): ...  # AudioChunk, the last one has is_last=True
    sched.fail(ticket, 408, "no text for 30 s", "text")   # end it as a failure the consumer reports
    sched.cancel(ticket)                          # client went away: frees the slot at the next step

Admission, streaming first: interactive requests go straight to the engine (its queue serves interactive before
bulk) unless every slot is taken and `max_queue` sessions already wait, in which case `Busy` is raised instead of
piling up. Bulk requests wait here and enter the engine only while fewer than `max_sessions - interactive_reserve`
sessions are active or queued, so an interactive arrival always finds a free slot. An incremental bulk session
may get text (`append_text` / `end_text`) while parked: it is checked then, kept on the ticket, and handed to the
engine session when it enters.

The loop thread blocks while nothing can run (no work, or every session waits for text): it sleeps on an event that
submit / text / end / cancel set, so a session waiting for text costs no CPU. It uses `Engine.runnable()` when the
engine has it; otherwise a step that emitted nothing and moved no session counts as "nothing runnable". Every ticket
ends with exactly one last chunk: one the engine emits, or, if the engine finished a session without emitting it
(e.g. a session that ends at prefill), one made here from the session's finish reason.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from qwen_tts_core import AudioChunk, EngineBusy, SynthesisRequest
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import check_text
from qwen_tts_core.types import SAMPLE_RATE

log = logging.getLogger(__name__)

_keys = itertools.count(1)


class Busy(RuntimeError):
    """The replica is full; the caller should retry after `retry_after_s`. Picklable (crosses Ray)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s

    def __reduce__(self):
        return (type(self), (self.message, self.retry_after_s))


class SynthesisFailed(RuntimeError):
    """A request that was accepted and then failed (engine error, deadline, cancellation). Picklable."""

    def __init__(self, message: str, finish_reason: str = "error", status: int = 500) -> None:
        super().__init__(message)
        self.message, self.finish_reason, self.status = message, finish_reason, status

    def __reduce__(self):
        return (type(self), (self.message, self.finish_reason, self.status))


@dataclass(frozen=True)
class SchedulerLimits:
    max_queue: int = 16              # interactive sessions waiting for a slot before Busy
    interactive_reserve: int = 2     # slots bulk never takes
    max_bulk_waiting: int = 1024     # bulk requests parked here before Busy
    retry_after_s: int = 1


@dataclass(frozen=True)
class Failure:
    """Why a session was ended by the service rather than by the engine (limits, timeouts, a lost consumer)."""

    status: int
    message: str
    field: str | None = None   # the core argument it is about (`text`); the replica's end item also gives the API's
    retry_after_s: int | None = None   # a 503 (busy): when to try again (SchedulerLimits.retry_after_s)


@dataclass(eq=False)
class Ticket:
    """One request's handle: its engine session (once admitted), its chunk queue and timing."""

    request: SynthesisRequest
    queue: asyncio.Queue
    key: int = field(default_factory=lambda: next(_keys))
    session: Any = None               # qwen_tts_core Session once in the engine
    parked_text: list = field(default_factory=list)   # incremental text (None = end) fed while parked as bulk
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_audio: float | None = None
    samples: int = 0
    finished: bool = False            # its last chunk was delivered
    cancelled: bool = False
    failure: Failure | None = None    # set by Scheduler.fail

    @property
    def ttfa_s(self) -> float | None:
        return None if self.t_first_audio is None else self.t_first_audio - self.t_submit


@dataclass
class SchedulerStats:
    """Counters read by metrics (mutated on the loop thread and the event loop; reads are snapshots)."""

    requests: int = 0
    errors: int = 0
    rejected_busy: int = 0
    cancelled: int = 0
    completed: int = 0
    steps: int = 0
    idle_waits: int = 0
    ttfa_s: deque = field(default_factory=lambda: deque(maxlen=1024))
    rtf: deque = field(default_factory=lambda: deque(maxlen=1024))


def _last(session_id: int, reason: str) -> AudioChunk:
    return AudioChunk(session_id, np.zeros(0, np.float32), 0, 0, True, reason)


class Scheduler:
    IDLE_WAIT_S = 1.0   # upper bound of one blocked wait (a safety net; every state change wakes the loop at once)

    def __init__(self, engine, limits: SchedulerLimits = SchedulerLimits(), on_finish=None,
                 validate=None) -> None:
        """`on_finish(ticket, chunk)` is called on the event loop when a session ends (metrics hook);
        `validate(request)` checks parked bulk requests up front (RequestError), as `engine.add` does for others."""
        self.engine, self.limits, self.on_finish, self.validate = engine, limits, on_finish, validate
        self.stats = SchedulerStats()
        self._by_session: dict[int, Ticket] = {}
        self._open: dict[int, Ticket] = {}
        self._bulk_waiting: deque[Ticket] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._step_since: float | None = None   # when the engine step in flight began (monotonic), None between steps

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qtts-step-loop", daemon=True)
        self._thread.start()

    def health(self, stuck_after_s: float) -> str | None:
        """Why the step loop cannot serve, or None: it has ended (it only ends on stop or a BaseException), or one
        engine step has run longer than `stuck_after_s` (a hung device call)."""
        if self._thread is None or self._stop.is_set():
            return None  # not started, or stopped on purpose
        if not self._thread.is_alive():
            return "the step loop has ended"
        since = self._step_since
        running = 0.0 if since is None else time.monotonic() - since
        if running > stuck_after_s:
            return f"one engine step has run for {running:.0f} s (limit {stuck_after_s:.0f} s)"
        return None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- caller side (event loop) -----------------------------------------------------------------------------
    @property
    def active_sessions(self) -> int:
        """Requests submitted and not yet finished (streaming, queued or waiting as bulk)."""
        return len(self._open)

    @property
    def queue_length(self) -> int:
        return self.engine.num_queued + len(self._bulk_waiting)

    def open_tickets(self) -> list[Ticket]:
        return list(self._open.values())

    async def submit(self, request: SynthesisRequest) -> Ticket:
        self.stats.requests += 1
        ticket = Ticket(request=request, queue=asyncio.Queue())
        if request.priority == "bulk":
            if len(self._bulk_waiting) >= self.limits.max_bulk_waiting:
                self.stats.rejected_busy += 1
                raise Busy(f"replica busy: {len(self._bulk_waiting)} bulk requests waiting",
                           self.limits.retry_after_s)
            try:
                if self.validate is not None:
                    self.validate(request)    # fail now, not when it reaches the engine
            except ValueError:
                self.stats.errors += 1
                raise
            with self._lock:
                self._open[ticket.key] = ticket
                self._bulk_waiting.append(ticket)
            self._wake.set()
            return ticket
        e = self.engine
        if e.num_active + e.num_queued >= e.max_sessions + self.limits.max_queue:  # slots and waiting room full
            self.stats.rejected_busy += 1
            raise Busy(f"replica busy: {self.engine.num_active} sessions active, {self.engine.num_queued} "
                       f"queued (max_queue={self.limits.max_queue})", self.limits.retry_after_s)
        try:
            with self._lock:
                ticket.session = self.engine.add(request)
                self._by_session[ticket.session.id] = ticket
                self._open[ticket.key] = ticket
        except EngineBusy as e:
            self.stats.rejected_busy += 1
            raise Busy(str(e), self.limits.retry_after_s) from None
        except ValueError:
            self.stats.errors += 1
            raise
        except Exception:  # noqa: BLE001 - this request fails, alone, as a bulk one would (not the replica)
            with self._lock:
                self._open[ticket.key] = ticket
            self._entry_failed(ticket)
        self._wake.set()
        return ticket

    def append_text(self, ticket: Ticket, piece: str) -> None:
        """More text for an incremental session; RequestError('text') when refused. A bulk session still parked
        here keeps it (checked now) and gets it on entering the engine."""
        with self._lock:
            if ticket.session is None:
                self._park_text(ticket, piece)
                return
        ticket.session.append_text(piece)
        self._wake.set()

    def end_text(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.session is None:
                self._park_text(ticket, None)
                return
        ticket.session.end_text()
        self._wake.set()

    @staticmethod
    def _park_text(ticket: Ticket, piece: str | None) -> None:
        """Keep a parked session's text (None: end) with the checks the engine session makes (caller holds the
        lock); its size is bounded by the caller's text limits (sessions.SessionTable.take_text)."""
        if ticket.finished or ticket.cancelled:
            raise RequestError("text", "the session has ended")
        if None in ticket.parked_text:
            raise RequestError("text", "text after end")
        if piece is not None:
            check_text(piece, allow_blank=True)
        ticket.parked_text.append(piece)

    def fail(self, ticket: Ticket, status: int, message: str, field: str | None = None) -> None:
        """End a session as a failure (the consumer reports `status`/`message`/`field`); no-op once finished."""
        if ticket.finished or ticket.failure is not None:
            return
        ticket.failure = Failure(status, message, field, self.limits.retry_after_s if status == 503 else None)
        self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> None:
        """Free the request's slot now (no-op when finished); its queue gets a last 'cancelled' chunk."""
        if ticket.finished or ticket.cancelled:
            return
        ticket.cancelled = True
        with self._lock:
            if ticket.session is None:  # still parked as bulk
                try:
                    self._bulk_waiting.remove(ticket)
                except ValueError:
                    pass
                else:
                    ticket.parked_text.clear()
                    self._deliver(ticket, _last(-1, "cancelled"))
                    return
        if ticket.session is not None:
            self.engine.cancel(ticket.session)
        self._wake.set()

    async def chunks(self, ticket: Ticket) -> AsyncIterator[AudioChunk]:
        """The request's chunks until the last one; cancelling the consumer cancels the session."""
        try:
            while True:
                chunk = await ticket.queue.get()
                yield chunk
                if chunk.is_last:
                    return
        finally:
            if not ticket.finished:
                self.cancel(ticket)

    # --- loop thread ------------------------------------------------------------------------------------------
    def _admit_bulk(self) -> None:
        e = self.engine
        room = e.max_sessions - self.limits.interactive_reserve
        with self._lock:
            while self._bulk_waiting and e.num_active + e.num_queued < room:
                ticket = self._bulk_waiting.popleft()
                try:
                    session = e.add(ticket.request)
                except Exception as err:  # noqa: BLE001 - this request fails, alone (not the running ones)
                    if isinstance(err, ValueError | EngineBusy):
                        log.warning("bulk request failed to enter the engine: %s", err)
                        if isinstance(err, ValueError):
                            ticket.failure = Failure(400, str(err), getattr(err, "field", None))
                        else:
                            ticket.failure = Failure(503, str(err), None, self.limits.retry_after_s)
                        self._deliver(ticket, _last(-1, "error"))
                    else:
                        self._entry_failed(ticket)
                    continue
                ticket.session = session
                self._by_session[session.id] = ticket
                self._replay_text(ticket)

    def _entry_failed(self, ticket: Ticket) -> None:
        """engine.add raised something unexpected (e.g. device memory while a stored voice moved to the GPU): the
        request ends as a counted 500 its consumer reports, the same for interactive and bulk; the replica is fine,
        so it is not the 502 "replica failed" an exception escaping the stream would give. Call inside the except
        (the traceback is logged); the lock may be held."""
        log.exception("%s request failed to enter the engine", ticket.request.priority)
        ticket.failure = Failure(500, "synthesis failed in the engine", None)
        self._deliver(ticket, _last(-1, "error"))

    def _replay_text(self, ticket: Ticket) -> None:
        """Hand a bulk session the text it was fed while parked (lock held; it was checked when it came)."""
        pieces, ticket.parked_text = ticket.parked_text, []
        try:
            for piece in pieces:
                if piece is None:
                    ticket.session.end_text()
                else:
                    ticket.session.append_text(piece)
        except ValueError as err:
            log.warning("parked text refused on entering the engine: %s", err)
            ticket.failure = Failure(400, str(err), "text")
            self.engine.cancel(ticket.session)

    def _runnable(self) -> bool:
        runnable = getattr(self.engine, "runnable", None)
        return bool(runnable()) if runnable is not None else self.engine.has_work()

    def _mark(self) -> tuple:
        """What a step can change, for engines without `runnable()`: counts and each session's position."""
        with self._lock:
            sessions = [t.session for t in self._by_session.values()]
        return (self.engine.num_active, self.engine.num_queued,
                *((getattr(s, "phase", None), getattr(s, "pos", None), getattr(s, "num_frames", None),
                   getattr(s, "text_step", None)) for s in sessions))

    def _run(self) -> None:
        idle = False
        while not self._stop.is_set():
            if idle:
                self.stats.idle_waits += 1
                self._wake.wait(self.IDLE_WAIT_S)
            self._wake.clear()
            try:
                idle = self._iterate()
            except Exception:  # noqa: BLE001 - keep serving: fail what was running, not the replica
                log.exception("engine step failed; failing its sessions")
                with self._lock:
                    tickets = list(self._by_session.values())
                    self._by_session.clear()
                for t in tickets:
                    self.engine.cancel(t.session)
                    self._deliver(t, _last(t.session.id, "error"))
                idle = False

    def _iterate(self) -> bool:
        """Admit, step, hand out chunks; True when nothing could run (the loop then blocks)."""
        self._admit_bulk()
        if not self._runnable():
            return True
        before = self._mark()
        self._step_since = time.monotonic()
        try:
            chunks = self.engine.step(emit=self._dispatch)  # chunks ready mid-step leave at once
        finally:
            self._step_since = None
        self.stats.steps += 1
        self._dispatch(chunks)
        self._reap_silent_finishes()
        self._admit_bulk()  # slots this step freed take parked bulk work now, not after an idle wait
        if hasattr(self.engine, "runnable"):
            return not self._runnable()
        return not chunks and self._mark() == before

    def _dispatch(self, chunks: list[AudioChunk]) -> None:
        for ch in chunks:
            with self._lock:
                ticket = self._by_session.get(ch.session_id)
                if ticket is not None and ch.is_last:
                    del self._by_session[ch.session_id]
            if ticket is not None:
                self._deliver(ticket, ch)

    def _reap_silent_finishes(self) -> None:
        """Sessions the engine finished without emitting their last chunk still end (never a hanging stream)."""
        with self._lock:
            done = [t for t in self._by_session.values() if getattr(t.session, "done", False)]
            for t in done:
                del self._by_session[t.session.id]
        for t in done:
            reason = getattr(t.session, "finish_reason", None) or "error"
            log.warning("session %s finished (%s) without a last chunk; ending it here", t.session.id, reason)
            self._deliver(t, _last(t.session.id, reason))

    def _deliver(self, ticket: Ticket, chunk: AudioChunk) -> None:
        if ticket.finished:
            return
        if chunk.pcm.size and ticket.t_first_audio is None:
            ticket.t_first_audio = time.perf_counter()
        ticket.samples += int(chunk.pcm.size)
        if chunk.is_last:
            ticket.finished = True
            self._loop.call_soon_threadsafe(self._finished, ticket, chunk)
        self._loop.call_soon_threadsafe(ticket.queue.put_nowait, chunk)

    def _finished(self, ticket: Ticket, chunk: AudioChunk) -> None:
        self._open.pop(ticket.key, None)
        reason = chunk.finish_reason
        if ticket.failure is not None or reason == "error":
            self.stats.errors += 1
        elif reason == "cancelled":
            self.stats.cancelled += 1
        else:
            self.stats.completed += 1
            if ticket.ttfa_s is not None and ticket.request.priority == "interactive":
                self.stats.ttfa_s.append(ticket.ttfa_s)
            if ticket.samples:
                self.stats.rtf.append((time.perf_counter() - ticket.t_submit) / (ticket.samples / SAMPLE_RATE))
        if self.on_finish is not None:
            try:
                self.on_finish(ticket, chunk)
            except Exception:  # noqa: BLE001 - metrics must not break serving
                log.exception("on_finish hook failed")
