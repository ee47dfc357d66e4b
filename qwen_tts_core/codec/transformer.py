"""The codec decoder's sliding-window transformer with a rolling KV cache (names follow `decoder.pre_transformer.*`).

Each query attends to itself and the window-1 positions before it. The cache keeps, per layer, the last window-1
keys (after RoPE) and values; a chunk attends to [cache, chunk] under a mask, so its cost does not grow with the
position in the stream.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import RMSNorm
from .config import CodecConfig
from .layers import PackedLinear
from .state import CodecStreamState, window_at

_ACTS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Multi-head (grouped-query) attention over [cached keys, chunk keys]."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        h, kv, d, bias = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.attention_bias
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.cache_len = cfg.sliding_window - 1
        self.q_proj = PackedLinear(cfg.hidden_size, h * d, bias=bias)
        self.k_proj = PackedLinear(cfg.hidden_size, kv * d, bias=bias)
        self.v_proj = PackedLinear(cfg.hidden_size, kv * d, bias=bias)
        self.o_proj = PackedLinear(h * d, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                state: CodecStreamState, layer: int) -> torch.Tensor:
        """x [B, t, hidden]; cos/sin [B, t, head_dim]; mask bool [B, 1, t, window-1+t] -> [B, t, hidden]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.cache_len:
            k = torch.cat([state.keys[layer], k], dim=2)
            v = torch.cat([state.values[layer], v], dim=2)
            if state.valid is None:
                state.keys[layer] = k[:, :, k.shape[2] - self.cache_len:].contiguous()
                state.values[layer] = v[:, :, v.shape[2] - self.cache_len:].contiguous()
            else:  # right-padded rows: the cache ends at each row's last real frame
                start = state.valid.at(t)
                state.keys[layer] = window_at(k, start, self.cache_len, 2)
                state.values[layer] = window_at(v, start, self.cache_len, 2)
        if self.heads != self.kv_heads:
            rep = self.heads // self.kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class Mlp(nn.Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.gate_proj = PackedLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = PackedLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = PackedLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = _ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + ls(attn(norm(x))), then x + ls(mlp(norm(x)))."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = Mlp(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)
        self.mlp_layer_scale = LayerScale(cfg.hidden_size, cfg.layer_scale_initial_scale)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                state: CodecStreamState, layer: int) -> torch.Tensor:
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask, state, layer)
        x = x + self.self_attn_layer_scale(h)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


def rope_inv_freq(cfg: CodecConfig) -> torch.Tensor:
    """The RoPE inverse frequencies [head_dim / 2] (fp32, on the current default device): a buffer outside the
    state_dict, so a meta-device build computes it again (`codec.load.load_decoder`)."""
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


class SlidingWindowTransformer(nn.Module):
    """latent [B, t, latent_dim] -> input_proj -> layers -> norm -> output_proj -> [B, t, latent_dim]."""

    def __init__(self, cfg: CodecConfig) -> None:
        super().__init__()
        self.window = cfg.sliding_window
        self.layers = nn.ModuleList([TransformerLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.input_proj = PackedLinear(cfg.latent_dim, cfg.hidden_size)
        self.output_proj = PackedLinear(cfg.hidden_size, cfg.latent_dim)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _mask(self, positions: torch.Tensor, t: int) -> torch.Tensor:
        """Bool [B, 1, t, window-1+t]: key j is visible to query i when 0 <= dist < window and j is not before
        the row's first frame (cache entries of a fresh row are padding)."""
        cache = self.window - 1
        k_idx = torch.arange(cache + t, device=positions.device)
        dist = (cache + torch.arange(t, device=positions.device))[:, None] - k_idx[None, :]
        allowed = (dist >= 0) & (dist < self.window)
        valid = k_idx[None, :] >= (cache - positions)[:, None]
        return (allowed[None] & valid[:, None, :]).unsqueeze(1)

    def forward(self, x: torch.Tensor, state: CodecStreamState) -> torch.Tensor:
        """x [B, t, latent_dim] at frames state.positions .. +t -> [B, t, latent_dim] (positions not advanced)."""
        t = x.shape[1]
        pos = (state.positions[:, None] + torch.arange(t, device=x.device)[None, :]).float()
        freqs = pos[..., None] * self.inv_freq.float()[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        h = self.input_proj(x)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        mask = self._mask(state.positions, t)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, mask, state, i)
        return self.output_proj(self.norm(h))
