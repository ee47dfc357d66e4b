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

from ..checkpoint.weights import Tensors, check_finite, check_state

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


def map_encoder_state(official: Mapping[str, torch.Tensor], target_keys: Sequence[str]) -> Tensors:
    """Rename official Mimi encoder tensors (without the `encoder.` prefix) to the installed MimiModel's names (each
    keeps its file and official name in `origin`, for error messages)."""
    target = set(target_keys)
    origin = getattr(official, "origin", {})
    out = Tensors()
    for name, value in official.items():
        for old, candidates in _RENAMES:
            if name.startswith(old):
                rest = name[len(old):]
                match = next((c + rest for c in candidates if c + rest in target), None)
                break
        else:
            match = name if name in target else None
        if match is None:
            where = f" of {origin[name][0]}" if name in origin else ""
            raise ValueError(f"speech tokenizer encoder: tensor 'encoder.{name}'{where} has no counterpart in the "
                             "installed MimiModel (does encoder_config match the weights?)")
        out[match] = value
        if name in origin:
            out.origin[match] = origin[name]
    return out


def checked_encoder_state(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """`tensors` (official `encoder.*` names, prefix stripped) renamed onto `model` (a MimiModel without its
    decoder, on the meta device or not), every tensor of the model there with its shape and kind, none left over,
    all finite; ValueError naming the tensor and its file."""
    own = model.state_dict()
    mapped = map_encoder_state(tensors, list(own))
    what = "speech tokenizer encoder"
    check_state(own, mapped, what)  # missing names are the installed MimiModel's
    for name, value in mapped.items():
        origin = mapped.origin.get(name)
        check_finite(value, f"{what}: " + (f"tensor {origin[1]!r} of {origin[0]}" if origin else f"tensor {name!r}"))
    return mapped


def check_encoder_state(mimi_config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """At load: the Mimi encoder of `mimi_config` can be built (on the meta device: nothing allocated) and
    `tensors` fill it exactly (see `checked_encoder_state`). `where`: the config file, for a config transformers
    refuses."""
    try:
        with torch.device("meta"):
            model = _build_mimi(mimi_config)
    except Exception as e:  # noqa: BLE001 - transformers' own validation errors: name the file and the block
        raise ValueError(f"{where}: encoder_config is not a usable MimiConfig ({type(e).__name__}: "
                         f"{str(e)[:300]})") from None
    checked_encoder_state(model, tensors)


class MimiEncoder(nn.Module):
    """Wraps a MimiModel without its decoder half; `encode` returns the first `num_quantizers` codebooks."""

    def __init__(self, mimi_config: Mapping[str, Any], num_quantizers: int = 16,
                 samples_per_frame: int = 1920) -> None:
        super().__init__()
        total = int(mimi_config.get("num_quantizers", 32))
        if num_quantizers > total:
            raise ValueError(f"encoder_valid_num_quantizers ({num_quantizers}) exceeds the Mimi encoder's "
                             f"num_quantizers ({total})")
        self.model = _build_mimi(mimi_config)
        self.num_quantizers = num_quantizers
        self.samples_per_frame = samples_per_frame

    def load_official(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load the `encoder.*` tensors of model.safetensors (prefix already stripped); strict, checked as at load
        (names, shapes, kinds, finite)."""
        self.model.load_state_dict(checked_encoder_state(self.model, tensors), strict=True)
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
