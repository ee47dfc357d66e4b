"""Logits -> token, in the order Hugging Face `generate()` applies its processors, so greedy runs match the reference
exactly and seeded sampled runs draw the same random numbers:
repetition penalty -> suppressed ids -> min-new-tokens (no EOS) -> [temperature -> top-k -> top-p -> multinomial]
or argmax when not sampling. Pure functions over fp32 logits.
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float) -> torch.Tensor:
    """logits [V]; history: 1-D ids generated so far (codebook 0). Divides positive / multiplies negative logits."""
    if history is None or history.numel() == 0 or penalty == 1.0:
        return logits
    score = logits.gather(0, history)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(0, history, score)


def warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, top-k and top-p on logits [..., V] (filtered entries become -inf)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int, top_p: float,
         generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [V] (fp32) -> token id (0-d long tensor)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = warp(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs[None], 1, generator=generator)[0, 0]


def pick_rows(logits: torch.Tensor, do_sample: list[bool], temperature: list[float], top_k: list[int],
              top_p: list[float], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Per-row `pick` over logits [B, V] with each row's own parameters and generator -> ids [B]."""
    B = logits.shape[0]
    if not any(do_sample):
        return logits.argmax(-1)
    same = (len(set(temperature)) == 1 and len(set(top_k)) == 1 and len(set(top_p)) == 1 and all(do_sample))
    if same and all(g is None for g in generators):
        probs = warp(logits, temperature[0], top_k[0], top_p[0]).softmax(-1)
        return torch.multinomial(probs, 1)[:, 0]
    out = torch.empty(B, dtype=torch.long, device=logits.device)
    for i in range(B):
        out[i] = pick(logits[i], do_sample[i], temperature[i], top_k[i], top_p[i], generators[i])
    return out


def talker_logits_processors(logits: torch.Tensor, history: torch.Tensor | None, repetition_penalty: float,
                             num_generated: int, eos_id: int, suppress_from: int, min_new_tokens: int = 2):
    """The talker's non-sampling processors on one row's logits [V] (fp32): repetition penalty on the codebook-0
    history, suppression of the special ids [suppress_from, V) except EOS, and no EOS before `min_new_tokens`."""
    logits = apply_repetition_penalty(logits, history, repetition_penalty)
    eos_logit = logits[eos_id].clone()
    logits[suppress_from:] = float("-inf")
    logits[eos_id] = float("-inf") if num_generated < min_new_tokens else eos_logit
    return logits
