"""Log-mel front end of the speaker encoder, in torch (no librosa at run time).

The filterbank is the Slaney-style mel scale with Slaney area normalisation, built the way librosa's
`filters.mel(htk=False, norm="slaney")` builds it (float64 maths, float32 result), so the log-mels equal the
reference's within float32 rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# Slaney mel scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above (27 mels per factor 6.4).
_LINEAR_HZ_PER_MEL = 200.0 / 3.0
_LOG_START_HZ = 1000.0
_LOG_START_MEL = _LOG_START_HZ / _LINEAR_HZ_PER_MEL
_LOG_STEP = np.log(6.4) / 27.0  # natural-log Hz per mel in the log region


@dataclass(frozen=True)
class MelSpec:
    """STFT and filterbank settings of a log-mel front end."""

    sample_rate: int = 24000
    n_fft: int = 1024
    hop_length: int = 256
    win_length: int = 1024
    n_mels: int = 128
    fmin: float = 0.0
    fmax: float = 12000.0
    log_floor: float = 1e-5
    magnitude_eps: float = 1e-9

    def __post_init__(self) -> None:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length must be <= n_fft={self.n_fft}, got {self.win_length}")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ValueError(
                f"need 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, fmax={self.fmax}"
            )
        if self.hop_length < 1 or self.hop_length > self.n_fft:
            raise ValueError(f"hop_length must be in [1, n_fft], got {self.hop_length}")

    @property
    def side_pad(self) -> int:
        """Reflect padding added on each side before a center=False STFT."""
        return (self.n_fft - self.hop_length) // 2

    @property
    def min_samples(self) -> int:
        """Fewest samples giving one frame (reflect padding also needs more samples than the pad)."""
        return max(self.n_fft - 2 * self.side_pad, self.side_pad + 1)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for `num_samples` input samples (0 when too short)."""
        padded = num_samples + 2 * self.side_pad
        if num_samples < self.min_samples:
            return 0
        return (padded - self.n_fft) // self.hop_length + 1


SPEAKER_MEL = MelSpec()
"""The front end the speaker encoder was trained with (24 kHz, 128 mels up to 12 kHz)."""


def hz_to_slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Frequencies in Hz -> Slaney mels (float64)."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / _LINEAR_HZ_PER_MEL
    high = hz >= _LOG_START_HZ
    safe = np.where(high, hz, _LOG_START_HZ)
    return np.where(high, _LOG_START_MEL + np.log(safe / _LOG_START_HZ) / _LOG_STEP, mel)


def slaney_mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Slaney mels -> frequencies in Hz (float64)."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * _LINEAR_HZ_PER_MEL
    high = mel >= _LOG_START_MEL
    return np.where(high, _LOG_START_HZ * np.exp(_LOG_STEP * (mel - _LOG_START_MEL)), hz)


@lru_cache(maxsize=8)
def slaney_mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float
) -> np.ndarray:
    """Triangular mel filters with Slaney area normalisation.

    Returns:
        float32 array [n_mels, n_fft // 2 + 1] (read-only; it is cached).
    """
    # Bin centre frequencies, computed as numpy's rfftfreq does (bit-equal float64 values).
    bin_hz = np.arange(n_fft // 2 + 1, dtype=np.float64) * (1.0 / (n_fft * (1.0 / sample_rate)))
    edges_mel = np.linspace(hz_to_slaney_mel(np.array(fmin)), hz_to_slaney_mel(np.array(fmax)),
                            n_mels + 2)
    edges_hz = slaney_mel_to_hz(edges_mel)
    width = np.diff(edges_hz)  # [n_mels + 1]
    left, right = edges_hz[:-2, None], edges_hz[2:, None]
    rising = (bin_hz[None, :] - left) / width[:-1, None]
    falling = (right - bin_hz[None, :]) / width[1:, None]
    tri = np.maximum(0.0, np.minimum(rising, falling)).astype(np.float32)
    # Area normalisation: each filter's weights scaled by 2 / (its bandwidth in Hz); float64 product, float32 result.
    area = 2.0 / (edges_hz[2:] - edges_hz[:-2])
    bank = (tri.astype(np.float64) * area[:, None]).astype(np.float32)
    bank.setflags(write=False)
    return bank


def _filterbank_tensor(spec: MelSpec, device: torch.device) -> torch.Tensor:
    bank = slaney_mel_filterbank(spec.sample_rate, spec.n_fft, spec.n_mels, spec.fmin, spec.fmax)
    return torch.from_numpy(bank.copy()).to(device)


def log_mel_spectrogram(wav: torch.Tensor, spec: MelSpec = SPEAKER_MEL) -> torch.Tensor:
    """Natural-log mel spectrogram: reflect pad, Hann STFT (center=False), magnitude, mel, log(clamp).

    Args:
        wav: float32 waveform [B, N] or [N] at `spec.sample_rate`, nominally in [-1, 1].
        spec: front-end settings.

    Returns:
        float32 log-mels [B, n_mels, frames] with frames = (N + 2*side_pad - n_fft) // hop + 1.

    Raises:
        ValueError: if `wav` is not 1-D/2-D floating point or has fewer than `spec.min_samples` samples.
    """
    if wav.ndim == 1:
        wav = wav.unsqueeze(0)
    if wav.ndim != 2:
        raise ValueError(f"wav must have shape [B, N] or [N], got {tuple(wav.shape)}")
    if not wav.is_floating_point():
        raise ValueError(f"wav must be a floating point tensor, got dtype {wav.dtype}")
    if wav.shape[-1] < spec.min_samples:
        raise ValueError(
            f"wav has {wav.shape[-1]} samples; the mel front end needs at least {spec.min_samples}"
        )
    wav = wav.float()
    if wav.numel() and (wav.min() < -1.0 or wav.max() > 1.0):
        logger.warning("waveform exceeds [-1, 1] (min %.3f, max %.3f)", wav.min().item(), wav.max().item())
    padded = F.pad(wav.unsqueeze(1), (spec.side_pad, spec.side_pad), mode="reflect").squeeze(1)
    window = torch.hann_window(spec.win_length, periodic=True, device=wav.device, dtype=torch.float32)
    stft = torch.stft(
        padded, spec.n_fft, hop_length=spec.hop_length, win_length=spec.win_length, window=window,
        center=False, normalized=False, onesided=True, return_complex=True,
    )  # [B, n_fft//2+1, frames]
    ri = torch.view_as_real(stft)
    magnitude = torch.sqrt(ri.pow(2).sum(-1) + spec.magnitude_eps)
    mel = torch.matmul(_filterbank_tensor(spec, wav.device), magnitude)
    return torch.log(torch.clamp(mel, min=spec.log_floor))
