"""The hot path: one batched talker step and one batched code-predictor pass. Small named functions (the units a
GPU build captures in CUDA graphs); no Python state of their own."""

from __future__ import annotations

import torch

from ..model.kv_cache import KVCache
from ..model.talker import Talker


@torch.inference_mode()
def prefill(talker: Talker, cache: KVCache, slot: int, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one session's prompt embeds [T, C] into cache slot `slot` at positions 0..T-1.
    Returns (last hidden [C], last codebook-0 logits [V] fp32)."""
    T = embeds.shape[0]
    positions = torch.arange(T, device=embeds.device)[None]
    slots = torch.tensor([slot], device=embeds.device)
    hidden, logits = talker(embeds[None], positions, cache, slots=slots, read_len=T)
    return hidden[0, -1], logits[0, -1].float()


@torch.inference_mode()
def talker_step(talker: Talker, cache: KVCache, slots: torch.Tensor, positions: torch.Tensor,
                embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for B sessions: embeds [B, C] at positions [B] in cache slots [B].
    Returns (hidden [B, C], codebook-0 logits [B, V] fp32)."""
    hidden, logits = talker(embeds[:, None], positions[:, None], cache, slots=slots)
    return hidden[:, 0], logits[:, 0].float()


@torch.inference_mode()
def predict_codes(talker: Talker, hidden: torch.Tensor, code0: torch.Tensor, pick_fn) -> torch.Tensor:
    """Codebooks 1..15 of B frames. hidden [B, C] (talker output that produced code0), code0 [B].
    `pick_fn(logits [B, 2048] fp32, group) -> ids [B]` samples; returns codes [B, 16]."""
    cp = talker.code_predictor
    B = hidden.shape[0]
    cache = cp.new_cache(B)
    x = torch.stack([hidden, talker.embed_codec(code0)], dim=1)  # [B, 2, C]
    codes = [code0]
    logits = cp(x, 0, cache, head=0)
    for g in range(1, cp.num_steps + 1):
        ids = pick_fn(logits.float(), g)
        codes.append(ids)
        if g == cp.num_steps:
            break
        logits = cp(cp.embed(g, ids)[:, None], g + 1, cache, head=g)
    return torch.stack(codes, dim=1)
