"""Serve's health check of a model replica (`TTSReplica.check_health` -> `ReplicaCore.health`): a replica that can
only fail requests (its step loop ended, a step hangs, its device fails a one-op probe: a CUDA sticky error) says
so, and Serve replaces it; a busy, working replica stays healthy. In-process on the real engine and a tiny
checkpoint; the device failure is injected into the probe (the CPU stand-in for a CUDA sticky error)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import serve.replica as replica_mod
from serve.config import ModelConfig
from serve.replica import ReplicaCore, TTSReplica


def cv_core(model_factory) -> ReplicaCore:
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=2, max_queue=4, interactive_reserve=0,
                      max_new_tokens=40, default_max_new_tokens=8)
    return ReplicaCore(model_factory("custom_voice"), cfg, None)


def check_health(core: ReplicaCore) -> None:
    """The deployment's own method, on an instance holding `core` (what Serve calls)."""
    replica = object.__new__(TTSReplica.func_or_class)
    replica.core = core
    asyncio.run(replica.check_health())


class Fatal(BaseException):
    """Escapes the step loop's handler (which keeps serving through any Exception)."""


def test_a_serving_replica_is_healthy_and_its_device_probe_computes(model_factory):
    core = cv_core(model_factory)
    core.engine.probe_device()  # the real probe on the CPU

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            stream = asyncio.ensure_future(
                _drain(core.stream({"input": "Busy but well.", "voice": "ryan", "max_new_tokens": 30, "seed": 1})))
            answers = []
            while not stream.done():
                answers.append(await asyncio.to_thread(core.health))
                await asyncio.sleep(0.05)
            return answers, (await stream)[-1]
        finally:
            core.stop()
    answers, end = asyncio.run(main())
    assert answers and set(answers) == {None}
    assert end["status"] is None
    check_health(core)  # stopped on purpose: not a failure


async def _drain(gen):
    return [x async for x in gen]


def test_a_step_loop_that_ended_is_unhealthy(model_factory):
    core = cv_core(model_factory)

    def step(emit=None):
        raise Fatal("the step loop thread dies")
    core.engine.step = step
    hook, threading.excepthook = threading.excepthook, lambda args: None  # the thread's death is expected here

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            gen = core.stream({"input": "Never spoken.", "voice": "ryan", "max_new_tokens": 8})
            assert (await gen.__anext__())["type"] == "start"
            deadline = time.time() + 10
            while core.scheduler._thread.is_alive() and time.time() < deadline:
                await asyncio.sleep(0.05)
            reason = core.health()
            with pytest.raises(RuntimeError, match="step loop has ended"):
                await asyncio.to_thread(check_health, core)
            await gen.aclose()
            return reason
        finally:
            core.stop()
    try:
        reason = asyncio.run(main())
    finally:
        threading.excepthook = hook
    assert reason == "the step loop has ended"


def test_a_hung_step_is_unhealthy_until_it_returns(model_factory, monkeypatch):
    core = cv_core(model_factory)
    monkeypatch.setattr(replica_mod, "STUCK_STEP_S", 0.3)
    release, entered = threading.Event(), threading.Event()
    real_step = core.engine.step

    def step(emit=None):
        entered.set()
        release.wait(30)  # a device call that does not return
        return real_step(emit)
    core.engine.step = step

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            stream = asyncio.ensure_future(
                _drain(core.stream({"input": "Stuck for a while.", "voice": "ryan", "max_new_tokens": 6})))
            assert await asyncio.to_thread(entered.wait, 10)
            early = core.health()
            await asyncio.sleep(0.5)
            stuck = core.health()
            core.engine.step = real_step
            release.set()
            end = (await asyncio.wait_for(stream, 60))[-1]
            return early, stuck, core.health(), end
        finally:
            release.set()
            core.stop()
    early, stuck, after, end = asyncio.run(main())
    assert early is None and after is None
    assert stuck is not None and "one engine step has run for" in stuck
    assert end["status"] is None  # the step returned: the request finished


def test_a_device_that_fails_the_probe_is_unhealthy(model_factory, monkeypatch):
    """On CUDA a device-side assert (an out-of-range index) leaves a sticky error: every later step fails, and the
    replica would answer 500 to every request until it is replaced."""
    core = cv_core(model_factory)

    def broken():
        raise RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA ...")
    monkeypatch.setattr(core.engine, "probe_device", broken)
    reason = core.health()
    assert reason is not None and reason.startswith("device cpu fails: RuntimeError: CUDA error: device-side assert")
    with pytest.raises(RuntimeError, match="replica for cv unhealthy: device cpu fails"):
        check_health(core)
