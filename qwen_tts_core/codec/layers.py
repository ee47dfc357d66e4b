"""Streaming conv building blocks of the codec decoder (parameter names follow the official checkpoint).

Every conv takes the `CodecStreamState` and keeps its own history there under `state_key` (set by the decoder to
the module's qualified name), so a chunk of frames continues exactly where the previous chunk stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .state import CodecStreamState, window_at


class CausalConv(nn.Module):
    """Stride-1 conv padded on the left only: output t sees inputs t-(kernel-1)*dilation .. t.

    Streaming: the last `context` inputs are kept in `state.conv_history[state_key]` (zeros at a fresh start,
    which is exactly the official left zero-padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation, groups=groups)
        self.context = (kernel_size - 1) * dilation
        self.state_key = ""

    def history_shape(self) -> tuple[int, int]:
        """(channels, samples) of the history this conv keeps."""
        return self.conv.in_channels, self.context

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, C_in, t] -> [B, C_out, t]."""
        if self.context == 0:
            return self.conv(x)
        full = torch.cat([state.conv_history[self.state_key], x], dim=-1)
        if state.valid is None:
            state.conv_history[self.state_key] = full[..., full.shape[-1] - self.context:].contiguous()
        else:  # right-padded rows: the history ends at each row's last real input
            state.conv_history[self.state_key] = window_at(full, state.valid.at(x.shape[-1]), self.context, 2)
        return self.conv(full)


class CausalTransConv(nn.Module):
    """Transposed conv (kernel >= stride) whose right surplus of kernel-stride samples is trimmed.

    Output samples [n*s, (n+1)*s) depend on input frames n and earlier, so t frames in give t*stride samples out at
    once. The trimmed surplus of a chunk is the overlap owed to the next chunk: it is kept (without bias) in
    `state.trans_tail[state_key]` and added to the next chunk's first samples.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"kernel_size must be >= stride, got {kernel_size} < {stride}")
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride)
        self.stride = stride
        self.overlap = kernel_size - stride
        self.state_key = ""

    def history_shape(self) -> tuple[int, int]:
        """(channels, samples) of the overlap tail this conv keeps."""
        return self.conv.out_channels, self.overlap

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, C_in, t] -> [B, C_out, t*stride]."""
        real = None
        if state.valid is not None and self.overlap:
            # right-padded rows: padding inputs must not add to the tail owed to the row's next real frame
            real = state.valid.at(x.shape[-1])
            keep = torch.arange(x.shape[-1], device=x.device)[None, :] < real[:, None]
            x = x * keep[:, None, :].to(x.dtype)
        y = F.conv_transpose1d(x, self.conv.weight, None, stride=self.stride)
        n = x.shape[-1] * self.stride
        if self.overlap:
            y[..., : self.overlap] += state.trans_tail[self.state_key]
            if real is None:
                state.trans_tail[self.state_key] = y[..., n:].contiguous()
            else:
                state.trans_tail[self.state_key] = window_at(y, real * self.stride, self.overlap, 2)
            y = y[..., :n]
        if self.conv.bias is not None:
            y = y + self.conv.bias[:, None]
        return y


class SnakeBeta(nn.Module):
    """x + sin^2(x * e^alpha) / (e^beta + 1e-9), per channel; alpha and beta are stored as logs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, t] -> [B, C, t]."""
        alpha = torch.exp(self.alpha)[None, :, None]
        beta = torch.exp(self.beta)[None, :, None]
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class ConvNeXtBlock(nn.Module):
    """Depthwise causal conv (k7) -> LayerNorm -> Linear(4x) -> GELU -> Linear -> gamma, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, C, t] -> [B, C, t]."""
        h = self.dwconv(x, state).transpose(1, 2)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).transpose(1, 2)


class ResidualUnit(nn.Module):
    """x + conv1x1(snake(dilated causal conv k7(snake(x))))."""

    def __init__(self, dim: int, dilation: int) -> None:
        super().__init__()
        self.act1 = SnakeBeta(dim)
        self.conv1 = CausalConv(dim, dim, kernel_size=7, dilation=dilation)
        self.act2 = SnakeBeta(dim)
        self.conv2 = CausalConv(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, C, t] -> [B, C, t]."""
        h = self.conv1(self.act1(x), state)
        return x + self.conv2(self.act2(h), state)


class DecoderBlock(nn.Module):
    """SnakeBeta -> transposed conv (kernel 2r, stride r, channels halve) -> residual units with dilation 1, 3, 9."""

    def __init__(self, in_dim: int, out_dim: int, rate: int) -> None:
        super().__init__()
        self.block = nn.ModuleList([
            SnakeBeta(in_dim),
            CausalTransConv(in_dim, out_dim, 2 * rate, rate),
            *(ResidualUnit(out_dim, d) for d in (1, 3, 9)),
        ])

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, in_dim, t] -> [B, out_dim, t*rate]."""
        x = self.block[0](x)
        for layer in self.block[1:]:
            x = layer(x, state)
        return x
