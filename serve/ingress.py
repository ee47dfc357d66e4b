"""HTTP and WebSocket transport (FastAPI under Serve): parse, check, forward to a model replica, encode audio.

No synthesis logic lives here: requests become payload dicts for `TTSReplica` (see replica.py for its protocol).
"""


import asyncio
import base64
import json
import logging
import secrets
from collections import Counter
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import ValidationError
from ray import serve

from .audio_format import make_encoder
from .config import ServiceConfig
from .metrics import prometheus_text
from .schemas import (
    ApiError,
    SpeechRequest,
    SynthesisFields,
    WSConfig,
    WSEnd,
    WSText,
    bad_request,
    from_validation_error,
)
from .voices import VoiceStore

log = logging.getLogger(__name__)

app = FastAPI(title="qwen-tts-fleet", version="0.1.0", docs_url=None, redoc_url=None)
HTTP_ERRORS: Counter = Counter()


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    HTTP_ERRORS[str(exc.status)] += 1
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
    return await _api_error(request, ApiError(400, f"{'.'.join(loc)}: {err.get('msg', 'invalid')}",
                                              ".".join(loc) or None))


def _last_line(exc: BaseException) -> str:
    lines = [x for x in str(exc).strip().splitlines() if x.strip()]
    msg = lines[-1] if lines else type(exc).__name__
    return msg.split("ValueError: ", 1)[-1]


def _replica_error(item: dict) -> ApiError:
    headers = {"Retry-After": str(item["retry_after"])} if item.get("retry_after") else {}
    return ApiError(item["status"], item["message"], item.get("param"), headers=headers)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict[str, Any], replicas: dict[str, Any]) -> None:
        self.cfg = ServiceConfig.from_dict(config)
        self.replicas = replicas
        self.voices = VoiceStore.from_uri(self.cfg.voices_uri)
        self.keys = self.cfg.effective_api_keys()
        self._info: dict[str, dict] = {}

    # --- shared checks ----------------------------------------------------------------------------------------
    def _auth(self, headers, query: dict | None = None) -> None:
        if not self.keys:
            return
        auth = headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else (query or {}).get("api_key", "")
        if not any(secrets.compare_digest(token, k) for k in self.keys):
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer <key>)", "authorization")

    async def _json(self, request: Request, limit: int) -> Any:
        if int(request.headers.get("content-length") or 0) > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", "body")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise ApiError(413, f"request body is larger than {limit} bytes", "body")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"body: malformed JSON ({e})", "body") from None

    def _handle(self, model: str | None):
        name = model or self.cfg.models[0].name
        if name not in self.replicas:
            raise ApiError(400, f"model {name!r} is not served; choose one of {sorted(self.replicas)}", "model")
        return name, self.replicas[name]

    def _check_input(self, text: str) -> None:
        if not text.strip():
            raise ApiError(400, "input must not be empty", "input")
        if len(text) > self.cfg.max_input_chars:
            raise ApiError(400, f"input is longer than {self.cfg.max_input_chars} characters", "input")

    async def _open_stream(self, handle, payload: dict, incremental: bool = False):
        gen = handle.options(stream=True).stream.remote(payload, incremental)
        try:
            first = await gen.__anext__()
        except Exception as e:  # noqa: BLE001 - Serve back-pressure or a dead replica
            if "BackPressure" in type(e).__name__ or "BackPressure" in str(e):
                raise ApiError(503, "service busy; retry later", None,
                               headers={"Retry-After": str(self.cfg.retry_after_s)}) from None
            log.exception("replica call failed")
            raise ApiError(500, f"replica failed: {_last_line(e)}") from None
        if first["type"] == "error":
            raise _replica_error(first)
        return gen, first

    # --- speech -----------------------------------------------------------------------------------------------
    @app.post("/v1/audio/speech")
    async def speech(self, request: Request) -> Response:
        self._auth(request.headers)
        body = await self._json(request, self.cfg.max_body_bytes)
        if not isinstance(body, dict):
            raise ApiError(400, "body: expected a JSON object", "body")
        try:
            req = SpeechRequest.model_validate(body)
        except ValidationError as e:
            raise from_validation_error(e) from None
        self._check_input(req.input)
        name, handle = self._handle(req.model)
        payload = req.model_dump(exclude={"response_format", "stream_format", "speed"})
        payload["model"] = name
        try:
            encoder = make_encoder(req.response_format)
        except ValueError as e:
            raise bad_request(e, "response_format") from None
        gen, _ = await self._open_stream(handle, payload)
        if req.stream_format == "sse":
            return StreamingResponse(self._sse(gen, encoder), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return StreamingResponse(self._audio(gen, encoder), media_type=encoder.media_type,
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _audio(self, gen, encoder):
        try:
            async for item in gen:
                if item["type"] == "audio":
                    data = encoder.push(item["pcm"])
                    if data:
                        yield data
                elif item["type"] == "end":
                    tail = encoder.finish()
                    if tail:
                        yield tail
        finally:
            gen.cancel()

    async def _sse(self, gen, encoder):
        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            async for item in gen:
                if item["type"] == "audio":
                    data = encoder.push(item["pcm"])
                    if data:
                        yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
                elif item["type"] == "end":
                    tail = encoder.finish()
                    if tail:
                        yield event({"type": "speech.audio.delta", "audio": base64.b64encode(tail).decode()})
                    yield event({"type": "speech.audio.done", "finish_reason": item["finish_reason"],
                                 "num_frames": item["num_frames"], "time_to_first_audio_s": item["ttfa_s"]})
        finally:
            gen.cancel()

    async def synthesize_bulk(self, payload: dict) -> dict:
        """Batch jobs' entry (`serve.get_app_handle("qtts").synthesize_bulk.remote(payload)`): the speech request
        fields -> {"pcm": float32 [N], "sample_rate": 24000, "finish_reason", "num_frames"} at bulk priority."""
        if not isinstance(payload, dict):
            raise ValueError("payload must be a dict of speech request fields")
        payload = {k: v for k, v in payload.items() if v is not None}
        try:
            fields = SynthesisFields.model_validate({k: v for k, v in payload.items() if k != "input"})
        except ValidationError as e:
            raise ValueError(from_validation_error(e).message) from None
        text = payload.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("input must be a non-empty string")
        if len(text) > self.cfg.max_input_chars:
            raise ValueError(f"input is longer than {self.cfg.max_input_chars} characters")
        try:
            name, handle = self._handle(fields.model)
        except ApiError as e:
            raise ValueError(e.message) from None
        data = fields.model_dump()
        data.update(input=text, model=name, priority="bulk")
        try:
            return await handle.synthesize.remote(data)
        except ValueError as e:
            raise ValueError(_last_line(e)) from None

    # --- voices -----------------------------------------------------------------------------------------------
    @app.get("/v1/audio/voices")
    async def list_voices(self, request: Request) -> dict:
        self._auth(request.headers)
        data = []
        for name, handle in self.replicas.items():
            info = await self._model_info(name, handle)
            for spk in info.get("speakers") or []:
                data.append({"id": spk, "object": "voice", "name": spk, "model": name, "builtin": True})
        stored = await asyncio.to_thread(self.voices.list)
        data += [{**v, "builtin": False} for v in stored]
        return {"object": "list", "data": data}

    @app.post("/v1/audio/voices")
    async def create_voice(self, request: Request) -> JSONResponse:
        self._auth(request.headers)
        limit = self.cfg.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit + 65536:
            raise ApiError(413, f"upload is larger than {limit} bytes", "file")
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            form = await self._json(request, limit * 2)
            if not isinstance(form, dict):
                raise ApiError(400, "body: expected a JSON object", "body")
            audio = None
        elif ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            try:
                form = await request.form(max_files=1, max_fields=16)
            except Exception as e:  # noqa: BLE001 - starlette's multipart errors
                raise ApiError(400, f"body: bad multipart form ({e})", "body") from None
            upload = form.get("file")
            audio = None
            if upload is not None and not isinstance(upload, str):
                audio = await upload.read(limit + 1)
                if len(audio) > limit:
                    raise ApiError(413, f"file is larger than {limit} bytes", "file")
        else:
            raise ApiError(415, "send multipart/form-data (file, ref_text, name) or JSON with audio_base64",
                           "content-type")
        audio = audio if audio is not None else await self._audio_from_fields(form)
        name = str(form.get("name") or "").strip()
        if not name or len(name) > 100:
            raise ApiError(400, "name is required (1-100 characters)", "name")
        ref_text = str(form.get("ref_text") or "").strip() or None
        xvec = str(form.get("x_vector_only", "false")).lower() in ("1", "true", "yes")
        if not xvec and not ref_text:
            raise ApiError(400, "ref_text is required unless x_vector_only=true", "ref_text")
        base_models = [m.name for m in self.cfg.models
                       if (await self._model_info(m.name, self.replicas[m.name])).get("type") == "base"]
        model = str(form.get("model") or (base_models[0] if base_models else ""))
        if model not in base_models:
            raise ApiError(400, f"model {model!r} cannot encode voices; Base models: {base_models}", "model")
        try:
            info = await self.replicas[model].create_voice.remote(audio, ref_text, xvec, name)
        except ValueError as e:
            msg = _last_line(e)
            param = "file" if msg.startswith("ref_audio") else "ref_text" if msg.startswith("ref_text") else "file"
            raise ApiError(400, msg.replace("ref_audio", "file", 1), param) from None
        return JSONResponse(info, status_code=201)

    async def _audio_from_fields(self, form) -> bytes:
        b64, url = form.get("audio_base64"), form.get("audio_url")
        if b64:
            try:
                data = base64.b64decode(str(b64).split(",", 1)[-1], validate=True)
            except ValueError:
                raise ApiError(400, "audio_base64: invalid base64", "audio_base64") from None
            if len(data) > self.cfg.max_upload_bytes:
                raise ApiError(413, f"audio_base64 is larger than {self.cfg.max_upload_bytes} bytes", "audio_base64")
            return data
        if url:
            url = str(url)
            if not any(url.startswith(p) for p in self.cfg.allowed_audio_url_prefixes):
                raise ApiError(400, "audio_url: fetching URLs is disabled unless allowed_audio_url_prefixes lists it",
                               "audio_url")
            return await asyncio.to_thread(self._fetch, url)
        raise ApiError(400, "file is required (multipart upload), or audio_base64", "file")

    def _fetch(self, url: str) -> bytes:
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - allow-listed prefix
                data = r.read(self.cfg.max_upload_bytes + 1)
        except OSError as e:
            raise ApiError(400, f"audio_url: could not fetch ({e})", "audio_url") from None
        if len(data) > self.cfg.max_upload_bytes:
            raise ApiError(413, f"audio_url: larger than {self.cfg.max_upload_bytes} bytes", "audio_url")
        return data

    @app.delete("/v1/audio/voices/{voice_id}")
    async def delete_voice(self, voice_id: str, request: Request) -> dict:
        self._auth(request.headers)
        try:
            await asyncio.to_thread(self.voices.delete, voice_id)
        except KeyError:
            raise ApiError(404, f"voice {voice_id!r} not found", "voice_id") from None
        return {"id": voice_id, "object": "voice", "deleted": True}

    # --- models, health, metrics, playground ------------------------------------------------------------------
    async def _model_info(self, name: str, handle) -> dict:
        if name not in self._info:
            self._info[name] = await handle.info.remote()
        return self._info[name]

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict:
        self._auth(request.headers)
        return {"object": "list",
                "data": [await self._model_info(n, h) for n, h in self.replicas.items()]}

    @app.get("/health")
    async def health(self) -> dict:
        out = {}
        for name, handle in self.replicas.items():
            try:
                s = await asyncio.wait_for(handle.stats.remote(), timeout=5)
                out[name] = {"status": "ok", "active_sessions": s["active_sessions"]}
            except Exception as e:  # noqa: BLE001
                out[name] = {"status": "error", "error": _last_line(e)}
        ok = all(v["status"] == "ok" for v in out.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": out}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics(self) -> PlainTextResponse:
        per_model = {}
        for name, handle in self.replicas.items():
            try:
                per_model[name] = await asyncio.wait_for(handle.stats.remote(), timeout=5)
            except Exception:  # noqa: BLE001 - a missing model shows as absent series
                log.warning("stats of %s unavailable", name)
        return PlainTextResponse(prometheus_text(per_model, dict(HTTP_ERRORS)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/")
    @app.get("/playground")
    async def playground(self) -> HTMLResponse:
        html = resources.files("serve").joinpath("static/playground.html").read_text()
        return HTMLResponse(html)

    # --- WebSocket: incremental text in, audio out ------------------------------------------------------------
    @app.websocket("/v1/audio/speech/stream")
    async def speech_stream(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            self._auth(ws.headers, dict(ws.query_params))
            cfg = WSConfig.model_validate(await self._ws_message(ws))
            name, handle = self._handle(cfg.model)
            payload = cfg.model_dump(exclude={"type", "response_format"})
            payload["model"] = name
            gen, first = await self._open_stream(handle, payload, incremental=True)
        except ValidationError as e:
            return await self._ws_fail(ws, from_validation_error(e))
        except ApiError as e:
            return await self._ws_fail(ws, e)
        except WebSocketDisconnect:
            return
        encoder = make_encoder(cfg.response_format)
        await ws.send_json({"type": "start", "model": name, "sample_rate": 24000, "format": cfg.response_format})
        feeder = asyncio.create_task(self._ws_feed(ws, handle, first["key"]))
        writer = asyncio.create_task(self._ws_write(ws, gen, encoder))
        try:
            done, _ = await asyncio.wait({feeder, writer}, return_when=asyncio.FIRST_COMPLETED)
            if feeder in done and feeder.result() is not None:
                writer.cancel()
                gen.cancel()
                return await self._ws_fail(ws, feeder.result())
            await writer
        except WebSocketDisconnect:
            pass
        finally:
            gen.cancel()
            feeder.cancel()
            writer.cancel()

    async def _ws_write(self, ws: WebSocket, gen, encoder) -> None:
        async for item in gen:
            if item["type"] == "audio":
                data = encoder.push(item["pcm"])
                if data:
                    await ws.send_bytes(data)
            elif item["type"] == "end":
                tail = encoder.finish()
                if tail:
                    await ws.send_bytes(tail)
                await ws.send_json({"type": "done", "finish_reason": item["finish_reason"],
                                    "num_frames": item["num_frames"], "time_to_first_audio_s": item["ttfa_s"]})
                await ws.close(1000)
                return

    async def _ws_message(self, ws: WebSocket) -> Any:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout=self.cfg.ws_idle_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"no message for {self.cfg.ws_idle_timeout_s} s", "message") from None
        if msg["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(msg.get("code", 1000))
        text = msg.get("text")
        if text is None:
            raise ApiError(400, "message: expected a JSON text message", "message")
        if len(text) > self.cfg.max_body_bytes:
            raise ApiError(413, "message: too large", "message")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"message: malformed JSON ({e})", "message") from None
        if not isinstance(data, dict) or "type" not in data:
            raise ApiError(400, "message: expected an object with 'type' (config, text or end)", "type")
        return data

    async def _ws_feed(self, ws: WebSocket, handle, key: int) -> ApiError | None:
        """Text messages -> the replica holding the session; returns an error to report, or None when ended."""
        total = 0
        try:
            while True:
                data = await self._ws_message(ws)
                kind = data.get("type")
                if kind == "text":
                    piece = WSText.model_validate(data).text
                    total += len(piece)
                    if total > self.cfg.max_input_chars:
                        return ApiError(400, f"text is longer than {self.cfg.max_input_chars} characters", "text")
                elif kind == "end":
                    WSEnd.model_validate(data)
                    piece = None
                else:
                    return ApiError(400, f"type must be 'text' or 'end' after the config, got {kind!r}", "type")
                err = await self._feed(handle, key, piece)
                if err is not None:
                    return ApiError(400, f"text: {err}", "text")
                if piece is None:
                    return None
        except ValidationError as e:
            return from_validation_error(e)
        except ApiError as e:
            return e
        except WebSocketDisconnect:
            return None

    async def _feed(self, handle, key: int, piece: str | None) -> str | None:
        # The session lives on one replica; with several replicas the call may land elsewhere: try again.
        for _ in range(32):
            err = await handle.feed.remote(key, piece)
            if err != "unknown session":
                return err
        return "session lost"

    async def _ws_fail(self, ws: WebSocket, err: ApiError) -> None:
        HTTP_ERRORS[f"ws_{err.status}"] += 1
        try:
            await ws.send_json({"type": "error", **err.body()})
            await ws.close(1008 if err.status < 500 else 1011)
        except Exception:  # noqa: BLE001 - the client is already gone
            pass
