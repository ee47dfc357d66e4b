"""The replica's scheduler: one Engine, one step-loop thread, one asyncio queue per session (no Ray here).

    sched = Scheduler(engine, SchedulerLimits(max_queue=16, interactive_reserve=2))
    sched.start(asyncio.get_running_loop())
    ticket = await sched.submit(request)          # ValueError (bad input) | Busy (full: answer 503 + Retry-After)
    async for chunk in sched.chunks(ticket): ...  # AudioChunk, the last one has is_last=True
    sched.cancel(ticket)                          # client went away: frees the slot at the next step

Admission, streaming first: interactive requests go straight to the engine (its queue serves interactive before
bulk) unless every slot is taken and `max_queue` sessions
already wait, in which case `Busy` is raised instead of piling up. Bulk requests wait
here and enter the engine only while fewer than `max_sessions - interactive_reserve` sessions are active or queued, so
an interactive arrival always finds a free slot; they never get `Busy`.
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

log = logging.getLogger(__name__)

_keys = itertools.count(1)


class Busy(RuntimeError):
    """The replica is full; the caller should retry after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SchedulerLimits:
    max_queue: int = 16              # interactive sessions waiting for a slot before Busy
    interactive_reserve: int = 2     # slots bulk never takes
    max_bulk_waiting: int = 1024     # bulk requests parked here before Busy
    retry_after_s: int = 1


@dataclass(eq=False)
class Ticket:
    """One request's handle: its engine session (once admitted), its chunk queue and timing."""

    request: SynthesisRequest
    queue: asyncio.Queue
    key: int = field(default_factory=lambda: next(_keys))
    session: Any = None               # qwen_tts_core Session once in the engine
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_audio: float | None = None
    samples: int = 0
    finished: bool = False
    cancelled: bool = False

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
    ttfa_s: deque = field(default_factory=lambda: deque(maxlen=1024))
    rtf: deque = field(default_factory=lambda: deque(maxlen=1024))


class Scheduler:
    def __init__(self, engine, limits: SchedulerLimits = SchedulerLimits(), on_finish=None,
                 validate=None) -> None:
        """`on_finish(ticket, chunk)` is called on the event loop when a session ends (metrics hook);
        `validate(request)` checks parked bulk requests up front (ValueError), as `engine.add` does for others."""
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

    # --- lifecycle --------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qtts-step-loop", daemon=True)
        self._thread.start()

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
        self._wake.set()
        return ticket

    def append_text(self, ticket: Ticket, piece: str) -> None:
        ticket.session.append_text(piece)
        self._wake.set()

    def end_text(self, ticket: Ticket) -> None:
        ticket.session.end_text()
        self._wake.set()

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
                    self._deliver(ticket, AudioChunk(-1, np.zeros(0, np.float32), 0, 0, True, "cancelled"))
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
                    ticket.session = e.add(ticket.request)
                except (ValueError, EngineBusy) as err:
                    log.warning("bulk request failed to enter the engine: %s", err)
                    self._deliver(ticket, AudioChunk(-1, np.zeros(0, np.float32), 0, 0, True, "error"))
                    continue
                self._by_session[ticket.session.id] = ticket

    def _run(self) -> None:
        while not self._stop.is_set():
            self._admit_bulk()
            if not self.engine.has_work():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                chunks = self.engine.step()
            except Exception:  # noqa: BLE001 - keep serving: fail what was running, not the replica
                log.exception("engine step failed; failing its sessions")
                chunks = []
                for t in list(self._by_session.values()):
                    self.engine.cancel(t.session)
                    chunks.append(AudioChunk(t.session.id, np.zeros(0, np.float32), 0, 0, True, "error"))
            self.stats.steps += 1
            for ch in chunks:
                with self._lock:
                    ticket = self._by_session.get(ch.session_id)
                    if ticket is not None and ch.is_last:
                        del self._by_session[ch.session_id]
                if ticket is not None:
                    self._deliver(ticket, ch)

    def _deliver(self, ticket: Ticket, chunk: AudioChunk) -> None:
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
        if reason == "cancelled":
            self.stats.cancelled += 1
        elif reason == "error":
            self.stats.errors += 1
        else:
            self.stats.completed += 1
            if ticket.ttfa_s is not None and ticket.request.priority == "interactive":
                self.stats.ttfa_s.append(ticket.ttfa_s)
            if ticket.samples:
                self.stats.rtf.append((time.perf_counter() - ticket.t_submit) / (ticket.samples / 24000))
        if self.on_finish is not None:
            try:
                self.on_finish(ticket, chunk)
            except Exception:  # noqa: BLE001 - metrics must not break serving
                log.exception("on_finish hook failed")
