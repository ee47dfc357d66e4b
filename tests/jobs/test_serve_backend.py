"""ServeBackend against a fake deployment handle: the window per replica, typed back-pressure (Busy, Serve's
BackPressureError) waited out, bad input failing only its row, calls lost with their replica sent again and reported.
The exceptions are raised the way Ray delivers them (RayTaskError subclasses of the original). The real replicas
are in tests/fleet and test_ray_e2e."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from jobs.serve_backend import ServeBackend
from jobs.synth import ChunkJob
from qwen_tts_core.errors import RequestError
from serve.scheduler import Busy


def as_ray_raises(exc: BaseException) -> BaseException:
    """What `DeploymentResponse.result()` raises for an exception raised in the replica."""
    return RayTaskError("synthesize", "Traceback (most recent call last): ...", exc).as_instanceof_cause()


class _Resp:
    def __init__(self, fn):
        self.fn = fn

    def result(self, timeout_s=None):
        return self.fn()


class FakeDeployment:
    """synthesize.remote(payload) -> a response; `script[text]` lists what successive calls for a text do."""

    def __init__(self, script: dict[str, list] | None = None, delay_s: float = 0.0):
        self.script, self.delay_s = script or {}, delay_s
        self.payloads: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.synthesize = self

    def remote(self, payload):
        with self.lock:
            self.payloads.append(dict(payload))
            step = (self.script.get(payload["input"]) or ["ok"]).pop(0) if self.script.get(payload["input"]) \
                else "ok"

        def run():
            with self.lock:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                time.sleep(self.delay_s)
                if isinstance(step, BaseException):
                    raise step
                return {"pcm": np.full(240, 0.1, np.float32), "sample_rate": 24000, "finish_reason": "eos",
                        "num_frames": 0}
            finally:
                with self.lock:
                    self.inflight -= 1

        return _Resp(run)


def backend(dep: FakeDeployment, replicas: int = 1, **kw) -> ServeBackend:
    be = ServeBackend("qtts", base_delay_s=0.001, max_delay_s=0.01, **kw)
    be._handles["m"] = dep
    be._replicas = (time.monotonic() + 1e9, {"m": replicas})  # no controller here
    return be


def job(text: str, **kw) -> ChunkJob:
    return ChunkJob(**{"text": text, "voice": "ryan", "language": "auto", "instruct": None, "seed": 3, "model": "m",
                       "sampling": {"max_new_tokens": 5}, **kw})


def test_window_is_a_share_of_the_per_replica_bound():
    dep = FakeDeployment(delay_s=0.05)
    be = backend(dep, replicas=2, max_inflight_per_replica=3, workers=2)
    res = be.synthesize([job(f"t{i}") for i in range(12)])
    assert all(r.error is None and r.pcm.size == 240 for r in res)
    assert be.window([job("x")] * 12) == 3 and 2 <= dep.max_inflight <= 3
    p = dep.payloads[0]
    assert p == {"input": "t0", "voice": "ryan", "language": "auto", "instructions": None, "seed": 3,
                 "non_streaming_mode": True, "priority": "bulk", "max_new_tokens": 5}


def test_busy_is_waited_out_and_bad_input_fails_only_its_row():
    dep = FakeDeployment({"busy": [as_ray_raises(Busy("full", retry_after_s=0)), BackPressureError(num_queued_requests=9,
                                                                                       max_queued_requests=8),
                                   "ok"],
                          "bad": [as_ray_raises(RequestError("voice", "'nobody' is not a stored voice"))]})
    be = backend(dep)
    ok, bad, busy = be.synthesize([job("ok"), job("bad"), job("busy")])
    assert ok.error is None and busy.error is None and busy.retries == ()  # back-pressure is routine
    assert be.busy_waits == 2 and sum(p["input"] == "busy" for p in dep.payloads) == 3
    assert bad.pcm is None and bad.error == "voice: 'nobody' is not a stored voice"
    assert sum(p["input"] == "bad" for p in dep.payloads) == 1  # never retried


def test_a_call_lost_with_its_replica_is_sent_again_and_reported():
    lost = ActorDiedError()
    dep = FakeDeployment({"a": [lost, "ok"], "b": [lost, lost, lost, lost, lost]})
    a, b = backend(dep, lost_retries=2).synthesize([job("a"), job("b")])
    assert a.error is None and a.retries == ("replica lost (ActorDiedError)",)
    assert b.pcm is None and "replica lost 3 times" in b.error and len(b.retries) == 3


def test_persistent_back_pressure_fails_the_row_not_the_batch():
    dep = FakeDeployment({"x": [as_ray_raises(Busy("full", 0))] * 10})
    x, y = backend(dep, busy_retries=3).synthesize([job("x"), job("y")])
    assert x.pcm is None and x.error.startswith("busy: the replicas stayed full for 4 tries")
    assert y.error is None


def test_other_replica_errors_fail_the_row_with_one_line():
    dep = FakeDeployment({"boom": [as_ray_raises(RuntimeError("engine exploded\nsecond line"))]})
    (r,) = backend(dep).synthesize([job("boom")])
    assert r.error == "RuntimeError: second line"


def test_bad_options():
    with pytest.raises(ValueError, match="max_inflight_per_replica"):
        ServeBackend("qtts", max_inflight_per_replica=0)
