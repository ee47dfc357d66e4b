"""Fake backends that kill their worker process (importable by Ray workers: tests/jobs/test_ray_worker_loss.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from jobs.synth import ChunkJob, ChunkResult
from tests.jobs.fakes import FakeBackend


class CrashFake(FakeBackend):
    """The worker process dies (as under the OOM killer) on any call holding a chunk with CRASH in it."""

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        if any("CRASH" in j.text for j in jobs):
            os._exit(137)
        return super().synthesize(jobs)


LOAD_LOG = Path(tempfile.gettempdir()) / "qtts-test-load-crash.log"   # one line per load attempt


class LoadCrashFake(FakeBackend):
    """The worker process dies while the backend loads (a model that does not fit its memory)."""

    def __init__(self, *args, **kwargs) -> None:
        with LOAD_LOG.open("a") as f:
            f.write(f"{os.getpid()}\n")
        os._exit(137)
