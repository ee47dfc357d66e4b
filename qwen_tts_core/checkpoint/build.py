"""`make_checkpoint`: random-weight checkpoints in the official layout, loadable by this engine and by the official
package (the tests' oracle): config.json, generation_config.json, model.safetensors, Qwen2 tokenizer files,
speech_tokenizer/. Weights are drawn so activations keep their scale (fan-in scaled matrices, unit embeddings,
norms near 1), never the HF default init that makes every code look alike."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..config import default_generation_config, make_config
from ..model.talker import Talker
from ..text.tiny_tokenizer import build_tiny_tokenizer
from .weights import SHARD_PATTERN, resolve_dtype

log = logging.getLogger(__name__)

def _draw(name: str, shape: torch.Size, g: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    if name.endswith(".bias"):
        return 0.1 * torch.randn(shape, generator=g)
    if "embedding" in name:
        return torch.randn(shape, generator=g)
    if len(shape) == 2:  # Linear [out, in]
        gain = 3.0 if ("codec_head" in name or "lm_head" in name) else 1.0
        return torch.randn(shape, generator=g) * (gain / shape[1] ** 0.5)
    raise ValueError(f"no init rule for {name} {tuple(shape)}")


def random_talker_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    """Random `talker.*` tensors (fp32) with the official names, drawn from a seeded generator."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Talker(cfg.talker, max_positions=1).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    return {f"talker.{k}": _draw(k, s, g) for k, s in sorted(shapes.items())}


def remove_stale_weights(folder: Path) -> None:
    """Delete the weight files of an earlier (sharded) checkpoint in `folder`: a `model.safetensors.index.json` left
    beside the new model.safetensors would make the folder ambiguous (the loader refuses it)."""
    stale = [folder / "model.safetensors.index.json"] + sorted(folder.glob(SHARD_PATTERN.format(stem="model")))
    for f in stale:
        if f.is_file() or f.is_symlink():
            log.warning("make_checkpoint: removing stale weight file %s", f)
            f.unlink()


def make_checkpoint(out_dir: str | Path, model_type: str = "custom_voice", size: str = "tiny", seed: int = 0,
                    dtype: str | torch.dtype = "float32", codec_size: str | None = None) -> Path:
    """Write a random-weight checkpoint of `model_type` ("custom_voice", "voice_design", "base") and `size`
    ("tiny", "tiny-proj", "0.6b", "1.7b") into out_dir; returns the folder."""
    from safetensors.torch import save_file

    from ..codec.build import write_random_speech_tokenizer
    from ..speaker.build import full_config as speaker_full
    from ..speaker.build import random_speaker_encoder_state, tiny_config

    dt = resolve_dtype(dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_weights(out)
    cfg = make_config(model_type, size)
    tensors = random_talker_state(cfg, seed)
    if model_type == "base":
        tiny = size.startswith("tiny")
        enc_dim = cfg.talker.hidden_size
        spk_cfg = tiny_config(enc_dim) if tiny else speaker_full(enc_dim)
        tensors.update(random_speaker_encoder_state(spk_cfg, seed=seed + 1))
        raw = cfg.to_json_dict()
        raw["speaker_encoder_config"] = spk_cfg.to_json_dict()
    else:
        raw = cfg.to_json_dict()
    save_file({k: v.to(dt).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    gen = default_generation_config()
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    build_tiny_tokenizer(out)
    codec_size = codec_size or ("tiny" if size.startswith("tiny") else "full")
    write_random_speech_tokenizer(out / "speech_tokenizer", size=codec_size, seed=seed + 2, dtype=dt)
    log.info("wrote %s %s checkpoint to %s", size, model_type, out)
    return out
