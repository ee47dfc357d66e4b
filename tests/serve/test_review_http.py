"""Review of POST /v1/audio/speech as an attacker and as a crash: the real ingress in-process (tests/serve/inproc.py,
no Ray) over a real `ReplicaCore` (tiny random CustomVoice model, the real scheduler and engine on this event loop)
or over a fake replica where the test is about the transport alone.

Pinned here (each not already covered elsewhere): concurrent streams each get their own audio (what the same
request gets alone, to one s16 step) and raw pcm/wav carry num_frames * 1920 samples; a mid-stream failure is never a
clean end in any format, at speed 1 or not; a request that ends at once (max_new_tokens=1) is a decodable file in
every format, speed changes included; inputs at and past their edges are answered 200 or a 400 naming the field;
a client that leaves mid-stream cancels its engine session at once."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import httpx
import numpy as np
import pytest

from qwen_tts_core.audio_fx import stretched_length
from serve.config import ModelConfig
from serve.replica import ReplicaCore
from tests.serve.helpers import decode_audio
from tests.serve.inproc import ingress_app

FORMATS = ["wav", "pcm", "flac", "mp3", "opus", "aac"]
MAX_CHARS = 40
CV = {"name": "cv", "model_type": "custom_voice"}


@pytest.fixture(scope="module")
def core(model_factory):
    """A real replica core: 4 slots, a 64-frame cap (16 by default), at most MAX_CHARS characters of input."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=4, max_queue=4, interactive_reserve=0,
                      max_new_tokens=64, default_max_new_tokens=16, max_input_chars=MAX_CHARS)
    return ReplicaCore(model_factory("custom_voice"), cfg, None)


def _run(monkeypatch, tmp_path, target, fn, **cfg):
    """`fn(client, app)` on one event loop with the ingress in front of `target` (a ReplicaCore is started on that
    loop and stopped after)."""
    _, app = ingress_app(monkeypatch, {"models": [CV], "voices_uri": str(tmp_path / "voices"), **cfg}, {"cv": target})

    async def main():
        if isinstance(target, ReplicaCore):
            target.start(asyncio.get_running_loop())
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return await fn(client, app)
        finally:
            if isinstance(target, ReplicaCore):
                target.stop()
    return asyncio.run(main())


def _sse(text: str) -> list[dict]:
    """SSE events; every event must be exactly one `data: <json>` line followed by a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block[:200]
        events.append(json.loads(block[6:]))
    return events


def _speaker(core) -> str:
    return core.model.get_supported_speakers()[0]


# --- no audio of one user ever reaches another ---------------------------------------------------------------------
def test_concurrent_streams_each_get_their_own_audio(core, monkeypatch, tmp_path):
    """Four requests (other texts, voices, seeds) alone over SSE, then all at once as raw pcm and wav: each client
    gets its own request's audio, as long as alone and within one s16 step of it (the engine batches them; a row
    decoded beside others differs from itself alone by float rounding, README: < 1e-5 in fp32), and pcm/wav carry
    num_frames * 1920 samples."""
    speakers = core.model.get_supported_speakers()
    reqs = [{"model": "cv", "input": text, "voice": speakers[i % len(speakers)], "seed": 11 + i,
             "max_new_tokens": 24}
            for i, text in enumerate(["One voice here.", "A second text, a little longer.", "Third one.",
                                      "And the fourth request."])]

    async def fn(client, app):
        alone = []
        for r in reqs:
            resp = await client.post("/v1/audio/speech", json={**r, "response_format": "pcm", "stream_format": "sse"})
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            events = _sse(resp.text)
            assert events[-1]["type"] == "speech.audio.done", events[-1]
            pcm = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
            assert all(e["type"] == "speech.audio.delta" for e in events[:-1])
            assert len(pcm) == events[-1]["num_frames"] * 1920 * 2, (len(pcm), events[-1])
            alone.append(pcm)
        fmts = ["pcm", "wav", "pcm", "wav"]
        together = await asyncio.gather(*(client.post("/v1/audio/speech", json={**r, "response_format": f})
                                          for r, f in zip(reqs, fmts)))
        return alone, fmts, together
    alone, fmts, together = _run(monkeypatch, tmp_path, core, fn)
    assert all(len(a) > 0 for a in alone) and len({bytes(a) for a in alone}) == len(alone), "distinct audio each"
    for pcm, fmt, resp in zip(alone, fmts, together):
        assert resp.status_code == 200 and resp.headers["content-type"] == f"audio/{fmt}", resp.headers
        body = resp.content[44:] if fmt == "wav" else resp.content
        got, own = np.frombuffer(body, "<i2").astype(int), np.frombuffer(pcm, "<i2").astype(int)
        assert len(got) == len(own), f"{fmt}: {len(got)} samples, alone {len(own)}: a cut or another's audio"
        # float rounding is at most 1 LSB of s16; another stream's audio would differ everywhere
        assert np.abs(got - own).max() <= 1, f"{fmt}: not this request's audio"


# --- a failure after the first byte is never a clean end ----------------------------------------------------------
class FailsMidway:
    """A replica that sends three pieces of audio, then fails: its end item carries a 500, or the call raises (the
    replica died)."""

    def __init__(self, how: str) -> None:
        self.how, self.n = how, 0

    def info(self):
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}

    def renew(self, sids):
        return []

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.n += 1
        yield {"type": "start", "session": f"r1-{self.n}"}
        for i in range(3):
            yield {"type": "audio", "pcm": (0.3 * np.sin(np.arange(1920) * 0.05 + i)).astype(np.float32)}
        if self.how == "raise":
            raise RuntimeError("the replica died")
        yield {"type": "end", "status": 500, "message": "synthesis failed in the engine", "param": None,
               "finish_reason": "error", "num_frames": 3, "ttfa_s": 0.0}


@pytest.mark.parametrize("speed", [1.0, 0.5])
@pytest.mark.parametrize("how", ["end-500", "raise"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failure_after_the_first_byte_is_never_a_clean_end(monkeypatch, tmp_path, fmt, how, speed):
    """Raw audio in every format (a streamed WAV's header says "unknown length", so only the transport can tell a
    cut): the body is aborted, never a complete 200. SSE: the last event is the `error`, never `done`."""
    rep = FailsMidway(how)
    body = {"model": "cv", "input": "Hi.", "voice": "ryan", "response_format": fmt, "speed": speed}

    async def fn(client, app):
        with pytest.raises(Exception) as e:   # httpx's ASGI transport re-raises what the app raised mid-body
            await client.post("/v1/audio/speech", json=body)
        sse = await client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
        return e.value, sse
    raw_err, sse = _run(monkeypatch, tmp_path, rep, fn)
    assert type(raw_err).__name__ == "StreamAborted", repr(raw_err)
    events = _sse(sse.text)
    assert events[-1]["type"] == "error" and not any(ev["type"] == "speech.audio.done" for ev in events), events[-1]
    assert events[-1]["error"]["code"] == ("500" if how == "end-500" else "502"), events[-1]


# --- a request that ends at once ----------------------------------------------------------------------------------
@pytest.mark.parametrize("speed", [1.0, 2.0, 0.25])
def test_zero_frames_is_a_decodable_file_in_every_format(core, monkeypatch, tmp_path, speed):
    """max_new_tokens=1 ends at prefill (no frame): wav is its 44-byte header, pcm an empty body, flac/mp3/opus/aac a
    file decoders read (README: one sample of silence); SSE ends with `done`, num_frames 0. With a speed too (the
    stretcher then flushes nothing)."""
    body = {"model": "cv", "input": "One token.", "voice": _speaker(core), "max_new_tokens": 1, "speed": speed}

    async def fn(client, app):
        raw = {f: await client.post("/v1/audio/speech", json={**body, "response_format": f}) for f in FORMATS}
        sse = await client.post("/v1/audio/speech", json={**body, "response_format": "wav", "stream_format": "sse"})
        return raw, sse
    raw, sse = _run(monkeypatch, tmp_path, core, fn)
    assert all(r.status_code == 200 for r in raw.values()), {f: r.status_code for f, r in raw.items()}
    assert len(raw["wav"].content) == 44 and raw["pcm"].content == b""
    for fmt in ("wav", "flac", "mp3", "opus", "aac"):
        y, sr = decode_audio(raw[fmt].content, fmt)
        assert sr == 24000 and len(y) <= 2048, (fmt, len(y))
    events = _sse(sse.text)
    assert events[-1] == {**events[-1], "type": "speech.audio.done", "num_frames": 0,
                          "finish_reason": "max_new_tokens"}, events[-1]


# --- inputs at and past their edges -------------------------------------------------------------------------------
EDGES = [
    pytest.param({"input": "x" * MAX_CHARS}, None, id="input-at-the-limit"),
    pytest.param({"input": "x" * (MAX_CHARS + 1)}, "input", id="input-one-over"),
    pytest.param({"input": "\u0958" * MAX_CHARS}, None, id="input-at-the-limit-that-nfc-doubles"),
    pytest.param({"input": " \t\n\u3000 "}, "input", id="whitespace-only-input"),
    pytest.param({"input": "\u200b\u2060\ufeff"}, "input", id="zero-width-only-input"),
    pytest.param({"input": ""}, "input", id="empty-input"),
    pytest.param({"voice": "ry\ud800an"}, "voice", id="lone-surrogate-voice"),
    pytest.param({"language": "\udfff"}, "language", id="lone-surrogate-language"),
    pytest.param({"language": ""}, "language", id="empty-language"),
    pytest.param({"max_new_tokens": 1.0}, "max_new_tokens", id="float-for-int"),
    pytest.param({"max_new_tokens": 0}, "max_new_tokens", id="zero-frames-asked"),
    pytest.param({"max_new_tokens": 10 ** 39}, "max_new_tokens", id="40-digit-int"),
    pytest.param({"top_k": -(10 ** 38)}, "top_k", id="huge-negative-top-k"),
    pytest.param({"seed": 2 ** 63 - 1}, None, id="largest-seed"),
    pytest.param({"seed": 2 ** 63}, "seed", id="seed-one-over"),
    pytest.param({"temperature": 1e-46}, None, id="temperature-zero-in-float32"),
    pytest.param({"repetition_penalty": 1e-300}, None, id="tiny-repetition-penalty"),
    pytest.param({"speed": 0.25}, None, id="slowest-speed"),
    pytest.param({"speed": 4}, None, id="fastest-speed-as-int"),
    pytest.param({"speed": 0.2499999}, "speed", id="speed-under"),
    pytest.param({"priority": "urgent"}, "priority", id="unknown-priority"),
    pytest.param({"response_format": "aac"}, None, id="aac"),
    pytest.param({"response_format": "m4a"}, "response_format", id="m4a"),
    pytest.param({"stream_format": None, "speed": None, "seed": None}, None, id="nulls-are-defaults"),
]


@pytest.mark.parametrize("fields,param", EDGES)
def test_edge_values_are_answered_200_or_a_400_naming_the_field(core, monkeypatch, tmp_path, fields, param):
    body = {"model": "cv", "input": "Edge.", "voice": _speaker(core), "response_format": "pcm", "seed": 3,
            "max_new_tokens": 8, **fields}

    async def fn(client, app):
        return await client.post("/v1/audio/speech", content=json.dumps(body),
                                 headers={"content-type": "application/json"})
    r = _run(monkeypatch, tmp_path, core, fn)
    if param is None:
        assert r.status_code == 200, r.text[:300]
        return
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["param"] == param and err["message"].startswith(f"{param}:"), err


@pytest.mark.parametrize("speed", [0.25, 4.0])
def test_extreme_speeds_give_round_n_over_speed_samples(core, monkeypatch, tmp_path, speed):
    body = {"model": "cv", "input": "Fast and slow.", "voice": _speaker(core), "response_format": "pcm", "seed": 5,
            "max_new_tokens": 12}

    async def fn(client, app):
        base = await client.post("/v1/audio/speech", json=body)
        stretched = await client.post("/v1/audio/speech", json={**body, "speed": speed})
        return base, stretched
    base, stretched = _run(monkeypatch, tmp_path, core, fn)
    assert base.status_code == stretched.status_code == 200
    n = len(base.content) // 2
    assert n > 0 and len(stretched.content) // 2 == stretched_length(n, speed)


# --- a client that leaves mid-stream ------------------------------------------------------------------------------
class _RemoteGen:
    """A replica's stream behind a boundary like Ray's: the replica generator runs in a task of its own, so the
    consumer's cancellation does not reach it; only `cancel()` (what the ingress calls on close) does."""

    def __init__(self, agen) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._pump(agen))

    async def _pump(self, agen) -> None:
        try:
            async for item in agen:
                self.queue.put_nowait(("item", item))
            self.queue.put_nowait(("stop", None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer as Ray would
            self.queue.put_nowait(("error", e))

    async def __anext__(self):
        kind, item = await self.queue.get()
        if kind == "stop":
            raise StopAsyncIteration
        if kind == "error":
            raise item
        return item

    def cancel(self) -> None:
        self.task.cancel()


class _RemoteHandle:
    def __init__(self, target, stream: bool = False) -> None:
        self.target, self.streaming = target, stream

    def options(self, stream: bool = False, **_) -> _RemoteHandle:
        return _RemoteHandle(self.target, stream)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        fn, streaming = getattr(self.target, name), self.streaming

        class Method:
            @staticmethod
            def remote(*args, **kwargs):
                if streaming:
                    return _RemoteGen(fn(*args, **kwargs))

                async def call():
                    out = fn(*args, **kwargs)
                    return await out if asyncio.iscoroutine(out) else out
                return call()
        return Method()


def test_a_client_that_leaves_mid_stream_cancels_its_session_at_once(core, monkeypatch, tmp_path):
    """The client disconnects right after its first audio bytes: the engine session is cancelled (counted as
    cancelled, not completed) within a second, long before its 64 frames would have finished."""
    body = json.dumps({"model": "cv", "input": "A long answer, on and on and on.", "voice": _speaker(core),
                       "response_format": "pcm", "seed": 1, "max_new_tokens": 64}).encode()
    from ray import serve

    _, app = ingress_app(monkeypatch, {"models": [CV], "voices_uri": str(tmp_path / "voices")}, {"cv": core})
    serve.get_replica_context().servable_object.replicas = {"cv": _RemoteHandle(core)}

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            before = core.scheduler.stats.cancelled
            got_audio, state, sent = asyncio.Event(), {"body": False}, []

            async def receive():
                if not state["body"]:
                    state["body"] = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await got_audio.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)
                if message["type"] == "http.response.body" and message.get("body"):
                    got_audio.set()
            scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                     "scheme": "http", "path": "/v1/audio/speech", "raw_path": b"/v1/audio/speech",
                     "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                     "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
            await asyncio.wait_for(app(scope, receive, send), 30)
            left = time.monotonic()
            while core.scheduler.active_sessions and time.monotonic() - left < 1.0:
                await asyncio.sleep(0.01)
            return sent, core.scheduler.active_sessions, core.scheduler.stats.cancelled - before
        finally:
            core.stop()
    sent, active, cancelled = asyncio.run(main())
    assert sent[0]["status"] == 200, sent
    frames = sum(len(m.get("body", b"")) for m in sent if m["type"] == "http.response.body") // 3840
    assert frames < 64, "the stream ran to its end: the disconnect came too late to test anything"
    assert (active, cancelled) == (0, 1), "the client left: its session must be cancelled at once"
