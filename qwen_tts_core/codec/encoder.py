"""Reference audio -> codes with transformers' `MimiModel` (off the hot path; transformers 4.57 .. 5.x).

The official checkpoint stores the encoder under the transformers-4.57 Mimi names (`encoder.layers.*`,
`encoder_transformer.*`, `downsample.*`, `quantizer.*`). Newer transformers moved the encoder half into a
sub-model (`encoder.encoder_seanet.layers.*`, `encoder.encoder_transformer.*`, `encoder.downsample.*`), so names are
mapped onto whatever the installed `MimiModel` expects and loaded strictly (decoder half dropped).

Encoding follows the reference: the batch is right-padded with zeros to the longest audio, encoded at once, the
first `encoder_valid_num_quantizers` codebooks kept and each item trimmed to ceil(len / 1920) frames.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

# official (4.57) prefix -> candidate prefixes in the installed MimiModel, tried in order
_RENAMES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("encoder.layers.", ("encoder.layers.", "encoder.encoder_seanet.layers.")),
    ("encoder_transformer.", ("encoder_transformer.", "encoder.encoder_transformer.")),
    ("downsample.", ("downsample.", "encoder.downsample.")),
    ("quantizer.", ("quantizer.", "encoder.quantizer.")),
)


def _build_mimi(mimi_config: Mapping[str, Any]) -> nn.Module:
    from transformers import MimiConfig, MimiModel

    cfg = MimiConfig(**{k: v for k, v in mimi_config.items() if k != "model_type"})
    try:
        cfg.decoder_config = None  # transformers >= 5: drop the decoder half at construction
        model = MimiModel(cfg)
    except (ValueError, AttributeError, TypeError):
        cfg = MimiConfig(**{k: v for k, v in mimi_config.items() if k != "model_type"})
        model = MimiModel(cfg)
    for name in ("upsample", "decoder_transformer", "decoder"):  # transformers 4.x: decoder parts as attributes
        if name in model._modules:
            setattr(model, name, None)
    return model


def map_encoder_state(official: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Rename official Mimi encoder tensors (without the `encoder.` prefix) to the installed MimiModel's names."""
    target = set(target_keys)
    out: dict[str, torch.Tensor] = {}
    for name, value in official.items():
        for old, candidates in _RENAMES:
            if name.startswith(old):
                rest = name[len(old):]
                match = next((c + rest for c in candidates if c + rest in target), None)
                break
        else:
            match = name if name in target else None
        if match is None:
            raise ValueError(f"encoder tensor {name!r} has no counterpart in the installed MimiModel")
        out[match] = value
    return out


class MimiEncoder(nn.Module):
    """Wraps a MimiModel without its decoder half; `encode` returns the first `num_quantizers` codebooks."""

    def __init__(self, mimi_config: Mapping[str, Any], num_quantizers: int = 16,
                 samples_per_frame: int = 1920) -> None:
        super().__init__()
        self.model = _build_mimi(mimi_config)
        self.num_quantizers = num_quantizers
        self.samples_per_frame = samples_per_frame
        total = int(mimi_config.get("num_quantizers", 32))
        if num_quantizers > total:
            raise ValueError(f"encoder_valid_num_quantizers ({num_quantizers}) exceeds the Mimi encoder's "
                             f"num_quantizers ({total})")

    def load_official(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the `encoder.*` tensors of model.safetensors (prefix already stripped); strict."""
        own = self.model.state_dict()
        mapped = map_encoder_state(tensors, list(own))
        missing = sorted(set(own) - set(mapped))
        if missing:
            raise ValueError(f"speech tokenizer checkpoint lacks encoder tensors: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        for name, value in mapped.items():
            if tuple(value.shape) != tuple(own[name].shape):
                raise ValueError(f"encoder tensor {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(own[name].shape)}")
        self.model.load_state_dict(mapped, strict=True)
        # the Mimi codebook caches embed_sum / cluster_usage on first use; drop any stale cache
        for module in self.model.modules():
            if hasattr(module, "_embed"):
                module._embed = None

    @torch.inference_mode()
    def encode(self, audios: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """audios: float mono 24 kHz arrays [L_i] -> codes Long [ceil(L_i / 1920), num_quantizers] each (on CPU)."""
        if len(audios) == 0:
            return []
        arrays: list[np.ndarray] = []
        for i, a in enumerate(audios):
            arr = np.asarray(a, dtype=np.float32)
            if arr.ndim != 1:
                raise ValueError(f"audios[{i}] must be a 1-D mono waveform, got shape {arr.shape}")
            if arr.size == 0:
                raise ValueError(f"audios[{i}] is empty")
            if not np.isfinite(arr).all():
                raise ValueError(f"audios[{i}] contains NaN or inf")
            arrays.append(arr)
        longest = max(a.size for a in arrays)
        batch = np.zeros((len(arrays), longest), dtype=np.float32)
        for i, a in enumerate(arrays):
            batch[i, : a.size] = a
        weight = next(self.model.parameters())
        x = torch.from_numpy(batch).to(device=weight.device, dtype=weight.dtype).unsqueeze(1)
        codes = self.model.encode(x, return_dict=True).audio_codes[:, : self.num_quantizers]  # [B, Q, T]
        out = []
        for i, a in enumerate(arrays):
            frames = math.ceil(a.size / self.samples_per_frame)
            out.append(codes[i, :, :frames].transpose(0, 1).long().cpu().contiguous())
        return out
