"""Review findings (compat): OpenAI-client interop of the speech and models routes, and the API's OpenAPI document.
The real ingress in-process (inproc.py) over a small fake replica; no Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.serve.inproc import ingress_app


class Speaks:
    """A CustomVoice model that records payloads and sends one piece of audio, then a clean end (`end` extra keys)."""

    def __init__(self, **end) -> None:
        self.payloads: list[dict] = []
        self.end = end

    def info(self):
        return {"id": "cv", "object": "model", "type": "custom_voice", "speakers": ["x"]}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.payloads.append(payload)
        yield {"type": "start", "session": "r1-abc"}
        yield {"type": "audio", "pcm": np.zeros(1920, np.float32)}
        yield {"type": "end", "status": None, "message": None, "param": None, "finish_reason": "eos",
               "num_frames": 1, "ttfa_s": 0.01, **self.end}

    def renew(self, sids):
        return []


def _client(monkeypatch, tmp_path, target):
    return ingress_app(monkeypatch, {"models": [{"name": "cv", "model_type": "custom_voice"}],
                                     "voices_uri": str(tmp_path / "voices")}, {"cv": target})[0]


def test_voice_as_an_object_with_an_id(monkeypatch, tmp_path):
    """Finding 2: OpenAI documents `voice: {"id": "voice_1234"}` for custom voices (openai-python: str | VoiceID);
    it was a 400 "voice: Input should be a valid string". It is the same as the id as a string now; other shapes
    get one message naming `voice` and the accepted forms."""
    fake = Speaks()
    client = _client(monkeypatch, tmp_path, fake)
    body = {"model": "cv", "input": "Hi.", "response_format": "pcm"}
    r = client.post("/v1/audio/speech", json={**body, "voice": {"id": "voice_0123456789abcdef"}})
    assert r.status_code == 200, r.text
    assert fake.payloads[-1]["voice"] == "voice_0123456789abcdef"
    for bad in ({"name": "x"}, {"id": 3}, {"id": "v", "extra": 1}, 5, ["x"]):
        r = client.post("/v1/audio/speech", json={**body, "voice": bad})
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (400, "voice"), (bad, r.text)
        assert '{"id": "<voice id>"}' in err["message"], err


def test_every_response_format_of_the_openai_client_is_served(monkeypatch, tmp_path):
    """openai-python's `response_format` Literal lists the formats OpenAI serves (mp3, opus, aac, flac, wav, pcm);
    `aac` was a 400. Each is a 200 with its media type and a body FFmpeg decodes (pcm: the raw samples)."""
    import typing

    from openai.types.audio.speech_create_params import SpeechCreateParams

    from tests.serve.helpers import decode_audio

    formats = typing.get_args(typing.get_type_hints(SpeechCreateParams)["response_format"])
    assert {"mp3", "opus", "aac", "flac", "wav", "pcm"} <= set(formats)
    client = _client(monkeypatch, tmp_path, Speaks())
    types = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
             "pcm": "audio/pcm"}
    for fmt in formats:
        r = client.post("/v1/audio/speech", json={"model": "cv", "voice": "x", "input": "Hi.", "response_format": fmt})
        assert r.status_code == 200, (fmt, r.text)
        assert r.headers["content-type"] == types[fmt], (fmt, r.headers["content-type"])
        y, _ = decode_audio(r.content, fmt)
        assert len(y) >= 1920, (fmt, len(y))


def test_sse_done_event_sends_usage_only_when_the_replica_counts_text_tokens(monkeypatch, tmp_path):
    """Finding 6: OpenAI's SpeechAudioDoneEvent requires `usage`. The ingress cannot count text tokens (no
    tokenizer), so it sends `usage` when the end item carries `text_tokens`, and never an invented count."""
    body = {"model": "cv", "voice": "x", "input": "Hi.", "response_format": "pcm", "stream_format": "sse"}

    def done(fake):
        r = _client(monkeypatch, tmp_path, fake).post("/v1/audio/speech", json=body)
        return json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))

    counted = done(Speaks(text_tokens=5))
    assert counted["type"] == "speech.audio.done" and counted["finish_reason"] == "eos"
    assert counted["usage"] == {"input_tokens": 5, "output_tokens": 1, "total_tokens": 6}
    assert "usage" not in done(Speaks())


def test_openapi_documents_the_speech_and_voice_bodies(monkeypatch, tmp_path):
    """Finding 8: the handlers read their bodies themselves, so /openapi.json (and /docs) showed no request body for
    /v1/audio/speech or /v1/audio/voices. They are declared now, every $ref resolving inside the document."""
    spec = _client(monkeypatch, tmp_path, Speaks()).get("/openapi.json").json()
    speech = spec["paths"]["/v1/audio/speech"]["post"]["requestBody"]
    props = speech["content"]["application/json"]["schema"]["properties"]
    assert speech["required"] and {"input", "voice", "response_format", "speed", "instructions"} <= set(props)
    voices = spec["paths"]["/v1/audio/voices"]["post"]["requestBody"]["content"]
    assert voices["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert {"name", "audio_base64"} <= set(voices["application/json"]["schema"]["properties"])
    refs = []

    def walk(x):
        if isinstance(x, dict):
            refs.extend(v for k, v in x.items() if k == "$ref")
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
    walk(spec)
    assert "#/components/schemas/VoiceRef" in refs
    for ref in refs:
        assert ref.removeprefix("#/components/schemas/") in spec["components"]["schemas"], ref


def test_get_one_model(monkeypatch, tmp_path):
    """Finding 10: `client.models.retrieve("cv")` got 404 "no such endpoint"; GET /v1/models/{id} answers now."""
    client = _client(monkeypatch, tmp_path, Speaks())
    r = client.get("/v1/models/cv")
    assert r.status_code == 200 and r.json()["id"] == "cv" and r.json()["object"] == "model", r.text
    r = client.get("/v1/models/nope")
    assert (r.status_code, r.json()["error"]["param"]) == (404, "model_id"), r.text


@pytest.mark.parametrize("n, status", [(2000, 200), (2001, 400)])
def test_instructions_limit_is_the_documented_one(monkeypatch, tmp_path, n, status):
    """Finding 7: the limit (2000 characters; OpenAI allows 4096) lives in schemas.MAX_INSTRUCTIONS_CHARS and
    serve/README states it."""
    from pathlib import Path

    from serve.schemas import MAX_INSTRUCTIONS_CHARS

    assert MAX_INSTRUCTIONS_CHARS == 2000
    readme = (Path(__file__).parents[2] / "serve" / "README.md").read_text()
    assert f"`instructions` at most {MAX_INSTRUCTIONS_CHARS} characters" in readme
    r = _client(monkeypatch, tmp_path, Speaks()).post(
        "/v1/audio/speech", json={"model": "cv", "voice": "x", "input": "Hi.", "instructions": "i" * n})
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json()["error"]["param"] == "instructions"


def test_null_for_an_optional_field_means_its_default(monkeypatch, tmp_path):
    """Clients that serialize unset options as null (`"speed": null`, `"response_format": null`) got a 400; null now
    means the field's default. A required field stays required, and an unknown field stays refused."""
    fake = Speaks()
    client = _client(monkeypatch, tmp_path, fake)
    nulls = {"response_format": None, "stream_format": None, "speed": None, "seed": None, "instructions": None,
             "language": None, "priority": None, "non_streaming_mode": None, "temperature": None}
    r = client.post("/v1/audio/speech", json={"model": "cv", "voice": "x", "input": "Hi.", **nulls})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg"  # the default format
    sent = fake.payloads[-1]
    assert (sent["priority"], sent["non_streaming_mode"], sent["seed"], sent["temperature"]) == \
           ("interactive", False, None, None)
    for body, param in (({"model": "cv", "voice": "x", "input": None}, "input"),
                        ({"model": "cv", "voice": "x", "input": "Hi.", "bogus": None}, "bogus")):
        r = client.post("/v1/audio/speech", json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (400, param), r.text


def test_openapi_documents_the_answers_the_service_gives(monkeypatch, tmp_path):
    """Client generators and fuzzers read /openapi.json: it documented a 422 the service never sends (validation
    errors are 400s), no error answer at all (each is an `ErrorResponse`), JSON as the speech and metrics answers'
    type, and the HTML pages as API operations. Each documented error is checked against a real answer here."""
    client = _client(monkeypatch, tmp_path, Speaks())
    spec = client.get("/openapi.json").json()
    assert spec["paths"].keys() == {"/v1/audio/speech", "/v1/audio/voices", "/v1/audio/voices/{voice_id}",
                                    "/v1/models", "/v1/models/{model_id}", "/health", "/metrics"}
    assert not {"HTTPValidationError", "ValidationError"} & spec["components"]["schemas"].keys()
    error_ref = {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for status, doc in op["responses"].items():
                if int(status) >= 400 and path != "/health":
                    assert doc["content"] == {"application/json": error_ref}, (method, path, status)
    speech = spec["paths"]["/v1/audio/speech"]["post"]["responses"]
    assert set(speech["200"]["content"]) == {"audio/mpeg", "audio/wav", "audio/flac", "audio/ogg", "audio/pcm",
                                             "audio/aac", "text/event-stream"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    detail = spec["components"]["schemas"]["ErrorDetail"]
    assert set(detail["required"]) == {"message", "type", "param", "code"}

    answers = {  # (method, path, body) -> an answer the document must list for that operation
        ("post", "/v1/audio/speech", '{"model": "cv", "voice": "x", "input": "Hi.", "response_format": "m4a"}'): 400,
        ("post", "/v1/audio/voices", "x"): 415,
        ("get", "/v1/audio/voices/{voice_id}", None): 404,
        ("delete", "/v1/audio/voices/{voice_id}", None): 404,
        ("get", "/v1/models/{model_id}", None): 404,
    }
    for (method, path, body), status in answers.items():
        r = client.request(method.upper(), path.format(voice_id="nope", model_id="nope"), content=body,
                           headers={"content-type": "application/json" if body and body != "x" else "text/plain"})
        assert r.status_code == status, (method, path, r.text)
        assert str(status) in spec["paths"][path][method]["responses"], (method, path, status)
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == set(detail["properties"])


@pytest.mark.parametrize(("method", "path", "allowed"), [
    ("OPTIONS", "/v1/audio/voices/v1", "DELETE, GET"),
    ("PUT", "/v1/audio/voices", "GET, POST"),
    ("GET", "/v1/audio/speech", "POST"),
])
def test_a_405_names_every_method_of_the_path(monkeypatch, tmp_path, method, path, allowed):
    """RFC 9110: a 405's Allow lists the methods the resource takes. Starlette listed the first matching route's
    only: `GET` for /v1/audio/voices/{id}, which takes DELETE too."""
    r = _client(monkeypatch, tmp_path, Speaks()).request(method, path)
    assert (r.status_code, r.json()["error"]["param"]) == (405, "method"), r.text
    assert r.headers.get_list("allow") == [allowed]


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/v1/audio/speech/"), ("GET", "/v1/audio/voices/"), ("DELETE", "/v1/audio/voices/"),
    ("GET", "/v1/models/"), ("GET", "/v1/models/cv/"), ("GET", "/health/"),
])
def test_a_trailing_slash_is_the_apis_404_not_a_redirect(monkeypatch, tmp_path, method, path):
    """Starlette's redirect_slashes answered `POST /v1/audio/speech/` with a bare 307 and an empty body (not the
    API's error shape), before the key check, its Location built from the client's Host header. It is the API's
    404 naming `path` now, like any unknown path, with or without a key."""
    for keys in ([], ["k-0123456789"]):
        client = ingress_app(monkeypatch, {"models": [{"name": "cv", "model_type": "custom_voice"}],
                                           "voices_uri": str(tmp_path / "voices"), "api_keys": keys},
                             {"cv": Speaks()})[0]
        r = client.request(method, path, json={"input": "Hi."} if method == "POST" else None,
                           headers={"host": "evil.example"}, follow_redirects=False)
        assert (r.status_code, r.json()["error"]["param"]) == (404, "path"), (keys, r.status_code, r.text)
        assert "location" not in r.headers


def test_openapi_declares_the_bearer_key_only_where_keys_are_set(monkeypatch, tmp_path):
    """With API keys the document names the bearer scheme on every operation that checks a key (/docs then offers
    "Authorize"); /health never needs one, /metrics not with metrics_without_key; without keys nothing is declared."""
    from tests.serve.inproc import ingress_app

    def spec(**cfg):
        client = ingress_app(monkeypatch, {"models": [{"name": "cv", "model_type": "custom_voice"}],
                                           "voices_uri": str(tmp_path / "voices"), "docs_without_key": True, **cfg},
                             {"cv": Speaks()})[0]
        return client.get("/openapi.json").json()

    def secured(s):
        return {p for p, ops in s["paths"].items() for op in ops.values() if op.get("security") == [{"apiKey": []}]}

    plain = spec()
    assert "securitySchemes" not in plain["components"] and not secured(plain)
    keyed = spec(api_keys=["k-0123456789"])
    assert keyed["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": "an API key (api_keys, QTTS_API_KEYS)"}
    assert secured(keyed) == set(keyed["paths"]) - {"/health"}
    assert secured(spec(api_keys=["k-0123456789"], metrics_without_key=True)) == set(keyed["paths"]) - {
        "/health", "/metrics"}
    assert "securitySchemes" not in spec()["components"]  # the cached document was not changed
