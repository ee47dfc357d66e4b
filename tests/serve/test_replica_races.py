"""Races inside one replica (from a concurrency review), in-process on the real engine and a tiny checkpoint: one
request's failure to enter the engine fails only that request, the event loop never waits on the voice store,
parked bulk work takes the slots a step frees at once, and a slow consumer's liveness answer holds back no other
session's lease check."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from qwen_tts_core.voice_prompt import VoiceClonePromptItem
from serve.config import ModelConfig
from serve.replica import ReplicaCore
from serve.scheduler import SynthesisFailed
from serve.sessions import SessionLimits
from serve.voices import VoiceStore


def cv_core(model_factory, **kw) -> ReplicaCore:
    fields = dict(max_sessions=4, max_queue=8, interactive_reserve=1, max_new_tokens=40, default_max_new_tokens=24)
    cfg = ModelConfig(name="cv", model_type="custom_voice", **{**fields, **kw.pop("cfg", {})})
    return ReplicaCore(model_factory("custom_voice"), cfg, None, **kw)


def test_a_bulk_request_that_fails_to_enter_the_engine_fails_alone(model_factory):
    """An unexpected error from engine.add while a parked bulk request enters (device memory while its voice moves
    to the GPU) hung that request forever (counted open) and failed every running interactive stream with a 500."""
    core = cv_core(model_factory)

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            async def stream(i):
                return [x async for x in core.stream({"input": f"An innocent stream number {i}.", "voice": "ryan",
                                                       "seed": i, "max_new_tokens": 30})]
            inter = [asyncio.ensure_future(stream(i)) for i in range(2)]
            await asyncio.sleep(0.3)
            real_add, fired = core.engine.add, []

            def add(req):
                if req.priority == "bulk" and not fired:
                    fired.append(1)
                    raise RuntimeError("CUDA out of memory (injected)")
                return real_add(req)
            core.engine.add = add
            with pytest.raises(SynthesisFailed):
                await asyncio.wait_for(core.synthesize({"input": "A bulk line.", "voice": "eric", "seed": 1}), 30)
            ends = [(await asyncio.wait_for(t, 60))[-1] for t in inter]
            return ends, len(core.scheduler._open), core.stats()["active_sessions"]
        finally:
            core.stop()
    ends, still_open, active = asyncio.run(main())
    assert [(e["finish_reason"], e["status"]) for e in ends] == [("max_new_tokens", None)] * 2, ends
    assert still_open == 0 and active == 0


def test_a_stored_voice_is_read_off_the_event_loop(model_factory, tmp_path):
    """Reading a stored voice is a store round trip (an S3 HEAD per use); on the replica's loop it stalled every
    other stream's chunks for as long (a 1.5 s HEAD: a 1.5 s gap in another stream's audio)."""
    base = model_factory("base", "tiny")
    store = VoiceStore(str(tmp_path))
    v = store.create(VoiceClonePromptItem(None, torch.randn(base.cfg.talker.hidden_size), True, False),
                     name="v", model="b", owner="")
    core = ReplicaCore(base, ModelConfig(name="b", model_type="base", max_sessions=4, max_new_tokens=8,
                                         default_max_new_tokens=8), store)
    threads = []
    real_load = store.load
    store.load = lambda *a, **k: (threads.append(threading.current_thread()), real_load(*a, **k))[1]

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            items = [x async for x in core.stream({"input": "Hello there.", "voice": v["id"], "seed": 1})]
            return items[-1], threading.current_thread()
        finally:
            core.stop()
    end, loop_thread = asyncio.run(main())
    assert end["type"] == "end" and end["status"] is None, end
    assert threads and loop_thread not in threads


def test_parked_bulk_work_takes_the_slots_a_step_frees_without_an_idle_wait(model_factory):
    """Every iteration that reports 'nothing to run' (the loop then sleeps up to a second) must leave no bulk work
    parked that could enter: bulk throughput fell ~8x (6 short requests: 5.67 s instead of 0.69 s)."""
    core = cv_core(model_factory, cfg=dict(max_sessions=2, interactive_reserve=1))
    sched = core.scheduler

    async def main():
        sched._loop = asyncio.get_running_loop()  # the step loop's iterations run here, one by one
        tickets = [await sched.submit(core_request(core, i)) for i in range(3)]
        idle_with_parked = 0
        for _ in range(400):
            idle = sched._iterate()
            room = core.engine.num_active + core.engine.num_queued < 1
            if idle and sched._bulk_waiting and room:
                idle_with_parked += 1
            if all(t.finished for t in tickets):
                return idle_with_parked, tickets
        raise AssertionError("bulk requests did not finish")
    idle_with_parked, tickets = asyncio.run(main())
    assert idle_with_parked == 0
    assert all(t.failure is None for t in tickets)


def core_request(core: ReplicaCore, i: int):
    from serve.requests import build_request

    return build_request(core.model, core.cfg, {"input": f"Bulk line {i}.", "voice": "eric", "seed": i,
                                                "max_new_tokens": 4, "priority": "bulk"})


def test_a_slow_consumer_answer_holds_back_no_other_lease_check(model_factory):
    """The watchdog awaited every consumer's liveness answer before its next round (up to a lease each time): one
    slow consumer delayed every other session's lease, idle and deadline checks."""
    release = threading.Event()

    class Liveness:
        @staticmethod
        def identity(value):
            return value if isinstance(value, dict) else None

        @staticmethod
        def alive(consumer):
            release.wait(20)  # a consumer that answers very late (counts alive once lease_s passes)
            return True
    core = cv_core(model_factory, cfg=dict(max_new_tokens=64, default_max_new_tokens=64),
                   limits=SessionLimits(lease_s=3.0), liveness=Liveness())
    rounds = []
    real_expired = core.sessions.expired
    core.sessions.expired = lambda *a: (rounds.append(time.monotonic()), real_expired(*a))[1]

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            gen = core.stream({"voice": "ryan", "seed": 1}, incremental=True, lease=True, consumer={"id": "slow"})
            start = await gen.__anext__()
            core.feed(start["session"], "Words that wait for more words.")
            await asyncio.sleep(3.6)                   # its lease lapsed: the slow consumer is being asked
            n, t = len(rounds), time.monotonic()
            await asyncio.sleep(2.0)
            done = len(rounds) - n
            release.set()
            await gen.aclose()
            return done, time.monotonic() - t
        finally:
            release.set()
            core.stop()
    done, _ = asyncio.run(main())
    assert done >= 3, done  # 0.5 s rounds go on (awaiting the answer blocked them for a whole lease, 3 s)
