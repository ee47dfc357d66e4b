"""The model replica: a Serve deployment that owns one Engine and streams its chunks to many requests at once.

Handle protocol of `stream(payload)` (an async generator, called with `.options(stream=True)`), plain dicts:
    {"type": "error", "status": 400|503, "message": str, "param": str|None, "retry_after": int}   (only item)
    {"type": "start", "key": int}                       then
    {"type": "audio", "pcm": np.ndarray float32 [N]}    ... then
    {"type": "end", "finish_reason": str, "num_frames": int, "ttfa_s": float|None}
Cancelling the call (the client went away) cancels the engine session at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import numpy as np
from ray import serve

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import validate as validate_request

from .config import ModelConfig
from .metrics import ReplicaMetrics, summarize
from .requests import build_request, load_model, model_info
from .scheduler import Busy, Scheduler, SchedulerLimits, Ticket
from .schemas import api_field
from .voices import VoiceStore

log = logging.getLogger(__name__)

SAMPLES_PER_FRAME = 1920


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> dict:
    return {"type": "error", "status": status, "message": message, "param": param, "retry_after": retry_after}


class ReplicaCore:
    """Everything the deployment does, without Serve (unit tests build it directly)."""

    def __init__(self, model, cfg: ModelConfig, voices: VoiceStore | None, retry_after_s: int = 1) -> None:
        self.model, self.cfg, self.voices = model, cfg, voices
        self.engine = Engine(model, max_sessions=cfg.max_sessions, max_queue=cfg.max_queue + cfg.max_sessions)
        self.metrics = ReplicaMetrics(cfg.name)
        self.scheduler = Scheduler(self.engine, SchedulerLimits(max_queue=cfg.max_queue,
                                                                interactive_reserve=cfg.interactive_reserve,
                                                                retry_after_s=retry_after_s),
                                   on_finish=self._on_finish, validate=partial(validate_request, model))
        self._incremental: dict[int, Ticket] = {}

    def warm_up(self) -> float:
        """One short synthesis (allocations, first-call costs) before traffic; returns seconds."""
        t = time.perf_counter()
        kind = {"custom_voice": "custom_voice", "voice_design": "voice_design"}.get(self.model.tts_model_type)
        if kind is None:
            return 0.0  # Base needs a reference voice; its first request pays the first-call costs
        req = SynthesisRequest(kind=kind, text="Warm up.", speaker=(self.model.get_supported_speakers() or [None])[0],
                               instruct="A calm voice." if kind == "voice_design" else None,
                               sampling=SamplingParams(max_new_tokens=6), seed=0)
        self.engine.run_all([req])
        return time.perf_counter() - t

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduler.start(loop)

    def _on_finish(self, ticket: Ticket, chunk) -> None:
        if chunk.finish_reason == "error":
            self.metrics.error("engine")
        rtf = None
        if ticket.samples and chunk.finish_reason not in ("cancelled", "error"):
            rtf = (time.perf_counter() - ticket.t_submit) / (ticket.samples / 24000)
        self.metrics.finished(ticket.ttfa_s if ticket.request.priority == "interactive" else None, rtf)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.gauges(self.scheduler.active_sessions, self.scheduler.queue_length)

    async def _submit(self, payload: dict[str, Any], incremental: bool) -> Ticket | dict:
        try:
            req = build_request(self.model, self.cfg, payload, self.voices,
                                **({"text": None} if incremental else {}))
            ticket = await self.scheduler.submit(req)
        except RequestError as e:  # the core's verdict, naming its field; API_FIELD names it for the client
            self.metrics.error("bad_request")
            param = api_field(e.field)
            return _error(400, f"{param}: {e.message}" if param else e.message, param)
        except ValueError as e:  # outside the contract (a bug to fix): still the client's 400, not a crash
            log.warning("request refused without a RequestError: %s", e)
            self.metrics.error("bad_request")
            return _error(400, str(e), None)
        except Busy as e:
            self.metrics.error("busy")
            return _error(503, str(e), None, e.retry_after_s)
        self.metrics.request(req.priority)
        self._gauges()
        return ticket

    async def stream(self, payload: dict[str, Any], incremental: bool = False) -> AsyncIterator[dict]:
        ticket = await self._submit(payload, incremental)
        if isinstance(ticket, dict):
            yield ticket
            return
        if incremental:
            self._incremental[ticket.key] = ticket
        try:
            yield {"type": "start", "key": ticket.key}
            async for ch in self.scheduler.chunks(ticket):
                if ch.pcm.size:
                    yield {"type": "audio", "pcm": ch.pcm}
                if ch.is_last:
                    yield {"type": "end", "finish_reason": ch.finish_reason,
                           "num_frames": ticket.samples // SAMPLES_PER_FRAME, "ttfa_s": ticket.ttfa_s}
        finally:
            self._incremental.pop(ticket.key, None)
            self.scheduler.cancel(ticket)  # no-op when it finished
            self._gauges()

    def feed(self, key: int, piece: str | None) -> str | None:
        """Text for an incremental session (None = end). Returns None on success, else an error message."""
        ticket = self._incremental.get(key)
        if ticket is None:
            return "unknown session"
        try:
            if piece is None:
                self.scheduler.end_text(ticket)
            else:
                self.scheduler.append_text(ticket, piece)
        except ValueError as e:
            return str(e)
        return None

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Whole utterance as one array (bulk priority unless the payload says otherwise); ValueError on bad input."""
        payload = {"priority": "bulk", **payload}
        pcm, end = [], None
        async for item in self.stream(payload):
            if item["type"] == "error":
                if item["status"] == 400:
                    raise ValueError(item["message"])
                raise RuntimeError(item["message"])
            if item["type"] == "audio":
                pcm.append(item["pcm"])
            elif item["type"] == "end":
                end = item
        audio = np.concatenate(pcm).astype(np.float32) if pcm else np.zeros(0, np.float32)
        return {"pcm": audio, "sample_rate": 24000, "finish_reason": end["finish_reason"],
                "num_frames": len(audio) // SAMPLES_PER_FRAME}

    async def create_voice(self, audio: bytes, ref_text: str | None, x_vector_only: bool, name: str,
                           owner: str = "") -> dict:
        """Encode the reference once and store the prompt owned by `owner` (an API key digest); returns the voice's
        info. RequestError on bad audio (checked from its header first) or a bad name."""
        if self.voices is None:
            raise RequestError("voice", "no voice store is configured")
        items = await asyncio.to_thread(self.model.create_voice_clone_prompt, audio, ref_text, x_vector_only)
        return await asyncio.to_thread(self.voices.create, items[0], name=name, model=self.cfg.name, owner=owner)

    def info(self) -> dict[str, Any]:
        return model_info(self.model, self.cfg)

    def stats(self) -> dict[str, Any]:
        s = summarize(self.scheduler.stats)
        s.update(active_sessions=self.scheduler.active_sessions, queue_length=self.scheduler.queue_length,
                 engine_active=self.engine.num_active, engine_queued=self.engine.num_queued)
        return s


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class TTSReplica:
    """One model on one device (GPU when `num_gpus` > 0); options (name, resources, autoscaling) come from app.py."""

    async def __init__(self, model_cfg: dict[str, Any], cache_dir: str, voices_uri: str,
                       retry_after_s: int = 1) -> None:
        cfg = ModelConfig.from_dict(model_cfg)
        model = await asyncio.to_thread(load_model, cfg, cache_dir)
        self.core = ReplicaCore(model, cfg, VoiceStore.from_uri(voices_uri), retry_after_s)
        if cfg.warmup:
            secs = await asyncio.to_thread(self.core.warm_up)
            log.info("replica for %s warmed up in %.2f s", cfg.name, secs)
        self.core.start(asyncio.get_running_loop())

    async def stream(self, payload: dict[str, Any], incremental: bool = False) -> AsyncIterator[dict]:
        async for item in self.core.stream(payload, incremental):
            yield item

    async def feed(self, key: int, piece: str | None) -> str | None:
        return self.core.feed(key, piece)

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.core.synthesize(payload)

    async def create_voice(self, audio: bytes, ref_text: str | None, x_vector_only: bool, name: str,
                           owner: str = "") -> dict:
        return await self.core.create_voice(audio, ref_text, x_vector_only, name, owner)

    async def info(self) -> dict[str, Any]:
        return self.core.info()

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.scheduler.stop()
