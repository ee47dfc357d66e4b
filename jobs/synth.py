"""Synthesis backends for jobs: the engine in this process, or the Serve app's model deployments (serve_backend.py).

Both take a list of `ChunkJob`s and return one `ChunkResult` per job, never raising for a single bad job (an unknown
voice becomes that job's `error`), so one bad row cannot sink a batch. Both turn a job's fields into a request with
the core's `request_from_fields`, so `voice` means the same everywhere: a CustomVoice speaker, a stored voice for
Base models (the engine backend also takes a voice-prompt file path), nothing for VoiceDesign (use `instruct`).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qwen_tts_core.errors import RequestError
from qwen_tts_core.types import SAMPLE_RATE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkJob:
    """One chunk of one row to synthesize (non-streaming, bulk priority). `model`: a checkpoint folder or hub id
    (engine backend) or a served model name (Serve backend)."""

    text: str
    voice: str | None
    language: str
    instruct: str | None
    seed: int
    model: str
    sampling: dict[str, Any] = field(default_factory=dict)


@dataclass
class ChunkResult:
    """pcm: mono float32 [N] at `sample_rate`, or None with `error` set. `retries`: what was retried on the way
    (a replica lost mid-call, ...); back-pressure waits are routine and not listed."""

    pcm: np.ndarray | None
    finish_reason: str | None
    error: str | None = None
    sample_rate: int = SAMPLE_RATE
    retries: tuple[str, ...] = ()


class Backend(Protocol):
    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]: ...


@dataclass(frozen=True)
class EngineOptions:
    """How engine actors load the model (dtype, device and the guard shape the audio: they are in output keys)."""

    device: str = "cpu"
    dtype: str = "float32"
    max_sessions: int = 8
    torch_threads: int = 1
    guard_frames_per_token: float | None = 8.0  # runaway guard: frames allowed per text token (+ base)
    guard_base_frames: int = 64
    voices_uri: str | None = None               # Base models: a VoiceStore (folder or s3://) holding voice ids


def error_text(e: BaseException) -> str:
    """One line for the manifest: a RequestError as 'field: message', anything else as 'Type: last line'."""
    cause = getattr(e, "cause", None) or e  # Ray wraps remote errors; the original is `.cause`
    field_name = getattr(cause, "field", None)
    if field_name is not None and getattr(cause, "message", None) is not None:
        return f"{field_name}: {cause.message}"[:500]
    lines = [x for x in str(cause).strip().splitlines() if x.strip()]
    return (f"{type(cause).__name__}: {lines[-1]}" if lines else type(cause).__name__)[:500]  # (`assert`: no text)


def _engine_error(chunk: Any) -> str:
    """A failed session's row error from what its last chunk says went wrong: a request field at fault as
    `error_text` words a RequestError ('field: message'), else "engine error: message"; "engine error" only when the
    engine gave no reason."""
    message, field_name = getattr(chunk, "error", None), getattr(chunk, "error_field", None)
    if not message:
        return "engine error"
    return error_text(RequestError(field_name, message)) if field_name else f"engine error: {message}"[:500]


class EngineBackend:
    """Our continuous-batching engine in this process; models are loaded once and kept.

    `revisions` maps a hub id to the commit the driver resolved, so every worker loads the weights the keys name.
    """

    def __init__(self, opts: EngineOptions = EngineOptions(), revisions: dict[str, str] | None = None) -> None:
        import torch

        torch.set_num_threads(max(1, opts.torch_threads))
        self.opts, self.revisions = opts, dict(revisions or {})
        self._engines: dict[str, Any] = {}
        self._voice_files: dict[str, Any] = {}
        self._store: Any = None

    def _engine(self, model_id: str) -> Any:
        if model_id not in self._engines:
            from qwen_tts_core import Engine, Qwen3TTSModel

            log.info("loading %s on %s", model_id, self.opts.device)
            model = Qwen3TTSModel.from_pretrained(model_id, device_map=self.opts.device, dtype=self.opts.dtype,
                                                  revision=self.revisions.get(model_id))
            self._engines[model_id] = Engine(model, max_sessions=self.opts.max_sessions,
                                             max_queue=max(64, self.opts.max_sessions * 4),
                                             guard_frames_per_token=self.opts.guard_frames_per_token,
                                             guard_base_frames=self.opts.guard_base_frames)
        return self._engines[model_id]

    def preload(self, model_ids: list[str]) -> None:
        """Load these models now (a Ray worker does it in its constructor, where a load that kills the process is
        told apart from a row that does: runner.RowTracker.begin_load)."""
        for m in model_ids:
            self._engine(m)

    def load_voice(self, voice: str) -> Any:
        """A Base model's voice: a voice-prompt file (save_voice_prompt) or an id in the `voices_uri` store.
        KeyError when neither has it (request_from_fields turns that into RequestError('voice'))."""
        from qwen_tts_core import load_voice_prompt

        if voice in self._voice_files:
            return self._voice_files[voice]
        path = Path(voice).expanduser()
        if path.is_file():
            self._voice_files[voice] = load_voice_prompt(str(path))
            return self._voice_files[voice]
        if self.opts.voices_uri:
            from serve import voices as store_module

            if self._store is None:
                self._store = store_module.VoiceStore.from_uri(self.opts.voices_uri)
            scope = getattr(store_module, "ANYONE", None)  # a store with owners: a batch job may use any voice
            return self._store.load(voice) if scope is None else self._store.load(voice, scope)
        raise KeyError(voice)

    def _request(self, model: Any, job: ChunkJob) -> Any:
        from qwen_tts_core.generate.requests import request_from_fields

        return request_from_fields(model, text=job.text, voice=job.voice, instructions=job.instruct,
                                   language=job.language, seed=job.seed, non_streaming_mode=True,
                                   priority="bulk", sampling=job.sampling, voices=self.load_voice)

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        from qwen_tts_core import EngineBusy

        results: list[ChunkResult | None] = [None] * len(jobs)
        pending: list[tuple[int, Any, Any]] = []
        for i, job in enumerate(jobs):
            try:
                engine = self._engine(job.model)
                pending.append((i, engine, self._request(engine.model, job)))
            except (ValueError, OSError) as e:
                results[i] = ChunkResult(None, "error", error_text(e))
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
                        results[i] = ChunkResult(None, "error", error_text(e))
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
                        err = None if chunk.finish_reason != "error" else _engine_error(chunk)
                        results[i] = ChunkResult(audio, chunk.finish_reason, err, chunk.sample_rate)
        return [r if r is not None else ChunkResult(None, "error", "no result from engine") for r in results]


def make_backend(spec: str, engine: EngineOptions = EngineOptions(), app_name: str = "qtts",
                 revisions: dict[str, str] | None = None, serve_opts: dict[str, Any] | None = None) -> Backend:
    """"engine" | "serve" | "package.module:Class" (a class taking no arguments, e.g. a test fake)."""
    if spec == "engine":
        return EngineBackend(engine, revisions)
    if spec == "serve":
        from .serve_backend import ServeBackend

        return ServeBackend(app_name, **(serve_opts or {}))
    if ":" in spec:
        mod, _, name = spec.partition(":")
        return getattr(importlib.import_module(mod), name)()
    raise ValueError(f"backend must be 'engine', 'serve' or 'module:Class', got {spec!r}")
