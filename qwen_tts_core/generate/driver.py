"""One engine shared by threads that each wait for their own sessions (the Python API's generate_* and stream_*).

No background thread: whichever caller needs progress steps the engine (one at a time) and hands every chunk to the
session it belongs to; the others wait on a condition. Calls made at the same time therefore share engine steps,
i.e. they are batched together, and an idle model holds no thread.
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from ..types import AudioChunk, SynthesisRequest
from .engine import Engine
from .session import Session

T = TypeVar("T")


class EngineDriver:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._step_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queues: dict[int, deque[AudioChunk]] = {}
        self._abandoned: dict[int, Session] = {}   # released, their last chunk still to come (see _prune)
        self._orphans: deque[Session] = deque()  # sessions whose reader was dropped before it began (see orphan)

    def open(self, req: SynthesisRequest) -> Session:
        """Add a request to the engine; its chunks are kept for `chunks()` (RequestError/EngineBusy as `add`)."""
        self._reap()
        self._prune()
        with self._cv:
            s = self.engine.add(req)
            self._queues[s.id] = deque()
        return s

    def chunks(self, s: Session, through: Callable[[Iterator[AudioChunk]], Iterator[T]] | None = None,
               on_end: Callable[[], None] | None = None) -> Reader:
        """The session's chunks up to its last (or what `through` makes of them); closing the iterator early (read
        or not) cancels the session. on_end: called once when the reading is over (read to its end, raised,
        closed, or dropped: then from the garbage collector, in any thread, so it must take no lock)."""
        return Reader(self._read(s) if through is None else through(self._read(s)), self, s, on_end)

    def _read(self, s: Session) -> Iterator[AudioChunk]:
        done = False
        try:
            while True:
                ch = self._next(s)
                if ch is None:   # released by another thread (Reader.close): the reading ends here
                    return
                if ch.is_last:
                    done = True
                yield ch
                if done:
                    return
        finally:
            if not done:
                self._release(s)

    def orphan(self, s: Session) -> None:
        """The reader of `s` was dropped without being started (a generator's `finally` never runs then): cancel it
        at the next call. Safe from a garbage-collector callback in any thread (no lock taken here)."""
        if s.id in self._queues:  # else read to its end (or released) already
            self._orphans.append(s)

    def idle(self) -> bool:
        """Whether the engine holds nothing anyone waits for: no session, or only cancelled ones (a closed or
        dropped stream's, which the next step would only end), dropped readers' sessions cancelled first."""
        self._reap()
        e = self.engine
        with e._lock:
            sessions = [*e.active, *(s for q in e.queues.values() for s in q)]
        return all(s.cancelled for s in sessions)

    def _prune(self) -> None:
        """Forget released sessions the engine ended without this driver seeing their last chunk (a step it did not
        deliver, e.g. a direct `model.engine.step()`): they were kept forever, one entry per stream."""
        with self._cv:
            for sid, s in list(self._abandoned.items()):
                if self._out_of_engine(s):
                    del self._abandoned[sid]
                    self._queues.pop(sid, None)

    def _reap(self) -> None:
        while True:
            try:  # other threads reap too: pop, never check-then-pop
                s = self._orphans.popleft()
            except IndexError:
                return
            self._release(s)

    def _release(self, s: Session) -> None:
        """Nobody will read `s` any more: drop its chunks and cancel it (no-op once read to its last chunk)."""
        with self._cv:
            q = self._queues.get(s.id)
            if q is None:
                return
            if q and q[-1].is_last or self._out_of_engine(s):
                # its last chunk is here, or out of the engine already (a step not delivered here, e.g. a direct
                # `model.engine.step()`, ended it): none will come to take it out of _abandoned
                del self._queues[s.id]
            else:
                q.clear()
                self._abandoned[s.id] = s
        self.engine.cancel(s)

    def _out_of_engine(self, s: Session) -> bool:
        """The engine will hand out nothing more of `s` (ended, no audio row left); False when it cannot tell (an
        engine stand-in without that state)."""
        return getattr(s, "done", False) and s.id not in getattr(self.engine, "_audio_rows", (s.id,))

    def run(self, reqs: list[SynthesisRequest]) -> list[Session]:
        """Run requests to the end (stepping when nobody else does); returns their sessions in order."""
        sessions: list[Session] = []
        try:
            for r in reqs:
                sessions.append(self.open(r))
            for s in sessions:
                for _ in self.chunks(s):
                    pass
        except BaseException:  # a later item refused, or the caller interrupted: nobody reads the others
            for s in sessions:
                self._release(s)
            raise
        return sessions

    def _next(self, s: Session) -> AudioChunk | None:
        """The session's next chunk; None once it was released (closed by another thread: nobody reads it)."""
        while True:
            self._reap()
            with self._cv:
                q = self._queues.get(s.id)
                if q is None or s.id in self._abandoned and not q:
                    return None
                if q:
                    ch = q.popleft()
                    if ch.is_last:
                        del self._queues[s.id]
                    return ch
            if self._step_lock.acquire(blocking=False):
                try:  # chunks are delivered before the lock is released: the next stepper sees them
                    with self._cv:
                        if self._queues.get(s.id):
                            continue  # delivered while we took the lock
                    if not self.engine.has_work():
                        raise RuntimeError(f"session {s.id} is not in the engine any more")
                    self.engine.wait_for_work(0.05)
                    self._deliver(self.engine.step(emit=self._deliver))
                finally:
                    self._step_lock.release()
            else:
                with self._cv:
                    if not self._queues.get(s.id):
                        self._cv.wait(timeout=0.05)

    def _deliver(self, chunks: list[AudioChunk]) -> None:
        with self._cv:
            for ch in chunks:
                if ch.session_id in self._abandoned:
                    if ch.is_last:
                        self._abandoned.pop(ch.session_id, None)
                        self._queues.pop(ch.session_id, None)
                    continue
                q = self._queues.get(ch.session_id)
                if q is not None:
                    q.append(ch)
            self._cv.notify_all()


class Reader(Generic[T]):
    """Iterates `gen`, the reading of session `s` (its chunks, or what is made of them): `close()` before the end,
    or dropping it, cancels the session whether reading began or not. A generator's own `close()` before its first
    `next()` runs nothing, so a stream closed unread kept its slot and generated on others' steps, its chunks piling
    up in the driver, until the generator was garbage-collected. Once the reading is over it lets go of the driver
    and the session (a finished stream kept by its caller does not keep the engine alive)."""

    def __init__(self, gen: Iterator[T], driver: EngineDriver, s: Session,
                 on_end: Callable[[], None] | None = None) -> None:
        self._gen, self._driver, self._s, self._on_end = gen, driver, s, on_end
        self._reading = threading.Lock()   # held while a thread is inside the generator
        # (lock-free: GC may run it in any thread)
        self._dropped = weakref.finalize(self, _dropped, driver, s, on_end)

    def __iter__(self) -> Reader[T]:
        return self

    def __next__(self) -> T:
        with self._reading:
            try:
                return next(self._gen)
            except BaseException:  # StopIteration or what the reading raised: the generator is over either way
                self._over()
                raise

    def close(self) -> None:
        """Cancel the session (nothing once read to its last chunk), from any thread: a thread reading meanwhile
        sees its reading end (the generator is closed by whichever thread holds it, never under another's feet)."""
        driver, s = self._driver, self._s
        if driver is not None:
            driver._release(s)
        if self._reading.acquire(blocking=False):
            try:
                self._gen.close()
                self._over()
            finally:
                self._reading.release()

    def _over(self) -> None:
        """The reading is over (read to its end, raised, or closed): let go of what kept the engine, once."""
        if self._dropped.detach() is not None and self._on_end is not None:
            self._on_end()
        self._gen, self._driver, self._s = _nothing(), None, None


def _nothing() -> Iterator:
    return
    yield


def _dropped(driver: EngineDriver, s: Session, on_end: Callable[[], None] | None) -> None:
    driver.orphan(s)
    if on_end is not None:
        on_end()


__all__ = ["EngineDriver", "Reader"]
