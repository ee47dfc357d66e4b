"""Config presets, random-weight states for tiny test checkpoints, and loading the encoder from a state dict."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..checkpoint.weights import Tensors, check_materialised, load_module
from .config import SpeakerEncoderConfig
from .ecapa import EcapaTdnn
from .mel import SPEAKER_MEL, log_mel_spectrogram

logger = logging.getLogger(__name__)

PREFIX = "speaker_encoder."
"""Prefix of the speaker encoder's tensors in the official model.safetensors."""

_PROBE_SEED = 20260101


def full_config(enc_dim: int) -> SpeakerEncoderConfig:
    """Published ECAPA-TDNN shape; `enc_dim` is the talker hidden size (1024 for 0.6B, 2048 for 1.7B)."""
    return SpeakerEncoderConfig(
        mel_dim=128, enc_dim=enc_dim, enc_channels=(512, 512, 512, 512, 1536),
        enc_kernel_sizes=(5, 3, 3, 3, 1), enc_dilations=(1, 2, 3, 4, 1), enc_attention_channels=128,
        enc_res2net_scale=8, enc_se_channels=128, sample_rate=24000,
    )


def tiny_config(enc_dim: int = 64) -> SpeakerEncoderConfig:
    """Same topology (kernels, dilations, 3 SE-Res2Net blocks) with narrow channels, for tests."""
    return SpeakerEncoderConfig(
        mel_dim=128, enc_dim=enc_dim, enc_channels=(32, 32, 32, 32, 96),
        enc_kernel_sizes=(5, 3, 3, 3, 1), enc_dilations=(1, 2, 3, 4, 1), enc_attention_channels=16,
        enc_res2net_scale=4, enc_se_channels=16, sample_rate=24000,
    )


def probe_waveforms(num_samples: int = SPEAKER_MEL.sample_rate) -> np.ndarray:
    """Four fixed, speech-like 24 kHz signals used to calibrate random weights.

    Returns:
        float32 [4, num_samples]: a 110 Hz harmonic tone with a syllable-rate envelope, a 210 Hz one gated
        into syllables with near-silent gaps, a rising chirp, and amplitude-modulated white noise (peak about 0.5).
    """
    rng = np.random.RandomState(_PROBE_SEED)
    t = np.arange(num_samples) / SPEAKER_MEL.sample_rate
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t)
    out = []
    gated = np.clip(np.sin(2 * np.pi * 3.0 * t), 0.0, None)  # syllables separated by near-silence
    for f0, env in ((110.0, envelope), (210.0, gated)):
        harmonics = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 25)
                        if f0 * k < 11000)
        out.append(harmonics * env)
    out.append(np.sin(2 * np.pi * (200.0 * t + 0.5 * 3800.0 * t**2 / t[-1])))
    out.append(rng.randn(num_samples) * (0.3 + 0.7 * np.abs(np.sin(2 * np.pi * 2.5 * t))))
    wavs = np.stack(out)
    wavs += 0.003 * rng.randn(*wavs.shape)
    wavs *= 0.5 / np.abs(wavs).max(axis=1, keepdims=True)
    return wavs.astype(np.float32)


def _calibrate(encoder: EcapaTdnn, mel: torch.Tensor, output_rms: float) -> None:
    """Data-dependent rescaling in one forward pass: every conv output is centred per channel and scaled to unit
    std (the final projection to `output_rms`) on the probe batch, in forward order, so activations keep their
    scale through the stack and the x-vector varies between inputs around zero."""

    def make_hook(target: float):
        def hook(conv: nn.Conv1d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            mean = out.mean(dim=(0, 2))  # [C_out]
            centred = out - mean[None, :, None]
            scale = target / centred.std().clamp(min=1e-6)
            conv.bias.sub_(mean).mul_(scale)
            conv.weight.mul_(scale)
            return centred * scale

        return hook

    handles = [
        module.register_forward_hook(make_hook(output_rms if module is encoder.fc else 1.0))
        for module in encoder.modules() if isinstance(module, nn.Conv1d)
    ]
    try:
        encoder(mel)
    finally:
        for h in handles:
            h.remove()


def random_speaker_encoder_state(
    cfg: SpeakerEncoderConfig, seed: int, dtype: torch.dtype = torch.float32, *, output_rms: float = 1.0
) -> dict[str, torch.Tensor]:
    """Random weights with official names (`speaker_encoder.*`), scaled so activations keep their scale.

    Weights start He-normal, then are calibrated on `probe_waveforms()` (see `_calibrate`), so x-vectors of
    different audio differ clearly, and an x-vector's RMS is about `output_rms`.

    Returns:
        name -> contiguous tensor of `dtype` on CPU; same `seed` gives the same tensors.
    """
    if not output_rms > 0:
        raise ValueError(f"output_rms must be > 0, got {output_rms!r}")
    gen = torch.Generator().manual_seed(int(seed))
    encoder = EcapaTdnn(cfg)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Conv1d):
                fan_in = module.in_channels * module.kernel_size[0]
                module.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
        probe = torch.from_numpy(probe_waveforms())
        mel = log_mel_spectrogram(probe).transpose(1, 2)
        _calibrate(encoder, mel, output_rms)
    return {PREFIX + k: v.detach().to(dtype).contiguous() for k, v in encoder.state_dict().items()}


def speaker_encoder_from_state(
    cfg: SpeakerEncoderConfig,
    state: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> EcapaTdnn:
    """Build the encoder from a checkpoint state dict (strict).

    Args:
        state: a whole model state (only `speaker_encoder.*` keys are used) or the encoder's own keys without
            the prefix.

    Raises:
        ValueError: if tensors are missing, unexpected or of the wrong shape.
    """
    own = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not own:
        own = dict(state)
    with torch.device("meta"):  # nothing of the config's size is allocated before the weights are found to match
        encoder = EcapaTdnn(cfg)
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(own) if tuple(own[k].shape) != tuple(expected[k].shape))
    origin = getattr(state, "origin", {})
    if missing or unexpected or bad_shape:
        files = sorted({str(origin[k][0]) for k in own if k in origin})
        raise ValueError(
            f"speaker encoder state{f' in {files[0]}' if files else ''} does not match the config "
            f"(speaker_encoder_config): missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} "
            f"({len(unexpected)}), wrong shape {bad_shape[:5]}"
        )
    tensors = Tensors()
    tensors.update(own)
    tensors.origin.update({k: origin[k] for k in own if k in origin})
    load_module(encoder, tensors, "speaker encoder", "cpu" if device is None else device,
                torch.float32 if dtype is None else dtype, prefix=PREFIX)
    check_materialised(encoder, "speaker encoder")
    encoder.eval()
    return encoder
