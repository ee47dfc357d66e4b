"""POST /v1/audio/voices through the real app in-process (tests/serve/inproc.py, no Ray): form bodies bounded while
they stream, `audio_base64` as a form field, and reference audio too short for the speaker encoder."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import numpy as np
import pytest

from qwen_tts_core.errors import RequestError
from tests.serve.inproc import asgi_call, ingress_app

KIB = 1024


class Recorder:
    """A Base model's replica that keeps the audio it is asked to encode (nothing is decoded)."""

    def __init__(self) -> None:
        self.audio: list[bytes] = []

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        self.audio.append(audio)
        return {"id": "voice_0123456789abcdef", "object": "voice", "name": name}


def _config(tmp_path, max_upload_bytes: int) -> dict:
    return {"models": [{"name": "base", "model_type": "base"}], "voices_uri": str(tmp_path / "voices"),
            "max_upload_bytes": max_upload_bytes}


def _wav(seconds: float, sr: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(int(seconds * sr)) * 0.05)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def test_a_chunked_multipart_upload_is_refused_once_it_passes_the_bound(monkeypatch, tmp_path):
    """Review finding: with no Content-Length (chunked), the whole multipart body was read and spooled to disk
    before the 413. Reading now stops at the form's bound (twice the upload limit plus 64 KiB)."""
    limit = 64 * KIB
    _, app = ingress_app(monkeypatch, _config(tmp_path, limit), {"base": Recorder()})
    head = (b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nv\r\n--B\r\n'
            b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\nContent-Type: audio/wav\r\n\r\n')

    def body():
        yield head
        for _ in range(256):                  # 16 MiB in 64 KiB pieces
            yield b"\0" * (64 * KIB)
        yield b"\r\n--B--\r\n"
    status, answer, read = asyncio.run(asgi_call(app, "POST", "/v1/audio/voices",
                                                 {"content-type": "multipart/form-data; boundary=B"}, body()))
    assert status == 413 and json.loads(answer)["error"]["param"] == "body", answer
    assert read <= 2 * limit + 64 * KIB + 64 * KIB, f"read {read} bytes before refusing"


def test_audio_base64_as_a_form_field_has_the_upload_limit(monkeypatch, tmp_path):
    """Review finding: `audio_base64` sent as a form field over 1 MiB (starlette's per-field default) was a 400
    "bad form" although the upload limit allows it. Form fields now get the JSON body's bound, and audio past the
    upload limit is a 413 naming `audio_base64`."""
    limit = 2048 * KIB
    rec = Recorder()
    client, _ = ingress_app(monkeypatch, _config(tmp_path, limit), {"base": rec})
    audio = np.random.default_rng(0).bytes(1536 * KIB)          # 2 MiB of base64: over starlette's default part
    b64 = base64.b64encode(audio).decode()
    fields = {"name": "v", "x_vector_only": "true", "audio_base64": b64}
    with client:
        urlencoded = client.post("/v1/audio/voices", data=fields)
        multipart = client.post("/v1/audio/voices", files={k: (None, v) for k, v in fields.items()})
        over = client.post("/v1/audio/voices", data={**fields, "audio_base64": base64.b64encode(
            audio + b"\0" * (limit - len(audio) + 1)).decode()})
    assert urlencoded.status_code == 201 and multipart.status_code == 201, (urlencoded.text, multipart.text)
    assert rec.audio == [audio, audio]
    assert over.status_code == 413 and over.json()["error"]["param"] == "audio_base64", over.text


def test_a_file_over_the_upload_limit_names_file(monkeypatch, tmp_path):
    client, _ = ingress_app(monkeypatch, _config(tmp_path, 64 * KIB), {"base": Recorder()})
    with client:
        r = client.post("/v1/audio/voices", files={"file": ("a.wav", b"\0" * (64 * KIB + 1), "audio/wav")},
                        data={"name": "v"})
        two = client.post("/v1/audio/voices", files=[("file", ("a.wav", b"RIFF", "audio/wav")),
                                                     ("file", ("b.wav", b"RIFF", "audio/wav"))], data={"name": "v"})
    assert r.status_code == 413 and r.json()["error"]["param"] == "file", r.text
    assert two.status_code == 400 and two.json()["error"]["param"] == "body", two.text


def test_a_file_in_another_field_says_the_audio_goes_in_file(monkeypatch, tmp_path):
    """OpenAI's voices API uploads `audio_sample`; this service's voice upload takes the audio as `file`."""
    client, _ = ingress_app(monkeypatch, _config(tmp_path, 64 * KIB), {"base": Recorder()})
    with client:
        r = client.post("/v1/audio/voices", files={"audio_sample": ("a.wav", b"RIFF", "audio/wav")},
                        data={"name": "v"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "audio_sample" and "'file'" in err["message"], r.text


def test_reference_audio_too_short_for_the_speaker_encoder_is_a_400_naming_the_upload(monkeypatch, tmp_path,
                                                                                       model_factory):
    """Review finding: audio under the speaker encoder's window (53 ms at 24 kHz) was a bare ValueError deep in the
    encoder: HTTP 500. The core refuses it naming `ref_audio` (the Python API's argument); the service names the
    field the client used."""
    from serve.config import ModelConfig
    from serve.replica import ReplicaCore
    from serve.voices import VoiceStore

    model = model_factory("base")
    short = _wav(0.01)
    with pytest.raises(RequestError) as e:
        model.create_voice_clone_prompt(short, None, True)
    assert e.value.field == "ref_audio" and "at least 53.3 ms" in e.value.message, e.value
    with pytest.raises(ValueError, match=r"^ref_audio\[1\]: audio is 25 ms long"):
        model.create_voice_clone_prompt([_wav(1.0), _wav(0.025)], None, True)

    core = ReplicaCore(model, ModelConfig(name="base", model_type="base", max_sessions=1, interactive_reserve=0),
                       VoiceStore.from_uri(str(tmp_path / "voices")))
    client, _ = ingress_app(monkeypatch, _config(tmp_path, 512 * KIB), {"base": core})
    with client:
        by_file = client.post("/v1/audio/voices", files={"file": ("a.wav", short, "audio/wav")},
                              data={"name": "v", "x_vector_only": "true"})
        by_b64 = client.post("/v1/audio/voices", json={"name": "v", "x_vector_only": True,
                                                       "audio_base64": base64.b64encode(short).decode()})
    for r, param in ((by_file, "file"), (by_b64, "audio_base64")):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and err["message"].startswith(f"{param}: audio is 10 ms long"), err


@pytest.mark.parametrize("ctype,body", [
    ("Application/JSON", json.dumps({"name": "v", "x_vector_only": True,
                                     "audio_base64": base64.b64encode(b"RIFF").decode()}).encode()),
    ("APPLICATION/X-WWW-FORM-URLENCODED; Charset=UTF-8", b"name=v&x_vector_only=true&audio_base64=UklGRg%3D%3D"),
    ("Multipart/Form-Data; Boundary=B", b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nv\r\n--B\r\n'
                                        b'Content-Disposition: form-data; name="x_vector_only"\r\n\r\ntrue\r\n--B\r\n'
                                        b'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                                        b'Content-Type: audio/wav\r\n\r\nRIFF\r\n--B--\r\n'),
], ids=["json", "urlencoded", "multipart"])
def test_content_types_are_matched_without_regard_to_case(monkeypatch, tmp_path, ctype, body):
    """Review finding: `Application/JSON` got a 415; media types are case-insensitive (RFC 9110 8.3.1)."""
    rec = Recorder()
    client, _ = ingress_app(monkeypatch, _config(tmp_path, 64 * KIB), {"base": rec})
    with client:
        r = client.post("/v1/audio/voices", content=body, headers={"content-type": ctype})
    assert r.status_code == 201, r.text
    assert rec.audio == [b"RIFF"]
