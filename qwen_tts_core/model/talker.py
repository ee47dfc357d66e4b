"""The talker: a Qwen3 decoder over the dual track (projected text + codec embeddings) predicting codebook 0.

Module tree and parameter names follow the official `talker.*` tensors:
`model.{layers,norm,codec_embedding,text_embedding}`, `text_projection.linear_fc{1,2}`, `codec_head`,
`code_predictor.*`. Math only: the generation loop lives in `qwen_tts_core.generate`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import TalkerConfig
from .code_predictor import CodePredictor
from .kv_cache import KVCache
from .layers import DecoderLayer, ResizeMLP, RMSNorm, RotaryTable, run_stack


class TalkerStack(nn.Module):
    def __init__(self, cfg: TalkerConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.codec_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, cfg.text_hidden_size)


class Talker(nn.Module):
    def __init__(self, cfg: TalkerConfig, max_positions: int | None = None) -> None:
        super().__init__()
        assert cfg.code_predictor is not None
        self.cfg = cfg
        self.model = TalkerStack(cfg)
        self.text_projection = ResizeMLP(cfg.text_hidden_size, cfg.text_hidden_size, cfg.hidden_size)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.code_predictor = CodePredictor(cfg.code_predictor, cfg.hidden_size)
        self.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, max_positions or cfg.max_position_embeddings)

    # --- embeddings -------------------------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """P(ids): text ids [..., T] -> [..., T, hidden]."""
        return self.text_projection(self.model.text_embedding(ids))

    def embed_codec(self, ids: torch.Tensor) -> torch.Tensor:
        """C(ids): codec ids (codebook 0 / specials / speakers) -> [..., hidden]."""
        return self.model.codec_embedding(ids)

    def embed_frame(self, codes: torch.Tensor) -> torch.Tensor:
        """Sum of the 16 codebook embeddings of a frame: codes [..., 16] -> [..., hidden].

        One reduction over a stacked [..., 16, hidden], as the reference (`codec_hiddens.sum(1)`): in bf16 torch's
        sum accumulates in fp32 and rounds once, where 15 chained bf16 adds round 15 times (other bits in ~half the
        elements, enough to flip a code predictor near-tie a frame later). In fp32 the same bits as chained adds."""
        embs = [self.model.codec_embedding(codes[..., 0])]
        embs += [emb(codes[..., g + 1]) for g, emb in enumerate(self.code_predictor.model.codec_embedding)]
        return torch.stack(embs, dim=-2).sum(-2)

    def new_cache(self, num_slots: int, max_len: int, device=None, dtype=None, static: bool = False) -> KVCache:
        p = self.codec_head.weight
        return KVCache(self.cfg.num_hidden_layers, num_slots, self.cfg.num_key_value_heads, self.cfg.head_dim,
                       max_len, device or p.device, dtype or p.dtype, static=static)

    # --- forward ----------------------------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor | None = None, read_len: int | None = None,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One talker pass.

        embeds: [B, T, hidden] input embeddings; positions: [B, T] absolute positions (also the cache write index);
        slots: [B] cache slot of each row (None: rows 0..B-1); read_len: keys read back (default max position + 1);
        mask: [B, 1, T, read_len] bool (default: key j visible to a query at position p iff j <= p).
        Returns (hidden [B, T, hidden] after the final norm, codebook-0 logits [B, T, vocab]).
        """
        if read_len is None:
            read_len = int(positions.max()) + 1
        if mask is None:
            keys = torch.arange(read_len, device=embeds.device)
            mask = keys[None, None, None, :] <= positions[:, None, :, None]
        hidden = run_stack(self.model.layers, self.model.norm, self.rope, embeds, positions,
                           cache.layers(slots, read_len), mask)
        return hidden, self.codec_head(hidden)
