"""The math of one engine step: the prefill of sessions that start together, one batched talker step, one batched code-predictor pass.

Pure functions over tensors (no Python state, no host sync in `talker_step` and `predict_codes`): the runner
(`runner.py`) calls them eagerly or captures them in CUDA graphs, the same code either way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.kv_cache import KVCache
from ..model.layers import decode_layout
from ..model.talker import Talker


@torch.inference_mode()
def prefill(talker: Talker, cache: KVCache, slots: torch.Tensor, embeds: torch.Tensor,
            last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run n sessions' prompt embeds [n, T, C] (right-padded) into cache slots `slots` [n] at positions 0..T-1;
    last [n]: each row's last real position. Returns (its hidden [n, C], its codebook-0 logits [n, V] fp32)."""
    n, T, _ = embeds.shape
    positions = torch.arange(T, device=embeds.device)[None].expand(n, T)
    hidden, logits = talker(embeds, positions, cache, slots=slots, read_len=T)
    rows = torch.arange(n, device=embeds.device)
    return hidden[rows, last], logits[rows, last].float()


def talker_step(talker: Talker, cache: KVCache, positions: torch.Tensor, embeds: torch.Tensor,
                read_len: int, layout: str = "gqa") -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step for the B sessions in cache slots 0..B-1: embeds [B, C] at positions [B]; keys are read up to
    `read_len` (a bucket above the longest row); `layout`: the attention layout (`model.layers.decode_layout`).
    Returns (hidden [B, C], codebook-0 logits [B, V] fp32)."""
    with decode_layout(layout):
        hidden, logits = talker(embeds[:, None], positions[:, None], cache, read_len=read_len)
    return hidden[:, 0], logits[:, 0].float()


def predict_codes(talker: Talker, cache: KVCache, hidden: torch.Tensor, code0: torch.Tensor,
                  pick: Callable[[torch.Tensor, int], torch.Tensor], layout: str = "gqa") -> torch.Tensor:
    """Codebooks 1..15 of B frames with the code predictor's per-frame cache `cache` (its rows 0..B-1, reused every
    frame). hidden [B, C] (the talker output that produced code0), code0 [B]. `pick(logits [B, 2048] fp32, group) ->
    ids [B]` draws codebook `group`; `layout`: the attention layout of its one-query steps. Returns codes [B, 16]."""
    with decode_layout(layout):
        return _predict_codes(talker, cache, hidden, code0, pick)


def _predict_codes(talker: Talker, cache: KVCache, hidden: torch.Tensor, code0: torch.Tensor,
                   pick: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    cp = talker.code_predictor
    x = torch.stack([hidden, talker.embed_codec(code0)], dim=1)  # [B, 2, C]
    codes = [code0]
    consts = cp.pass_constants(x.dtype)
    logits = cp(x, 0, cache, head=0, consts=consts)
    for g in range(1, cp.num_steps + 1):
        ids = pick(logits.float(), g)
        codes.append(ids)
        if g == cp.num_steps:
            break
        logits = cp(cp.embed(g, ids)[:, None], g + 1, cache, head=g, consts=consts)
    return torch.stack(codes, dim=1)
