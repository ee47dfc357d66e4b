"""A replica that runs for weeks: per-request state must not outlive its request. Mixed traffic (full streams,
streams cancelled after their first audio, refused requests, bulk synthesize, incremental sessions fed and
abandoned, engine steps that fail) is driven through a ReplicaCore and the Python API's driver, in process; after
it every per-request container is back to empty (or full, for free slots) and tasks, threads and file descriptors
are where they were. Growth of any of them with the number of requests is what a crash would find after days."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import threading
import time

import pytest

from qwen_tts_core.errors import RequestError
from serve.config import ModelConfig
from serve.replica import ReplicaCore
from serve.scheduler import Busy, SynthesisFailed


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _engine_state(engine) -> dict:
    audio = engine.audio
    return {"live": len(engine._live), "audio_rows": len(engine._audio_rows), "undelivered": len(engine._undelivered),
            "active": len(engine.active), "queued": sum(len(q) for q in engine.queues.values()),
            "free_slots": sorted(engine.free_slots),
            "open_rows": len(audio.open_rows) if audio is not None else 0,
            "free_rows": sorted(audio.free) if audio is not None else []}


def _idle_engine(engine) -> dict:
    n = engine.max_sessions
    return {"live": 0, "audio_rows": 0, "undelivered": 0, "active": 0, "queued": 0, "free_slots": list(range(n)),
            "open_rows": 0, "free_rows": list(range(engine.audio.max_rows)) if engine.audio is not None else []}


async def _one(core: ReplicaCore, i: int, rnd: random.Random) -> None:
    r = rnd.random()
    p = {"input": f"Hi {i}.", "voice": "Vivian", "seed": i, "max_new_tokens": rnd.choice([2, 3])}
    try:
        if r < 0.2:   # the client leaves after its first audio
            gen = core.stream(p)
            await gen.__anext__()
            await gen.__anext__()
            await gen.aclose()
        elif r < 0.3:  # refused (400)
            [x async for x in core.stream({"input": "", "voice": "nobody"})]
        elif r < 0.4:
            await core.synthesize({**p, "priority": "bulk"})
        elif r < 0.6:  # incremental: fed (or not), then read to its end or abandoned
            gen = core.stream({"voice": "Vivian", "max_new_tokens": 2}, incremental=True)
            start = await gen.__anext__()
            end = False
            if rnd.random() < 0.7:
                end = rnd.random() < 0.7
                core.feed(start["session"], f"some text {i}", end=end)
            if end and rnd.random() < 0.5:   # (without `end` it would wait for text until its idle timeout)
                async for x in gen:
                    if x["type"] == "end":
                        break
            await gen.aclose()
        else:
            [x async for x in core.stream(p)]
    except (RequestError, Busy, SynthesisFailed):
        pass


def test_a_replica_holds_no_per_request_state_after_mixed_traffic(model_factory, monkeypatch):
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=3, max_queue=3, max_new_tokens=8,
                      default_max_new_tokens=3)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None)
    engine, steps = core.engine, [0]
    real_step = engine._step

    def sometimes_failing_step(out, emit):  # a step that raises fails its sessions; the engine goes on
        steps[0] += 1
        if steps[0] % 11 == 0:
            raise RuntimeError("injected step failure")
        return real_step(out, emit)

    monkeypatch.setattr(engine, "_step", sometimes_failing_step)
    logging.disable(logging.CRITICAL)   # the injected failures are logged with their tracebacks

    async def rounds(n: int, seed: int) -> None:
        rnd = random.Random(seed)
        for k in range(0, n, 4):
            await asyncio.gather(*(_one(core, k + j, rnd) for j in range(4)))
        for _ in range(100):     # the last chunks' _finished callbacks run on the loop
            if not core.scheduler._open:
                break
            await asyncio.sleep(0.01)

    async def main() -> tuple[dict, dict]:
        core.start(asyncio.get_running_loop())
        try:
            await rounds(8, 0)   # first calls: executor threads, lazily built caches
            gc.collect()
            before = {"tasks": len(asyncio.all_tasks()), "threads": len(threading.enumerate()), "fds": _fds()}
            await rounds(200, 1)
            gc.collect()
            after = {"tasks": len(asyncio.all_tasks()), "threads": len(threading.enumerate()), "fds": _fds()}
            return before, after
        finally:
            core.stop()

    try:
        before, after = asyncio.run(main())
    finally:
        logging.disable(logging.NOTSET)
    assert steps[0] >= 11, "no step failure was injected"
    sch = core.scheduler
    assert len(core.sessions) == 0
    assert (len(sch._open), len(sch._by_session), len(sch._bulk_waiting)) == (0, 0, 0)
    assert _engine_state(engine) == _idle_engine(engine)
    assert not core._asking and not core._tasks
    assert after["tasks"] == before["tasks"]
    assert after["fds"] <= before["fds"]
    # asyncio.to_thread's executor may still start a thread or two up to its bound, never one per request
    assert after["threads"] <= before["threads"] + 2
    # recent TTFA/RTF samples are a window, not one entry per request served
    assert sch.stats.ttfa_s.maxlen is not None and sch.stats.rtf.maxlen is not None
    assert sch.stats.requests >= 150 and sch.stats.errors >= 1 and sch.stats.cancelled >= 1


def test_the_python_apis_driver_forgets_streams_closed_dropped_or_failed(model_factory):
    model = model_factory("custom_voice")
    spk = model.get_supported_speakers()[0]
    rnd = random.Random(3)
    for i in range(120):
        r = rnd.random()
        kw = dict(speaker=spk, seed=i, max_new_tokens=rnd.choice([2, 3]))
        try:
            if r < 0.25:      # the caller stops after its first chunk
                for _ in model.stream_custom_voice(f"Hi {i}.", first_chunk_frames=1, chunk_frames=1, **kw):
                    break
            elif r < 0.4:     # dropped unread
                g = model.stream_custom_voice(f"Hi {i}.", **kw)
                del g
            elif r < 0.55:    # closed unread
                model.stream_custom_voice(f"Hi {i}.", **kw).close()
            elif r < 0.65:    # refused
                model.generate_custom_voice(text=f"Hi {i}.", speaker="nobody")
            else:
                list(model.stream_custom_voice(f"Hi {i}.", **kw))
        except ValueError:
            pass
    gc.collect()
    model.generate_custom_voice(text="Last.", speaker=spk, max_new_tokens=2)   # reaps what was dropped
    drv = model._driver
    assert (len(drv._queues), len(drv._abandoned), len(drv._orphans)) == (0, 0, 0)
    assert not model._in_flight
    assert _engine_state(drv.engine) == _idle_engine(drv.engine)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


def test_the_ingress_holds_no_stream_state_after_websocket_sessions_and_disconnects(model_factory, monkeypatch,
                                                                                      tmp_path):
    """WebSocket sessions through the real ingress over a real ReplicaCore (tests/serve/test_review_ws.py's
    harness): ended by `end`, or by the client vanishing after its text. After them the ingress holds no lease,
    counts no open client stream, and the replica no session."""
    from serve import ingress as ingress_mod
    from serve.sessions import SessionLimits
    from tests.serve.test_review_ws import Client, _config, _run, _session

    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=4, max_queue=4, interactive_reserve=0,
                      max_new_tokens=8, default_max_new_tokens=3)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None,
                       limits=SessionLimits(max_text_chars=400, idle_text_timeout_s=3.0))

    async def fn(app):
        ing = ingress_mod.serve.get_replica_context().servable_object
        for i in range(24):
            c = Client()
            c.text(_config(core, seed=i, max_new_tokens=3))
            c.text({"type": "text", "text": f"Hello {i}."})
            if i % 3 == 2:
                c.inbox.put_nowait({"type": "websocket.disconnect", "code": 1001})   # the client vanishes
            else:
                c.text({"type": "end"})
            await _session(app, c, 30)
        t = time.monotonic()
        while (len(ing.leases) or len(core.sessions) or core.scheduler._open) and time.monotonic() - t < 5:
            await asyncio.sleep(0.02)
        return len(ing.leases), ing.client_streams.count, len(core.sessions), len(core.scheduler._open)

    assert _run(monkeypatch, tmp_path, core, fn) == (0, 0, 0, 0)
    assert _engine_state(core.engine) == _idle_engine(core.engine)
