"""The static-shape fast path (GPU): fixed batch buckets, a static KV cache read at full length, a sampler made of
pure tensor ops, and CUDA-graph capture of the talker step and of the whole 15-step code-predictor loop per bucket.

The same code runs eagerly on CPU (no capture), which is how its correctness is tested without a GPU:
greedy results equal the dynamic path's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..model.talker import Talker

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def sample_tensor(logits: torch.Tensor, do_sample: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Per-row sampling with no host sync (capturable): logits [B, V] fp32; do_sample bool [B]; temperature,
    top_p float [B]; top_k long [B] (0 = off). Multinomial via the exponential race: argmax(p / Exp(1))."""
    V = logits.shape[-1]
    x = logits / temperature[:, None]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    sorted_x, _ = torch.sort(x, dim=-1, descending=True)
    kth = sorted_x.gather(-1, (k - 1)[:, None])
    x = x.masked_fill(x < kth, float("-inf"))
    # top-p on what survived top-k: drop tokens whose ascending cumulative probability stays <= 1 - top_p
    sorted_x2, idx = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x2.softmax(-1).cumsum(-1)
    remove = cum <= (1 - top_p)[:, None]
    remove[:, -1] = False
    x = x.masked_fill(remove.scatter(-1, idx, remove), float("-inf"))
    probs = x.softmax(-1)
    noise = torch.empty_like(probs).exponential_()
    sampled = (probs / noise).argmax(-1)
    return torch.where(do_sample, sampled, logits.argmax(-1))


def bucket_for(n: int, max_sessions: int) -> int:
    """The smallest bucket holding n rows (never above max_sessions, which is itself the last bucket)."""
    fits = [b for b in BUCKETS if n <= b <= max_sessions]
    return fits[0] if fits else max(n, max_sessions)


class FastPath:
    """Static buffers + (on CUDA) graphs for one engine. `talker_step` and `predict_codes` mirror step.py."""

    def __init__(self, talker: Talker, max_sessions: int, max_len: int, use_graphs: bool | None = None) -> None:
        self.talker, self.max_sessions, self.max_len = talker, max_sessions, max_len
        p = talker.codec_head.weight
        self.device, self.dtype = p.device, p.dtype
        self.cache = talker.new_cache(max_sessions + 1, max_len, static=True)  # +1: a scratch slot for padding
        self.scratch = max_sessions
        self.use_graphs = (self.device.type == "cuda") if use_graphs is None else use_graphs
        self._graphs: dict[tuple[str, int], tuple[torch.cuda.CUDAGraph, dict, dict]] = {}
        self.capturer = None  # a GraphCapture (e.g. the CPU stand-in); None: torch.cuda directly

    # --- eager bodies (also what gets captured) -----------------------------------------------------------------
    def _talker_body(self, io: dict) -> dict:
        hidden, logits = self.talker(io["embeds"][:, None], io["pos"][:, None], self.cache, slots=io["slots"],
                                     read_len=self.max_len)
        return {"hidden": hidden[:, 0], "logits": logits[:, 0].float()}

    def _cp_body(self, io: dict) -> dict:
        t, cp = self.talker, self.talker.code_predictor
        cache = io["cp_cache"]
        x = torch.stack([io["hidden"], t.embed_codec(io["code0"])], dim=1)
        codes = [io["code0"]]
        logits = cp(x, 0, cache, head=0)
        for g in range(1, cp.num_steps + 1):
            ids = sample_tensor(logits.float(), io["do_sample"], io["temperature"], io["top_k"], io["top_p"])
            codes.append(ids)
            if g < cp.num_steps:
                logits = cp(cp.embed(g, ids)[:, None], g + 1, cache, head=g)
        return {"codes": torch.stack(codes, dim=1)}

    # --- public ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def talker_step(self, slots: torch.Tensor, pos: torch.Tensor, embeds: torch.Tensor):
        n = slots.shape[0]
        B = bucket_for(n, self.max_sessions)
        io = {"slots": _pad(slots, B, self.scratch), "pos": _pad(pos, B, 0), "embeds": _pad_rows(embeds, B)}
        out = self._run("talker", B, io, self._talker_body)
        return out["hidden"][:n], out["logits"][:n]

    @torch.inference_mode()
    def predict_codes(self, hidden: torch.Tensor, code0: torch.Tensor, params: dict[str, torch.Tensor]):
        n = hidden.shape[0]
        B = bucket_for(n, self.max_sessions)
        io = {"hidden": _pad_rows(hidden, B), "code0": _pad(code0, B, 0),
              **{k: _pad(v, B, v[0] if len(v) else 0) for k, v in params.items()}}
        if not self.use_graphs:
            io["cp_cache"] = self.talker.code_predictor.new_cache(B)
        return self._run("cp", B, io, self._cp_body)["codes"][:n]

    def _run(self, name: str, B: int, io: dict, body: Callable[[dict], dict]) -> dict:
        if not self.use_graphs:
            return body(io)
        key = (name, B)
        if key not in self._graphs:
            self._graphs[key] = self._capture(name, B, io, body)
        graph, static_in, static_out = self._graphs[key]
        for k, v in io.items():
            static_in[k].copy_(v)
        graph.replay()
        return static_out

    def _capture(self, name: str, B: int, io: dict, body: Callable[[dict], dict]):
        static_in = {k: v.clone() for k, v in io.items()}
        if name == "cp":
            static_in["cp_cache"] = self.talker.code_predictor.new_cache(B)
        if name == "talker":
            static_in["slots"].fill_(self.scratch)  # warm-up and capture write only the scratch slot
        if self.capturer is not None:
            static_out: dict = {}
            graph = self.capturer.capture(lambda: static_out.update(body(static_in)))
            return graph, static_in, static_out
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                body(static_in)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = body(static_in)
        log.info("captured CUDA graph %s batch %d", name, B)
        return graph, static_in, static_out


def _pad(x: torch.Tensor, B: int, fill) -> torch.Tensor:
    if x.shape[0] == B:
        return x
    pad = torch.full((B - x.shape[0], *x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def _pad_rows(x: torch.Tensor, B: int) -> torch.Tensor:
    if x.shape[0] == B:
        return x
    return torch.cat([x, x.new_zeros(B - x.shape[0], *x.shape[1:])])


def sampling_tensors(sps, device) -> dict[str, torch.Tensor]:
    """The code predictor's per-row sampling parameters as tensors."""
    return {
        "do_sample": torch.tensor([p.subtalker_dosample for p in sps], device=device),
        "temperature": torch.tensor([float(p.subtalker_temperature) for p in sps], device=device),
        "top_k": torch.tensor([int(p.subtalker_top_k) for p in sps], device=device),
        "top_p": torch.tensor([float(p.subtalker_top_p) for p in sps], device=device),
    }


__all__ = ["FastPath", "sample_tensor", "sampling_tensors"]
