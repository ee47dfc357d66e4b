"""A fake engine with the Engine interface (unit tests of the scheduler only; end-to-end tests use the real one)."""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from qwen_tts_core import AudioChunk, EngineBusy

_ids = itertools.count(1)


@dataclass(eq=False)
class FakeSession:
    request: object
    id: int
    frames: int = 0
    cancelled: bool = False


class FakeEngine:
    """Each step emits one 1920-sample chunk per active session; a session ends after `frames` chunks."""

    def __init__(self, max_sessions: int = 4, max_queue: int = 64, frames: int = 5, fail_at_step: int = -1,
                 step_s: float = 0.001):
        self.max_sessions, self.max_queue, self.frames, self.step_s = max_sessions, max_queue, frames, step_s
        self.queues = {"interactive": deque(), "bulk": deque()}
        self.active: list[FakeSession] = []
        self.lock = threading.Lock()
        self.steps, self.fail_at_step = 0, fail_at_step
        self.max_bulk_seen = 0
        self.admitted: list[tuple[int, str]] = []

    def add(self, req) -> FakeSession:
        if not req.text:
            raise ValueError("text must not be empty")
        with self.lock:
            if self.num_queued >= self.max_queue:
                raise EngineBusy("full")
            s = FakeSession(req, next(_ids))
            self.queues[req.priority].append(s)
        return s

    def cancel(self, s: FakeSession) -> None:
        s.cancelled = True

    @property
    def num_queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    @property
    def num_active(self) -> int:
        return len(self.active)

    def has_work(self) -> bool:
        return bool(self.active) or self.num_queued > 0

    def step(self, emit=None) -> list[AudioChunk]:
        self.steps += 1
        time.sleep(self.step_s)
        if self.steps == self.fail_at_step:
            raise RuntimeError("boom")
        out = []
        with self.lock:
            for q in (self.queues["interactive"], self.queues["bulk"]):
                while q and len(self.active) < self.max_sessions:
                    s = q.popleft()
                    self.active.append(s)
                    self.admitted.append((s.id, s.request.priority))
            for q in self.queues.values():
                for s in [s for s in q if s.cancelled]:
                    q.remove(s)
                    out.append(AudioChunk(s.id, np.zeros(0, np.float32), 0, 0, True, "cancelled"))
        self.max_bulk_seen = max(self.max_bulk_seen, sum(s.request.priority == "bulk" for s in self.active))
        for s in list(self.active):
            if s.cancelled:
                self.active.remove(s)
                out.append(AudioChunk(s.id, np.zeros(0, np.float32), s.frames, 0, True, "cancelled"))
                continue
            out.append(AudioChunk(s.id, np.full(1920, 0.1, np.float32), s.frames, 1))
            s.frames += 1
            if s.frames >= self.frames:
                self.active.remove(s)
                out.append(AudioChunk(s.id, np.zeros(0, np.float32), s.frames, 0, True, "eos"))
        return out
