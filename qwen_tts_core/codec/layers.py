"""Streaming conv building blocks of the codec decoder (parameter names follow the official checkpoint).

Every conv takes the `CodecStreamState` and keeps its own history there under `state_key` (set by the decoder to
the module's qualified name), so a chunk of frames continues exactly where the previous chunk stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import onednn_linear, packed_matrix
from .state import CodecStreamState, window_at

MATMUL_ROWS = {"conv": 4.0, "trans": 8.0}
"""On CPU, a conv whose rows (batch x input positions) times this ratio are at most its input channels runs as one
matrix product instead (`conv1d_mm`, `conv_transpose1d_mm`): streaming chunks of a few frames through the wide
early layers, where oneDNN's conv kernels read their weights at a few GB/s (measured on a 2-core Zen 4, fp32, one row
of 4 frames: the 1024->1536 k7 conv 23 -> 4 ms, the 1536->768 k16 transposed conv 46 -> 13 ms). Larger calls keep the
conv kernels, which are faster there. The products run on oneDNN-packed weights where it can pack them
(`packed_matrix`). Same math, summed in another order (differences ~1e-6). float("inf"): never."""


def _as_matmul(x: torch.Tensor, rows: int, in_channels: int, kind: str) -> bool:
    return x.device.type == "cpu" and rows * MATMUL_ROWS[kind] <= in_channels


def _conv_matrix(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)                               # [O, C*K], im2col column order


def _trans_matrix(weight: torch.Tensor, stride: int) -> torch.Tensor:
    c, o, k = weight.shape
    m = -(-k // stride)
    if m * stride != k:
        weight = F.pad(weight, (0, m * stride - k))
    return weight.reshape(c, o * m * stride).t()                             # [O*M*S, C]


def conv1d_mm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int = 1,
              packed: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv1d(x, weight, bias, dilation=dilation)` (stride 1, no padding, groups 1) as one matrix product over
    im2col columns: x [B, C, L] -> [B, O, L - (K-1)*dilation], contiguous. packed: `weight` packed as
    [O, C*K] (`packed_matrix`), for oneDNN's product instead of torch's."""
    b, c, length = x.shape
    o, _, k = weight.shape
    t = length - (k - 1) * dilation
    xt = x.transpose(1, 2)                                                   # [B, L, C]
    cols = torch.stack([xt[:, i * dilation: i * dilation + t] for i in range(k)], dim=-1)  # [B, t, C, K]
    flat = cols.reshape(b * t, c * k)
    if packed is not None:
        y = onednn_linear(flat, packed, bias)
    else:
        w = _conv_matrix(weight).t()
        y = torch.addmm(bias, flat, w) if bias is not None else flat @ w    # [B*t, O]
    return y.view(b, t, o).transpose(1, 2).contiguous()


def conv_transpose1d_mm(x: torch.Tensor, weight: torch.Tensor, stride: int,
                        packed: torch.Tensor | None = None) -> torch.Tensor:
    """`F.conv_transpose1d(x, weight, None, stride=stride)` as one matrix product and an overlap-add:
    x [B, C_in, N], weight [C_in, C_out, K] -> [B, C_out, (N-1)*stride + K]. packed: `_trans_matrix(weight)` packed
    (`packed_matrix`), for oneDNN's product instead of torch's."""
    b, c, n = x.shape
    _, o, k = weight.shape
    m = -(-k // stride)                                                      # input frames one output frame sees
    flat = x.transpose(1, 2).reshape(b * n, c)
    z = onednn_linear(flat, packed) if packed is not None else flat @ _trans_matrix(weight, stride).t()
    z = z.view(b, n, o, m, stride)
    y = x.new_empty(b, o, n + m - 1, stride)
    y[:, :, :n] = z[:, :, :, 0].transpose(1, 2)
    y[:, :, n:] = 0
    for i in range(1, m):
        y[:, :, i: i + n] += z[:, :, :, i].transpose(1, 2)
    return y.view(b, o, (n + m - 1) * stride)[..., : (n - 1) * stride + k]


class PackedLinear(nn.Linear):
    """nn.Linear (same parameters and names) that runs on CPU with a oneDNN-packed copy of its weight
    (`packed_matrix`): faster than torch's GEMM for the few rows of a streaming chunk on AMD cores."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = packed_matrix(self, self.weight, lambda w: w, x)
        return F.linear(x, self.weight, self.bias) if packed is None else onednn_linear(x, packed, self.bias)


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
            return self._conv(x)
        full = torch.cat([state.conv_history[self.state_key], x], dim=-1)
        if state.valid is None:
            state.conv_history[self.state_key] = full[..., full.shape[-1] - self.context:].contiguous()
        else:  # right-padded rows: the history ends at each row's last real input
            state.conv_history[self.state_key] = window_at(full, state.valid.at(x.shape[-1]), self.context, 2)
        return self._conv(full)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if conv.groups == 1 and _as_matmul(x, x.shape[0] * x.shape[-1], conv.in_channels, "conv"):
            packed = packed_matrix(self, conv.weight, _conv_matrix, x)
            return conv1d_mm(x, conv.weight, conv.bias, conv.dilation[0], packed)
        return conv(x)


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
        if _as_matmul(x, x.shape[0] * x.shape[-1], self.conv.in_channels, "trans"):
            packed = packed_matrix(self, self.conv.weight, lambda w: _trans_matrix(w, self.stride), x)
            y = conv_transpose1d_mm(x, self.conv.weight, self.stride, packed)
        else:
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
            y.add_(self.conv.bias[:, None])  # y is this call's own buffer (the tail above is a copy)
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
        inv_beta = (1.0 / (torch.exp(self.beta) + 1e-9))[None, :, None]
        # x + inv_beta * sin(x * alpha)^2 in one buffer: the same roundings as the spelled-out ops, ~20% faster
        s = torch.mul(x, alpha).sin_()
        return s.mul_(s).mul_(inv_beta).add_(x)


class ConvNeXtBlock(nn.Module):
    """Depthwise causal conv (k7) -> LayerNorm -> Linear(4x) -> GELU -> Linear -> gamma, plus the input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = CausalConv(dim, dim, kernel_size=7, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = PackedLinear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = PackedLinear(4 * dim, dim)
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
