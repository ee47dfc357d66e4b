"""ServeBackend's windowing and back-pressure retries, with a fake handle (the real app is in test_ray_e2e)."""

import numpy as np

from jobs.synth import SERVE_DEFAULT_MODEL, ChunkJob, ServeBackend


class BackPressureError(RuntimeError):
    pass


class _Resp:
    def __init__(self, fn):
        self.fn = fn

    def result(self):
        return self.fn()


class _Handle:
    def __init__(self, busy_first: int):
        self.busy_left, self.payloads, self.inflight, self.max_seen = busy_first, [], 0, 0
        self.synthesize_bulk = self

    def remote(self, payload):
        self.payloads.append(payload)
        self.inflight += 1
        self.max_seen = max(self.max_seen, self.inflight)

        def done():
            self.inflight -= 1
            if self.busy_left > 0:
                self.busy_left -= 1
                raise BackPressureError("queue full")
            if payload["voice"] == "nobody":
                raise ValueError("voice: unknown voice 'nobody'")
            return {"pcm": np.ones(10, np.float32), "sample_rate": 24000, "finish_reason": "eos"}

        return _Resp(done)


def _backend(handle):
    be = ServeBackend.__new__(ServeBackend)
    be.handle, be.max_inflight, be.busy_retries, be.busy_delay_s = handle, 3, 4, 0.001
    return be


def test_window_retries_and_per_row_errors():
    h = _Handle(busy_first=2)
    jobs = [ChunkJob(text=f"t{i}", voice="nobody" if i == 5 else "ryan", language="auto", instruct=None, seed=i,
                     model=SERVE_DEFAULT_MODEL, sampling={"max_new_tokens": 5}) for i in range(8)]
    res = _backend(h).synthesize(jobs)
    assert h.max_seen <= 3 and len(h.payloads) == 8 + 2
    assert [r.error is None for r in res] == [i != 5 for i in range(8)]
    assert "unknown voice" in res[5].error
    p = h.payloads[-1]
    assert p["model"] is None and p["priority"] == "bulk" and p["non_streaming_mode"] and p["max_new_tokens"] == 5


def test_persistent_back_pressure_fails_the_row():
    res = _backend(_Handle(busy_first=100)).synthesize([ChunkJob("t", "ryan", "auto", None, 0, "m")])
    assert res[0].pcm is None and "BackPressure" in res[0].error
