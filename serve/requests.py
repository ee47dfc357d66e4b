"""Request JSON (already schema-checked) -> engine `SynthesisRequest` for one loaded model, and model loading.

Everything here raises ValueError whose message starts with the API field it is about, so the transport can answer
400 naming the field.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import Any

from qwen_tts_core import SynthesisRequest

from .config import ModelConfig
from .schemas import SAMPLING_FIELDS

log = logging.getLogger(__name__)

KIND_BY_TYPE = {"custom_voice": "custom_voice", "voice_design": "voice_design", "base": "voice_clone"}


def resolve_checkpoint(cfg: ModelConfig, cache_dir: str) -> str:
    """The model's checkpoint path or hub id; builds the tiny random one into `cache_dir` when none is named."""
    if cfg.checkpoint:
        return cfg.checkpoint
    from qwen_tts_core import make_checkpoint

    root = Path(cache_dir).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"tiny-{cfg.model_type}-seed{cfg.seed}"
    with open(root / ".build.lock", "w") as lock:  # several replicas may start at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
            log.info("building a tiny random %s checkpoint in %s", cfg.model_type, path)
            make_checkpoint(path, model_type=cfg.model_type, size="tiny", seed=cfg.seed)
    return str(path)


def load_model(cfg: ModelConfig, cache_dir: str):
    import torch

    from qwen_tts_core import Qwen3TTSModel

    device = cfg.device
    if device == "auto":
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
    return Qwen3TTSModel.from_pretrained(resolve_checkpoint(cfg, cache_dir), device_map=device, dtype=cfg.dtype)


def build_request(model, cfg: ModelConfig, payload: dict[str, Any], voices=None,
                  text: str | None | object = ...) -> SynthesisRequest:
    """payload: the speech request fields (model, input, voice, language, instructions, seed, sampling...).

    `text=None` opens an incremental-text session (WebSocket); otherwise the text is `payload["input"]`.
    """
    kind = KIND_BY_TYPE[model.tts_model_type]
    if text is ...:
        text = payload.get("input")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("input must be a non-empty string")
    voice, instruct = payload.get("voice"), payload.get("instructions") or None
    speaker, prompt = None, None
    if kind == "custom_voice":
        speakers = model.get_supported_speakers() or []
        speaker = (voice or speakers[0]).lower() if (voice or speakers) else None
        if speaker not in speakers:
            raise ValueError(f"voice {voice!r} is not a speaker of model {cfg.name!r}; choose one of {speakers}")
    elif kind == "voice_design":
        if voice:
            raise ValueError(f"voice: model {cfg.name!r} is a VoiceDesign model; describe the voice in "
                             "'instructions' instead of naming one")
        if not instruct:
            raise ValueError(f"instructions: model {cfg.name!r} (VoiceDesign) needs a voice description")
    else:
        if not voice:
            raise ValueError(f"voice: model {cfg.name!r} (Base) needs a stored voice id from POST /v1/audio/voices")
        if voices is None:
            raise ValueError("voice: no voice store configured")
        try:
            prompt = voices.load(voice)
        except KeyError:
            raise ValueError(f"voice {voice!r} is not a stored voice (GET /v1/audio/voices)") from None
        instruct = None
    language = (payload.get("language") or "auto").lower()
    langs = model.get_supported_languages()
    if language not in langs:
        raise ValueError(f"language {payload.get('language')!r} is not supported by {cfg.name!r}; "
                         f"choose one of {langs}")
    sampling = {k: payload[k] for k in SAMPLING_FIELDS if payload.get(k) is not None}
    want = sampling.get("max_new_tokens")
    if want is not None and want > cfg.max_new_tokens:
        raise ValueError(f"max_new_tokens must be <= {cfg.max_new_tokens} on model {cfg.name!r}, got {want}")
    params = model.sampling_params(**sampling)
    if want is None:
        cap = cfg.default_max_new_tokens or cfg.max_new_tokens
        params = params.with_overrides(max_new_tokens=min(params.max_new_tokens, cap))
    seed = payload.get("seed")
    priority = payload.get("priority") or "interactive"
    if priority not in ("interactive", "bulk"):
        raise ValueError(f"priority must be 'interactive' or 'bulk', got {priority!r}")
    return SynthesisRequest(kind=kind, text=text, speaker=speaker, language=language, instruct=instruct,
                            voice_clone_prompt=prompt, non_streaming_mode=bool(payload.get("non_streaming_mode")),
                            sampling=params, seed=None if seed is None else int(seed), priority=priority,
                            first_chunk_frames=cfg.first_chunk_frames, chunk_frames=cfg.chunk_frames)


def model_info(model, cfg: ModelConfig) -> dict[str, Any]:
    from qwen_tts_core.checkpoint.digest import checkpoint_digest

    return {"id": cfg.name, "object": "model", "owned_by": "qwen-tts-fleet", "type": model.tts_model_type,
            "size": model.tts_model_size, "speakers": model.get_supported_speakers(),
            "languages": model.get_supported_languages(), "max_new_tokens": cfg.max_new_tokens,
            "max_sessions": cfg.max_sessions,
            # what shapes the audio besides the request (batch jobs key their outputs on it)
            "checkpoint_digest": checkpoint_digest(model.path), "dtype": str(model.dtype).removeprefix("torch."),
            "device": model.device.type, "default_max_new_tokens": cfg.default_max_new_tokens}
