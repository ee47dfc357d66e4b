"""Errors name the right field and never echo a huge input, through the real app in-process (tests/serve/inproc.py,
no Ray)."""

from __future__ import annotations

from qwen_tts_core.errors import ECHO_CHARS, RequestError
from tests.serve.inproc import ingress_app


class Base:
    """A Base model's replica whose encoder refuses empty audio as the core does."""

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        if not audio:
            raise RequestError("ref_audio", "audio bytes is empty")
        return {"id": "voice_0123456789abcdef", "object": "voice", "name": name}


def _client(monkeypatch, tmp_path):
    return ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}],
                                     "voices_uri": str(tmp_path / "voices")}, {"base": Base()})[0]


def test_empty_audio_base64_is_named(monkeypatch, tmp_path):
    """Review finding (tenancy 5): an empty `audio_base64` ("" is falsy) got an error naming `audio_url`."""
    client = _client(monkeypatch, tmp_path)
    with client:
        for r in (client.post("/v1/audio/voices", json={"name": "v", "audio_base64": ""}),
                  client.post("/v1/audio/voices", data={"name": "v", "audio_base64": ""})):
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (400, "audio_base64"), err
            assert err["message"].startswith("audio_base64: ")


def test_an_unknown_model_is_not_echoed_in_full(monkeypatch, tmp_path):
    """Review finding (tenancy 6): an unknown `model` of 100k characters came back whole in the error (a 100 KB
    body); it is shown cut (errors.shown, ECHO_CHARS) like the other echoed values, on HTTP and on the WebSocket."""
    client = _client(monkeypatch, tmp_path)
    name = "m" * 100_000
    with client:
        r = client.post("/v1/audio/speech", json={"model": name, "input": "Hi."})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert len(r.content) < 500 and "m" * 10 in r.text and "m" * 41 not in r.text, r.text[:200]
        with client.websocket_connect("/v1/audio/speech/stream") as ws:
            ws.send_json({"type": "config", "model": name})
            err = ws.receive_json()["error"]
            assert err["param"] == "model" and len(err["message"]) < 300, err["message"][:200]


def test_an_unknown_field_name_is_not_echoed_in_full(monkeypatch, tmp_path):
    """Found by the WebSocket fuzz (test_ws_fuzz.py): a field the schema does not have, named with 50k characters,
    came back twice in full (as `param` and in the message: a 100 KB error). Its name is cut to ECHO_CHARS, on every
    body the service validates: speech, voice upload, WebSocket config and text messages."""
    client = _client(monkeypatch, tmp_path)
    key = "k" * 50_000
    with client:
        for path, body in (("/v1/audio/speech", {"model": "base", "input": "Hi.", key: 1}),
                           ("/v1/audio/voices", {"name": "v", "audio_base64": "AAAA", key: 1})):
            r = client.post(path, json=body)
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == "k" * ECHO_CHARS, (path, r.text[:200])
            assert len(r.content) < 500, (path, len(r.content))
        with client.websocket_connect("/v1/audio/speech/stream") as ws:
            ws.send_json({"type": "config", "model": "base", key: 1})
            err = ws.receive_json()["error"]
            assert err["param"] == "k" * ECHO_CHARS and len(err["message"]) < 300, err["message"][:200]


def test_a_key_pydantic_cannot_read_names_the_body(monkeypatch, tmp_path):
    """Review finding: an unknown key holding a lone surrogate gave pydantic an error with no location, answered with
    `param: null` (every other body error names a field). It names the body, or the message on the WebSocket."""
    client = _client(monkeypatch, tmp_path)
    with client:
        for path, body in (("/v1/audio/speech", '{"model": "base", "input": "Hi.", "bo\\ud800gus": 1}'),
                           ("/v1/audio/voices", '{"name": "v", "audio_base64": "AAAA", "\\udfff": 1}')):
            r = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (400, "body"), (path, err)
            assert err["message"].startswith("body: "), err
        with client.websocket_connect("/v1/audio/speech/stream") as ws:
            ws.send_text('{"type": "config", "model": "base", "bo\\ud800gus": 1}')
            err = ws.receive_json()["error"]
            assert err["param"] == "message" and err["message"].startswith("message: "), err


class Gone:
    """A replica that died (or whose queue is full) under the one-shot calls: info and create_voice."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def info(self) -> dict:
        raise self.exc

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        raise self.exc


def test_a_dead_or_full_replica_under_one_shot_calls_is_502_or_503_not_500(monkeypatch, tmp_path):
    """GET /v1/models and POST /v1/audio/voices call the replica once: its death was a logged 500 "internal error"
    (the streams already said 502), and a full queue a 500 too (the streams: 503 with Retry-After)."""
    from ray.exceptions import ActorDiedError
    from ray.serve.exceptions import BackPressureError

    for exc, status in ((ActorDiedError(), 502), (BackPressureError(num_queued_requests=9, max_queued_requests=8),
                                                  503)):
        client = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}],
                                           "voices_uri": str(tmp_path / "voices")}, {"base": Gone(exc)})[0]
        with client:
            for r in (client.get("/v1/models"), client.get("/v1/models/base"),
                      client.post("/v1/audio/voices", json={"name": "v", "x_vector_only": True,
                                                            "audio_base64": "UklGRg=="})):
                assert r.status_code == status, (type(exc).__name__, r.request.url, r.text)
                assert "error" in r.json()
                if status == 503:
                    assert r.headers["Retry-After"] == "1"
