"""The math of one engine step: a session's prefill, one batched talker step, one batched code-predictor pass.

Pure functions over tensors (no Python state, no host sync in `talker_step` and `predict_codes`): the runner
(`runner.py`) calls them eagerly or captures them in CUDA graphs, the same code either way.
"""

from __future__ import annotations

from collections.abc import Callable

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


def talker_step(talker: Talker, cache: KVCache, positions: torch.Tensor, embeds: torch.Tensor,
                read_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for the B sessions in cache slots 0..B-1: embeds [B, C] at positions [B]; keys are read up to
    `read_len` (a bucket above the longest row). Returns (hidden [B, C], codebook-0 logits [B, V] fp32)."""
    hidden, logits = talker(embeds[:, None], positions[:, None], cache, read_len=read_len)
    return hidden[:, 0], logits[:, 0].float()


def predict_codes(talker: Talker, cache: KVCache, hidden: torch.Tensor, code0: torch.Tensor,
                  pick: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Codebooks 1..15 of B frames with the code predictor's per-frame cache `cache` (B slots, reused every frame).
    hidden [B, C] (the talker output that produced code0), code0 [B]. `pick(logits [B, 2048] fp32, group) -> ids [B]`
    draws codebook `group`. Returns codes [B, 16]."""
    cp = talker.code_predictor
    x = torch.stack([hidden, talker.embed_codec(code0)], dim=1)  # [B, 2, C]
    codes = [code0]
    logits = cp(x, 0, cache, head=0)
    for g in range(1, cp.num_steps + 1):
        ids = pick(logits.float(), g)
        codes.append(ids)
        if g == cp.num_steps:
            break
        logits = cp(cp.embed(g, ids)[:, None], g + 1, cache, head=g)
    return torch.stack(codes, dim=1)
