"""HTTP and WebSocket transport (FastAPI under Serve): parse, check, forward to a model replica, encode audio.

No synthesis logic lives here: requests become payload dicts for `TTSReplica` (see replica.py for its protocol).
"""


import asyncio
import base64
import contextlib
import copy
import logging
import random
import time
from collections import defaultdict
from collections.abc import Iterable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from qwen_tts_core.audio_fx import StretchedEncoder
from qwen_tts_core.errors import RequestError, shown
from qwen_tts_core.generate.requests import check_ref_text, check_text
from qwen_tts_core.types import SAMPLE_RATE

from .audio_format import MEDIA_TYPES, make_encoder
from .auth import Caller, KeyRing, bearer_token, cross_site
from .config import ServiceConfig
from .fetch import AllowList, FetchRefused, fetch_allowed
from .jsonlimits import JsonLimits, JsonRejected, loads_bounded
from .liveness import this_actor
from .metrics import ClientStreams, count_http_error, http_errors, merge_stats, prometheus_text
from .quotas import Place, StreamQuota, UploadQuota
from .requests import CALLER
from .routing import detached, route_key
from .schemas import (
    ApiError,
    ErrorResponse,
    SpeechRequest,
    VoiceUpload,
    WSConfig,
    bad_request,
    from_request_error,
    from_validation_error,
)
from .streaming import (
    Leases,
    Pacer,
    ReplicaLost,
    ReplicaStream,
    StreamAborted,
    audio_body,
    replica_answer,
    sse_body,
)
from .uploads import MULTIPART, URLENCODED, body_timeout, media_type, read_form
from .voices import VOICE_ID, DamagedVoice, VoiceStore
from .ws_session import MessageLimiter, WSSession, send_error

log = logging.getLogger(__name__)

# /docs and /openapi.json are routes of the Ingress below (behind the API key unless docs_without_key).
# redirect_slashes off: `/v1/audio/speech/` is the API's JSON 404/405 like any unknown path, not Starlette's bare 307
# (sent before the key is checked, its Location built from the client's Host header).
app = FastAPI(title="qwen-tts-fleet", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None,
              redirect_slashes=False)


# Request bodies for /docs and /openapi.json only: the handlers read their bodies themselves (bounded, jsonlimits.py
# and uploads.py) and validate them with these same models. Nested models go to components (`_DOC_SCHEMAS`).
_REF = "#/components/schemas/{model}"
_SPEECH_SCHEMA = SpeechRequest.model_json_schema(ref_template=_REF)
_VOICE_SCHEMA = VoiceUpload.model_json_schema(ref_template=_REF)
_ERROR_SCHEMA = ErrorResponse.model_json_schema(ref_template=_REF)
_DOC_SCHEMAS = {**_SPEECH_SCHEMA.pop("$defs", {}), **_VOICE_SCHEMA.pop("$defs", {}), **_ERROR_SCHEMA.pop("$defs", {}),
                "ErrorResponse": _ERROR_SCHEMA}
_VOICE_FORM = {**_VOICE_SCHEMA, "title": "VoiceUploadForm",
               "properties": {"file": {"type": "string", "format": "binary", "description": "reference audio"},
                              **_VOICE_SCHEMA["properties"]}}


def _body_doc(content: dict[str, dict]) -> dict:
    """`openapi_extra` declaring a required request body: media type -> schema."""
    return {"requestBody": {"required": True, "content": {k: {"schema": v} for k, v in content.items()}}}


# The answers each route documents. Every error is an `ErrorResponse` (ApiError.body); a request FastAPI finds
# invalid is a 400 too (`_validation_error`), so the 422 FastAPI documents by itself is taken out (`_finish_openapi`).
_ERROR_DOCS = {
    400: "bad request: the message and `param` name the field", 401: "missing or invalid API key",
    403: "a browser page of another site, refused by a service without API keys (`param`: origin)",
    404: "not found (`param` names what)", 408: "the request body did not arrive within body_timeout_s",
    409: "the stored voice's file is damaged (`param`: voice_id); delete it and upload it again",
    413: "the body or the audio is larger than its limit", 415: "a content type this route does not take",
    429: "this API key holds its share (open streams, stored voices, uploads in progress); see Retry-After",
    500: "internal error", 502: "the model replica (or the audio_url server) failed; retry",
    503: "the service is busy; retry after Retry-After seconds",
    504: "the synthesis did not finish within session_deadline_s"}
_AUDIO_OUT = {"description": "the audio in `response_format`, sent as it is made (chunked); with `stream_format: "
              "sse`, events `speech.audio.delta` (base64 audio) then `speech.audio.done`. An error after the first "
              "byte ends the stream without its last chunk (or with an `error` event), never as a clean end.",
              "content": {**{t: {"schema": {"type": "string", "format": "binary"}} for t in MEDIA_TYPES.values()},
                          "text/event-stream": {"schema": {"type": "string"}}}}


def _answers(*errors: int) -> dict:
    """FastAPI `responses` for these error statuses, each an `ErrorResponse`."""
    error = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
    return {s: {"description": _ERROR_DOCS[s], "content": error} for s in errors}


def _finish_openapi(spec: dict, open_paths: Iterable[str] | None = None) -> dict:
    """The generated document made true to the service (a new dict): the bodies' schemas in components, no 422
    (validation errors are 400s here), and with API keys (`open_paths` not None) the bearer scheme, required by
    every operation but those of `open_paths` (so /docs offers "Authorize" and clients know to send a key)."""
    spec = copy.deepcopy(spec)
    components = spec.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(_DOC_SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if open_paths is not None:
        components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer",
                                                    "description": "an API key (api_keys, QTTS_API_KEYS)"}}
    for path, ops in spec.get("paths", {}).items():
        for op in ops.values():
            if isinstance(op, dict):
                op.get("responses", {}).pop("422", None)
                if open_paths is not None and path not in open_paths:
                    op["security"] = [{"apiKey": []}]
    return spec


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    count_http_error(str(exc.status))
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    return await _api_error(request, ApiError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid')}",
                                              ".".join(loc) or None))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own answers (unknown path 404, wrong method 405, ...) in the API's error shape."""
    if exc.status_code == 404:
        err = ApiError(404, f"no such endpoint: {request.url.path[:200]}", "path")
    elif exc.status_code == 405:
        err = ApiError(405, f"method {request.method} is not allowed on {request.url.path[:200]}", "method")
    else:
        err = ApiError(exc.status_code, str(exc.detail)[:500])
    err.headers = dict(exc.headers or {})
    if exc.status_code == 405:   # Starlette's Allow names the first matching route's methods only (GET, not DELETE)
        err.headers = {k: v for k, v in err.headers.items() if k.lower() != "allow"}
        err.headers["Allow"] = ", ".join(_allowed_methods(request))
    return await _api_error(request, err)


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route takes on this request's path (a 405's Allow header, RFC 9110 15.5.6): asked of the
    router per method, as a request would be routed (routes may sit in included routers)."""
    routes = request.app.router.routes
    return [m for m in ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
            if any(r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes)]


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, StreamAborted):   # a body aborted on purpose: logged and counted as it failed (streaming.py)
        raise exc
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return await _api_error(request, ApiError(500, f"internal error ({type(exc).__name__})"))


def _is_json(ctype: str) -> bool:
    """Whether a media type (lower case, without parameters) declares JSON: application/json or a `+json` type."""
    return ctype == "application/json" or (ctype.endswith("+json") and "/" in ctype)


def _check_json_type(headers) -> None:
    """415 naming content-type unless the body is declared JSON (application/json or a `+json` type) or not declared
    at all. text/plain and the form types are what a web page may POST across origins without a CORS preflight: a
    speech request must not be one of those (a service without API keys would synthesize for any page)."""
    if "content-type" not in headers:
        return
    ctype = media_type(headers)
    if not _is_json(ctype):
        raise ApiError(415, f"content-type: {shown(ctype)} is not JSON; send Content-Type: application/json",
                       "content-type")


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    stats_timeout_s = 5.0   # /health and /metrics wait this long for a replica's `stats` (all asked at once)
    health_cache_s = 1.0    # /health (open to anyone) answers from one round of `stats` for this long
    replica_list_s = 1.0    # a model's replica ids (asked when the chosen replica is full) are listed again after it
    busy_asks = 8           # other replicas asked (each once) when the chosen one is full, before answering 503

    def __init__(self, config: dict[str, Any], replicas: dict[str, Any]) -> None:
        # Keys: those resolved where the app was built (in `config`) plus this worker's own environment's.
        self.cfg = ServiceConfig.from_dict(config).with_env_keys()
        self.replicas = replicas
        self.voices = VoiceStore.from_uri(self.cfg.voices_uri)
        self.voices.check()   # a store that cannot work as configured fails the start, naming voices_uri
        self.keys = KeyRing(self.cfg.api_keys, self.cfg.admin_api_keys)
        # the paths answered without a key even when keys are set: decided here, read by their handlers and by the
        # OpenAPI document (which marks every other operation as needing the bearer key)
        self.open_paths = frozenset({"/health", "/", "/playground"}
                                    | ({"/metrics"} if self.cfg.metrics_without_key else set())
                                    | ({"/openapi.json", "/docs"} if self.cfg.docs_without_key else set()))
        self.allow_urls = AllowList(self.cfg.allowed_audio_url_prefixes)
        self._info: dict[str, dict] = {}
        self._health: tuple[float, asyncio.Future | None] = (0.0, None)   # (when asked, the round's answer)
        self._replica_list: dict[str, tuple[float, list[str]]] = {}   # model -> (when listed, replica ids)
        self._listing: dict[str, asyncio.Future] = {}   # model -> the listing in flight (at most one thread each)
        # streams this ingress consumes, renewed on their replicas, which ping this actor before cancelling a lapse
        self.leases = Leases(self.cfg.session_lease_s, this_actor())
        self.client_streams = ClientStreams()               # open client streams (HTTP + WebSocket) of this ingress
        self.quota = StreamQuota(self.cfg.max_streams_per_key, self.client_streams, self.cfg.retry_after_s)
        self._voice_creates: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)   # per key (bounded by keys)
        self.uploads = UploadQuota(self.cfg.max_uploads_per_key, self.cfg.retry_after_s)
        ctx = serve.get_replica_context()
        self.app_name = ctx.app_name
        self.ingress_id = getattr(getattr(ctx, "replica_id", None), "unique_id", "")   # the `ingress` label

    # --- shared checks ----------------------------------------------------------------------------------------
    def _auth(self, headers, query: dict | None = None) -> Caller:
        """The caller behind `Authorization: Bearer <key>` (or `?api_key=` on the WebSocket); 401 otherwise. Without
        keys, a browser request from a page of another site is a 403 (auth.cross_site)."""
        if not self.keys.enabled and cross_site(headers):
            raise ApiError(403, "origin: a page of another site may not use this service, which has no API keys "
                                "(set api_keys to serve other sites' pages with a key)", "origin")
        token = bearer_token(headers)
        if token is None and query and query.get("api_key") is not None:
            token = query["api_key"]
        caller = self.keys.check(token)
        if caller is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authorization",
                           headers={"WWW-Authenticate": "Bearer"})
        return caller

    def _limits(self, max_bytes: int) -> JsonLimits:
        return JsonLimits(max_bytes=max_bytes)

    async def _json(self, request: Request, limit: int) -> Any:
        """The body as JSON, within `limit` bytes and jsonlimits' depth and number bounds, received within
        `body_timeout_s`; 400/408/413 naming body (400 also when the client left mid-body)."""
        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "content-length: not a number", "content-length") from None
        if declared > limit:
            raise ApiError(413, f"body: larger than {limit} bytes", "body")
        body = bytearray()

        async def read() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > limit:
                    raise ApiError(413, f"body: larger than {limit} bytes", "body")
        try:  # wait_for, not asyncio.timeout: Python 3.10 is supported
            await asyncio.wait_for(read(), self.cfg.body_timeout_s)
        except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
            raise body_timeout(self.cfg.body_timeout_s) from None
        except ClientDisconnect:   # not ours to count as a 500 nor to log as an error
            raise ApiError(400, "body: the client left before the body was complete", "body") from None
        try:
            return loads_bounded(bytes(body), self._limits(limit))
        except JsonRejected as e:
            raise ApiError(e.status, str(e), "body") from None

    def _handle(self, model: str | None):
        name = model or self.cfg.models[0].name
        if name not in self.replicas:
            raise ApiError(400, f"model {shown(name)} is not served; choose one of {sorted(self.replicas)}", "model")
        return name, self.replicas[name]

    async def _stream(self, name: str, handle, payload: dict, place: Place, incremental: bool = False,
                      counted: bool = True) -> ReplicaStream:
        """Open a replica stream (leased by this ingress; counted as an open client stream when `counted`) on the
        caller's `place` (quotas.py); ApiError if refused. The place is given back when the stream closes, and here
        when no stream comes of it (refused, replica gone, the client left while it opened). A WebSocket (not
        `counted`: it counts itself from its accept) gives its place back when the session ends."""
        counter = place if counted else None
        try:
            try:
                return await ReplicaStream.open(name, handle, payload, self.leases, incremental,
                                                self.cfg.retry_after_s, counter)
            except ApiError as e:
                if not getattr(e, "full_replica", None):
                    raise
                busy = e
            # The replica Serve's router chose is full. The router takes the less loaded of two random replicas, so
            # both may be full while another has room (a replica just restarted, long WebSocket sessions piled up on
            # some): other replicas are asked once each, by id (SessionRouter), before the client gets the 503 (at
            # most `busy_asks`: a full service answers each request after that many cheap refusals, not one per replica).
            for rid in (await self._other_replicas(name, busy.full_replica))[:self.busy_asks]:
                try:
                    return await ReplicaStream.open(name, handle.options(session_id=route_key(rid)), payload,
                                                    self.leases, incremental, self.cfg.retry_after_s, counter)
                except ApiError as e:
                    if not getattr(e, "full_replica", None):
                        raise
            raise busy
        except BaseException:
            place.closed()
            raise

    async def _other_replicas(self, name: str, but: str) -> list[str]:
        """The ids of model `name`'s running replicas other than `but`, in random order; listed at most once per
        `replica_list_s` (a busy service asks often), none outside Ray."""
        import ray

        at, ids = self._replica_list.get(name, (0.0, []))
        if time.monotonic() - at > self.replica_list_s:
            ids = []
            if ray.is_initialized():  # a GCS that does not answer: no other replica is tried
                ids = await self._list_replicas(name)
            self._replica_list[name] = (time.monotonic(), ids)
        others = [r for r in ids if r != but]
        return random.sample(others, len(others))

    # --- speech -----------------------------------------------------------------------------------------------
    @app.post("/v1/audio/speech", openapi_extra=_body_doc({"application/json": _SPEECH_SCHEMA}),
              response_class=Response,
              responses={200: _AUDIO_OUT, **_answers(400, 401, 403, 408, 413, 415, 429, 500, 502, 503, 504)})
    async def speech(self, request: Request) -> Response:
        caller = self._auth(request.headers)
        # The key's place first (429 when it holds its share), BEFORE the body is read: a key's connections that
        # never send their body each held one of the ingress's places for body_timeout_s, uncounted, until every
        # key and /health waited behind them. From here the place is given back on every exit: by `_stream` or
        # the stream's close once one is opened, else below (bad body, timeout, refused, client gone).
        place, stream = self.quota.take(caller), None
        try:
            req, encoder, name, handle, payload = await self._speech_request(request, caller)
            # Nothing is sent before the first audio: a request that fails before it gets a 4xx/5xx JSON answer,
            # and one whose replica died (ReplicaLost) goes again to another one: Serve's router drops a replica
            # whose call died from the handle's choices.
            for attempt in range(self.cfg.failover_retries + 1):
                try:
                    opening = self._stream(name, handle, payload, place)
                    stream = await (opening if attempt == 0 else asyncio.wait_for(opening, self.cfg.failover_wait_s))
                    first = await stream.first_output()
                    break
                except ReplicaLost:
                    if attempt == self.cfg.failover_retries:
                        raise
                except asyncio.TimeoutError:   # no replica took the retry in failover_wait_s
                    raise ApiError(502, "the model replica serving this request failed and no other took it; "
                                        "retry the request") from None
                if stream is not None:
                    stream.close()
                place.closed()   # (given back already; taken again at once, with no await between)
                place, stream = self.quota.take(caller), None
                count_http_error("failover")
                log.warning("speech request: its replica of %s was lost before any audio; trying another "
                            "(%d/%d)", name, attempt + 1, self.cfg.failover_retries)
        except BaseException:  # an error, or the client left (cancelled) before any audio
            if stream is not None:
                stream.close()
            place.closed()   # idempotent: `_stream` or the stream's close may have given it back already
            raise
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Session-Id": stream.sid}
        pacer = Pacer(self.cfg.stream_lead_s, req.speed) if self.cfg.stream_lead_s > 0 else None
        if req.stream_format == "sse":
            return StreamingResponse(stream.close_with(sse_body(stream, first, encoder, self._count_error, pacer)),
                                     media_type="text/event-stream", headers=headers)
        return StreamingResponse(stream.close_with(audio_body(stream, first, encoder, self._count_error, pacer)),
                                 media_type=encoder.media_type, headers=headers)

    async def _speech_request(self, request: Request, caller: Caller,
                              ) -> tuple[SpeechRequest, Any, str, Any, dict]:
        """Read and check the body; (request, its encoder, model name, its handle, the replica's payload)."""
        _check_json_type(request.headers)
        body = await self._json(request, self.cfg.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "body: expected a JSON object", "body")
        try:
            req = SpeechRequest.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        name, handle = self._handle(req.model)
        payload = req.model_dump(exclude={"response_format", "stream_format", "speed"})
        payload.update(model=name, **{CALLER: caller.scope})  # the key's scope: which stored voices it may use
        try:
            encoder = make_encoder(req.response_format, SAMPLE_RATE)
        except ValueError as e:
            raise bad_request(str(e), "response_format") from None
        if req.speed != 1.0:  # the encoder gets the audio stretched as it streams (chunk-independent, pitch kept)
            encoder = StretchedEncoder(encoder, SAMPLE_RATE, req.speed)
        return req, encoder, name, handle, payload

    async def synthesize_bulk(self, payload: dict) -> dict:
        """Kept for callers of the app handle; batch jobs call the model deployment directly (one hop):
        `serve.get_deployment_handle(f"tts-{model}", app_name).synthesize.remote(payload)` (replica.py)."""
        model = payload.get("model") if isinstance(payload, dict) else None
        if model is not None and not isinstance(model, str):
            raise RequestError("model", "must be a string")
        try:
            _, handle = self._handle(model)
        except ApiError as e:
            raise RequestError("model", e.message) from None
        return await handle.synthesize.remote(payload)

    # --- voices (owned by the key that created them; other keys see 404, admin keys see all) ------------------
    async def _builtin_voices(self) -> list[dict]:
        """Each model's speakers, one entry per model and speaker (what the voice list shows as builtin)."""
        data = []
        for name, handle in self.replicas.items():
            info = await self._model_info(name, handle)
            for spk in info.get("speakers") or []:
                data.append({"id": spk, "object": "voice", "name": spk, "model": name, "builtin": True})
        return data

    @app.get("/v1/audio/voices", responses=_answers(401, 403, 500))
    async def list_voices(self, request: Request) -> dict:
        caller = self._auth(request.headers)
        data = await self._builtin_voices()
        stored = await asyncio.to_thread(self.voices.list, caller.scope)
        data += [{**v, "builtin": False} for v in stored]
        return {"object": "list", "data": data}

    @app.get("/v1/audio/voices/{voice_id}", responses=_answers(401, 403, 404, 409, 500))
    async def get_voice(self, voice_id: str, request: Request) -> dict:
        caller = self._auth(request.headers)
        try:
            return {**await asyncio.to_thread(self.voices.info, voice_id, caller.scope), "builtin": False}
        except KeyError:
            pass
        except DamagedVoice as e:   # storage damage, shown to whom may see the voice (its owner, an admin)
            raise ApiError(409, f"voice_id: the stored voice {voice_id} is damaged ({e.reason}); delete it "
                                f"(DELETE /v1/audio/voices/{voice_id}) and upload it again", "voice_id") from None
        builtin = await self._speaker(voice_id)
        if builtin:  # as the list shows it (a speaker of several models: the first model's entry)
            return builtin[0]
        raise ApiError(404, f"voice_id: no stored voice or built-in speaker {shown(voice_id)}", "voice_id")

    async def _speaker(self, voice_id: str) -> list[dict]:
        """The voice list's builtin entries of this id; none for a stored voice's id (never a speaker's name), so
        a lost stored voice is a 404 without asking the replicas."""
        if VOICE_ID.fullmatch(voice_id):
            return []
        return [v for v in await self._builtin_voices() if v["id"] == voice_id]

    @app.post("/v1/audio/voices", status_code=201,
              openapi_extra=_body_doc({MULTIPART: _VOICE_FORM, URLENCODED: _VOICE_FORM,
                                       "application/json": _VOICE_SCHEMA}),
              responses=_answers(400, 401, 403, 408, 413, 415, 429, 500, 502, 503))
    async def create_voice(self, request: Request) -> JSONResponse:
        caller = self._auth(request.headers)
        with self.uploads.hold(caller):   # 429 when this key has max_uploads_per_key in progress; freed on any exit
            return await self._create_voice(request, caller)

    async def _create_voice(self, request: Request, caller: Caller) -> JSONResponse:
        """The cheap checks come before the costly work: the key's voice count before the body is read, the texts
        and the model before `audio_base64` is decoded or `audio_url` fetched (a refused upload fetches nothing).
        The count that decides is taken in the store after the voice is written (`VoiceStore.keep_within`), so the
        limit holds across ingress replicas: an upload that finds its key over the limit is undone (429)."""
        limit = None if caller.admin else self.cfg.max_voices_per_key
        await self._check_voice_count(caller, limit)     # early: no body read or encoding at the limit
        audio, fields, is_json = await self._voice_body(request)
        try:
            up = VoiceUpload.model_validate(fields, strict=is_json)
        except ValidationError as e:
            raise from_validation_error(e) from None
        audio_field = "file" if audio is not None else "audio_base64" if up.audio_base64 is not None else "audio_url"
        try:   # the core's rules (ref_text's length limit too), here before any audio is decoded or fetched
            if up.name is not None:
                check_text(up.name, "name", allow_blank=True)
            if up.ref_text is not None:
                check_ref_text(up.ref_text, allow_blank=True)
        except RequestError as e:
            raise from_request_error(e) from None
        model = await self._voice_model(up.model)
        if audio is None:
            audio = await self._audio_from_fields(up)
        ref_text = (up.ref_text or "").strip() or None
        # one create of a key at a time in this ingress: its own burst never races (only uploads through other
        # ingress replicas can, and keep_within below settles those)
        async with self._voice_creates[caller.owner] if limit is not None else contextlib.nullcontext():
            await self._check_voice_count(caller, limit)
            try:
                info = await replica_answer(self.replicas[model].create_voice.remote(
                    audio, ref_text, up.x_vector_only, up.name, caller.owner), self.cfg.retry_after_s)
            except RequestError as e:  # from the core (audio header limits, decoding, ref_text) or the store (name,
                err = getattr(e, "cause", e)   # size: VoiceTooLarge carries its 413 as `status`)
                raise from_request_error(err, audio_field, getattr(err, "status", 400)) from None
            if limit is not None:   # authoritative: counted in the store after the write (other ingress replicas)
                have = await asyncio.to_thread(self.voices.keep_within, info["id"], caller.owner, limit)
                if have > limit:
                    raise ApiError(429, f"name: this API key stores {have - 1} voices, at most {limit} (another "
                                        "upload of it was stored at the same time); delete one first "
                                        "(DELETE /v1/audio/voices/{voice_id}) or retry", "name",
                                   headers={"Retry-After": str(self.cfg.retry_after_s)})
        return JSONResponse({**info, "builtin": False}, status_code=201)

    async def _voice_body(self, request: Request) -> tuple[bytes | None, dict, bool]:
        """(the multipart `file` or None, the fields, whether the body was JSON); bounded as every body is."""
        ctype = media_type(request.headers)
        if _is_json(ctype):  # as the speech route takes it (a `+json` type too)
            # base64 makes the audio 4/3 larger; the JSON bounds (depth, numbers) hold as for every body
            fields = await self._json(request, self.cfg.max_upload_bytes * 2)
            if not isinstance(fields, dict):
                raise ApiError(400, "body: expected a JSON object", "body")
            return None, fields, True
        if ctype in (MULTIPART, URLENCODED):  # bounded while it streams (uploads.py)
            audio, fields = await read_form(request, self.cfg.max_upload_bytes, self.cfg.body_timeout_s)
            return audio, fields, False
        raise ApiError(415, "content-type: send multipart/form-data (file, ref_text, name) or JSON with "
                       "audio_base64", "content-type")

    async def _voice_model(self, model: str | None) -> str:
        """The Base model that will encode the voice (the first served when `model` is None); 400 naming `model`."""
        base_models = [m.name for m in self.cfg.models
                       if (await self._model_info(m.name, self.replicas[m.name])).get("type") == "base"]
        model = model or (base_models[0] if base_models else "")
        if model not in base_models:
            raise ApiError(400, f"model: {shown(model)} cannot encode voices; Base models: {base_models}", "model")
        return model

    async def _check_voice_count(self, caller: Caller, limit: int | None) -> None:
        """429 naming `name` when the key stores `limit` voices already (None: not limited)."""
        if limit is None:
            return
        have = await asyncio.to_thread(self.voices.count, caller.owner)
        if have >= limit:
            raise ApiError(429, f"name: this API key stores {have} voices, at most {limit}; delete one "
                                "first (DELETE /v1/audio/voices/{voice_id})", "name")

    async def _audio_from_fields(self, up: VoiceUpload) -> bytes:
        if up.audio_base64 is not None:
            b64 = up.audio_base64.split(",", 1)[-1] if up.audio_base64.startswith("data:") else up.audio_base64
            if len(b64) > self.cfg.max_upload_bytes * 4 // 3 + 4:
                raise ApiError(413, f"audio_base64: larger than {self.cfg.max_upload_bytes} bytes", "audio_base64")
            try:
                data = base64.b64decode(b64, validate=True)
            except ValueError:
                raise ApiError(400, "audio_base64: invalid base64", "audio_base64") from None
            if len(data) > self.cfg.max_upload_bytes:
                raise ApiError(413, f"audio_base64: larger than {self.cfg.max_upload_bytes} bytes", "audio_base64")
            return data
        if up.audio_url is not None:
            return await self._fetch(up.audio_url)
        raise ApiError(400, "file: required (multipart upload), or audio_base64 / audio_url", "file")

    async def _fetch(self, url: str) -> bytes:
        """An allow-listed URL's bytes (serve/fetch.py: structural prefix match, normalised path, every redirect
        re-checked, size and time bounded)."""
        try:
            return await fetch_allowed(url, self.allow_urls, self.cfg.max_upload_bytes)
        except FetchRefused as e:
            raise ApiError(e.status, f"audio_url: {e}", "audio_url") from None

    @app.delete("/v1/audio/voices/{voice_id}", responses=_answers(400, 401, 403, 404, 500))
    async def delete_voice(self, voice_id: str, request: Request) -> dict:
        caller = self._auth(request.headers)
        try:
            await asyncio.to_thread(self.voices.delete, voice_id, caller.scope)
        except KeyError:
            models = [v["model"] for v in await self._speaker(voice_id)]
            if models:
                raise ApiError(400, f"voice_id: {shown(voice_id)} is a built-in speaker of {', '.join(models)} "
                                    "(part of the checkpoint); only stored voices can be deleted", "voice_id") from None
            raise ApiError(404, f"voice_id: no stored voice {shown(voice_id)}", "voice_id") from None
        return {"id": voice_id, "object": "voice", "deleted": True}

    # --- models, health, metrics, playground ------------------------------------------------------------------
    async def _model_info(self, name: str, handle) -> dict:
        if name not in self._info:
            self._info[name] = await replica_answer(handle.info.remote(), self.cfg.retry_after_s)
        return self._info[name]

    @app.get("/v1/models", responses=_answers(401, 403, 500, 502, 503))
    async def models(self, request: Request) -> dict:
        self._auth(request.headers)
        return {"object": "list",
                "data": [await self._model_info(n, h) for n, h in self.replicas.items()]}

    @app.get("/v1/models/{model_id}", responses=_answers(401, 403, 404, 500, 502, 503))
    async def model(self, model_id: str, request: Request) -> dict:
        self._auth(request.headers)
        if model_id not in self.replicas:
            raise ApiError(404, f"model_id: no served model {shown(model_id)}; see GET /v1/models", "model_id")
        return await self._model_info(model_id, self.replicas[model_id])

    async def _list_replicas(self, name: str) -> list[str]:
        """`_replica_ids` in a thread, bounded by `stats_timeout_s` (a GCS slow to answer must hold no answer);
        [] when the GCS fails or does not answer in time (logged). Callers while a listing runs share it: a GCS that
        hangs holds one thread per model, not one per /metrics scrape (threads the voices API also runs in)."""
        listing = self._listing.get(name)
        if listing is None or listing.done():
            listing = self._listing[name] = asyncio.ensure_future(asyncio.to_thread(self._replica_ids, name))
        try:
            return await asyncio.wait_for(asyncio.shield(listing), self.stats_timeout_s)
        except Exception as e:  # noqa: BLE001 - any failure of the listing: the callers go on without it
            log.warning("could not list the replicas of %s: %s: %s", name, type(e).__name__, e)
            return []

    def _replica_ids(self, name: str) -> list[str]:
        """Serve's ids of the running replicas of model `name` (from Ray's named actors of this app)."""
        import ray

        prefix = f"SERVE_REPLICA::{self.app_name}#tts-{name}#"
        return [a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefix)]

    async def _replica_stats(self, name: str, handle) -> dict[str, dict]:
        """`stats` of every replica of a model that answered within `stats_timeout_s`, by replica id (each asked
        directly, routed by its id). A GCS that does not answer leaves the model's handle asked once (one replica, as
        outside Ray), not /health and /metrics a 500."""
        ids = await self._list_replicas(name)
        calls = [asyncio.wait_for(detached(handle.options(session_id=route_key(rid)).stats.remote),
                                  timeout=self.stats_timeout_s)
                 for rid in ids] or [asyncio.wait_for(detached(handle.stats.remote), timeout=self.stats_timeout_s)]
        out: dict[str, dict] = {}
        for r in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(r, dict):
                out.setdefault(str(r.get("replica", len(out))), r)
            else:
                log.warning("stats of a %s replica unavailable: %s", name, r)
        return out

    async def _all_stats(self) -> dict[str, dict[str, dict]]:
        """`_replica_stats` of every model, all asked at once (a model that hangs costs one timeout, not one each)."""
        names = list(self.replicas)
        rows = await asyncio.gather(*(self._replica_stats(n, self.replicas[n]) for n in names))
        return dict(zip(names, rows))

    async def _health_stats(self) -> dict[str, dict[str, dict]]:
        """`_all_stats` for /health, which needs no key: every caller within `health_cache_s` of a round, and every
        caller while it runs, shares it (a flood of probes costs one round of replica calls a second, not one
        each: each round lists Ray's named actors and asks every replica)."""
        at, round_ = self._health
        if round_ is None or time.monotonic() - at > self.health_cache_s and round_.done():
            round_ = asyncio.ensure_future(self._all_stats())
            self._health = (time.monotonic(), round_)
        return await asyncio.shield(round_)

    @app.head("/health", include_in_schema=False)   # load-balancer probes; the same answer as GET
    @app.get("/health", responses={503: {"description": "a model has no replica answering (the same body)",
                                         "content": {"application/json": {"schema": {"type": "object"}}}}})
    async def health(self) -> JSONResponse:
        out = {}
        for name, stats in (await self._health_stats()).items():
            out[name] = ({"status": "ok", "replicas": len(stats),
                          "active_sessions": merge_stats(list(stats.values()))["active_sessions"]}
                         if stats else {"status": "error", "error": "no replica answered"})
        ok = all(v["status"] == "ok" for v in out.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": out,
                             "open_client_streams": self.client_streams.count}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse, responses=_answers(401, 403))
    async def metrics(self, request: Request) -> Response:
        if "/metrics" not in self.open_paths:
            self._auth(request.headers)
        # a model with no replica answering shows as absent series
        text = prometheus_text(await self._all_stats(), http_errors(), self.client_streams.count,
                               self.ingress_id)
        return Response(text, media_type=CONTENT_TYPE_PLAIN_0_0_4)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        if "/openapi.json" not in self.open_paths:
            self._auth(request.headers)
        open_paths = self.open_paths if self.keys.enabled else None
        return JSONResponse(_finish_openapi(app.openapi(), open_paths))   # app.openapi(): built once, cached

    @app.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        if "/docs" not in self.open_paths:
            self._auth(request.headers)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title="qwen-tts-fleet API")

    @app.get("/", include_in_schema=False)
    @app.get("/playground", include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        html = resources.files("serve").joinpath("static/playground.html").read_text()
        return HTMLResponse(html)

    # --- WebSocket: incremental text in, audio out ------------------------------------------------------------
    @app.websocket("/v1/audio/speech/stream")
    async def speech_stream(self, ws: WebSocket) -> None:
        await ws.accept()
        self.client_streams.opened()
        place: Place | None = None
        try:
            try:
                caller = self._auth(ws.headers, dict(ws.query_params))
                # 429 when this key holds its share (HTTP streams included), BEFORE the config is awaited: a key's
                # sockets that never send one are counted while they wait; given back in `finally` below
                place = self.quota.take(caller)
                cfg = WSConfig.model_validate(await self._ws_message(ws, self.cfg.ws_idle_timeout_s))
                name, handle = self._handle(cfg.model)
                payload = cfg.model_dump(exclude={"type", "response_format"})
                payload.update(model=name, **{CALLER: caller.scope})
                encoder = make_encoder(cfg.response_format)
                stream = await self._stream(name, handle, payload, place, incremental=True, counted=False)
            except ValidationError as e:
                return await send_error(ws, from_validation_error(e, whole="message"), self._count_error)
            except ApiError as e:
                return await send_error(ws, e, self._count_error)
            except WebSocketDisconnect:
                return
            c = self.cfg
            session = WSSession(ws, lambda: self._ws_message(ws), handle, stream, encoder,
                                MessageLimiter(c.ws_max_messages, c.ws_max_messages_per_s, c.ws_message_burst),
                                {"type": "start", "model": name, "sample_rate": SAMPLE_RATE, "format": cfg.response_format},
                                self._count_error,
                                Pacer(c.stream_lead_s) if c.stream_lead_s > 0 else None)
            await session.run()
        finally:
            if place is not None:
                place.closed()
            self.client_streams.closed()

    @staticmethod
    def _count_error(kind: str) -> None:
        count_http_error(kind)

    async def _ws_message(self, ws: WebSocket, timeout_s: float | None = None) -> Any:
        """The next client message as a JSON object with a `type` (bounded JSON); ApiError when it is not one,
        408 after `timeout_s` of silence, WebSocketDisconnect when the client left."""
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"message: none for {timeout_s:g} s", "message") from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        text = msg.get("text")
        if text is None:
            raise ApiError(400, "message: expected a JSON text message", "message")
        try:
            data = loads_bounded(text, self._limits(self.cfg.max_body_bytes), what="message")
        except JsonRejected as e:
            raise ApiError(e.status, str(e), "message") from None
        if not isinstance(data, dict) or "type" not in data:
            raise ApiError(400, "message: expected an object with 'type' (config, text or end)", "type")
        return data
