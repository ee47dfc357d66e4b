"""End to end on a real local Ray cluster with Serve and tiny checkpoints (real engine, no fakes): HTTP streaming,
the openai client, SSE, WebSocket incremental text, voices, bulk handle, disconnect, overload and bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time

import httpx
import numpy as np
import pytest

from tests.serve.helpers import decode_audio, metric

pytestmark = pytest.mark.ray


def _speech(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/audio/speech", json=body, timeout=120)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "flac", "mp3", "opus", "aac"])
def test_http_streaming_every_format(serve_app, fmt):
    r = _speech(serve_app["url"], model="cv", input="Hello there.", voice="vivian", response_format=fmt, seed=1)
    assert r.status_code == 200, r.text
    y, sr = decode_audio(r.content, fmt)
    assert sr == 24000 and len(y) > 1920 and np.abs(y).max() > 0.001


def test_audio_streams_before_the_request_ends(serve_app):
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{serve_app['url']}/v1/audio/speech", timeout=120,
                      json={"model": "cv", "input": "A longer sentence to speak.", "voice": "ryan",
                            "response_format": "pcm", "max_new_tokens": 48, "seed": 7}) as r:
        times = []
        for chunk in r.iter_raw():
            if chunk:
                times.append(time.perf_counter() - t0)
    # seeded: an unseeded random tiny model may choose EOS after a chunk or two (seen once on CI)
    assert len(times) >= 3, "audio must arrive in several pieces"
    assert times[0] < times[-1] * 0.5


def test_openai_client_streaming(serve_app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_app['url']}/v1", api_key="unused")
    buf = io.BytesIO()
    with client.audio.speech.with_streaming_response.create(model="cv", voice="aiden", input="From the client.",
                                                            response_format="wav") as resp:
        for part in resp.iter_bytes():
            buf.write(part)
    y, sr = decode_audio(buf.getvalue(), "wav")
    assert sr == 24000 and len(y) > 0


def test_sse_events(serve_app):
    r = _speech(serve_app["url"], model="cv", input="Events please.", voice="eric", response_format="pcm",
                stream_format="sse")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert deltas and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert len(pcm) == events[-1]["num_frames"] * 1920 * 2


def test_models_side_by_side(serve_app):
    data = httpx.get(f"{serve_app['url']}/v1/models").json()["data"]
    assert {m["id"]: m["type"] for m in data} == {"cv": "custom_voice", "base": "base", "vd": "voice_design"}
    r = _speech(serve_app["url"], model="vd", input="Designed.", instructions="A deep calm voice.",
                response_format="pcm")
    assert r.status_code == 200 and len(r.content) > 0
    assert httpx.get(f"{serve_app['url']}/health").json()["status"] == "ok"


# The random tiny model draws EOS before the text's end in ~1% of sessions (after "there, how " with seed 42): a
# test that must send all its text fixes a seed that speaks to max_new_tokens (seed 1); seed 42's early end is
# the contract tested below.
def test_websocket_incremental_text(serve_app):
    import websockets

    async def main():
        url = serve_app["url"].replace("http", "ws") + "/v1/audio/speech/stream"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "config", "model": "cv", "voice": "vivian", "max_new_tokens": 24,
                                      "seed": 1}))
            start = json.loads(await ws.recv())
            for piece in ["Hello ", "there, how ", "are you?"]:
                await ws.send(json.dumps({"type": "text", "text": piece}))
                await asyncio.sleep(0.05)
            await ws.send(json.dumps({"type": "end"}))
            audio, msgs = b"", []
            async for m in ws:
                if isinstance(m, bytes):
                    audio += m
                else:
                    msgs.append(json.loads(m))
            return start, audio, msgs
    start, audio, msgs = asyncio.run(main())
    assert start["type"] == "start" and start["sample_rate"] == 24000
    assert msgs[-1]["type"] == "done" and len(audio) == msgs[-1]["num_frames"] * 1920 * 2 > 0
    assert msgs[-1]["finish_reason"] == "max_new_tokens" and msgs[-1]["num_frames"] == 23


def test_websocket_model_ends_before_the_text(serve_app):
    """The model may end (EOS) while the client still has text to send: the client hears `done` with its reason
    and every frame's audio, then a normal close; text sent after that is not taken for spoken."""
    import websockets

    async def main():
        url = serve_app["url"].replace("http", "ws") + "/v1/audio/speech/stream"
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"type": "config", "model": "cv", "voice": "vivian", "max_new_tokens": 24,
                                      "seed": 42}))
            json.loads(await ws.recv())
            for piece in ["Hello ", "there, how "]:
                await ws.send(json.dumps({"type": "text", "text": piece}))
            audio, msgs = b"", []
            async for m in ws:   # no `end`: the model's own end closes the session
                if isinstance(m, bytes):
                    audio += m
                else:
                    msgs.append(json.loads(m))
            with pytest.raises(websockets.ConnectionClosedOK):
                await ws.send(json.dumps({"type": "text", "text": "are you?"}))
            return audio, msgs, ws.close_code
    audio, msgs, code = asyncio.run(main())
    assert [m["type"] for m in msgs] == ["done"] and code == 1000
    assert msgs[0]["finish_reason"] == "eos" and len(audio) == msgs[0]["num_frames"] * 1920 * 2 > 0


@pytest.mark.parametrize("first,second,param", [
    pytest.param("garbage", None, "message", id="not-json"),
    pytest.param(json.dumps({"type": "config", "model": "nope"}), None, "model", id="unknown-model"),
    pytest.param(json.dumps({"type": "config", "model": "cv", "voice": "vivian"}),
                 json.dumps({"type": "shout", "text": "x"}), "type", id="bad-message-type"),
    pytest.param(json.dumps({"type": "config", "model": "cv", "voice": "vivian"}), "SILENT", "text",
                 id="silent-client"),   # the replica's idle-text timeout ends the session (408 naming text)
])
def test_websocket_bad_input_gets_error_and_close(serve_app, first, second, param):
    import websockets

    async def main():
        url = serve_app["url"].replace("http", "ws") + "/v1/audio/speech/stream"
        async with websockets.connect(url) as ws:
            await ws.send(first)
            if second is not None:
                assert json.loads(await ws.recv())["type"] == "start"
                if second != "SILENT":
                    await ws.send(second)
            msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return msg, ws.close_code
    msg, code = asyncio.run(main())
    assert msg["type"] == "error" and msg["error"]["param"] == param, msg
    assert code in (1008, 1011)
    assert _speech(serve_app["url"], model="cv", input="Still fine.", voice="ryan",
                   response_format="pcm").status_code == 200


def test_voices_create_use_delete(serve_app, ref_wav_path):
    url = serve_app["url"]
    r = httpx.post(f"{url}/v1/audio/voices", timeout=120, data={"name": "alice", "ref_text": "A reference."},
                   files={"file": ("ref.wav", ref_wav_path.read_bytes(), "audio/wav")})
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    assert (serve_app["voices_dir"] / f"{vid}.safetensors").is_file()
    listed = httpx.get(f"{url}/v1/audio/voices").json()["data"]
    assert any(v["id"] == vid and v["name"] == "alice" for v in listed)
    assert any(v["id"] == "vivian" and v["builtin"] for v in listed)
    r = _speech(url, model="base", input="In the cloned voice.", voice=vid, response_format="wav")
    assert r.status_code == 200 and len(decode_audio(r.content, "wav")[0]) > 0
    b64 = base64.b64encode(ref_wav_path.read_bytes()).decode()
    r2 = httpx.post(f"{url}/v1/audio/voices", json={"name": "b64", "audio_base64": b64, "x_vector_only": True},
                    timeout=120)
    assert r2.status_code == 201, r2.text
    assert httpx.delete(f"{url}/v1/audio/voices/{vid}").status_code == 200
    assert httpx.delete(f"{url}/v1/audio/voices/{vid}").status_code == 404
    r = _speech(url, model="base", input="Gone.", voice=vid)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice"


BAD_SPEECH = [
    pytest.param(b'{"model": "cv", "input": "hi"', "body", id="malformed-json"),
    pytest.param({"model": "nope", "input": "hi"}, "model", id="unknown-model"),
    pytest.param({"model": "cv", "input": "hi", "voice": "alloy"}, "voice", id="unknown-voice"),
    pytest.param({"model": "cv", "input": "hi", "language": "klingon"}, "language", id="unknown-language"),
    pytest.param({"model": "cv", "input": "hi", "response_format": "m4a"}, "response_format", id="unknown-format"),
    pytest.param({"model": "cv", "input": ""}, "input", id="empty-input"),
    pytest.param({"model": "cv", "input": "x" * 501}, "input", id="over-long-input"),
    pytest.param({"model": "cv", "input": "hi", "temperature": 0}, "temperature", id="bad-temperature"),
    pytest.param({"model": "cv", "input": "hi", "top_k": -1}, "top_k", id="bad-top-k"),
    pytest.param({"model": "cv", "input": "hi", "max_new_tokens": 65}, "max_new_tokens", id="over-cap"),
    pytest.param({"model": "cv", "input": "hi", "stream_format": "chunks"}, "stream_format", id="bad-stream"),
    pytest.param({"model": "base", "input": "hi", "voice": "voice_0000000000000000"}, "voice", id="unknown-id"),
    pytest.param({"model": "vd", "input": "hi"}, "instructions", id="design-needs-instructions"),
    pytest.param({"model": "cv", "input": "hi", "extra_field": 1}, "extra_field", id="unknown-field"),
    pytest.param(b"x" * (70 * 1024), "body", id="body-too-large"),
]


@pytest.mark.parametrize("body,param", BAD_SPEECH)
def test_bad_speech_input_names_the_field(serve_app, body, param):
    url = f"{serve_app['url']}/v1/audio/speech"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = httpx.post(url, json=body, timeout=60)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert _speech(serve_app["url"], model="cv", input="ok", voice="ryan", response_format="pcm").status_code == 200


@pytest.mark.parametrize("files,data,param,status", [
    pytest.param({"file": ("x.wav", b"not audio" * 50, "audio/wav")}, {"name": "x", "ref_text": "t"}, "file", 400,
                 id="not-audio"),
    pytest.param({"file": ("x.wav", b"\0" * (600 * 1024), "audio/wav")}, {"name": "x", "ref_text": "t"}, "file",
                 413, id="too-large"),
    pytest.param(None, {"name": "x", "ref_text": "t", "audio_url": "http://example.com/a.wav"}, "audio_url", 400,
                 id="url-not-allowed"),
    pytest.param({"file": ("x.wav", b"RIFF", "audio/wav")}, {"ref_text": "t"}, "name", 400, id="no-name"),
])
def test_bad_voice_uploads(serve_app, files, data, param, status):
    r = httpx.post(f"{serve_app['url']}/v1/audio/voices", files=files, data=data, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_bulk_handle_for_batch_jobs(serve_app):
    """The batch jobs' contract, one hop on the model deployment: audio, or a typed RequestError / Busy."""
    from ray import serve

    from qwen_tts_core.errors import RequestError
    from serve.scheduler import Busy

    h = serve.get_deployment_handle("tts-cv", "qtts")
    out = h.synthesize.remote({"input": "Batch row.", "voice": "serena", "seed": 2}).result()
    assert out["sample_rate"] == 24000 and out["pcm"].dtype == np.float32 and out["num_frames"] > 0
    assert out["finish_reason"] in ("eos", "max_new_tokens")
    # the checkpoint that made the audio, as info() reports it (a job checks each reply against the digest it keys on)
    info = h.info.remote().result()
    assert out["checkpoint_digest"] == info["checkpoint_digest"] and out["checkpoint_digest"]
    # ... and its other audio settings, as the job keys on them from info() at its start (jobs.models.serve_spec)
    from jobs.models import serve_spec
    from jobs.serve_backend import REPLY_SETTINGS

    spec = serve_spec("cv", "qtts", {"cv": 1})   # (asks the replica's info(), as a job does)
    assert out["settings"] == {k: spec.audio[k] for k in REPLY_SETTINGS} and out["settings"]["dtype"]
    with pytest.raises(RequestError) as e:
        h.synthesize.remote({"input": "Batch row.", "voice": "nobody"}).result()
    assert e.value.field == "speaker"
    with pytest.raises(RequestError) as e:
        h.synthesize.remote({"input": "Batch row.", "voice": "serena", "max_new_tokens": True}).result()
    assert e.value.field == "max_new_tokens"
    # More bulk rows at once than the replica parks: the rest are refused with Busy (retry later), not queued.
    responses = [h.synthesize.remote({"input": f"Row {i}.", "voice": "serena", "max_new_tokens": 16})
                 for i in range(12)]
    outcomes = []
    for r in responses:
        try:
            outcomes.append(r.result()["num_frames"] >= 0)
        except Busy as b:
            outcomes.append(b.retry_after_s)
    assert outcomes.count(True) >= 3 and outcomes.count(1) >= 1, outcomes
    # The app handle's entry stays a thin forward to the same contract.
    assert serve.get_app_handle("qtts").synthesize_bulk.remote(
        {"model": "cv", "input": "Batch row.", "voice": "serena", "seed": 2}).result()["num_frames"] > 0


def _active(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "qtts_active_sessions", model="cv")


@pytest.mark.parametrize("fmt", ["pcm", "opus", "mp3"])
def test_disconnect_frees_the_session(serve_app, fmt):
    """A client that leaves after the first bytes cancels its session, whatever the encoder between (Opus and MP3
    hold a PyAV/libsndfile encoder with buffered state when the stream is abandoned)."""
    url = serve_app["url"]
    # Seeded, and checked to run to max_new_tokens when nobody leaves (64 ids, 63 frames: the last id gets none, as
    # in the reference): unseeded, the random tiny model sometimes chooses EOS early, and the session
    # had ended before the client left (seen once in CI, opus; seed 11 of 0-11 stops at 17 frames)
    body = {"model": "cv", "input": "A long answer.", "voice": "ryan", "max_new_tokens": 64, "seed": 7}
    whole = httpx.post(f"{url}/v1/audio/speech", json={**body, "response_format": "pcm"}, timeout=60)
    assert whole.status_code == 200 and len(whole.content) == 63 * 1920 * 2, len(whole.content)
    before = metric(httpx.get(f"{url}/metrics").text, "qtts_cancelled_total", model="cv")
    with httpx.stream("POST", f"{url}/v1/audio/speech", timeout=60, json={**body, "response_format": fmt}) as r:
        assert r.status_code == 200
        next(r.iter_raw())
        _active(url)  # (mid-stream reads of this gauge showed 0 here; see serve/README.md "Known gaps")
    deadline = time.time() + 10
    while time.time() < deadline and _active(url) != 0:
        time.sleep(0.1)
    after = metric(httpx.get(f"{url}/metrics").text, "qtts_cancelled_total", model="cv")
    assert (_active(url), after) == (0, before + 1), "the disconnect must cancel the session, not finish it"


def test_overload_answers_503_with_retry_after(serve_app):
    """cv has 4 slots and a queue of 2: of 10 concurrent long requests some must be refused, not piled up."""
    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(seed):   # seeded: an unseeded session of the random tiny model may choose EOS at once
                r = await client.post(f"{serve_app['url']}/v1/audio/speech",
                                      json={"model": "cv", "input": "Overload.", "voice": "ryan",
                                            "response_format": "pcm", "max_new_tokens": 64, "seed": seed})
                return r.status_code, r.headers.get("retry-after"), r.json() if r.status_code != 200 else None
            return await asyncio.gather(*[one(seed) for seed in range(10)])
    results = asyncio.run(main())
    codes = [c for c, _, _ in results]
    assert codes.count(200) >= 4 and codes.count(503) >= 1, codes
    assert all(ra == "1" for c, ra, _ in results if c == 503)
    assert _speech(serve_app["url"], model="cv", input="After.", voice="ryan", response_format="pcm").status_code == 200
