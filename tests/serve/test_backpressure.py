"""Connections that hold the ingress without using it, through the real app in-process (tests/serve/inproc.py, no Ray):

* a key's connections that never send their speech body (or WebSocket config) are counted in its stream share from
  the start: the next one gets 429 at once, other keys are served, and every place comes back (review: one key's
  ~1000 idle connections stalled every user, /health included, for body_timeout_s); the Ingress deployment has a
  bounded Serve queue (`ingress_max_queued_requests`) so overflow is Serve's 503 at once;
* an encoder failure mid-stream is an `error` event (SSE) / an aborted body (raw audio), never an escaped exception;
* `stream_lead_s` paces streams to real time (a client that stops reading no longer has its whole answer piled up
  in Serve's proxy while its key's place is given back).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

import numpy as np
import pytest
from ray import serve
from starlette.websockets import WebSocketDisconnect

from serve.config import ServiceConfig
from serve.streaming import ReplicaStream, StreamAborted, audio_body, sse_body
from tests.serve.helpers import FakeReplicaGen
from tests.serve.inproc import asgi_call, ingress_app

SR = 24000
A, B = ({"authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
WS = "/v1/audio/speech/stream"


class Replica:
    """A model replica that answers every request with `chunks` pieces of `chunk_s` seconds of audio at once."""

    def __init__(self, chunks: int = 2, chunk_s: float = 0.02) -> None:
        self.chunks, self.chunk_s, self.opened = chunks, chunk_s, 0

    def info(self) -> dict:
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.opened += 1
        yield {"type": "start", "session": f"r1-{self.opened}"}
        for _ in range(self.chunks):
            yield {"type": "audio", "pcm": np.full(round(self.chunk_s * SR), 0.1, np.float32)}
        yield {"type": "end", "status": None, "finish_reason": "eos", "num_frames": self.chunks, "ttfa_s": 0.0,
               "text_tokens": 3}

    def renew(self, sessions):
        return []

    def feed(self, session, text="", end=False):
        return {"chars": len(text)}


def _app(monkeypatch, rep: Replica | None = None, **cfg):
    rep = rep or Replica()
    client, app = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "api_keys": ["key-a", "key-b"], **cfg},
                              {"cv": rep})
    return client, app, serve.get_replica_context().servable_object, rep


def _held(ing, headers) -> int:
    return ing.quota.held.get(ing.keys.check(headers["authorization"][7:].encode()).owner, 0)


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


BODY = json.dumps({"input": "Hello.", "voice": "ryan", "response_format": "pcm"}).encode()


async def _idle_speech(app, headers, leave: asyncio.Event | None):
    """A speech request whose body never comes: the client waits (the body timeout ends it) or leaves on `leave`."""
    sent = []

    async def receive():
        if leave is None:
            await asyncio.sleep(3600)
        await leave.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech", "query_string": b"", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in {**headers, "content-type": "application/json",
                                                                 "content-length": "100"}.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 30)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


def test_idle_speech_bodies_count_against_their_key_at_once(monkeypatch):
    """Review finding (high): the speech route read the body (up to body_timeout_s) before taking the key's place,
    so one key could park any number of body-less requests. Now they hold its places: the next request of that key
    is a 429 at once (not after the body timeout), another key is served, and the places come back when the idle
    requests time out (408) or their client leaves (400)."""
    client, app, ing, rep = _app(monkeypatch, max_streams_per_key=2, body_timeout_s=1.5)

    async def main():
        leave = asyncio.Event()
        timing_out = asyncio.create_task(_idle_speech(app, A, None))
        leaving = asyncio.create_task(_idle_speech(app, A, leave))
        await asyncio.sleep(0.2)
        t = time.monotonic()
        third = await asgi_call(app, "POST", "/v1/audio/speech", {**A, "content-type": "application/json"}, [BODY])
        third_s = time.monotonic() - t
        held = (_held(ing, A), ing.client_streams.count)
        other = await asgi_call(app, "POST", "/v1/audio/speech", {**B, "content-type": "application/json"}, [BODY])
        leave.set()
        return third, third_s, held, other, await leaving, await timing_out

    (status, answer, _), third_s, held, (other, audio, _), left, timed_out = asyncio.run(main())
    assert status == 429 and "at most 2" in json.loads(answer)["error"]["message"], (status, answer)
    assert third_s < 1.0, f"the 429 took {third_s:.2f} s: it waited for the body"
    assert held == (2, 0), held   # both idle requests hold a place; no stream is open
    assert other == 200 and len(audio) == 2 * 2 * round(0.02 * SR)
    assert rep.opened == 1, "a refused request must not reach a replica"
    assert left == 400 and timed_out == 408
    assert not ing.quota.held and ing.client_streams.count == 0


def test_idle_websockets_count_against_their_key_at_once(monkeypatch):
    """The same for WebSockets that never send their config (they waited ws_idle_timeout_s uncounted): the next
    socket of the key gets the 429 error (close 1008) without sending anything, another key is served, and the
    places come back when the idle sockets close or time out (408)."""
    client, app, ing, rep = _app(monkeypatch, max_streams_per_key=2, ws_idle_timeout_s=3)
    with client, contextlib.ExitStack() as stack:
        ws1 = client.websocket_connect(WS, headers=A)                  # closed by its client
        stack.callback(ws1.__exit__, None, None, None)
        ws1.__enter__()
        ws2 = stack.enter_context(client.websocket_connect(WS, headers=A))   # left to time out
        with client.websocket_connect(WS, headers=A) as ws3:
            t = time.monotonic()
            err = ws3.receive_json()
            assert err["type"] == "error" and err["error"]["code"] == "429", err
            assert time.monotonic() - t < 1.0
            with pytest.raises(WebSocketDisconnect) as closed:
                ws3.receive_json()
            assert closed.value.code == 1008
        assert _held(ing, A) == 2
        with client.websocket_connect(WS, headers=B) as wsb:
            wsb.send_json({"type": "config", "voice": "ryan"})
            assert wsb.receive_json()["type"] == "start"
        assert rep.opened == 1
        ws1.__exit__(None, None, None)
        _until(lambda: _held(ing, A) <= 1)
        err = ws2.receive_json()   # ws_idle_timeout_s without a config
        assert err["error"]["code"] == "408", err
        _until(lambda: not ing.quota.held)
        assert ing.client_streams.count == 0


def test_the_ingress_queue_is_bounded():
    """Serve's default max_queued_requests is unbounded: requests piled up behind held connections with no answer.
    The Ingress has a bounded queue (past it Serve's proxy answers 503 at once), set by ingress_max_queued_requests."""
    from serve.app import INGRESS_MAX_ONGOING, build_app

    dep = build_app({})._bound_deployment._deployment_config
    assert dep.max_queued_requests == 200 and dep.max_ongoing_requests == INGRESS_MAX_ONGOING
    assert build_app({"ingress_max_queued_requests": 7})._bound_deployment._deployment_config.max_queued_requests == 7
    # past it: 503 with Retry-After, as the replicas' own 503s (a bare 503 before)
    answer = build_app({"retry_after_s": 4})._bound_deployment._deployment_config.backpressure_config
    assert (answer.status_code, answer.retry_after_s) == (503, 4)


@pytest.mark.parametrize(("key", "value"), [
    ("ingress_max_queued_requests", 0), ("ingress_max_queued_requests", -1), ("ingress_max_queued_requests", 1.5),
    ("ingress_max_queued_requests", True), ("ingress_max_queued_requests", "4"), ("ingress_max_queued_requests", None),
    ("stream_lead_s", -0.1), ("stream_lead_s", math.nan), ("stream_lead_s", math.inf), ("stream_lead_s", True),
    ("stream_lead_s", "1"), ("stream_lead_s", None)])
def test_new_keys_are_checked(key, value):
    with pytest.raises(ValueError, match=key):
        ServiceConfig.from_dict({key: value})


def test_new_keys_defaults():
    cfg = ServiceConfig.from_dict({"stream_lead_s": 2, "ingress_max_queued_requests": 5})
    assert cfg.stream_lead_s == 2 and cfg.ingress_max_queued_requests == 5
    assert ServiceConfig().stream_lead_s == 0 and ServiceConfig().ingress_max_queued_requests == 200


# --- an encoder that fails mid-stream ---------------------------------------------------------------------------
class FailingEncoder:
    """PCM-like, raises RuntimeError (as PyAV / libsndfile / the stretcher may) on its second piece."""
    media_type = "audio/pcm"

    def __init__(self) -> None:
        self.n = 0

    def push(self, pcm):
        self.n += 1
        if self.n > 1:
            raise RuntimeError("libopus: encode failed")
        return b"x" * len(pcm)

    def finish(self):
        return b""


def test_encoder_failure_mid_sse_is_an_error_event(monkeypatch, caplog):
    """Review finding (minor): sse_body caught only ApiError, so an encoder's RuntimeError ended the SSE body with an
    exception and no documented `error` event. Now: a 500 `error` event, logged with its traceback."""
    client, app, ing, rep = _app(monkeypatch, Replica(chunks=3))
    # the ingress's own namespace (Serve's ingress decorator runs a copy of the class's functions)
    monkeypatch.setitem(type(ing).speech.__globals__, "make_encoder", lambda fmt, sr=SR: FailingEncoder())
    with caplog.at_level(logging.ERROR, logger="serve.streaming"), client:
        r = client.post("/v1/audio/speech", headers=A, json={"input": "Hi.", "voice": "ryan", "stream_format": "sse"})
        assert r.status_code == 200
        events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert [e["type"] for e in events] == ["speech.audio.delta", "error"], events
        assert events[-1]["error"]["code"] == "500" and "RuntimeError" in events[-1]["error"]["message"]
        _until(lambda: not ing.quota.held and ing.client_streams.count == 0)
    rec = [r for r in caplog.records if "failed after its first audio" in r.getMessage()]
    assert rec and rec[0].exc_info is not None and "libopus" in str(rec[0].exc_info[1])


def _items(chunks: int, chunk_s: float) -> list[dict]:
    return ([{"type": "audio", "pcm": np.full(round(chunk_s * SR), 0.1, np.float32)} for _ in range(chunks)]
            + [{"type": "end", "status": None, "finish_reason": "eos", "num_frames": chunks, "ttfa_s": 0.0}])


def test_encoder_failure_mid_raw_audio_aborts_the_body(caplog):
    """Raw audio: the encoder's failure aborts the body (StreamAborted: the client sees a broken body, never a clean
    end), counted as stream_500 and logged with its traceback; the stream is released."""
    counted = []

    async def main():
        s = ReplicaStream(FakeReplicaGen(_items(3, 0.02)), "r-1", "cv", None, None)
        out = []
        with pytest.raises(StreamAborted):
            async for part in audio_body(s, await s.first_output(), FailingEncoder(), counted.append):
                out.append(part)
        return out, s
    with caplog.at_level(logging.ERROR, logger="serve.streaming"):
        out, s = asyncio.run(main())
    assert len(out) == 1 and counted == ["stream_500"] and s.closed and s.gen.cancelled
    assert any(r.exc_info is not None for r in caplog.records if "failed after its first audio" in r.getMessage())


# --- stream_lead_s ----------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now, self.sleeps = 100.0, []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


class _Pcm:
    media_type = "audio/pcm"

    def push(self, pcm):
        return b"x" * (2 * len(pcm))

    def finish(self):
        return b""


@pytest.mark.parametrize("body", ["audio", "sse"])
# (0.05, 0.25): pieces (0.32 s at speed 0.25) longer than the lead: the client must not run dry between them
@pytest.mark.parametrize(("lead_s", "speed"), [(0.5, 1.0), (0.5, 0.5), (1.0, 2.0), (0.05, 0.25), (0.0, 1.0)])
def test_pacer_keeps_the_stream_within_its_lead(lead_s, speed, body):
    """With a fake clock (the replica's audio all there at once, a client that reads at once): every piece after
    the first goes out when the audio already sent, at the request's speed, is at most `lead_s` ahead of the time
    since the first (a client playing along holds the lead when it arrives); the whole stream takes its duration
    minus the lead and the last piece (not more); with lead 0 nothing waits."""
    from serve.streaming import Pacer

    clock = FakeClock()
    chunks, chunk_s = 40, 0.08
    pacer = Pacer(lead_s, speed, clock=clock, sleep=clock.sleep)
    make = audio_body if body == "audio" else sse_body

    async def main():
        s = ReplicaStream(FakeReplicaGen(_items(chunks, chunk_s)), "r-1", "cv", None, None)
        seen = []   # (time since the first piece, audio seconds out with this piece)
        t0, n = None, 0
        async for part in make(s, await s.first_output(), _Pcm(), None, pacer):
            if body == "sse" and "delta" not in part:
                continue
            n += 1
            t0 = clock.now if t0 is None else t0
            seen.append((clock.now - t0, n * chunk_s / speed))
        return seen
    seen = asyncio.run(main())
    assert len(seen) == chunks
    duration = chunks * chunk_s / speed
    if lead_s == 0:
        assert clock.sleeps == [] and seen[-1][0] == 0
        return
    piece = chunk_s / speed
    for elapsed, out in seen[1:]:
        assert out - piece - elapsed <= lead_s + 1e-9            # what the client holds when this piece arrives
        assert out - piece - elapsed >= min(lead_s, out - piece) - 1e-9   # never less: no underrun
    assert seen[-1][0] == pytest.approx(duration - lead_s - piece)


def test_paced_streams_take_their_audio_duration(monkeypatch):
    """Through the app with stream_lead_s 0.5 (real time; TestClient, like Serve's proxy, takes the whole body
    whatever the client reads): 2 s of audio take at least 1.4 s to leave the ingress, and the key's place and the
    open stream are held until then; at speed 0.5 (4 s of audio) at least 3.3 s. Without the option: no pacing."""
    rep = Replica(chunks=20, chunk_s=0.1)
    client, app, ing, _ = _app(monkeypatch, rep, stream_lead_s=0.5)
    body = {"input": "Hi.", "voice": "ryan", "response_format": "pcm"}
    with client:
        t = time.monotonic()
        r = client.post("/v1/audio/speech", headers=A, json=body)
        paced_s = time.monotonic() - t
        assert r.status_code == 200 and len(r.content) == 2 * 2 * SR
        assert paced_s >= 1.4 - 0.05, paced_s       # 2 s - the 0.5 s lead - the last 0.1 s piece
        t = time.monotonic()
        r = client.post("/v1/audio/speech", headers=A, json={**body, "speed": 0.5, "stream_format": "sse"})
        slow_s = time.monotonic() - t
        assert r.status_code == 200 and '"speech.audio.done"' in r.text
        assert slow_s >= 3.3 - 0.05, slow_s         # 4 s - 0.5 s - the last piece (0.2 s at speed 0.5)
        _until(lambda: not ing.quota.held and ing.client_streams.count == 0)

    client, app, ing, _ = _app(monkeypatch, rep)   # stream_lead_s 0 (the default): as fast as it is made
    with client:
        t = time.monotonic()
        r = client.post("/v1/audio/speech", headers=A, json=body)
        fast_s = time.monotonic() - t
        assert r.status_code == 200 and len(r.content) == 2 * 2 * SR
    assert fast_s < 1.0, fast_s
    print(f"\n2 s of audio: paced (lead 0.5 s) {paced_s:.2f} s; at speed 0.5 (4 s) {slow_s:.2f} s; "
          f"unpaced {fast_s:.3f} s")


def test_paced_websocket(monkeypatch):
    """The WebSocket writer is paced the same way: 1.5 s of audio reach `done` no sooner than 0.9 s."""
    client, app, ing, _ = _app(monkeypatch, Replica(chunks=15, chunk_s=0.1), stream_lead_s=0.5)
    with client, client.websocket_connect(WS, headers=A) as ws:
        ws.send_json({"type": "config", "voice": "ryan", "response_format": "pcm"})
        assert ws.receive_json()["type"] == "start"
        t = time.monotonic()
        got = 0
        while True:
            msg = ws.receive()
            if msg.get("bytes"):
                got += len(msg["bytes"])
            elif msg.get("text") and json.loads(msg["text"])["type"] == "done":
                break
        ws_s = time.monotonic() - t
    assert got == 2 * int(1.5 * SR) and ws_s >= 0.9 - 0.05, (got, ws_s)   # 1.5 s - 0.5 s - the last 0.1 s
