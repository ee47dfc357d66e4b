"""The code predictor ("sub-talker"): a small Qwen3 decoder that predicts codebooks 1..15 of a frame.

Per frame it starts from a fresh cache: position 0 is the talker's final hidden state, position 1 the embedding of
codebook 0, then each predicted code's embedding. Parameter names follow `talker.code_predictor.*`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import CodePredictorConfig
from .kv_cache import KVCache
from .layers import DecoderLayer, RMSNorm, RotaryTable, run_stack


class CodePredictorStack(nn.Module):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # codebooks 1..15 are embedded at the TALKER's width (their sum feeds the talker)
        self.codec_embedding = nn.ModuleList(
            nn.Embedding(cfg.vocab_size, talker_hidden) for _ in range(cfg.num_code_groups - 1))


class CodePredictor(nn.Module):
    def __init__(self, cfg: CodePredictorConfig, talker_hidden: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = CodePredictorStack(cfg, talker_hidden)
        self.lm_head = nn.ModuleList(
            nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) for _ in range(cfg.num_code_groups - 1))
        self.small_to_mtp_projection = (nn.Linear(talker_hidden, cfg.hidden_size, bias=True)
                                        if cfg.hidden_size != talker_hidden else nn.Identity())
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, cfg.num_code_groups + 1)
        self.num_steps = cfg.num_code_groups - 1

    def new_cache(self, batch: int, device=None, dtype=None) -> KVCache:
        p = self.lm_head[0].weight
        return KVCache(self.cfg.num_hidden_layers, batch, self.cfg.num_key_value_heads, self.cfg.head_dim,
                       self.cfg.num_code_groups + 1, device or p.device, dtype or p.dtype, static=True)

    def embed(self, group: int, codes: torch.Tensor) -> torch.Tensor:
        """Embedding (talker width) of codebook `group` (1..15) codes [...] -> [..., talker_hidden]."""
        return self.model.codec_embedding[group - 1](codes)

    def pass_constants(self, dtype: torch.dtype) -> PassConstants:
        """What every step of one frame's pass reads alike, made once per pass from the live weights: the RoPE table
        of its positions in `dtype` and each layer's q/k norm weight (3 + 5 kernels fewer per step on a GPU)."""
        return PassConstants(self.rope.table.to(dtype),
                             [layer.self_attn.qk_norm_weight() for layer in self.model.layers])

    def forward(self, embeds: torch.Tensor, start: int, cache: KVCache, head: int,
                consts: PassConstants | None = None) -> torch.Tensor:
        """embeds [B, T, talker_hidden] at positions start..start+T-1 of a per-frame cache (rows = slots 0..B-1);
        returns the logits of codebook `head + 1` for the last position: [B, vocab]. consts: this pass's
        `pass_constants` (the same numbers as without)."""
        B, T, _ = embeds.shape
        x = self.small_to_mtp_projection(embeds)
        if not (start == 0 or T == 1):
            raise ValueError("the code predictor continues one position at a time after its prefill")
        positions, cos_sin = None, None
        if consts is not None and T == 1:  # every row at position `start`: a view of the table, broadcast over rows
            cos, sin = consts.rope[start]                                       # [D] each
            cos_sin = (cos.expand(B, 1, 1, -1), sin.expand(B, 1, 1, -1))
        else:
            positions = torch.arange(start, start + T, device=x.device)[None].expand(B, T)
        # fresh cache: causal prefill at 0, then one query that sees every earlier key: no mask needed
        hidden = run_stack(self.model.layers, self.model.norm, self.rope, x, positions,
                           cache.layers(None, start + T, start=start), None, cos_sin,
                           None if consts is None else consts.qk_weights)
        return self.lm_head[head](hidden[:, -1])


@dataclass
class PassConstants:
    """See `CodePredictor.pass_constants`."""

    rope: torch.Tensor                        # [positions, 2, head_dim]: cos and signed sin (`RotaryTable.table`)
    qk_weights: list[torch.Tensor | None]     # per layer: `Attention.qk_norm_weight()`
