"""ECAPA-TDNN speaker encoder (no batch norm), parameter names equal to the official `speaker_encoder.*` names.

Structure (names in brackets are the state-dict prefixes):
    mel [B, T, mel_dim] -> channels-first
    -> input TDNN [blocks.0]
    -> SE-Res2Net blocks [blocks.1 .. blocks.n-2]   (residual)
    -> concat of the SE-Res2Net outputs -> MFA TDNN [mfa]
    -> attentive statistics pooling [asp]          (weighted mean ++ weighted std over time)
    -> 1x1 projection [fc] -> x-vector [B, enc_dim]

Every conv pads "same" with reflection, so the encoder needs at least `config.min_frames` mel frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import SpeakerEncoderConfig
from .mel import SPEAKER_MEL, log_mel_spectrogram

_STD_FLOOR = 1e-12  # variance floor of the statistics pooling


class ConvReLU(nn.Module):
    """Dilated 1-D conv with reflect "same" padding, then ReLU. [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_ch, out_ch, kernel, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(reflect_same_conv(self.conv, x))


def reflect_same_conv(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Apply `conv` (stride 1, no built-in padding) after reflect-padding x so the length is kept.

    Args:
        x: [B, C_in, T]; T must exceed the pad width on each side.

    Returns:
        [B, C_out, T]
    """
    total = conv.dilation[0] * (conv.kernel_size[0] - 1)
    if total:
        x = F.pad(x, (total // 2, total - total // 2), mode="reflect")
    return conv(x)


class Res2Conv(nn.Module):
    """Res2Net split: channels cut into `scale` groups; group 0 passes through, group i>0 is convolved after adding
    the previous group's output (i>1), giving growing receptive fields. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int) -> None:
        super().__init__()
        width = channels // scale
        self.scale = scale
        self.blocks = nn.ModuleList(ConvReLU(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.chunk(x, self.scale, dim=1)
        outs = [groups[0]]
        prev: torch.Tensor | None = None
        for conv_relu, group in zip(self.blocks, groups[1:]):
            prev = conv_relu(group if prev is None else group + prev)
            outs.append(prev)
        return torch.cat(outs, dim=1)


class SqueezeExcite(nn.Module):
    """Channel gating from the time-averaged features. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, bottleneck: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(channels, bottleneck, 1)
        self.conv2 = nn.Conv1d(bottleneck, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        summary = x.mean(dim=2, keepdim=True)  # [B, C, 1]
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(summary))))
        return x * gate


class SERes2Block(nn.Module):
    """1x1 TDNN -> Res2Net -> 1x1 TDNN -> squeeze-excitation, plus the input. [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, scale: int, se_channels: int, kernel: int, dilation: int) -> None:
        super().__init__()
        self.tdnn1 = ConvReLU(channels, channels, 1, 1)
        self.res2net_block = Res2Conv(channels, scale, kernel, dilation)
        self.tdnn2 = ConvReLU(channels, channels, 1, 1)
        self.se_block = SqueezeExcite(channels, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x))))


def _mean_std(x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean and std over time. x [B, C, T], weights [B, C|1, T] summing to 1 over T -> 2 x [B, C]."""
    mean = (weights * x).sum(dim=2)
    var = (weights * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2)
    return mean, torch.sqrt(var.clamp(min=_STD_FLOOR))


class AttentiveStatsPool(nn.Module):
    """Attention over time conditioned on the utterance's global mean/std; returns [weighted mean ++ weighted std].
    [B, C, T] -> [B, 2C, 1]."""

    def __init__(self, channels: int, attention_channels: int) -> None:
        super().__init__()
        self.tdnn = ConvReLU(3 * channels, attention_channels, 1, 1)
        self.conv = nn.Conv1d(attention_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        uniform = torch.full((1, 1, frames), 1.0 / frames, dtype=x.dtype, device=x.device)
        mean, std = _mean_std(x, uniform)
        context = torch.cat(
            [x, mean.unsqueeze(2).expand(-1, -1, frames), std.unsqueeze(2).expand(-1, -1, frames)], dim=1
        )
        logits = self.conv(torch.tanh(self.tdnn(context)))  # [B, C, T]
        attn = torch.softmax(logits, dim=2)
        mean, std = _mean_std(x, attn)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class EcapaTdnn(nn.Module):
    """The speaker encoder. `state_dict()` keys equal the official ones without the `speaker_encoder.` prefix."""

    def __init__(self, config: SpeakerEncoderConfig) -> None:
        super().__init__()
        self.config = config
        ch, ks, dil = config.enc_channels, config.enc_kernel_sizes, config.enc_dilations
        layers: list[nn.Module] = [ConvReLU(config.mel_dim, ch[0], ks[0], dil[0])]
        for i in range(1, len(ch) - 1):
            layers.append(
                SERes2Block(ch[i], config.enc_res2net_scale, config.enc_se_channels, ks[i], dil[i])
            )
        self.blocks = nn.ModuleList(layers)
        self.mfa = ConvReLU(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPool(ch[-1], config.enc_attention_channels)
        self.fc = nn.Conv1d(2 * ch[-1], config.enc_dim, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Speaker vectors of equal-length utterances.

        Args:
            mel: log-mels [B, T, mel_dim] with T >= config.min_frames.

        Returns:
            x-vectors [B, enc_dim].
        """
        if mel.ndim != 3 or mel.shape[2] != self.config.mel_dim:
            raise ValueError(
                f"mel must have shape [B, T, {self.config.mel_dim}], got {tuple(mel.shape)}"
            )
        if mel.shape[1] < self.config.min_frames:
            raise ValueError(
                f"mel has {mel.shape[1]} frames; the speaker encoder needs at least "
                f"{self.config.min_frames}"
            )
        x = mel.transpose(1, 2)
        x = self.blocks[0](x)
        body = []
        for block in self.blocks[1:]:
            x = block(x)
            body.append(x)
        x = self.mfa(torch.cat(body, dim=1))
        return self.fc(self.asp(x)).squeeze(2)


def min_speaker_samples(config: SpeakerEncoderConfig) -> int:
    """Fewest 24 kHz samples `speaker_embedding` accepts (enough mel frames for every reflect pad)."""
    spec = SPEAKER_MEL
    frames_need = spec.n_fft - 2 * spec.side_pad + (config.min_frames - 1) * spec.hop_length
    return max(spec.min_samples, frames_need)


@torch.inference_mode()
def speaker_embedding(encoder: EcapaTdnn, wav_24k: np.ndarray) -> torch.Tensor:
    """The x-vector of one 24 kHz mono utterance, as the reference's `extract_speaker_embedding` computes it.

    The log-mels are computed in float32 on the encoder's device and cast to the encoder's dtype.

    Args:
        encoder: the speaker encoder (its parameters fix device and dtype).
        wav_24k: float mono waveform [N] at 24 kHz (see `qwen_tts_core.audio_io.to_24k`).

    Returns:
        [enc_dim] in the encoder's dtype, on its device.

    Raises:
        ValueError: if `wav_24k` is not a finite 1-D float array of at least `min_speaker_samples` samples.
    """
    if encoder.config.sample_rate != SPEAKER_MEL.sample_rate:
        raise ValueError(
            f"speaker encoder sample_rate must be {SPEAKER_MEL.sample_rate}, got {encoder.config.sample_rate}"
        )
    if encoder.config.mel_dim != SPEAKER_MEL.n_mels:
        raise ValueError(f"speaker encoder mel_dim must be {SPEAKER_MEL.n_mels}, got {encoder.config.mel_dim}")
    if not isinstance(wav_24k, np.ndarray) or wav_24k.ndim != 1:
        raise ValueError("wav_24k must be a 1-D numpy array (mono, 24 kHz)")
    if not np.issubdtype(wav_24k.dtype, np.floating):
        raise ValueError(f"wav_24k must be a float array, got dtype {wav_24k.dtype}")
    need = min_speaker_samples(encoder.config)
    if wav_24k.shape[0] < need:
        raise ValueError(
            f"wav_24k has {wav_24k.shape[0]} samples; the speaker encoder needs at least {need} "
            f"({need / SPEAKER_MEL.sample_rate * 1000:.0f} ms at 24 kHz)"
        )
    if not np.isfinite(wav_24k).all():
        raise ValueError("wav_24k contains NaN or infinite samples")
    param = next(encoder.parameters())
    wav = torch.from_numpy(np.ascontiguousarray(wav_24k, dtype=np.float32)).to(param.device)
    mel = log_mel_spectrogram(wav.unsqueeze(0)).transpose(1, 2)  # [1, T, n_mels]
    return encoder(mel.to(param.dtype))[0]
