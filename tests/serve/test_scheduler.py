"""The replica's scheduler: per-session queues, interactive-first admission, Busy, cancel, step failures."""

from __future__ import annotations

import asyncio
import logging

import pytest

from qwen_tts_core import SynthesisRequest
from serve.scheduler import Busy, Failure, Scheduler, SchedulerLimits
from tests.serve.fakes import FakeEngine


def _req(priority: str = "interactive", text: str = "hi") -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", priority=priority)


async def _collect(sched: Scheduler, ticket) -> list:
    return [c async for c in sched.chunks(ticket)]


def test_sessions_stream_concurrently_to_their_own_queues():
    async def main():
        eng = FakeEngine(max_sessions=4, frames=6)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            tickets = [await sched.submit(_req()) for _ in range(3)]
            results = await asyncio.gather(*[_collect(sched, t) for t in tickets])
        finally:
            sched.stop()
        for t, chunks in zip(tickets, results):
            assert [c.session_id for c in chunks] == [t.session.id] * 7
            assert chunks[-1].is_last and chunks[-1].finish_reason == "eos"
            assert t.ttfa_s is not None and t.samples == 6 * 1920
        assert eng.steps <= 8, "three sessions must share engine steps (batched), not run one after another"
        assert sched.active_sessions == 0 and sched.stats.completed == 3
    asyncio.run(main())


def test_bulk_only_takes_capacity_interactive_leaves():
    async def main():
        eng = FakeEngine(max_sessions=4, frames=8, step_s=0.01)
        sched = Scheduler(eng, SchedulerLimits(interactive_reserve=2))
        sched.start(asyncio.get_running_loop())
        try:
            bulk = [await sched.submit(_req("bulk")) for _ in range(6)]
            await asyncio.sleep(0.03)
            inter = await sched.submit(_req())
            bulk_tasks = [asyncio.create_task(_collect(sched, t)) for t in bulk]
            chunks = await _collect(sched, inter)
            bulk_done_when_interactive_ended = sum(t.done() for t in bulk_tasks)
            await asyncio.gather(*bulk_tasks)
        finally:
            sched.stop()
        assert chunks[-1].finish_reason == "eos"
        assert eng.max_bulk_seen <= 2, "bulk must leave interactive_reserve slots free"
        assert bulk_done_when_interactive_ended <= 2, "the interactive request must not wait behind all bulk work"
        assert all(t.finished for t in bulk)
    asyncio.run(main())


def test_full_replica_raises_busy_instead_of_queueing():
    async def main():
        eng = FakeEngine(max_sessions=1)
        sched = Scheduler(eng, SchedulerLimits(max_queue=2, retry_after_s=3))  # loop not started: all stay queued
        for _ in range(3):   # one slot + a waiting room of two
            await sched.submit(_req())
        with pytest.raises(Busy) as e:
            await sched.submit(_req())
        assert e.value.retry_after_s == 3 and sched.stats.rejected_busy == 1
    asyncio.run(main())


def test_bad_request_is_a_value_error_and_counted():
    async def main():
        sched = Scheduler(FakeEngine())
        with pytest.raises(ValueError, match="text"):
            await sched.submit(_req(text=""))
        bad = []
        sched2 = Scheduler(FakeEngine(), validate=lambda r: bad.append(r) or (_ for _ in ()).throw(
            ValueError("speaker 'x' is not supported")))
        with pytest.raises(ValueError, match="speaker"):
            await sched2.submit(_req("bulk"))
        assert sched.stats.errors == 1 and sched2.stats.errors == 1 and sched2.active_sessions == 0
    asyncio.run(main())


def test_cancel_frees_the_session_at_once():
    async def main():
        eng = FakeEngine(max_sessions=2, frames=1000)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            t = await sched.submit(_req())
            agen = sched.chunks(t)
            first = await agen.__anext__()
            assert first.pcm.size and sched.active_sessions == 1
            await agen.aclose()            # the consumer goes away (client disconnect)
            for _ in range(100):
                if sched.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
            parked = await sched.submit(_req("bulk"))  # and a parked bulk request can be cancelled too
            sched.cancel(parked)
            for _ in range(100):
                if sched.active_sessions == 0:
                    break
                await asyncio.sleep(0.01)
        finally:
            sched.stop()
        assert sched.active_sessions == 0 and sched.stats.cancelled >= 1 and eng.num_active == 0
    asyncio.run(main())


def test_step_failure_fails_running_sessions_and_keeps_serving():
    async def main():
        eng = FakeEngine(max_sessions=2, frames=3, fail_at_step=2)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            t1 = await sched.submit(_req())
            c1 = await asyncio.wait_for(_collect(sched, t1), 5)
            t2 = await sched.submit(_req())
            c2 = await asyncio.wait_for(_collect(sched, t2), 5)
        finally:
            sched.stop()
        assert c1[-1].finish_reason == "error"
        assert c2[-1].finish_reason == "eos"
    asyncio.run(main())


@pytest.mark.parametrize("priority", ["interactive", "bulk"])
def test_an_unexpected_add_error_fails_that_request_as_a_counted_500(priority, caplog):
    """engine.add may raise anything (device memory while a stored voice moves to the GPU): that request ends as a
    500 its consumer reports, logged with the traceback and counted, on both paths, and the replica serves on. An
    interactive one escaped submit: the ingress called it a lost replica (502) and stats.errors missed it."""
    async def main():
        eng = FakeEngine(frames=2)
        real_add = eng.add

        def add(req):
            if req.text == "oom":
                raise RuntimeError("CUDA out of memory")
            return real_add(req)
        eng.add = add
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            bad = await sched.submit(_req(priority, "oom"))
            failed = await asyncio.wait_for(_collect(sched, bad), 5)
            served = await asyncio.wait_for(_collect(sched, await sched.submit(_req(priority))), 5)
        finally:
            sched.stop()
        assert [c.finish_reason for c in failed] == ["error"] and failed[0].is_last
        assert bad.failure == Failure(500, "synthesis failed in the engine")
        assert served[-1].finish_reason == "eos"
        assert sched.stats.errors == 1 and sched.stats.completed == 1 and sched.active_sessions == 0
    with caplog.at_level(logging.ERROR, logger="serve.scheduler"):
        asyncio.run(main())
    assert [r.exc_info[0] for r in caplog.records if "failed to enter the engine" in r.getMessage()] == [RuntimeError]
