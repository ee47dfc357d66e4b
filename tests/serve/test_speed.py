"""`speed` on POST /v1/audio/speech (OpenAI's field): the synthesized audio is time-stretched as it streams, pitch
kept, exactly round(N / speed) samples; out-of-range or mistyped values are a 400 naming `speed`."""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import pytest

from qwen_tts_core.audio_fx import stretched_length
from tests.serve.helpers import decode_audio

pytestmark = pytest.mark.ray

BODY = {"model": "cv", "input": "Speed it up a little.", "voice": "ryan", "seed": 7, "max_new_tokens": 24}


def _pcm(url: str, **extra) -> np.ndarray:
    r = httpx.post(f"{url}/v1/audio/speech", json={**BODY, "response_format": "pcm", **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return np.frombuffer(r.content, dtype="<i2")


@pytest.mark.parametrize("speed", [0.5, 2.0, 1.25])
def test_speed_gives_round_n_over_speed_samples(serve_app, speed):
    base = _pcm(serve_app["url"])                 # same seed: the same codes, so the same audio before the stretch
    fast = _pcm(serve_app["url"], speed=speed)
    assert base.size > 1920
    assert fast.size == stretched_length(base.size, speed), (base.size, fast.size)
    assert np.abs(fast).max() > 0                 # not silence


def test_openai_client_speed_and_sse(serve_app):
    from openai import OpenAI

    client = OpenAI(base_url=f"{serve_app['url']}/v1", api_key="unused")
    buf = io.BytesIO()
    with client.audio.speech.with_streaming_response.create(
            model="cv", voice="ryan", input=BODY["input"], response_format="wav", speed=1.5,
            extra_body={"seed": 7, "max_new_tokens": 24}) as resp:
        for part in resp.iter_bytes():
            buf.write(part)
    y, sr = decode_audio(buf.getvalue(), "wav")
    base = _pcm(serve_app["url"])
    assert sr == 24000 and len(y) == stretched_length(base.size, 1.5)

    r = httpx.post(f"{serve_app['url']}/v1/audio/speech", timeout=120,
                   json={**BODY, "response_format": "pcm", "stream_format": "sse", "speed": 0.75})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(pcm) // 2 == stretched_length(events[-1]["num_frames"] * 1920, 0.75)


@pytest.mark.parametrize("speed", [0.1, 4.5, 4.000001, -1, 0, "1.5", True, [1.0]])  # null: the default (test_openai_compat)
def test_bad_speed_is_a_400_naming_speed(serve_app, speed):
    body = json.dumps({**BODY, "speed": speed})
    r = httpx.post(f"{serve_app['url']}/v1/audio/speech", content=body,
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "speed", r.json()
