"""Request fields (already shape-checked by serve/schemas.py) -> engine `SynthesisRequest`, and model loading.

`build_request` hands the fields to `qwen_tts_core.generate.requests.request_from_fields` (the one mapping, shared
with the batch jobs) with this model's `RequestPolicy`; every rule about values lives there and raises
`RequestError(field, ...)`, which serve/schemas.py's `API_FIELD` names for the client. Stored voices are loaded
through the voice store with the caller's scope (`payload["caller"]`, set by the ingress from the API key), so a
voice id of another key is "not a stored voice" here, whatever the request says.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwen_tts_core import SynthesisRequest
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import RequestPolicy, request_from_fields
from qwen_tts_core.types import SAMPLING_FIELDS

from .config import ModelConfig
from .voices import ANYONE, VoiceStore

log = logging.getLogger(__name__)

CALLER = "caller"  # payload key the ingress sets from the API key (a key digest, or voices.ANYONE); never a client field


def policy(cfg: ModelConfig) -> RequestPolicy:
    return RequestPolicy(max_new_tokens=cfg.max_new_tokens, default_max_new_tokens=cfg.default_max_new_tokens,
                         max_text_chars=cfg.max_input_chars, first_chunk_frames=cfg.first_chunk_frames,
                         chunk_frames=cfg.chunk_frames)


def build_request(model, cfg: ModelConfig, payload: Mapping[str, Any], voices: VoiceStore | None = None,
                  text: str | None | object = ...) -> SynthesisRequest:
    """payload: the speech request fields (input, voice, language, instructions, seed, sampling..., caller).

    `text=None` opens an incremental-text session (WebSocket); otherwise the text is `payload["input"]`. Handle
    callers inside the cluster (batch jobs) that set no `caller` see every stored voice.
    """
    if text is ...:
        text = payload.get("input")
        if text is None:
            raise RequestError("text", "is required")
    scope = payload.get(CALLER, ANYONE)
    loader = None if voices is None else (lambda voice_id: voices.load(voice_id, scope))
    return request_from_fields(
        model, text=text, voice=payload.get("voice"), instructions=payload.get("instructions"),
        language=payload.get("language"), seed=payload.get("seed"),
        non_streaming_mode=payload.get("non_streaming_mode", False),
        priority=payload.get("priority") or "interactive",
        sampling={k: payload[k] for k in SAMPLING_FIELDS if payload.get(k) is not None},
        voices=loader, policy=policy(cfg))


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


def render_settings(model, cfg: ModelConfig) -> dict[str, Any]:
    """What shapes a replica's audio besides the request and its checkpoint: every `synthesize` reply carries it
    (`settings`) beside `checkpoint_digest`, so a batch job notices a redeploy that changed only these (e.g. fp32
    to bf16) while it runs (jobs/serve_backend.py). The values are those jobs.models.serve_spec takes from `info()`
    at the job's start and keys its outputs on (the frame cap: the model's default, else its limit)."""
    return {"dtype": str(model.dtype).removeprefix("torch."), "device": model.device.type,
            "default_max_new_tokens": cfg.default_max_new_tokens or cfg.max_new_tokens}


def model_info(model, cfg: ModelConfig) -> dict[str, Any]:
    from qwen_tts_core.checkpoint.digest import checkpoint_digest

    created = int((Path(model.path) / "config.json").stat().st_mtime)  # OpenAI's `created`: the checkpoint's time
    settings = render_settings(model, cfg)
    return {"id": cfg.name, "object": "model", "created": created, "owned_by": "qwen-tts-fleet",
            "type": model.tts_model_type,
            "size": model.tts_model_size, "speakers": model.get_supported_speakers(),
            "languages": model.get_supported_languages(), "max_new_tokens": cfg.max_new_tokens,
            "max_sessions": cfg.max_sessions,
            # what shapes the audio besides the request (batch jobs key their outputs on it)
            "checkpoint_digest": checkpoint_digest(model.path), "dtype": settings["dtype"],
            "device": settings["device"], "default_max_new_tokens": cfg.default_max_new_tokens}
