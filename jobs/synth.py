"""Synthesis backends for jobs: the engine in this process, or the running Serve app's replicas.

Both take a list of `ChunkJob`s and return one `ChunkResult` per job, never raising for a single bad
job (an unknown voice becomes that job's `error`), so one bad row cannot sink a batch.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)
SAMPLE_RATE = 24000
SERVE_DEFAULT_MODEL = "serve:default"  # with the Serve backend: the app's first model


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of one row to synthesize (non-streaming, bulk priority)."""

    text: str
    voice: str | None
    language: str
    instruct: str | None
    seed: int
    model: str
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkResult:
    """pcm: mono float32 [N] at `sample_rate`, or None with `error` set."""

    pcm: np.ndarray | None
    finish_reason: str | None
    error: str | None = None
    sample_rate: int = SAMPLE_RATE


class Backend(Protocol):
    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]: ...


@dataclass(frozen=True)
class EngineOptions:
    """How engine actors load the model."""

    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = 8
    torch_threads: int = 1
    guard_frames_per_token: float | None = 8.0  # runaway guard: frames allowed per text token (+ base)
    guard_base_frames: int = 64


class EngineBackend:
    """Our continuous-batching engine in this process; models are loaded once and kept."""

    def __init__(self, opts: EngineOptions = EngineOptions()) -> None:
        import torch

        torch.set_num_threads(max(1, opts.torch_threads))
        self.opts = opts
        self._engines: dict[str, Any] = {}
        self._voice_prompts: dict[str, Any] = {}

    def _engine(self, model_id: str) -> Any:
        if model_id not in self._engines:
            import torch

            from qwen_tts_core import Engine, Qwen3TTSModel

            log.info("loading %s on %s", model_id, self.opts.device)
            model = Qwen3TTSModel.from_pretrained(model_id, device_map=self.opts.device,
                                                  dtype=getattr(torch, self.opts.dtype))
            self._engines[model_id] = Engine(model, max_sessions=self.opts.max_sessions,
                                             max_queue=max(64, self.opts.max_sessions * 4),
                                             guard_frames_per_token=self.opts.guard_frames_per_token,
                                             guard_base_frames=self.opts.guard_base_frames)
        return self._engines[model_id]

    def _request(self, model: Any, job: ChunkJob) -> Any:
        from qwen_tts_core import SamplingParams, SynthesisRequest

        kind = model.tts_model_type
        speaker, instruct, prompt = None, job.instruct, None
        if kind == "custom_voice":
            speakers = model.get_supported_speakers() or []
            if not job.voice or job.voice.lower() not in speakers:
                raise ValueError(f"voice: unknown speaker {job.voice!r}; this model has {speakers}")
            speaker = job.voice.lower()
        elif kind == "voice_design":
            instruct = job.instruct or job.voice
            if not instruct:
                raise ValueError("voice/instruct: a voice_design model needs a voice description")
        else:  # base: voice is a saved voice prompt (.safetensors from save_voice_prompt)
            from qwen_tts_core import load_voice_prompt

            if not job.voice:
                raise ValueError("voice: a base model needs a saved voice prompt file as voice")
            if job.voice not in self._voice_prompts:
                self._voice_prompts[job.voice] = load_voice_prompt(job.voice)
            prompt, kind = self._voice_prompts[job.voice], "voice_clone"
        sampling = model.sampling_params(**job.sampling) if hasattr(model, "sampling_params") \
            else SamplingParams().with_overrides(**job.sampling)
        return SynthesisRequest(kind=kind, text=job.text, speaker=speaker, language=job.language or "auto",
                                instruct=instruct, voice_clone_prompt=prompt, non_streaming_mode=True,
                                sampling=sampling, seed=job.seed, priority="bulk")

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        from qwen_tts_core import EngineBusy

        results: list[ChunkResult | None] = [None] * len(jobs)
        pending: list[tuple[int, Any, Any]] = []
        for i, job in enumerate(jobs):
            try:
                engine = self._engine(job.model)
                pending.append((i, engine, self._request(engine.model, job)))
            except (ValueError, OSError) as e:
                results[i] = ChunkResult(None, "error", f"{type(e).__name__}: {e}")
        by_engine: dict[int, list[tuple[int, Any, Any]]] = {}
        for i, engine, req in pending:
            by_engine.setdefault(id(engine), []).append((i, engine, req))
        for group in by_engine.values():
            engine = group[0][1]
            todo = list(group)
            pcm: dict[int, list[np.ndarray]] = {}
            owner: dict[int, int] = {}
            while todo or engine.has_work():
                while todo:  # admit as many as the queue takes
                    i, _, req = todo[0]
                    try:
                        s = engine.add(req)
                    except EngineBusy:
                        break
                    except ValueError as e:
                        results[i] = ChunkResult(None, "error", f"ValueError: {e}")
                        todo.pop(0)
                        continue
                    owner[s.id], pcm[s.id] = i, []
                    todo.pop(0)
                for chunk in engine.step():
                    if chunk.session_id not in owner:
                        continue
                    pcm[chunk.session_id].append(np.asarray(chunk.pcm, dtype=np.float32))
                    if chunk.is_last:
                        i = owner[chunk.session_id]
                        audio = np.concatenate(pcm[chunk.session_id]) if pcm[chunk.session_id] \
                            else np.zeros(0, np.float32)
                        err = None if chunk.finish_reason != "error" else "engine error"
                        results[i] = ChunkResult(audio, chunk.finish_reason, err, chunk.sample_rate)
        return [r if r is not None else ChunkResult(None, "error", "no result from engine") for r in results]


class ServeBackend:
    """The running Serve app's ingress (`synthesize_bulk`), so batch jobs share the streaming replicas.

    At most `max_inflight` calls are outstanding per worker; a call refused for back-pressure (Serve's
    queue or the replica is full) is retried with exponential backoff instead of failing the row.
    """

    def __init__(self, app_name: str = "qtts", max_inflight: int = 8, busy_retries: int = 8,
                 busy_delay_s: float = 0.5) -> None:
        from ray import serve

        self.handle = serve.get_app_handle(app_name)
        self.max_inflight, self.busy_retries, self.busy_delay_s = max_inflight, busy_retries, busy_delay_s

    @staticmethod
    def _payload(job: ChunkJob) -> dict[str, Any]:
        return {"model": None if job.model == SERVE_DEFAULT_MODEL else job.model, "input": job.text,
                "voice": job.voice, "language": job.language, "instructions": job.instruct,
                "seed": job.seed, "non_streaming_mode": True, "priority": "bulk", **job.sampling}

    @staticmethod
    def _busy(e: Exception) -> bool:
        text = f"{type(e).__name__} {e}"
        return "BackPressure" in text or "Busy" in text or "busy" in text

    def _call(self, job: ChunkJob, attempt: int = 0) -> tuple[Any, ChunkJob, int]:
        return self.handle.synthesize_bulk.remote(self._payload(job)), job, attempt

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        import time

        out: list[ChunkResult | None] = [None] * len(jobs)
        waiting = list(enumerate(jobs))
        running: list[tuple[int, Any, ChunkJob, int]] = []
        while waiting or running:
            while waiting and len(running) < self.max_inflight:
                i, job = waiting.pop(0)
                running.append((i, *self._call(job)))
            i, call, job, attempt = running.pop(0)
            try:
                r = call.result()
                out[i] = ChunkResult(np.asarray(r["pcm"], dtype=np.float32), r.get("finish_reason"), None,
                                     int(r.get("sample_rate", SAMPLE_RATE)))
            except Exception as e:  # noqa: BLE001 - a replica error is this row's failure, not the job's
                if self._busy(e) and attempt < self.busy_retries:
                    time.sleep(min(10.0, self.busy_delay_s * 2**attempt))
                    running.append((i, *self._call(job, attempt + 1)))
                    continue
                out[i] = ChunkResult(None, "error", f"{type(e).__name__}: {str(e).splitlines()[-1][:500]}")
        return [r if r is not None else ChunkResult(None, "error", "no result") for r in out]


def serve_app_running(app_name: str = "qtts") -> bool:
    """True when Ray is connected and the Serve app `app_name` is RUNNING."""
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return False
        app = serve.status().applications.get(app_name)
        return app is not None and str(app.status).endswith("RUNNING")
    except Exception:  # noqa: BLE001 - no Serve at all
        return False


def make_backend(spec: str, engine: EngineOptions = EngineOptions(), app_name: str = "qtts") -> Backend:
    """"engine" | "serve" | "package.module:Class" (a class taking no arguments, e.g. a test fake)."""
    if spec == "engine":
        return EngineBackend(engine)
    if spec == "serve":
        return ServeBackend(app_name)
    if ":" in spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)()
    raise ValueError(f"backend must be 'engine', 'serve' or 'module:Class', got {spec!r}")
