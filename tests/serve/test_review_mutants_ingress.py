"""Mutation review of the ingress outside tenancy and admission (serve/ingress.py: request parsing, error answers,
response headers and media types, the voices, models, health, metrics and docs routes; serve/app.py;
serve/requests.py): each test here fails on a hand-made mutant that the rest of the non-Ray suite let through (named
in its docstring) and passes on the code as it is. No Ray: the real app in-process (tests/serve/inproc.py) over small
fake replicas and the real voice store on a folder."""

from __future__ import annotations

import asyncio
import base64
import gc
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from ray import serve
from ray.exceptions import ActorDiedError
from starlette.requests import Request

from qwen_tts_core.errors import RequestError
from serve import ingress
from serve.config import ModelConfig
from serve.fetch import FetchTooLarge
from serve.metrics import http_errors
from serve.requests import CALLER, build_request
from serve.voices import VoiceStore, VoiceTooLarge
from tests.serve.inproc import asgi_call, ingress_app
from tests.serve.test_drain_options import _deployment_configs
from tests.serve.test_metrics_compat import TwoReplicas, _ingress_cls, _samples
from tests.serve.test_metrics_compat import _app as metrics_app
from tests.serve.test_voices import _item


class Model:
    """A model's replica: records speech payloads and voice uploads; a speech stream is one piece of audio (`pcm`
    samples) and a clean end; `stats` answers as one replica."""

    def __init__(self, name: str = "cv", kind: str = "custom_voice", speakers: tuple[str, ...] = ("x",),
                 samples: int = 1920) -> None:
        self.name, self.kind, self.speakers, self.samples = name, kind, list(speakers), samples
        self.payloads: list[dict] = []
        self.uploads: list[tuple] = []

    def info(self) -> dict:
        return {"id": self.name, "object": "model", "type": self.kind, "speakers": self.speakers}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.payloads.append(payload)
        yield {"type": "start", "session": f"r1-{len(self.payloads)}"}
        yield {"type": "audio", "pcm": np.full(self.samples, 0.25, np.float32)}
        yield {"type": "end", "status": None, "message": None, "param": None, "finish_reason": "eos",
               "num_frames": 1, "ttfa_s": 0.01}

    def renew(self, sids):
        return []

    async def stats(self):
        return {"replica": "r1", "active_sessions": 0}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        self.uploads.append((audio, ref_text, x_vector_only, name, owner))
        return {"id": "voice_0123456789abcdef", "object": "voice", "name": name, "model": self.name}


def _app(monkeypatch, tmp_path, targets: dict[str, Model], **cfg):
    """(client, the Ingress instance) over `targets`, configured in their order; `stats` asks each model's handle
    once (no Ray: no named actors are listed)."""
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", lambda self, name: [])
    models = [{"name": n, "model_type": t.kind} for n, t in targets.items()]
    client, _ = ingress_app(monkeypatch, {"models": models, "voices_uri": str(tmp_path / "voices"), **cfg}, targets)
    return client, serve.get_replica_context().servable_object


def _error(r) -> tuple[int, str | None]:
    assert r.headers["content-type"] == "application/json", (r.status_code, r.headers, r.text[:200])
    return r.status_code, r.json()["error"]["param"]


# --- speech: what reaches the replica, what the client gets ---------------------------------------------------------
def test_a_request_without_model_goes_to_the_first_configured_model(monkeypatch, tmp_path):
    """H01: with no `model`, the first model of the config serves (README: the default), not the first by name."""
    zz, aa = Model("zz"), Model("aa")
    client, _ = _app(monkeypatch, tmp_path, {"zz": zz, "aa": aa})
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "x", "response_format": "pcm"})
    assert r.status_code == 200, r.text
    assert (len(zz.payloads), len(aa.payloads)) == (1, 0) and zz.payloads[0]["model"] == "zz"


def test_the_replica_gets_the_synthesis_fields_and_not_the_transports(monkeypatch, tmp_path):
    """H05, H06: the payload names the served model (the replica checks it) and carries the caller's scope, but not
    response_format / stream_format / speed, which the ingress applies to the audio itself."""
    m = Model()
    client, _ = _app(monkeypatch, tmp_path, {"cv": m})
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "x", "response_format": "wav",
                                              "stream_format": "audio", "speed": 1.5})
    assert r.status_code == 200, r.text
    payload = m.payloads[-1]
    assert payload["model"] == "cv" and CALLER in payload and payload["input"] == "Hi."
    assert not {"response_format", "stream_format", "speed"} & set(payload), payload


def test_a_streamed_answer_says_not_to_cache_nor_buffer_and_names_its_session(monkeypatch, tmp_path):
    """S10, S11, S12: every speech answer (raw audio and SSE) carries Cache-Control: no-cache, X-Accel-Buffering:
    no (a proxy must pass chunks on at once) and X-Session-Id, the replica's session id (what a support ticket
    quotes, and the key of the replica's logs)."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model()})
    for i, extra in enumerate(({}, {"stream_format": "sse"}), start=1):
        r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "x", "response_format": "pcm", **extra})
        assert r.status_code == 200, r.text
        assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no", r.headers
        assert r.headers["x-session-id"] == f"r1-{i}", r.headers


# --- voices ---------------------------------------------------------------------------------------------------------
def _voices_app(monkeypatch, tmp_path, **cfg):
    """(client, the Base replica, a stored voice id of the no-key caller) with a CustomVoice model of two speakers."""
    uri = str(tmp_path / "voices")
    vid = VoiceStore.from_uri(uri).create(_item(), name="alice", model="base", owner="")["id"]
    base = Model("base", "base", speakers=())
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model("cv", speakers=("ryan", "vivian")), "base": base}, **cfg)
    return client, base, vid


def test_the_voice_list_has_every_builtin_speaker_and_the_stored_voices_marked(monkeypatch, tmp_path):
    """V01, V02, V03: GET /v1/audio/voices lists each model's every speaker as a builtin voice of that model and each
    stored voice as not builtin; GET of one stored voice says builtin false too (V04)."""
    client, _, vid = _voices_app(monkeypatch, tmp_path)
    r = client.get("/v1/audio/voices")
    assert r.status_code == 200 and r.json()["object"] == "list", r.text
    rows = {(v["id"], v.get("model"), v["builtin"]) for v in r.json()["data"]}
    assert {("ryan", "cv", True), ("vivian", "cv", True)} <= rows, rows
    stored = [v for v in r.json()["data"] if v["id"] == vid]
    assert len(stored) == 1 and stored[0]["builtin"] is False, r.json()
    one = client.get(f"/v1/audio/voices/{vid}")
    assert one.status_code == 200 and one.json()["id"] == vid and one.json()["builtin"] is False, one.text


def test_an_unknown_voice_is_a_404_naming_voice_id_for_get_and_delete(monkeypatch, tmp_path):
    """V05, V37, V36: GET and DELETE of a voice id the store does not hold are 404s naming voice_id; a DELETE that
    removed one says so (`deleted: true`), and the voice is gone after it."""
    client, _, vid = _voices_app(monkeypatch, tmp_path)
    unknown = "voice_" + "0" * 16
    assert _error(client.get(f"/v1/audio/voices/{unknown}")) == (404, "voice_id")
    assert _error(client.delete(f"/v1/audio/voices/{unknown}")) == (404, "voice_id")
    r = client.delete(f"/v1/audio/voices/{vid}")
    assert r.status_code == 200 and r.json() == {"id": vid, "object": "voice", "deleted": True}, r.text
    assert _error(client.get(f"/v1/audio/voices/{vid}")) == (404, "voice_id")


def test_a_listed_builtin_speaker_can_be_read_and_is_refused_for_delete(monkeypatch, tmp_path):
    """Found by this review: the voice list shows each model's speakers (id "vivian", builtin), but GET of that id
    was a 404 "no stored voice", and DELETE the same 404, as if the listed voice did not exist. GET now answers the
    list's entry; DELETE is a 400 naming voice_id and the model (a speaker is part of the checkpoint); an id no one
    has stays a 404."""
    client, _, vid = _voices_app(monkeypatch, tmp_path)
    listed = [v for v in client.get("/v1/audio/voices").json()["data"] if v["id"] == "vivian"]
    r = client.get("/v1/audio/voices/vivian")
    assert r.status_code == 200 and [r.json()] == listed and r.json()["builtin"] is True, r.text
    r = client.delete("/v1/audio/voices/vivian")
    assert _error(r) == (400, "voice_id") and "built-in speaker of cv" in r.json()["error"]["message"], r.text
    assert client.get("/v1/audio/voices/vivian").status_code == 200   # still there
    assert _error(client.get("/v1/audio/voices/nobody")) == (404, "voice_id")
    assert _error(client.delete("/v1/audio/voices/nobody")) == (404, "voice_id")


def test_a_created_voice_is_a_201_not_builtin_and_encoded_by_the_first_base_model(monkeypatch, tmp_path):
    """V09, V10, V26: POST /v1/audio/voices answers 201 with the voice, `builtin: false`; with no `model` the first
    configured Base model encodes it; a blank ref_text reaches it as None (V16: x-vector only, not an empty
    transcript)."""
    b1, b2 = Model("zb", "base", speakers=()), Model("ab", "base", speakers=())
    client, _ = _app(monkeypatch, tmp_path, {"zb": b1, "ab": b2})
    audio = b"RIFF0000WAVE"
    r = client.post("/v1/audio/voices", json={"audio_base64": base64.b64encode(audio).decode(), "ref_text": "  ",
                                              "name": "v"})
    assert r.status_code == 201, r.text
    assert r.json()["builtin"] is False and r.json()["id"] == "voice_0123456789abcdef", r.json()
    assert (len(b1.uploads), len(b2.uploads)) == (1, 0)
    assert b1.uploads[0][0] == audio and b1.uploads[0][1] is None, b1.uploads


def test_a_voice_upload_takes_json_under_any_json_media_type_as_speech_does(monkeypatch, tmp_path):
    """Found by this review: the speech route takes application/json and `+json` types (application/vnd.api+json,
    with a charset), the voice upload took application/json only: the same JSON body was a 415 there."""
    b = Model("b", "base", speakers=())
    client, _ = _app(monkeypatch, tmp_path, {"b": b})
    body = json.dumps({"audio_base64": base64.b64encode(b"RIFF0000WAVE").decode(), "name": "v", "ref_text": "Hi."})
    for ctype in ("application/vnd.api+json", "Application/JSON; charset=utf-8"):
        r = client.post("/v1/audio/voices", content=body, headers={"content-type": ctype})
        assert r.status_code == 201, (ctype, r.text)
    assert len(b.uploads) == 2
    r = client.post("/v1/audio/voices", content=body, headers={"content-type": "text/plain"})
    assert _error(r) == (415, "content-type")


def test_audio_base64_as_a_data_url_and_at_the_upload_limit(monkeypatch, tmp_path):
    """V28, V29, V32, V30, V31: a `data:audio/wav;base64,` URL is its base64 part; audio of exactly
    max_upload_bytes is taken and one byte more is a 413 naming audio_base64; base64 that is not (a stray
    character, MIME line breaks) is a 400 naming audio_base64."""
    limit = 3000
    client, base, _ = _voices_app(monkeypatch, tmp_path, max_upload_bytes=limit)
    audio = bytes(range(256)) * 11 + bytes(limit - 256 * 11)

    def post(b64: str):
        return client.post("/v1/audio/voices", json={"audio_base64": b64, "name": "v"})
    r = post("data:audio/wav;base64," + base64.b64encode(audio[:100]).decode())
    assert r.status_code == 201, r.text
    assert base.uploads[-1][0] == audio[:100]
    r = post(base64.b64encode(audio).decode())
    assert r.status_code == 201, r.text
    assert base.uploads[-1][0] == audio
    assert _error(post(base64.b64encode(audio + b"\0").decode())) == (413, "audio_base64")
    assert _error(post("AAAA*AAAA")) == (400, "audio_base64")     # (decoded as AAAAAAAA without validate)
    assert _error(post("AAAA\nAAAA")) == (400, "audio_base64")
    assert len(base.uploads) == 2


# --- errors, health, metrics, docs ----------------------------------------------------------------------------------
def test_every_error_answer_is_counted_by_its_status(monkeypatch, tmp_path):
    """E01: each JSON error answer counts one in qtts_http_errors_total under its status (a dashboard's 4xx/5xx
    rates): a 400 and a 404 here, each seen in /metrics."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model()})
    before = http_errors()
    assert _error(client.post("/v1/audio/speech", json={"input": "Hi.", "model": "nope"})) == (400, "model")
    assert _error(client.get("/v1/models/nope")) == (404, "model_id")
    after = http_errors()
    assert after.get("400", 0) - before.get("400", 0) == 1, (before, after)
    assert after.get("404", 0) - before.get("404", 0) == 1, (before, after)


def test_health_counts_replicas_and_open_streams_and_metrics_is_prometheus_text(monkeypatch, tmp_path):
    """M05, M08, M13, M21: /health gives each model's number of replicas that answered and this ingress's open
    client streams; /metrics is Prometheus text format 0.0.4 (its content type is what scrapers negotiate on) and
    counts the open client streams too."""
    client, _, ing = metrics_app(monkeypatch, tmp_path, {"m": TwoReplicas()}, {"m": ["r1", "r2"]})
    ing.client_streams.opened()
    r = client.get("/health")
    assert r.status_code == 200, r.text
    assert r.json()["models"]["m"]["replicas"] == 2 and r.json()["open_client_streams"] == 1, r.json()
    m = client.get("/metrics")
    assert m.status_code == 200 and m.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert list(_samples(m.text, "qtts_open_client_streams").values()) == [1.0], m.text


def test_docs_point_at_the_openapi_document_under_the_root_path(monkeypatch, tmp_path):
    """M18: behind a path prefix (Serve's route_prefix, a proxy's root_path) /docs loads <root>/openapi.json, not
    /openapi.json of the host's root (another app, or a 404)."""
    _, _ = _app(monkeypatch, tmp_path, {"cv": Model()}, docs_without_key=True)
    with TestClient(ingress.app, root_path="/tts") as client:
        r = client.get("/tts/docs")
    assert r.status_code == 200, r.text
    assert "'/tts/openapi.json'" in r.text or '"/tts/openapi.json"' in r.text, r.text[:2000]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/cv", "/metrics", "/openapi.json", "/docs"])
def test_with_keys_these_routes_need_one_unless_opened(monkeypatch, tmp_path, path):
    """M03, M04, M12, M16, M17: with api_keys set, /v1/models, /v1/models/{id}, /metrics, /openapi.json and /docs
    are 401s naming authorization without a key and served with one; metrics_without_key / docs_without_key open
    them (M14, M15), /health is always open."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model()}, api_keys=["key-a"])
    assert _error(client.get(path)) == (401, "authorization")
    assert client.get(path, headers={"Authorization": "Bearer key-a"}).status_code == 200
    assert client.get("/health").status_code == 200
    if path in ("/metrics", "/openapi.json", "/docs"):
        opened = {"metrics_without_key": True} if path == "/metrics" else {"docs_without_key": True}
        client, _ = _app(monkeypatch, tmp_path, {"cv": Model()}, api_keys=["key-a"], **opened)
        assert client.get(path).status_code == 200


# --- WebSocket (besides keys and admission) -------------------------------------------------------------------------
class Incremental(Model):
    """A model whose incremental session speaks once the client ends its text."""

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.payloads.append(payload)
        self.ended = asyncio.Event()
        yield {"type": "start", "session": "r1-ws"}
        await self.ended.wait()
        yield {"type": "audio", "pcm": np.full(self.samples, 0.25, np.float32)}
        yield {"type": "end", "status": None, "message": None, "param": None, "finish_reason": "eos",
               "num_frames": 1, "ttfa_s": 0.01}

    def feed(self, session, text="", end=False):
        if end:
            self.ended.set()
        return {"chars": len(text)}


def test_a_websocket_session_speaks_in_its_format_and_sends_the_replica_only_synthesis_fields(monkeypatch, tmp_path):
    """W02, W03, W07: the start message names the model, sample rate and `format`; `response_format: wav` sends a
    WAV stream (RIFF header first); the replica's payload has the served model and the caller, not `type` nor
    `response_format`."""
    m = Incremental()
    client, _ = _app(monkeypatch, tmp_path, {"cv": m})
    with client.websocket_connect("/v1/audio/speech/stream") as ws:
        ws.send_json({"type": "config", "voice": "x", "response_format": "wav"})
        start = ws.receive_json()
        assert {k: start.get(k) for k in ("type", "model", "sample_rate", "format", "session")} == {
            "type": "start", "model": "cv", "sample_rate": 24000, "format": "wav", "session": "r1-ws"}, start
        ws.send_json({"type": "text", "text": "Hi."})
        ws.send_json({"type": "end"})
        audio = b""
        while True:
            msg = ws.receive()
            if msg.get("bytes") is not None:
                audio += msg["bytes"]
                continue
            done = json.loads(msg["text"])
            break
    assert done["type"] == "done", done
    assert audio[:4] == b"RIFF" and audio[8:12] == b"WAVE", audio[:16]
    payload = m.payloads[-1]
    assert payload["model"] == "cv" and CALLER in payload and not {"type", "response_format"} & set(payload), payload


def test_an_unexpected_error_is_a_500_internal_error_naming_no_field(monkeypatch, tmp_path):
    """E14: a bug or storage failure inside a handler is a 500 `server_error` "internal error (<type>)" (not a 502,
    which tells the client the model replica failed and to retry), counted under 500."""
    client, ing = _app(monkeypatch, tmp_path, {"cv": Model()})

    def broken(scope):
        raise RuntimeError("disk gone")
    monkeypatch.setattr(ing.voices, "list", broken)
    before = http_errors().get("500", 0)
    r = client.get("/v1/audio/voices")
    assert _error(r) == (500, None)
    assert r.json()["error"]["type"] == "server_error" and "RuntimeError" in r.json()["error"]["message"], r.text
    assert "disk gone" not in r.text
    assert http_errors().get("500", 0) == before + 1


def test_health_and_metrics_answer_when_the_replicas_cannot_be_listed(monkeypatch, tmp_path):
    """Defect found in this review: /health and /metrics list a model's replicas through Ray's GCS
    (`_replica_ids`) unguarded and unbounded, so a GCS that fails to answer made /health a 500 (documented: 200 or
    503) and every /metrics scrape a 500 (the ingress's own error counters lost with it), and one that hangs held
    them. As `_other_replicas` already does, the listing is bounded by stats_timeout_s and its failure falls back to
    asking the model's handle (one replica, as outside Ray)."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model()})

    def gcs_down(self, name):
        raise ConnectionError("GCS unavailable")
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", gcs_down)
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["models"]["cv"]["status"] == "ok", r.text
    assert client.get("/metrics").status_code == 200


# --- speech: failover and a client that leaves before the first audio ----------------------------------------------
class Stalls(Model):
    """Call i (1-based) as `plan[i]` says: "die" (the replica died opening it), "stall" (its session opened, then
    no audio ever comes), "hang" (no answer at all), else one piece of audio and a clean end."""

    def __init__(self, plan: dict[int, str]) -> None:
        super().__init__()
        self.plan, self.calls, self.waiting = plan, 0, asyncio.Event()

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.calls += 1
        step = self.plan.get(self.calls)
        if step == "die":
            raise ActorDiedError()
        if step == "hang":
            self.waiting.set()
            await asyncio.Event().wait()
        yield {"type": "start", "session": f"r1-{self.calls}"}
        if step == "stall":
            self.waiting.set()
            await asyncio.Event().wait()
        async for item in super().stream(payload, incremental, lease, consumer):
            if item["type"] != "start":
                yield item


def _speech_call(app, **body):
    payload = json.dumps({"input": "Hi.", "voice": "x", "response_format": "pcm", **body}).encode()
    return asgi_call(app, "POST", "/v1/audio/speech", {"content-type": "application/json"}, [payload])


def test_a_failover_that_no_replica_takes_within_failover_wait_s_is_a_502(monkeypatch, tmp_path):
    """S03: the retry after a lost replica waits at most failover_wait_s for another replica to take the request;
    past it the client gets a 502 (retry), not a request held for as long as the hung call lasts."""
    rep = Stalls({1: "die", 2: "hang"})
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", lambda self, name: [])
    _, app = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "failover_retries": 1, "failover_wait_s": 0.2},
                         {"cv": rep})
    status, body, _ = asyncio.run(asyncio.wait_for(_speech_call(app), 20))
    assert status == 502 and json.loads(body)["error"]["code"] == "502", body
    assert rep.calls == 2


def test_a_client_that_leaves_before_the_first_audio_closes_its_replica_stream(monkeypatch, tmp_path):
    """S08: a speech request cancelled (its client left) while it waits for the first audio closes its replica
    stream: its lease is dropped (so the replica's session lapses instead of being renewed for nobody) and its open
    stream and the key's place are given back."""
    rep = Stalls({1: "stall"})
    client, ing = _app(monkeypatch, tmp_path, {"cv": rep})
    async def main():
        call = asyncio.ensure_future(_speech_call(ingress.app))
        await rep.waiting.wait()
        await asyncio.sleep(0)
        assert len(ing.leases) == 1 and ing.client_streams.count == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    asyncio.run(main())
    assert len(ing.leases) == 0 and ing.client_streams.count == 0


def test_an_answer_dropped_before_its_body_starts_still_closes_its_stream(monkeypatch, tmp_path):
    """S17: a speech answer whose body never runs (the server drops the response: its client left as the headers
    were to go out) still closes its replica stream when the body is collected: the lease is dropped and the open
    stream and the key's place are given back, not left renewed and counted for as long as the ingress lives."""
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})
    body = json.dumps({"input": "Hi.", "voice": "x", "response_format": "pcm"}).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/audio/speech", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def main():
        response = await ing.speech(Request(scope, receive))
        assert response.status_code == 200 and len(ing.leases) == 1 and ing.client_streams.count == 1
        del response
        gc.collect()
    asyncio.run(main())
    assert len(ing.leases) == 0 and ing.client_streams.count == 0


def test_a_voice_too_large_to_store_is_a_413_naming_where_the_audio_came_from(monkeypatch, tmp_path):
    """V17 (V18): the store's VoiceTooLarge (a RequestError whose `status` is 413), raised in the replica's
    create_voice, reaches the client as a 413 naming the upload's audio field (here audio_base64), not a 400."""
    client, base, _ = _voices_app(monkeypatch, tmp_path)

    def too_large(*args, **kwargs):
        raise VoiceTooLarge("ref_audio", "the voice prompt file would be too large")
    monkeypatch.setattr(base, "create_voice", too_large)
    r = client.post("/v1/audio/voices", json={"audio_base64": base64.b64encode(b"RIFF").decode(), "name": "v"})
    assert _error(r) == (413, "audio_base64")


def test_an_upload_that_finds_its_key_over_the_limit_after_the_write_is_a_429(monkeypatch, tmp_path):
    """V19: the count taken in the store after the write decides (uploads through other ingress replicas race):
    one voice over max_voices_per_key is a 429 naming `name`, with Retry-After."""
    client, _, _ = _voices_app(monkeypatch, tmp_path, max_voices_per_key=3, api_keys=["key-a"])
    ing = serve.get_replica_context().servable_object
    key = {"Authorization": "Bearer key-a"}
    body = {"audio_base64": base64.b64encode(b"RIFF").decode(), "name": "v"}
    monkeypatch.setattr(ing.voices, "keep_within", lambda voice_id, owner, limit: limit + 1)
    r = client.post("/v1/audio/voices", json=body, headers=key)
    assert _error(r) == (429, "name") and r.headers["retry-after"] == "1", r.headers
    monkeypatch.setattr(ing.voices, "keep_within", lambda voice_id, owner, limit: limit)
    r = client.post("/v1/audio/voices", json=body, headers=key)
    assert r.status_code == 201, r.text


def test_a_refused_audio_url_keeps_its_status_and_names_audio_url(monkeypatch, tmp_path):
    """V34: a fetch of `audio_url` refused for its size is a 413 naming audio_url (not a 400): the status the fetcher
    chose reaches the client, whatever the refusal."""
    client, base, _ = _voices_app(monkeypatch, tmp_path, allowed_audio_url_prefixes=["http://127.0.0.1:9/ok/"])

    async def too_large(url, allow, max_bytes):
        raise FetchTooLarge(f"larger than {max_bytes} bytes")
    # (the class Serve wraps is a copy, pickled by value: its methods have their own module globals)
    monkeypatch.setitem(_ingress_cls()._fetch.__globals__, "fetch_allowed", too_large)
    r = client.post("/v1/audio/voices", json={"audio_url": "http://127.0.0.1:9/ok/a.wav", "name": "v"})
    assert _error(r) == (413, "audio_url") and base.uploads == []


def test_health_is_a_503_when_any_model_has_no_replica_answering(monkeypatch, tmp_path):
    """M06: /health is ok only when every model has a replica answering: one model down of two is a 503
    `degraded` naming that model's error (the other stays ok in the body)."""
    class Down(Model):
        async def stats(self):
            raise RuntimeError("no replica")

    client, _ = _app(monkeypatch, tmp_path, {"cv": Model(), "down": Down("down")})
    r = client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded", r.text
    assert r.json()["models"]["cv"]["status"] == "ok" and r.json()["models"]["down"]["status"] == "error", r.text


class GatedStats(Model):
    """A model whose `stats` calls wait until `release` is set (counted in `calls`; `asked` is set by each)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls, self.asked, self.release = 0, asyncio.Event(), asyncio.Event()

    async def stats(self):
        self.calls += 1
        self.asked.set()
        await self.release.wait()
        return {"replica": "r1", "active_sessions": 0}


def test_a_health_round_in_flight_is_shared_and_outlives_a_probe_that_leaves(monkeypatch, tmp_path):
    """M10, M11: probes that come while a round of `stats` runs share it, even past health_cache_s (a slow replica
    must not get one call per probe), and a probe that leaves (cancelled) does not cancel the round the others
    wait on."""
    target = GatedStats()
    _, ing = _app(monkeypatch, tmp_path, {"cv": target})
    ing.health_cache_s = -1.0                     # every finished round is stale at once

    async def main():
        first = asyncio.ensure_future(asgi_call(ingress.app, "GET", "/health", {}, []))
        await target.asked.wait()
        others = [asyncio.ensure_future(asgi_call(ingress.app, "GET", "/health", {}, [])) for _ in range(3)]
        for _ in range(20):                       # (yields, no wait: each probe runs until it awaits the round)
            await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        target.release.set()
        return await asyncio.gather(*others)
    answers = asyncio.run(main())
    assert [status for status, _, _ in answers] == [200] * 3, answers
    assert target.calls == 1, target.calls


def test_a_declared_body_of_exactly_max_body_bytes_is_read(monkeypatch, tmp_path):
    """J02: a speech body whose Content-Length is exactly max_body_bytes is taken (200); one byte more is a 413
    naming body, refused on the declared length."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Model()}, max_body_bytes=4096)
    text = json.dumps({"input": "Hi.", "voice": "x", "response_format": "pcm"})
    exact = text.ljust(4096).encode()
    r = client.post("/v1/audio/speech", content=exact, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    r = client.post("/v1/audio/speech", content=exact + b" ", headers={"content-type": "application/json"})
    assert _error(r) == (413, "body")


def test_a_json_content_length_that_is_no_number_is_a_400_naming_it(monkeypatch, tmp_path):
    """J10: on the JSON path too (speech), a Content-Length that is no number is a 400 naming content-length, not
    taken as absent."""
    _app(monkeypatch, tmp_path, {"cv": Model()})
    body = json.dumps({"input": "Hi.", "voice": "x", "response_format": "pcm"}).encode()
    status, answer, _ = asyncio.run(asgi_call(ingress.app, "POST", "/v1/audio/speech",
                                              {"content-type": "application/json", "content-length": "12abc"},
                                              [body]))
    assert (status, json.loads(answer)["error"]["param"]) == (400, "content-length"), answer


def test_a_websocket_that_never_sends_its_config_gets_a_408_after_ws_idle_timeout_s(monkeypatch, tmp_path):
    """W01: the config message is awaited at most ws_idle_timeout_s; then the session ends with a 408 error naming
    `message` (close 1008), and its open stream is given back: a socket never sending it does not hold a place."""
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()}, ws_idle_timeout_s=0.05)
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    out: list[dict] = []

    async def send(message):
        out.append(message)
    asyncio.run(asyncio.wait_for(ingress.app(_ws_scope(), inbox.get, send), 20))
    errors = [json.loads(m["text"]) for m in out if m["type"] == "websocket.send"]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "408" and errors[0]["error"]["param"] == "message"
    assert out[-1]["type"] == "websocket.close" and out[-1]["code"] == 1008, out[-1]
    assert ing.client_streams.count == 0


def _ws_scope() -> dict:
    return {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
            "path": "/v1/audio/speech/stream", "raw_path": b"/v1/audio/speech/stream", "query_string": b"",
            "root_path": "", "headers": [(b"host", b"testserver")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80), "subprotocols": []}


@pytest.mark.parametrize("message, status, param", [
    ({"text": "no type"}, "400", "type"),
    ({"type": "text", "text": "x" * 3000}, "413", "message"),
], ids=["no-type", "too-large"])
def test_a_websocket_message_without_type_or_over_max_body_bytes_ends_the_session_naming_it(
        monkeypatch, tmp_path, message, status, param):
    """W10, W12: after the config, a message larger than max_body_bytes is a 413 naming message (and a message with
    no `type` a 400 naming type); either ends the session with that one error, before any audio."""
    client, _ = _app(monkeypatch, tmp_path, {"cv": Incremental()}, max_body_bytes=1024)
    with client.websocket_connect("/v1/audio/speech/stream") as ws:
        ws.send_json({"type": "config", "voice": "x"})
        assert ws.receive_json()["type"] == "start"
        ws.send_json(message)
        ws.send_json({"type": "end"})            # (a session that took the message would end with audio, not hang)
        err = ws.receive_json()
    assert err["type"] == "error" and (err["error"]["code"], err["error"]["param"]) == (status, param), err


def test_a_websocket_client_that_leaves_before_its_config_ends_the_session_quietly(monkeypatch, tmp_path, caplog):
    """W14: a client gone before sending its config ends the session without an error raised out of the app (nor
    logged), and its open stream is given back."""
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1001})

    async def send(message):
        pass
    asyncio.run(asyncio.wait_for(ingress.app(_ws_scope(), inbox.get, send), 20))
    assert ing.client_streams.count == 0
    assert "Traceback" not in caplog.text


def test_a_full_replica_sends_the_request_to_another_one_with_room(monkeypatch, tmp_path):
    """T02: when the replica Serve chose is full (503 naming itself), the other replicas of the model are asked
    before the client gets a 503: the request is served."""
    class FullOnce(Model):
        async def stream(self, payload, incremental=False, lease=False, consumer=None):
            if not self.payloads:
                self.payloads.append(None)
                yield {"type": "error", "status": 503, "message": "replica full", "param": None, "retry_after": 1,
                       "replica": "r1"}
                return
            async for item in super().stream(payload, incremental, lease, consumer):
                yield item

    rep = FullOnce()
    client, ing = _app(monkeypatch, tmp_path, {"cv": rep})
    ing.replica_list_s = float("inf")
    ing._replica_list["cv"] = (0.0, ["r1", "r2"])      # as listed from Ray: the full one and another
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "x", "response_format": "pcm"})
    assert r.status_code == 200, r.text
    assert len(rep.payloads) == 2


# --- serve/app.py ---------------------------------------------------------------------------------------------------
def test_the_ingress_queue_is_bounded_by_the_config():
    """A07: the ingress deployment's max_queued_requests is ingress_max_queued_requests (Serve's default is
    unbounded: requests piled up behind held connections and /health went unanswered)."""
    configs = _deployment_configs({"ingress_max_queued_requests": 77})
    assert configs["ingress"].max_queued_requests == 77


# --- serve/requests.py ----------------------------------------------------------------------------------------------
def test_false_and_zero_sampling_values_reach_the_engine_and_the_text_cap_holds(model_factory):
    """R05, R06: `do_sample: false` (greedy decoding) is what the client asked for, not "absent, so the default
    (true)"; a text over the model's max_input_chars is refused naming text."""
    model = model_factory("custom_voice")
    speaker = model.get_supported_speakers()[0]
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_new_tokens=8, max_input_chars=20)
    req = build_request(model, cfg, {"input": "Hi.", "voice": speaker, "do_sample": False,
                                     "subtalker_dosample": False})
    assert req.sampling.do_sample is False and req.sampling.subtalker_dosample is False, req.sampling
    with pytest.raises(RequestError) as e:
        build_request(model, cfg, {"input": "x" * 21, "voice": speaker})
    assert e.value.field == "text"


def test_synthesize_bulk_refuses_an_unknown_model_as_a_request_error_naming_model(monkeypatch, tmp_path):
    """B02: a caller of the app handle (the core's error types, not HTTP ones) gets a RequestError naming `model`
    for a model that is not served, as for any other field."""
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})
    with pytest.raises(RequestError) as e:
        asyncio.run(ing.synthesize_bulk({"model": "nope", "input": "Hi."}))
    assert e.value.field == "model"
