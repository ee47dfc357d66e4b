"""A fake synthesis backend with the `jobs.synth.Backend` interface (unit tests only; e2e tests use the engine)."""

from __future__ import annotations

import numpy as np

from jobs.synth import ChunkJob, ChunkResult

VOICES = ("vivian", "ryan")


class FakeBackend:
    """A tone per chunk, 0.06 s per character. Voice 'nobody' is unknown; 'RUNAWAY' trips the guard on the
    first attempt only (seed changes on retry), 'FOREVER' on every attempt."""

    calls: list[list[ChunkJob]] = []

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        FakeBackend.calls.append(list(jobs))
        out = []
        for j in jobs:
            if j.voice not in VOICES:
                out.append(ChunkResult(None, "error", f"ValueError: voice: unknown speaker {j.voice!r}"))
                continue
            n = int(24000 * 0.06 * len(j.text))
            t = np.arange(n) / 24000
            freq = 200 + (hash((j.voice, j.seed)) % 200)
            pcm = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
            reason = "eos"
            if "FOREVER" in j.text or ("RUNAWAY" in j.text and j.seed < 1_000_000):
                reason = "guard"
            out.append(ChunkResult(pcm, reason))
        return out


class SlowFake(FakeBackend):
    """FakeBackend that takes QTTS_FAKE_DELAY_S seconds (default 0.3) per call: long enough to act mid-job."""

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        import os
        import time

        time.sleep(float(os.environ.get("QTTS_FAKE_DELAY_S", "0.3")))
        return super().synthesize(jobs)


class BrokenBackend:
    """A backend whose set-up fails with an exception that has no text (a bare `assert`, `MemoryError()`)."""

    def __init__(self) -> None:
        raise AssertionError()


class SigtermFake(FakeBackend):
    """FakeBackend that sends this process SIGTERM during its first call (as Kubernetes does to stop a pod)."""

    def __init__(self) -> None:
        self.calls_made = 0

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        import os
        import signal

        self.calls_made += 1
        if self.calls_made == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().synthesize(jobs)
