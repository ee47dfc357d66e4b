"""Reusable voice-clone prompts: what `create_voice_clone_prompt` returns, and their storage as safetensors files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class VoiceClonePromptItem:
    """One reference voice: ICL codes of the reference audio (None in x-vector-only mode) and its speaker vector."""

    ref_code: torch.Tensor | None      # [T, 16] long
    ref_spk_embedding: torch.Tensor    # [D]
    x_vector_only_mode: bool
    icl_mode: bool
    ref_text: str | None = None


def save_voice_prompt(item: VoiceClonePromptItem, path: str | Path, **metadata: str) -> Path:
    """Write the item as one safetensors file (tensors + JSON metadata)."""
    from safetensors.torch import save_file

    tensors = {"ref_spk_embedding": item.ref_spk_embedding.detach().float().cpu().contiguous()}
    if item.ref_code is not None:
        tensors["ref_code"] = item.ref_code.detach().long().cpu().contiguous()
    meta = {"format": "qwen-tts-fleet/voice-prompt/1", "x_vector_only_mode": json.dumps(item.x_vector_only_mode),
            "icl_mode": json.dumps(item.icl_mode), "ref_text": json.dumps(item.ref_text),
            **{k: str(v) for k, v in metadata.items()}}
    path = Path(path)
    save_file(tensors, str(path), metadata=meta)
    return path


def load_voice_prompt(path: str | Path) -> VoiceClonePromptItem:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if not meta.get("format", "").startswith("qwen-tts-fleet/voice-prompt/"):
            raise ValueError(f"{path}: not a voice prompt file")
        names = set(f.keys())
        return VoiceClonePromptItem(
            ref_code=f.get_tensor("ref_code") if "ref_code" in names else None,
            ref_spk_embedding=f.get_tensor("ref_spk_embedding"),
            x_vector_only_mode=json.loads(meta["x_vector_only_mode"]),
            icl_mode=json.loads(meta["icl_mode"]),
            ref_text=json.loads(meta["ref_text"]),
        )


def voice_prompt_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
