"""A speech request whose model replica dies (or cannot be reached) before any audio reached the client goes again to
another replica (`failover_retries`): nothing was sent, so the client gets its audio instead of a 502. Once audio
has gone out, a lost replica still fails the stream visibly (never retried, never a clean end). Through the real
app in-process (tests/serve/inproc.py, no Ray); the real Ray path is in tests/fleet/test_fleet.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from serve.metrics import http_errors
from tests.serve.inproc import ingress_app

SR = 24000
KEY = {"authorization": "Bearer key-a"}
BODY = {"input": "Hello there.", "voice": "ryan", "response_format": "pcm", "seed": 7}


class Flaky:
    """Model replicas behind one handle: call i (1-based) dies as `deaths[i]` says ("open": before its session
    item, "parked": after it, before audio, "mid": after the first audio), else streams two pieces of audio."""

    def __init__(self, deaths: dict[int, str], error: type[BaseException] = ActorDiedError) -> None:
        self.deaths, self.error, self.calls, self.payloads = deaths, error, 0, []

    def info(self) -> dict:
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}

    def renew(self, sessions):
        return []

    def _die(self):
        if self.error is ActorUnavailableError:
            return ActorUnavailableError("unreachable for a while", b"\x00" * 16)
        return self.error() if self.error is ActorDiedError else RuntimeError("a bug in the replica")

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.calls += 1
        self.payloads.append(payload)
        death = self.deaths.get(self.calls)
        if death == "open":
            raise self._die()
        yield {"type": "start", "session": f"r{self.calls}-abc"}
        if death == "parked":
            raise self._die()
        yield {"type": "audio", "pcm": np.full(960, 0.1 * self.calls, np.float32)}
        if death == "mid":
            raise self._die()
        yield {"type": "audio", "pcm": np.full(960, 0.1 * self.calls, np.float32)}
        yield {"type": "end", "status": None, "finish_reason": "eos", "num_frames": 2, "ttfa_s": 0.0,
               "text_tokens": 3}


def _app(monkeypatch, rep: Flaky, **cfg):
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "api_keys": ["key-a"], "max_streams_per_key": 1,
                                          **cfg}, {"cv": rep})
    return client, serve.get_replica_context().servable_object


def _held(ing) -> int:
    return sum(ing.quota.held.values())


@pytest.mark.parametrize("when", ["open", "parked"])
def test_a_replica_lost_before_any_audio_is_retried_on_another(monkeypatch, when):
    rep = Flaky({1: when})
    client, ing = _app(monkeypatch, rep)
    before = http_errors().get("failover", 0)
    r = client.post("/v1/audio/speech", json=BODY, headers=KEY)
    assert r.status_code == 200, r.text
    pcm = np.frombuffer(r.content, "<i2")
    assert rep.calls == 2 and len(pcm) == 1920 and abs(pcm[0] / 32767 - 0.2) < 1e-3   # the second replica's audio
    assert rep.payloads[0] == rep.payloads[1]                  # the same request, seed included
    assert r.headers["x-session-id"] == "r2-abc"
    assert _held(ing) == 0 and len(ing.leases) == 0 and ing.client_streams.count == 0
    assert http_errors().get("failover", 0) == before + 1    # qtts_http_errors_total{status="failover"}
    # the key's one place was handed from the lost stream to the retry: a second request is served too
    assert client.post("/v1/audio/speech", json=BODY, headers=KEY).status_code == 200 and _held(ing) == 0


def test_retries_are_bounded_and_the_last_loss_is_a_502(monkeypatch):
    rep = Flaky({1: "open", 2: "parked", 3: "open"})
    client, ing = _app(monkeypatch, rep, failover_retries=1)
    r = client.post("/v1/audio/speech", json=BODY, headers=KEY)
    assert r.status_code == 502 and rep.calls == 2 and "replica" in r.json()["error"]["message"]
    assert _held(ing) == 0 and len(ing.leases) == 0 and ing.client_streams.count == 0
    r = client.post("/v1/audio/speech", json=BODY, headers=KEY)   # call 3 dies, call 4 streams
    assert r.status_code == 200 and rep.calls == 4


def test_failover_off_is_a_502_at_once(monkeypatch):
    rep = Flaky({1: "open"})
    client, ing = _app(monkeypatch, rep, failover_retries=0)
    assert client.post("/v1/audio/speech", json=BODY, headers=KEY).status_code == 502 and rep.calls == 1
    assert _held(ing) == 0


def test_a_replica_lost_after_audio_went_out_is_never_retried(monkeypatch):
    """The client has audio: a retry would send it a second, different stream. The body is aborted instead."""
    rep = Flaky({1: "mid"})
    client, ing = _app(monkeypatch, rep)
    with client.stream("POST", "/v1/audio/speech", json={**BODY, "stream_format": "sse"}, headers=KEY) as r:
        events = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert r.status_code == 200 and rep.calls == 1
    assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "502" and _held(ing) == 0


@pytest.mark.parametrize("error", [RayTaskError, ActorUnavailableError])
def test_a_replica_error_that_is_not_a_dead_replica_is_not_retried(monkeypatch, error):
    """A replica that raised (a bug; Ray's RayTaskError) is alive: the same request would fail the same way on
    another one. One that could not be reached for a while (ActorUnavailableError) stays in Serve's rotation and
    may still run the first call: a retry could run the request twice. Each is the 502 it was, once."""
    rep = Flaky({1: "parked"}, error=error)
    client, ing = _app(monkeypatch, rep)
    assert client.post("/v1/audio/speech", json=BODY, headers=KEY).status_code == 502 and rep.calls == 1
    assert _held(ing) == 0


def test_failover_config_is_checked():
    from serve.config import ServiceConfig

    for bad in ({"failover_retries": -1}, {"failover_retries": 4}, {"failover_retries": True},
                {"failover_retries": 1.5}, {"failover_wait_s": 0}, {"failover_wait_s": float("nan")},
                {"failover_wait_s": "10"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServiceConfig.from_dict(bad)
    assert ServiceConfig.from_dict({"failover_retries": 0}).failover_retries == 0
