"""The model replica: a Serve deployment that owns one Engine and streams its chunks to many requests at once.

Handle protocol of `stream(payload, incremental=False, lease=False, consumer=None)` (an async generator, called
with `.options(stream=True)`), plain dicts:
    {"type": "error", "status": 400|503, "message": str, "param": str|None, "retry_after": int}   (only item;
     a 503 (full) also names this replica: "replica": its Serve unique id)
    {"type": "start", "session": str}                 then
    {"type": "audio", "pcm": np.ndarray float32 [N]}  ... then
    {"type": "end", "finish_reason": str, "num_frames": int, "ttfa_s": float|None, "text_tokens": int,
     "status": None | int, "message": None | str, "param": None | str, "field": None | str,
     "retry_after": None | int}
        (status set: the session FAILED; `param` names its field as the API does (`input`), `field` as the core
        does (`text`); `retry_after`: a 503's seconds to wait before trying again, sent as Retry-After)
The session id routes later calls to this replica (routing.py): `feed(session, text, end)` for incremental text,
`renew([sessions])` for the consumer's lease (`lease=True`: a session nobody renews for `lease_s` is cancelled once
its `consumer`, the actor that renews, is confirmed dead; liveness.py).
Cancelling the call (the client went away) cancels the engine session at its next step.

For batch jobs, one hop at bulk priority:
    h = serve.get_deployment_handle(f"tts-{model}", app_name)
    out = await h.synthesize.remote({"input": "...", "voice": "vivian", ...})
    # {"pcm": float32 [N], "sample_rate": 24000, "finish_reason": str, "num_frames": int,
    #  "checkpoint_digest": str,   (the checkpoint that made the audio, as `info()` reports it: a job keys on it)
    #  "settings": {"dtype", "device", "default_max_new_tokens"}}   (the replica's other audio settings)
    # raises qwen_tts_core.errors.RequestError (bad input, `.field`), serve.scheduler.Busy (`.retry_after_s`),
    # serve.scheduler.SynthesisFailed (accepted, then failed: engine error, deadline)
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
from qwen_tts_core.errors import RequestError, SessionEnded
from qwen_tts_core.generate.requests import validate as validate_request
from qwen_tts_core.types import SAMPLE_RATE, SAMPLES_PER_FRAME

from .config import ModelConfig
from .liveness import RAY_ACTORS
from .metrics import ReplicaMetrics, summarize
from .requests import build_request, load_model, model_info, render_settings
from .scheduler import Busy, Scheduler, SchedulerLimits, SynthesisFailed, Ticket
from .schemas import api_field, from_request_error
from .sessions import OpenSession, SessionLimits, SessionTable, UnknownSession
from .voices import VoiceStore

log = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.5
STUCK_STEP_S = 300.0   # one engine step running longer than this marks the replica unhealthy (a hung device call)
ENGINE_OPTIONS = ("max_len", "cuda_graphs", "batch_buckets", "compile", "audio_dtype")


def _error(status: int, message: str, param: str | None = None, retry_after: int | None = None) -> dict:
    return {"type": "error", "status": status, "message": message, "param": param, "retry_after": retry_after}


def _api_param(field: str | None) -> str | None:
    """A core argument name -> the API field clients know (schemas' one table)."""
    return api_field(field) if field else None


def _api_named(field: str | None, message: str, incremental: bool = False) -> tuple[str, str | None]:
    """(message, param) of a failure the core reports about `field` (its argument name), as the API names it. The
    core's message may carry its own prefix (`str(RequestError)`: `text: ...`); that prefix becomes the API field's
    (`input: ...`) through from_request_error, which names every other core error. An incremental session's `text`
    stays `text`: the WebSocket's own message field (as its feed refusals name it)."""
    if not field:
        return message, None
    if incremental and field == "text":
        return message, "text"
    prefix = f"{field}: "
    if not message.startswith(prefix):
        return message, _api_param(field)
    err = from_request_error(RequestError(field, message[len(prefix):]))
    return err.message, err.param


def as_request_error(e: ValueError) -> RequestError:
    """Bad input as the typed core error (the core raises RequestError; any other ValueError is about the input)."""
    if not isinstance(e, RequestError):  # outside the core contract (a bug to fix): still the caller's 400
        log.warning("request refused without a RequestError: %s", e)
        return RequestError("request", str(e))
    return e


def engine_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The Engine options set in the model config (unset ones keep the engine's defaults)."""
    import inspect

    out = {k: getattr(cfg, k) for k in ENGINE_OPTIONS if getattr(cfg, k) is not None}
    accepted = inspect.signature(Engine.__init__).parameters
    unknown = sorted(set(out) - set(accepted))
    if unknown:
        raise ValueError(f"models[{cfg.name}]: this engine has no option(s) {unknown}")
    if "batch_buckets" in out:
        out["batch_buckets"] = tuple(out["batch_buckets"])
    return out


class ReplicaCore:
    """Everything the deployment does, without Serve (unit tests build it directly)."""

    def __init__(self, model, cfg: ModelConfig, voices: VoiceStore | None, retry_after_s: int = 1,
                 limits: SessionLimits | None = None, owner: str = "local",
                 liveness=None) -> None:
        """`liveness` (liveness.RAY_ACTORS): checks the consumer named with a leased stream and whether it lives;
        None: no consumer is kept, a lapsed lease cancels at once."""
        self.model, self.cfg, self.voices = model, cfg, voices
        self.liveness = liveness
        self.engine = Engine(model, max_sessions=cfg.max_sessions, max_queue=cfg.max_queue + cfg.max_sessions,
                             audio_chunk_frames=(cfg.first_chunk_frames, cfg.chunk_frames), **engine_kwargs(cfg))
        self.metrics = ReplicaMetrics(cfg.name)
        self.scheduler = Scheduler(self.engine, SchedulerLimits(max_queue=cfg.max_queue,
                                                                interactive_reserve=cfg.interactive_reserve,
                                                                max_bulk_waiting=cfg.max_bulk_queue,
                                                                retry_after_s=retry_after_s),
                                   on_finish=self._on_finish, validate=partial(validate_request, model))
        self.sessions = SessionTable(owner, limits or SessionLimits())
        self._watch_task: asyncio.Task | None = None
        self._digest: str | None = None
        self._asking: set[str] = set()        # consumers whose liveness is being asked (one question each at a time)
        self._tasks: set[asyncio.Task] = set()  # those questions

    def warm_up(self) -> float:
        """First-call costs paid before traffic; returns seconds. The engine's own warm-up for every model type, Base
        included (graphs, a prefill, steps, an audio decode; no request needed), then, for a model with a voice of its
        own, one short synthesis through the request path (text, prompt, sampling)."""
        t = time.perf_counter()
        self.engine.warm_up()
        kind = {"custom_voice": "custom_voice", "voice_design": "voice_design"}.get(self.model.tts_model_type)
        if kind is None:
            return time.perf_counter() - t  # Base: a request needs a reference voice, which a replica has none of
        req = SynthesisRequest(kind=kind, text="Warm up.", speaker=(self.model.get_supported_speakers() or [None])[0],
                               instruct="A calm voice." if kind == "voice_design" else None,
                               sampling=SamplingParams(max_new_tokens=6), seed=0)
        self.engine.run_all([req])
        return time.perf_counter() - t

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.scheduler.start(loop)
        self._watch_task = loop.create_task(self._watch())

    def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for t in list(self._tasks):
            t.cancel()
        self.scheduler.stop()

    async def _watch(self) -> None:
        """End sessions past their idle timeout or deadline, and cancel those whose consumer is gone."""
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            expired = self.sessions.expired(WATCH_PERIOD_S)
            by_consumer: dict[str | None, list] = {}
            for s, failure in expired:
                if failure is not None:
                    log.info("session %s: %s", s.sid, failure.message)
                    self.scheduler.fail(s.ticket, failure.status, failure.message, failure.field)
                else:
                    by_consumer.setdefault(s.consumer["id"] if s.consumer else None, []).append(s)
            for cid, group in by_consumer.items():
                if cid is None:  # sessions that named no consumer: nobody to ask
                    self._settle(group, False)
                elif cid not in self._asking:  # asked in the background: a slow answer holds back no other check
                    self._asking.add(cid)
                    task = asyncio.get_running_loop().create_task(self._ask_and_settle(group))
                    self._tasks.add(task)
                    task.add_done_callback(lambda t, cid=cid: (self._asking.discard(cid), self._tasks.discard(t)))

    async def _ask_and_settle(self, sessions: list) -> None:
        """Sessions of one consumer: ask whether it lives, then settle their lapsed leases."""
        self._settle(sessions, await self._consumer_alive(sessions[0].consumer))

    def _settle(self, sessions: list, alive: bool) -> None:
        """Lapsed leases: cancel the sessions when their consumer is gone, else extend them."""
        for s in sessions:
            if self.sessions.lapsed(s, alive):
                log.warning("session %s: consumer gone (lease expired); cancelling", s.sid)
                self.scheduler.cancel(s.ticket)
            else:
                log.warning("session %s: lease renewals late but its consumer %s lives; lease extended",
                            s.sid, s.consumer["id"])

    async def _consumer_alive(self, consumer: dict) -> bool:
        """Whether the consumer (an actor) lives, asked in a thread. An answer slower than a lease counts as alive
        (the session deadline bounds it)."""
        if self.liveness is None:
            return False
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.liveness.alive, consumer),
                                          self.sessions.limits.lease_s)
        except asyncio.TimeoutError:
            return True

    def _on_finish(self, ticket: Ticket, chunk) -> None:
        if ticket.failure is not None or chunk.finish_reason == "error":
            self.metrics.error("engine" if ticket.failure is None else "session")
        rtf = None
        if ticket.samples and chunk.finish_reason not in ("cancelled", "error") and ticket.failure is None:
            rtf = (time.perf_counter() - ticket.t_submit) / (ticket.samples / SAMPLE_RATE)
        self.metrics.finished(ticket.ttfa_s if ticket.request.priority == "interactive" else None, rtf)
        self._gauges()

    def health(self) -> str | None:
        """Why this replica cannot serve any more, or None: its step loop ended or hangs, or its device fails a
        one-op probe (a CUDA sticky error fails every later step). Blocking (call it in a thread)."""
        reason = self.scheduler.health(STUCK_STEP_S)
        if reason is not None:
            return reason
        try:
            self.engine.probe_device()
        except Exception as e:  # noqa: BLE001 - any failure of the probe is the answer
            return f"device {self.engine.device} fails: {type(e).__name__}: {str(e).strip()[:200]}"
        return None

    def _gauges(self) -> None:
        self.metrics.gauges(self.scheduler.active_sessions, self.scheduler.queue_length)

    async def _submit(self, payload: dict[str, Any], incremental: bool) -> Ticket:
        """RequestError (bad input) or Busy (full)."""
        if not isinstance(payload, dict):
            raise RequestError("payload", "must be a dict of request fields")
        try:
            # in a thread: a stored voice is read from the store (an S3 HEAD/GET): on the loop it stalled every
            # other stream's chunks for as long
            req = await asyncio.to_thread(build_request, self.model, self.cfg, payload, self.voices,
                                          **({"text": None} if incremental else {}))
            ticket = await self.scheduler.submit(req)
        except ValueError as e:
            self.metrics.error("bad_request")
            raise as_request_error(e) from None
        except Busy:
            self.metrics.error("busy")
            raise
        self.metrics.request(req.priority)
        self._gauges()
        return ticket

    def _end_item(self, ticket: Ticket, ch, incremental: bool = False) -> dict:
        """The stream's last item. A failure names its field twice: `field`, the core argument name (synthesize
        raises RequestError with it, as the handle contract promises batch callers: `text`, wherever the problem was
        found), and `param`, the API's name for it (`input`: the HTTP/WS error's `param`), which its message starts
        with as every other error's does (`_api_named`; an incremental session's `text` stays `text`)."""
        prompt = getattr(ticket.session, "prompt", None)
        end = {"type": "end", "finish_reason": ch.finish_reason, "num_frames": ticket.samples // SAMPLES_PER_FRAME,
               "ttfa_s": ticket.ttfa_s, "status": None, "message": None, "param": None, "field": None,
               "retry_after": None,
               "text_tokens": prompt.num_text_tokens if prompt is not None else 0}  # SSE `usage` (streaming.py)
        f = ticket.failure
        if f is not None:
            message, param = _api_named(f.field, f.message, incremental)
            end.update(finish_reason="error", status=f.status, message=message, field=f.field, param=param,
                       retry_after=f.retry_after_s)
        elif ch.finish_reason == "error":
            field = getattr(ch, "error_field", None)
            message = (getattr(ch, "error", None) or getattr(ticket.session, "error", None)
                       or "synthesis failed in the engine")
            message, param = _api_named(field, message, incremental)
            end.update(status=400 if field else 500, message=message, field=field, param=param)
        elif ch.finish_reason == "cancelled":
            end.update(status=500, message="the session was cancelled")
        return end

    async def stream(self, payload: dict[str, Any], incremental: bool = False, lease: bool = False,
                     consumer: Any = None) -> AsyncIterator[dict]:
        try:
            ticket = await self._submit(payload, incremental)
        except RequestError as e:
            err = from_request_error(e)
            yield _error(400, err.message, err.param)
            return
        except Busy as e:
            # `replica`: which one is full (the ingress then asks the others before answering 503)
            yield {**_error(503, str(e), None, e.retry_after_s), "replica": self.sessions.owner}
            return
        consumer = self.liveness.identity(consumer) if lease and self.liveness is not None else None
        sess = self.sessions.open(ticket, incremental, bool(lease), consumer)
        try:
            yield {"type": "start", "session": sess.sid}
            async for ch in self.scheduler.chunks(ticket):
                if ch.pcm.size:
                    yield {"type": "audio", "pcm": ch.pcm}
                if ch.is_last:
                    yield self._end_item(ticket, ch, incremental)
        finally:
            self.sessions.close(sess.sid)
            self.scheduler.cancel(ticket)  # no-op when it finished
            self._gauges()

    def feed(self, session: str, text: str = "", end: bool = False) -> dict:
        """Text for an incremental session held here. Raises UnknownSession (not held here / ended) or
        RequestError('text') (bad text, limits; the session then fails too). Returns {"chars": total so far}."""
        s: OpenSession = self.sessions.get(session)
        t = s.ticket
        if t.finished or t.failure is not None or t.cancelled:
            raise UnknownSession(session, "has ended")
        if not s.incremental:
            raise RequestError("text", "this session was opened with its full text")
        try:
            text = self.sessions.take_text(s, text, end)
            if text:
                self.scheduler.append_text(t, text)
            if end:
                self.scheduler.end_text(t)
        except SessionEnded:  # it ended in the engine before its ticket saw it: not the text's fault
            raise UnknownSession(session, "has ended") from None
        except ValueError as e:
            err = as_request_error(e)
            self.scheduler.fail(t, 400, str(err), "text")
            raise err from None
        return {"chars": s.text_chars}

    def renew(self, sessions: list[str]) -> list[str]:
        """The consumer of these sessions is alive; returns the ids this replica does not hold."""
        return self.sessions.renew(list(sessions))

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Whole utterance as one array, at bulk priority unless the payload says otherwise.
        Raises RequestError (bad input), Busy (full: retry later), SynthesisFailed (accepted, then failed)."""
        if not isinstance(payload, dict):
            raise RequestError("payload", "must be a dict of request fields")
        ticket = await self._submit({"priority": "bulk", **payload}, False)
        sess = self.sessions.open(ticket, False, False)
        pcm, end = [], None
        try:
            async for ch in self.scheduler.chunks(ticket):
                if ch.pcm.size:
                    pcm.append(ch.pcm)
                if ch.is_last:
                    end = self._end_item(ticket, ch)
        finally:
            self.sessions.close(sess.sid)
            self.scheduler.cancel(ticket)
        if end["status"] is not None:
            if end["status"] == 400 and end["field"]:   # the core's name, and its message without the API's prefix
                param = end["param"]
                raise RequestError(end["field"], end["message"].removeprefix(f"{param}: ") if param else end["message"])
            raise SynthesisFailed(end["message"], end["finish_reason"], end["status"])
        audio = np.concatenate(pcm).astype(np.float32) if pcm else np.zeros(0, np.float32)
        return {"pcm": audio, "sample_rate": SAMPLE_RATE, "finish_reason": end["finish_reason"],
                "num_frames": len(audio) // SAMPLES_PER_FRAME, "checkpoint_digest": self.checkpoint_digest(),
                "settings": render_settings(self.model, self.cfg)}

    async def create_voice(self, audio: bytes, ref_text: str | None, x_vector_only: bool, name: str,
                           owner: str = "") -> dict:
        """Encode the reference once and store the prompt owned by `owner` (an API key digest); returns the voice's
        info. RequestError on bad audio (checked from its header first) or a bad name."""
        if self.voices is None:
            raise RequestError("voice", "no voice store is configured")
        items = await asyncio.to_thread(self.model.create_voice_clone_prompt, audio, ref_text, x_vector_only,
                                        allow_urls=False)  # uploads only: a client's text never becomes a fetch
        return await asyncio.to_thread(self.voices.create, items[0], name=name, model=self.cfg.name, owner=owner)

    def checkpoint_digest(self) -> str:
        """The content digest of the checkpoint this replica loaded: what `info()` reports and every `synthesize`
        reply carries (batch jobs key their outputs on it and check each reply against the digest they started
        with). Computed once (hashing the files: TTSReplica takes it off the event loop at start)."""
        if self._digest is None:
            from qwen_tts_core.checkpoint.digest import checkpoint_digest

            self._digest = checkpoint_digest(self.model.path)
        return self._digest

    def info(self) -> dict[str, Any]:
        return {**model_info(self.model, self.cfg), "checkpoint_digest": self.checkpoint_digest()}

    def stats(self) -> dict[str, Any]:
        """This replica's numbers (`replica` identifies it: the ingress sums over every replica of a model)."""
        st = self.scheduler.stats
        s = summarize(st)
        s.update(replica=self.sessions.owner, active_sessions=self.scheduler.active_sessions,
                 queue_length=self.scheduler.queue_length, open_sessions=len(self.sessions),
                 engine_active=self.engine.num_active, engine_queued=self.engine.num_queued,
                 idle_waits=st.idle_waits, ttfa_recent_s=list(st.ttfa_s)[-256:],
                 **{f"expired_{k}": v for k, v in self.sessions.expired_counts.items()})
        return s


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class TTSReplica:
    """One model on one device (GPU when `num_gpus` > 0); options (name, resources, router, autoscaling) come from
    app.py. Its methods are the handle API above; `synthesize` is the batch jobs' entry."""

    async def __init__(self, model_cfg: dict[str, Any], cache_dir: str, voices_uri: str,
                       retry_after_s: int = 1, session_limits: dict[str, Any] | None = None) -> None:
        cfg = ModelConfig.from_dict(model_cfg)
        if cfg.num_gpus > 0 and (cfg.device == "auto" or cfg.device.startswith("cuda")):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"models[{cfg.name}]: num_gpus={cfg.num_gpus} but CUDA is not available to this "
                                   f"replica (torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                                   "install a CUDA build of torch, set num_gpus: 0, or device: cpu to hold the GPU "
                                   "resource while computing on the CPU")
        model = await asyncio.to_thread(load_model, cfg, cache_dir)
        owner = serve.get_replica_context().replica_id.unique_id
        self.core = ReplicaCore(model, cfg, VoiceStore.from_uri(voices_uri), retry_after_s,
                                SessionLimits(**(session_limits or {})), owner=owner, liveness=RAY_ACTORS)
        await asyncio.to_thread(self.core.checkpoint_digest)  # hashed here, never on the loop of a request
        if cfg.warmup:
            secs = await asyncio.to_thread(self.core.warm_up)
            log.info("replica for %s warmed up in %.2f s", cfg.name, secs)
        self.core.start(asyncio.get_running_loop())

    async def stream(self, payload: dict[str, Any], incremental: bool = False, lease: bool = False,
                     consumer: Any = None) -> AsyncIterator[dict]:
        async for item in self.core.stream(payload, incremental, lease, consumer):
            yield item

    async def feed(self, session: str, text: str = "", end: bool = False) -> dict:
        return self.core.feed(session, text, end)

    async def renew(self, sessions: list[str]) -> list[str]:
        return self.core.renew(sessions)

    async def synthesize(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.core.synthesize(payload)

    async def create_voice(self, audio: bytes, ref_text: str | None, x_vector_only: bool, name: str,
                           owner: str = "") -> dict:
        return await self.core.create_voice(audio, ref_text, x_vector_only, name, owner)

    async def info(self) -> dict[str, Any]:
        return self.core.info()

    async def check_health(self) -> None:
        """Serve's health check (every `health_check_period_s`): raising marks this replica unhealthy, and Serve
        replaces it rather than route requests that can only fail to it. A probe that hangs (a hung GPU) runs past
        Serve's health check timeout, which counts as a failure too."""
        reason = await asyncio.to_thread(self.core.health)
        if reason is not None:
            log.error("replica for %s unhealthy: %s", self.core.cfg.name, reason)
            raise RuntimeError(f"replica for {self.core.cfg.name} unhealthy: {reason}")

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    def __del__(self) -> None:
        core = getattr(self, "core", None)
        if core is not None:
            core.scheduler.stop()
