"""Mutation review of the ingress, second part (serve/ingress.py, serve/app.py, serve/requests.py): the mutants the
first part (test_review_mutants_ingress.py) wrote but never ran, brought up to the code on main, and a few more
(E01..: the replica listing, /health's numbers, the built-in speakers' voice routes). Each test here fails on a
hand-made mutant that the rest of the non-Ray suite let through (named in its docstring) and passes on the code as it
is. No Ray: the real app in-process (tests/serve/inproc.py) over the small fake replicas of the first part."""

from __future__ import annotations

import asyncio
import base64
import json
import threading

import pytest

from qwen_tts_core.errors import RequestError
from serve import ingress
from serve.app import build_app
from serve.config import ModelConfig, ServiceConfig
from serve.metrics import http_errors
from serve.requests import (
    build_request,
    load_model,
    model_info,
    render_settings,
    resolve_checkpoint,
)
from tests.serve.inproc import asgi_call
from tests.serve.test_drain_options import _deployment_configs
from tests.serve.test_metrics_compat import _ingress_cls
from tests.serve.test_review_mutants_ingress import Model, _app, _error, _voices_app, _ws_scope

JSON = {"content-type": "application/json"}
SPEECH = {"input": "Hi.", "voice": "x", "response_format": "pcm"}


# --- bodies ---------------------------------------------------------------------------------------------------------
def test_a_body_over_max_body_bytes_is_a_413_declared_or_streamed(monkeypatch, tmp_path):
    """J11, J04: a body whose Content-Length is over max_body_bytes is a 413 naming body refused on the declared
    length, before any byte of it is read (a client must not hold the place for the time it takes to send it); a
    chunked body (no Content-Length) that grows past the limit is the same 413, not a 400."""
    _app(monkeypatch, tmp_path, {"cv": Model()}, max_body_bytes=1024)
    chunks = [b" " * 600, b" " * 425]
    status, answer, read = asyncio.run(asgi_call(ingress.app, "POST", "/v1/audio/speech",
                                                 {**JSON, "content-length": "1025"}, chunks))
    assert (status, json.loads(answer)["error"]["param"], read) == (413, "body", 0), answer
    status, answer, read = asyncio.run(asgi_call(ingress.app, "POST", "/v1/audio/speech", JSON, chunks))
    assert (status, json.loads(answer)["error"]["param"]) == (413, "body"), answer


def test_malformed_json_is_a_400_naming_body(monkeypatch, tmp_path):
    """J08: a body that is not JSON (cut short here) is a 400 naming body, on the speech route and the JSON voice
    upload alike."""
    client, _, _ = _voices_app(monkeypatch, tmp_path)
    for path in ("/v1/audio/speech", "/v1/audio/voices"):
        r = client.post(path, content=b'{"input": "Hi', headers=JSON)
        assert _error(r) == (400, "body"), (path, r.text)


def test_only_json_media_types_are_taken_as_json(monkeypatch, tmp_path):
    """V22: a voice upload is JSON only under application/json or a `+json` type, as speech: text/json or
    application/x-ndjson is a 415 naming content-type on both routes (one rule), not parsed as JSON."""
    client, base, _ = _voices_app(monkeypatch, tmp_path)
    body = json.dumps({"audio_base64": base64.b64encode(b"RIFF0000WAVE").decode(), "name": "v", **SPEECH})
    for ctype in ("text/json", "application/x-ndjson"):
        for path in ("/v1/audio/speech", "/v1/audio/voices"):
            r = client.post(path, content=body, headers={"content-type": ctype})
            assert _error(r) == (415, "content-type"), (ctype, path, r.text)
    assert base.uploads == []


# --- speech: a full replica -----------------------------------------------------------------------------------------
class FullTwice(Model):
    """A model whose first two stream calls are refused as full (each naming a replica), the third served."""

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        if len(self.payloads) < 2:
            self.payloads.append(None)
            yield {"type": "error", "status": 503, "message": "replica full", "param": None, "retry_after": 1,
                   "replica": f"r{len(self.payloads)}"}
            return
        async for item in super().stream(payload, incremental, lease, consumer):
            yield item


def test_a_second_full_replica_does_not_stop_the_search_for_one_with_room(monkeypatch, tmp_path):
    """T03: when the chosen replica is full, each other replica is asked in turn: one more that is full (a 503
    naming itself) moves on to the next, which serves the request; only a refusal that is not "full" ends it."""
    rep = FullTwice()
    client, ing = _app(monkeypatch, tmp_path, {"cv": rep})
    ing.replica_list_s = float("inf")
    ing._replica_list["cv"] = (0.0, ["r1", "r2", "r3"])
    r = client.post("/v1/audio/speech", json=SPEECH)
    assert r.status_code == 200, r.text
    assert len(rep.payloads) == 3


# --- voices ---------------------------------------------------------------------------------------------------------
def test_an_upload_without_audio_is_a_400_naming_file(monkeypatch, tmp_path):
    """V33: a voice upload with none of file, audio_base64 and audio_url is the client's error, a 400 naming file
    (not a 500), and no replica is asked to encode anything."""
    client, base, _ = _voices_app(monkeypatch, tmp_path)
    r = client.post("/v1/audio/voices", json={"name": "v", "ref_text": "Hi."})
    assert _error(r) == (400, "file") and base.uploads == [], r.text


def test_an_audio_url_is_fetched_within_max_upload_bytes(monkeypatch, tmp_path):
    """V35: the fetch of `audio_url` is bounded by max_upload_bytes, the limit of every other way to send the audio
    (not a looser one): the bound handed to the fetcher is that limit, and the fetched bytes reach the replica."""
    client, base, _ = _voices_app(monkeypatch, tmp_path, max_upload_bytes=3000,
                                  allowed_audio_url_prefixes=["http://127.0.0.1:9/ok/"])
    bounds = []

    async def fetch(url, allow, max_bytes):
        bounds.append(max_bytes)
        return b"RIFF0000WAVE"
    monkeypatch.setitem(_ingress_cls()._fetch.__globals__, "fetch_allowed", fetch)
    r = client.post("/v1/audio/voices", json={"audio_url": "http://127.0.0.1:9/ok/a.wav", "name": "v"})
    assert r.status_code == 201, r.text
    assert bounds == [3000] and base.uploads[-1][0] == b"RIFF0000WAVE"


def test_the_openapi_document_says_a_created_voice_is_a_201(monkeypatch, tmp_path):
    """V08: POST /v1/audio/voices answers 201 Created, and the OpenAPI document (what client generators read) says
    201, not FastAPI's default 200."""
    client, _, _ = _voices_app(monkeypatch, tmp_path)
    answers = client.get("/openapi.json").json()["paths"]["/v1/audio/voices"]["post"]["responses"]
    assert "201" in answers and "200" not in answers, sorted(answers)


class Counted(Model):
    """A model that counts its `info` calls."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.info_calls = 0

    def info(self) -> dict:
        self.info_calls += 1
        return super().info()


def test_a_models_info_is_asked_of_its_replica_once(monkeypatch, tmp_path):
    """M01: a model's info (type, speakers) is asked of a replica once and kept (a checkpoint does not change under
    a running replica): /v1/models, the voice list and uploads do not each cost a replica call per model."""
    cv, base = Counted("cv"), Counted("base", "base", speakers=())
    client, _ = _app(monkeypatch, tmp_path, {"cv": cv, "base": base})
    for _ in range(2):
        assert client.get("/v1/models").status_code == 200
        assert client.get("/v1/models/cv").status_code == 200
        assert client.get("/v1/audio/voices").status_code == 200
    r = client.post("/v1/audio/voices", json={"audio_base64": base64.b64encode(b"RIFF").decode(), "name": "v"})
    assert r.status_code == 201, r.text
    assert (cv.info_calls, base.info_calls) == (1, 1)


# --- WebSocket ------------------------------------------------------------------------------------------------------
def test_a_websocket_client_that_leaves_is_not_counted_as_an_error(monkeypatch, tmp_path):
    """W16: a client that leaves (websocket.disconnect) before its config ends the session as a departure, not as
    a message that is "not a JSON text message": no ws_400 (nor any error) is counted for it."""
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})
    inbox: asyncio.Queue = asyncio.Queue()
    inbox.put_nowait({"type": "websocket.connect"})
    inbox.put_nowait({"type": "websocket.disconnect", "code": 1001})
    sent: list[dict] = []

    async def send(message):
        sent.append(message)
    before = http_errors()
    asyncio.run(asyncio.wait_for(ingress.app(_ws_scope(), inbox.get, send), 20))
    assert http_errors() == before, (before, http_errors())
    assert [m["type"] for m in sent] == ["websocket.accept"], sent
    assert ing.client_streams.count == 0


# --- listing a model's replicas, /health (E01..) --------------------------------------------------------------------
def test_replica_ids_are_those_of_this_app_and_this_model_only(monkeypatch, tmp_path):
    """E03, E04: a model's replicas are the named actors SERVE_REPLICA::<app>#tts-<model>#<id> of this app: not
    those of model `ab` when the model is `a` (its name a prefix of another's), nor another app's model of the same
    name (two apps on one cluster)."""
    import ray

    _, ing = _app(monkeypatch, tmp_path, {"a": Model("a")})
    monkeypatch.undo()   # (the helper's _replica_ids stand-in; the real one asks ray.util.list_named_actors)
    app = ing.app_name
    actors = [{"name": f"SERVE_REPLICA::{app}#tts-a#r1"}, {"name": f"SERVE_REPLICA::{app}#tts-ab#r2"},
              {"name": "SERVE_REPLICA::other#tts-a#r3"}, {"name": "SERVE_CONTROLLER_ACTOR"}]
    monkeypatch.setattr(ray.util, "list_named_actors", lambda all_namespaces=False: actors)
    assert ing._replica_ids("a") == ["r1"]
    assert ing._replica_ids("ab") == ["r2"]


def test_health_answers_when_the_replica_listing_hangs(monkeypatch, tmp_path):
    """E01, E02: listing a model's replicas (Ray's GCS) is bounded by stats_timeout_s: a GCS that does not answer
    leaves /health answered from the model's handle (200, one replica), not held nor a 500."""
    release = threading.Event()
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})

    def hangs(self, name):
        release.wait(30)
        return []
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", hangs)
    ing.stats_timeout_s = 0.05

    async def main():
        try:
            return await asyncio.wait_for(asgi_call(ingress.app, "GET", "/health", {}, []), 10)
        finally:
            release.set()   # (before asyncio.run waits for its threads: the listing's is one)
    status, answer, _ = asyncio.run(main())
    assert status == 200 and json.loads(answer)["models"]["cv"]["replicas"] == 1, answer


def test_a_hung_replica_listing_holds_one_thread_however_often_it_is_asked(monkeypatch, tmp_path):
    """While Ray's GCS hangs, every /metrics scrape (and every failover) asked for the listing in a thread of its own
    that stayed blocked after the scrape gave up: the default thread pool, which the voices API runs in too, filled
    up with them. Callers now share the listing in flight (one blocked thread per model), each still bounded by
    stats_timeout_s, and a listing that has ended is made again on the next call."""
    release = threading.Event()
    entered: list[str] = []
    _, ing = _app(monkeypatch, tmp_path, {"cv": Model()})

    def hangs(self, name):
        entered.append(name)
        release.wait(30)
        return ["r1"]
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", hangs)
    ing.stats_timeout_s = 0.05

    async def main():
        try:
            answers = [await asyncio.wait_for(asgi_call(ingress.app, "GET", "/metrics", {}, []), 10)
                       for _ in range(12)]
            assert [a[0] for a in answers] == [200] * 12
            assert entered == ["cv"], entered   # one thread, not twelve
            release.set()
            while ing._listing["cv"] is not None and not ing._listing["cv"].done():
                await asyncio.sleep(0.01)
            assert await ing._list_replicas("cv") == ["r1"]
            assert entered == ["cv", "cv"]   # the ended listing is not reused: a new one answered
        finally:
            release.set()
    asyncio.run(main())


class Replicas(Model):
    """Replicas r1..rN of one model as the listing names them: `stats` answers for the replica it is routed to
    (the in-process handle ignores routing: answered in turn); `hung` ones never answer."""

    def __init__(self, active: dict[str, int], hung: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.active, self.hung, self.n = active, hung, 0

    async def stats(self):
        rid = sorted(self.active)[self.n % len(self.active)]
        self.n += 1
        if rid in self.hung:
            await asyncio.Event().wait()
        return {"replica": rid, "active_sessions": self.active[rid]}


def test_health_sums_active_sessions_and_a_hung_replica_costs_one_timeout(monkeypatch, tmp_path):
    """E08, E09: /health gives the sessions active on the model's replicas that answered (summed), and a replica
    whose `stats` never answers is left out after stats_timeout_s (the others still counted), not waited for."""
    rep = Replicas({"r1": 2, "r2": 3, "r3": 7}, hung=("r3",))
    _, ing = _app(monkeypatch, tmp_path, {"cv": rep})
    monkeypatch.setattr(_ingress_cls(), "_replica_ids", lambda self, name: ["r1", "r2", "r3"])
    ing.stats_timeout_s = 0.05
    status, answer, _ = asyncio.run(asyncio.wait_for(asgi_call(ingress.app, "GET", "/health", {}, []), 10))
    assert status == 200, answer
    assert json.loads(answer)["models"]["cv"] == {"status": "ok", "replicas": 2, "active_sessions": 5}, answer


class AllFull(Model):
    """A model whose every replica is full (each refusal names a replica)."""

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.payloads.append(None)
        yield {"type": "error", "status": 503, "message": "replica full", "param": None, "retry_after": 1,
               "replica": f"r{len(self.payloads)}"}


def test_a_full_service_asks_at_most_busy_asks_other_replicas(monkeypatch, tmp_path):
    """E07: when every replica is full, a request asks the one Serve chose and at most `busy_asks` others before its
    503 (a full service answers each request after a few cheap refusals, not one call per replica)."""
    rep = AllFull()
    client, ing = _app(monkeypatch, tmp_path, {"cv": rep})
    ing.busy_asks, ing.replica_list_s = 2, float("inf")
    ing._replica_list["cv"] = (0.0, [f"r{i}" for i in range(1, 7)])
    r = client.post("/v1/audio/speech", json=SPEECH)
    assert _error(r) == (503, None) and r.headers["retry-after"] == "1", (r.status_code, r.text)
    assert len(rep.payloads) == 3


# --- voices: built-in speakers (E05, E06) ---------------------------------------------------------------------------
def test_a_missing_stored_voice_is_a_404_without_asking_the_replicas(monkeypatch, tmp_path):
    """E05: GET and DELETE of a stored voice's id (voice_<16 hex>) that the store does not hold are 404s naming
    voice_id even while no model replica answers: such an id is never a speaker's name, so the replicas are not
    asked."""
    class Down(Model):
        def info(self):
            raise RuntimeError("replica down")

    client, _ = _app(monkeypatch, tmp_path, {"cv": Down()})
    missing = "voice_" + "0" * 16
    assert _error(client.get(f"/v1/audio/voices/{missing}")) == (404, "voice_id")
    assert _error(client.delete(f"/v1/audio/voices/{missing}")) == (404, "voice_id")


def test_a_speaker_of_two_models_reads_as_the_first_models_entry(monkeypatch, tmp_path):
    """E06: GET /v1/audio/voices/{speaker} of a speaker that two models have answers the entry the voice list
    shows first: the first configured model's."""
    client, _ = _app(monkeypatch, tmp_path, {"zz": Model("zz", speakers=("vivian",)),
                                             "aa": Model("aa", speakers=("vivian",))})
    first = next(v for v in client.get("/v1/audio/voices").json()["data"] if v["id"] == "vivian")
    r = client.get("/v1/audio/voices/vivian")
    assert r.status_code == 200 and r.json() == first and first["model"] == "zz", (r.text, first)


# --- serve/app.py ---------------------------------------------------------------------------------------------------
APP_CONFIG = {"retry_after_s": 7, "ingress_replicas": 3,
              "models": [{"name": "a", "max_sessions": 64, "max_queue": 400, "num_gpus": 0.5, "num_replicas": 2},
                         {"name": "b", "autoscaling": {"min_replicas": 1, "max_replicas": 4}}]}


def test_each_model_deployment_is_shaped_by_its_model_config():
    """A02, A03, A11, A12, A13, A14: a model's deployment takes its GPUs, replica count or autoscaling, its
    max_ongoing_requests (every slot and queue place, so the replica's own admission answers 503) and a router
    queue at least as long; its calls about a session are routed by SessionRouter; the replica is built with the
    service's retry_after_s (its 503s' Retry-After)."""
    configs = _deployment_configs(APP_CONFIG)
    models = build_app(APP_CONFIG)._bound_deployment.init_args[1]
    a, b = configs["a"], configs["b"]
    want = ServiceConfig.from_dict(APP_CONFIG).models[0].max_ongoing_requests
    assert want > 256 and a.max_ongoing_requests == want and a.max_queued_requests == want
    assert a.num_replicas == 2 and a.autoscaling_config is None
    assert b.autoscaling_config is not None and b.autoscaling_config.max_replicas == 4
    assert models["a"]._bound_deployment._replica_config.ray_actor_options["num_gpus"] == 0.5
    for name in ("a", "b"):
        assert configs[name].request_router_config.request_router_class == "serve.routing.SessionRouter", name
        assert models[name]._bound_deployment.init_args[3] == 7, name


def test_the_ingress_runs_the_configured_replicas_and_sheds_load_with_a_503():
    """A10, A08: the ingress deployment runs ingress_replicas replicas, and past its queue the proxy answers 503
    with Retry-After retry_after_s (the replicas' own busy answer), not a 429 that blames the client's key."""
    ingress_config = _deployment_configs(APP_CONFIG)["ingress"]
    assert ingress_config.num_replicas == 3
    backpressure = getattr(ingress_config, "backpressure_config", None)
    if backpressure is not None:   # (Ray Serve >= 2.60)
        assert (backpressure.status_code, backpressure.retry_after_s) == (503, 7), backpressure


# --- serve/requests.py ----------------------------------------------------------------------------------------------
def test_every_request_field_and_the_models_policy_reach_the_engine_request(model_factory):
    """R01, R03, R07, R08, R14, R15: the speech fields reach the engine's request (seed: reproducible audio,
    instructions, non_streaming_mode) with the model's chunking (first_chunk_frames, chunk_frames) and its default
    frame cap for a request that sets none; a payload without `input` is refused naming text (None would open an
    incremental-text session that no one feeds)."""
    model = model_factory("custom_voice")
    speaker = model.get_supported_speakers()[0]
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_new_tokens=64, default_max_new_tokens=16,
                      first_chunk_frames=2, chunk_frames=6)
    req = build_request(model, cfg, {"input": "Hi.", "voice": speaker, "seed": 1234, "instructions": "calm",
                                     "non_streaming_mode": True})
    assert (req.text, req.seed, req.instruct, req.non_streaming_mode) == ("Hi.", 1234, "calm", True), req
    assert (req.first_chunk_frames, req.chunk_frames, req.sampling.max_new_tokens) == (2, 6, 16), req
    with pytest.raises(RequestError) as e:
        build_request(model, cfg, {"voice": speaker})
    assert e.value.field == "text"


def test_the_render_settings_and_info_name_the_frame_cap_and_the_session_limit(model_factory):
    """R09, R13: a replica's render settings give the frame cap a request without max_new_tokens gets (the model's
    default, else its limit: what a batch job keys its outputs on), and its info the model's max_sessions."""
    model = model_factory("custom_voice")
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_new_tokens=64, max_sessions=5)
    assert render_settings(model, cfg)["default_max_new_tokens"] == 64
    assert model_info(model, cfg)["max_sessions"] == 5


def test_a_tiny_checkpoint_is_built_once_per_model_type_and_seed(monkeypatch, tmp_path):
    """R11, R12: with no checkpoint named, the tiny random checkpoint is built in cache_dir once (a replica that
    starts later loads it, nobody rewrites it under a loading replica), and one of another seed is another
    checkpoint (other weights), not the first one's folder."""
    import qwen_tts_core

    built = []

    def make(path, model_type, size, seed):
        built.append((model_type, seed))
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
    monkeypatch.setattr(qwen_tts_core, "make_checkpoint", make)
    one, again = (resolve_checkpoint(ModelConfig(name="a", seed=1), str(tmp_path)) for _ in range(2))
    other = resolve_checkpoint(ModelConfig(name="b", seed=2), str(tmp_path))
    assert one == again != other and built == [("custom_voice", 1), ("custom_voice", 2)], (one, other, built)


def test_device_auto_is_the_cpu_for_a_model_given_no_gpu(monkeypatch):
    """R10: `device: auto` loads on CUDA only when the model's deployment has GPUs (num_gpus > 0): a replica given
    none must not take a GPU it was not scheduled for, even on a node that has one."""
    import torch

    import qwen_tts_core

    loads = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qwen_tts_core.Qwen3TTSModel, "from_pretrained",
                        classmethod(lambda cls, path, device_map, dtype: loads.append(device_map)))
    for gpus in (0, 1):
        load_model(ModelConfig(name="a", checkpoint="/nowhere", device="auto", num_gpus=gpus), "/nowhere")
    assert loads == ["cpu", "cuda"]
