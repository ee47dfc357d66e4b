"""Logits -> token, in the order Hugging Face `generate()` applies its processors:
repetition penalty -> suppressed ids -> min-new-tokens (no EOS) -> [temperature -> top-k -> top-p -> draw]
or argmax when not sampling. Pure functions over fp32 logits.

Two samplers share these rules:
  - the reference sampler (`pick`, `pick_rows`): torch's generators and `torch.multinomial`, one row at a time on the
    host's orders, so a run draws exactly the random numbers the reference draws (seeded parity with the official
    package after `torch.manual_seed`). Eager only; `Engine(sampler="torch")`.
  - the device sampler (`sample_device` + `gumbel`): per-row tensors and a counter-based hash of (seed, frame,
    codebook, id), no host sync, captured inside the CUDA graphs; the same draws alone or batched, on any device
    (the same codes where the logits are too: see the Engine).
    `Engine(sampler="device")`, the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model.fused import FusedOp


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
    probs = _probs(warp(logits, temperature, top_k, top_p), logits)
    return torch.multinomial(probs[None], 1, generator=generator)[0, 0]


def _probs(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """softmax(x) over the last dim; a row whose softmax is not finite becomes one-hot at argmax(logits) (the same
    draw from the generator). That happens when a tiny temperature or penalty sends a logit to +inf: the limit of
    the distribution is the greedy id, where the reference's multinomial raises (and with it the whole batch)."""
    probs = x.softmax(-1)
    ok = torch.isfinite(probs).all(-1, keepdim=True)
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), x.shape[-1]).to(probs.dtype)
    return torch.where(ok, probs, greedy)


def pick_rows(logits: torch.Tensor, do_sample: list[bool], temperature: list[float], top_k: list[int],
              top_p: list[float], generators: list[torch.Generator | None]) -> torch.Tensor:
    """Per-row `pick` over logits [B, V] with each row's own parameters and generator -> ids [B]."""
    B = logits.shape[0]
    if not any(do_sample):
        return logits.argmax(-1)
    same = (len(set(temperature)) == 1 and len(set(top_k)) == 1 and len(set(top_p)) == 1 and all(do_sample))
    if same and all(g is None for g in generators):
        probs = _probs(warp(logits, temperature[0], top_k[0], top_p[0]), logits)
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


# --- the device sampler: per-row tensors, no host sync, capturable in a CUDA graph -------------------------------
# Randomness is a counter-based hash of (seed, frame, codebook, token id) made of integer tensor ops: a row's draws do
# not depend on which other rows share its batch, on the batch size, on graphs or on the device, so a seeded request
# gives the same codes alone or batched wherever its logits are the same (CPU engines: bit for bit; see the Engine).
# Sampling is the Gumbel-max trick: argmax(logits / T + Gumbel) over the ids that top-k and top-p keep draws from
# softmax(logits / T) restricted to them, exactly.

_M32 = 0xFFFFFFFF
_MUL = 0x045D9F3B  # < 2**27: products of 32-bit values stay below 2**59 (no int64 overflow)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche, on int64 tensors holding values in [0, 2**32)."""
    x = ((x >> 16) ^ x) * _MUL & _M32
    x = ((x >> 16) ^ x) * _MUL & _M32
    return (x >> 16) ^ x


def token_hash(vocab_size: int, device=None) -> torch.Tensor:
    """Per-id salt [V] (int64 in [0, 2**32)) mixed into every draw."""
    return _mix(_mix(torch.arange(vocab_size, device=device, dtype=torch.long) + 0x9E3779B9 & _M32))


def seed_key(seed: int) -> int:
    """A seed in [0, 2**63) -> the 32-bit key its draws derive from (both halves of the seed mixed in)."""
    lo, hi = torch.tensor(seed & _M32), torch.tensor((seed >> 32) & _M32)
    return int(_mix(lo ^ _mix(hi + 0x6A09E667 & _M32)))


def noise_key(key: torch.Tensor, frame: torch.Tensor, codebook: int | torch.Tensor) -> torch.Tensor:
    """Keys of the draws of codebook `codebook` (0 = the talker's id) of frame `frame`, from each row's seed key
    (`seed_key`): [B] for an int codebook; [B, G] for a Long [G] of codebooks (all of a frame's draws at once, the
    same keys as one by one)."""
    if isinstance(codebook, torch.Tensor):
        key, frame = key[:, None], frame[:, None]
    return _mix(key ^ _mix((frame * 16 + codebook) & _M32))


_E_MIN = 2.0 ** -24  # -log of the largest float32 below 1: the smallest -log(u) an exact log gives on the grid


def _gumbel(key: torch.Tensor, tok_hash: torch.Tensor) -> torch.Tensor:
    u = _mix(key[..., None] ^ tok_hash)
    u = ((u >> 8).float() + 0.5) * (1.0 / (1 << 24))  # uniform in (0, 1] on a 2**-24 grid
    # The top of the grid, (2**24 - 0.5) / 2**24, rounds to 1.0 in float32: its noise was +inf, -inf + inf = NaN on
    # filtered ids, and argmax drew any id at all (a blocked special id crashed the codec, once in ~5500 talker
    # draws). -log(u) is held at or above the value of the largest float below 1, so that point draws as that float
    # would (noise 16.6) and a log less exact near 1 (a compiled kernel's) cannot give +inf or NaN either.
    return -torch.log((-torch.log(u)).clamp(min=_E_MIN))


def grid_top_key(tok_hash: torch.Tensor, token: int, search: int = 1 << 30) -> torch.Tensor | None:
    """A draw key (Long [1]) whose uniform for `token` is the top of the grid, where float32 rounds to 1.0 (the
    extreme the noise must survive: tests, gpu_check); found by hash search over keys below `search`, on
    tok_hash's device (~2**24 keys expected). None when none is found."""
    step = 1 << 22 if tok_hash.device.type == "cpu" else 1 << 24
    for start in range(0, search, step):
        keys = torch.arange(start, start + step, dtype=torch.long, device=tok_hash.device)
        hit = ((_mix(keys ^ tok_hash[token]) & _M32) >> 8 == (1 << 24) - 1).nonzero()
        if len(hit):
            return keys[hit[0]]
    return None


gumbel = FusedOp(_gumbel)
"""gumbel(key, tok_hash): Gumbel(0, 1) noise [..., V] (fp32) from keys [...] (e.g. [B], or [B, G] for G draws) and
the token salt [V]. Elementwise in the keys: a batch of keys gives each key's noise bit for bit. One kernel when
compiled (`model.fused.compiled_ops`), ~25 plain."""


def sample_device(logits: torch.Tensor, do_sample: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, noise: Callable[[], torch.Tensor], plan: SamplePlan | None = None,
                  memo: dict | None = None) -> torch.Tensor:
    """Per-row sampling with no host sync: logits [B, V] fp32 (processed); do_sample bool [B]; temperature, top_p
    float [B]; top_k long [B] (0 = off); noise() -> [B, V] Gumbel. Greedy rows take argmax(logits), as HF does.
    Filters as HF's warpers in order: temperature, top-k (ties with the k-th value kept), top-p (smallest set whose
    probability exceeds top_p, computed on what top-k kept).

    plan: what the host knows about the rows that count (eager only; None = the general code a graph captures). A
    plan only skips work whose result is known: no row samples (argmax), no row uses top-p (the k-th value from a
    top-k of the largest k instead of a full sort). The ids are the same either way. Each way is one `FusedOp`
    (a few kernels when compiled).

    memo: a dict shared by the draws of one pass over the same rows and parameters (the code predictor's 15): what
    the filters derive from top_k and top_p per row is computed at the first draw only (~5 kernels fewer per draw)."""
    if plan is not None and not plan.sample:
        return logits.argmax(-1)
    V = logits.shape[-1]
    memo = {} if memo is None else memo
    if plan is None or plan.top_p:
        if ("sorted", V) not in memo:
            memo["sorted", V] = _sorted_rows(top_k, top_p, V)
        return _sample_sorted(logits, do_sample, temperature, *memo["sorted", V], noise())
    kmax = max(1, min(plan.kmax, V))
    if ("topk", kmax) not in memo:
        memo["topk", kmax] = _topk_rows(top_k, kmax)
    return _sample_topk(logits, do_sample, temperature, *memo["topk", kmax], noise(), kmax)


def _sorted_rows_plain(top_k: torch.Tensor, top_p: torch.Tensor, V: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the sorted sampler needs per row: k - 1 (V - 1 without top-k) [B, 1] and 1 - top_p [B, 1]."""
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    return (k - 1)[:, None], (1 - top_p)[:, None]


def _topk_rows_plain(top_k: torch.Tensor, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the top-k sampler needs per row: k - 1 within the top kmax [B, 1], and whether top-k is off [B, 1]."""
    return (top_k.clamp(1, kmax) - 1)[:, None], (top_k <= 0)[:, None]


def _sample_sorted_plain(logits: torch.Tensor, do_sample: torch.Tensor, temperature: torch.Tensor,
                         kth_index: torch.Tensor, drop_below: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """kth_index Long [B, 1]: each row's k - 1 (V - 1 without top-k); drop_below [B, 1]: 1 - top_p."""
    greedy = logits.argmax(-1)
    x = logits / temperature[:, None]
    sx, sidx = torch.sort(x, dim=-1, descending=True)
    kth = sx.gather(-1, kth_index)
    sx = sx.masked_fill(sx < kth, float("-inf"))
    # top-p: cumulative probability in ascending order (as HF sums it), read back in descending order
    cum = sx.softmax(-1).flip(-1).cumsum(-1).flip(-1)
    drop_sorted = cum <= drop_below
    drop_sorted[:, 0] = False  # the most likely id always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, sidx, drop_sorted) | (x < kth)
    sampled = (x.masked_fill(drop, float("-inf")) + noise).argmax(-1)
    # a row whose largest tempered logit is +inf or NaN (a tiny temperature sends every positive logit to +inf, ties
    # the draw would break by index) takes the greedy id, its limit, as the reference sampler does (`_probs`)
    return torch.where(do_sample & sx[:, 0].isfinite(), sampled, greedy)


def _sample_topk_plain(logits: torch.Tensor, do_sample: torch.Tensor, temperature: torch.Tensor,
                       kth_index: torch.Tensor, no_top_k: torch.Tensor, noise: torch.Tensor, kmax: int
                       ) -> torch.Tensor:
    """kth_index Long [B, 1]: each row's k - 1 within the top kmax; no_top_k bool [B, 1]: the row keeps every id."""
    greedy = logits.argmax(-1)
    x = logits / temperature[:, None]
    vals = torch.topk(x, kmax, dim=-1).values
    kth = vals.gather(-1, kth_index).masked_fill(no_top_k, float("-inf"))
    sampled = (x.masked_fill(x < kth, float("-inf")) + noise).argmax(-1)
    return torch.where(do_sample & vals[:, 0].isfinite(), sampled, greedy)  # see _sample_sorted_plain


_sample_sorted, _sample_topk = FusedOp(_sample_sorted_plain), FusedOp(_sample_topk_plain)
_sorted_rows, _topk_rows = FusedOp(_sorted_rows_plain), FusedOp(_topk_rows_plain)


@dataclass(frozen=True)
class SamplePlan:
    """Host-side facts about the rows of an eager step (see `sample_device`)."""

    sample: bool      # some row samples
    kmax: int         # the largest top_k among sampling rows that set one
    top_p: bool       # some sampling row uses top-p < 1

    @staticmethod
    def of(do_sample, top_k, top_p) -> SamplePlan:
        ks = [int(k) for d, k in zip(do_sample, top_k) if d and k > 0]
        return SamplePlan(any(do_sample), max(ks, default=1),
                          any(d and p < 1.0 for d, p in zip(do_sample, top_p)))


def talker_logits_batch(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor, num_generated: torch.Tensor,
                        blocked: torch.Tensor, eos_id: int, min_new_tokens: int = 2) -> torch.Tensor:
    """`talker_logits_processors` for a batch, with no host sync: logits [B, V] fp32; seen [B, V] bool (ids generated
    so far: the repetition history as a set, which is all HF's penalty uses); penalty [B]; num_generated [B] long;
    blocked [V] bool (the special ids that are never sampled, EOS excluded). Same values as the per-row version."""
    pen = penalty[:, None]
    logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    logits = logits.masked_fill(blocked[None, :], float("-inf"))
    no_eos = (num_generated < min_new_tokens)[:, None] & (torch.arange(logits.shape[-1], device=logits.device)
                                                          == eos_id)[None, :]
    return logits.masked_fill(no_eos, float("-inf"))
