"""The hot path: per-slot state on the device, and one step body for the talker and one for the code predictor,
run eagerly or replayed from CUDA graphs (the same code either way).

Slot = batch row. Session i lives in cache slot i and every per-session value the step needs lives in a device
tensor indexed by slot: position, last frame's codes, pending codebook-0 id and talker hidden state, trailing text
embeddings, repetition history (a seen-set), sampling parameters, seed and counters. A step runs rows 0..B-1 (B a
batch bucket covering the highest slot in use) with two masks saying which rows the code predictor and the talker
advance; other rows compute and are discarded (their writes are masked, and a talker row that does not advance
only writes the cache position it will overwrite before reading it). Keys are read up to L, a length bucket above
the longest active row, not the cache capacity. Nothing in a step reads the device from the host except the one
read of the new ids (`step()` returns them); the masks are uploaded only when they change.

With graphs, `capture_all()` records one code-predictor graph per batch bucket, one talker graph per (batch
bucket, length bucket) and one prefill graph per (rows, prompt length) bucket before traffic, in one memory pool
(graphs.py). Without graphs (CPU) the cache grows by doubling, B is exact and prefills run eagerly at the prompts'
own lengths. With compiled bodies (CPU, `compile`; compiled.py) each body is one torch.compiled graph for every
batch, key length and cache size, compiled before traffic (`compile_all`); a batch runs at least two rows there.

Samplers (sampling.py): "device" (counter-based RNG, inside the graphs) or "torch" (the reference's generators and
draw order; eager only: rows' picks go through the host).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..model.fused import compiled_ops
from ..model.layers import (
    live_rows,
    onednn_enabled,
    pack_linears_,
    packed_linears,
    probe_decode_layouts,
)
from ..model.talker import Talker
from ..types import SamplingParams
from .compiled import MIN_ROWS, CompiledBody, compile_mode
from .graphs import GraphCapture
from .sampling import (
    SamplePlan,
    gumbel,
    noise_key,
    pick_rows,
    sample_device,
    seed_key,
    talker_logits_batch,
    token_hash,
)
from .step import predict_codes, prefill, talker_step

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MIN_LEN_BUCKET = 64
"""The smallest key-length bucket of the graphs, and the step of an eager step's key length (`read_length`)."""
PREFILL_TOKENS = 4096
"""At most this many (padded) positions in one batched prefill: sessions admitted together share one talker pass."""
PREFILL_PAD_SLACK = 64
"""Padding a batched prefill may add beyond a quarter of its real positions (a pass costs at least one read of the
weights: a few dozen positions of compute on CPU, more on GPU)."""
PREFILL_GRAPH_ROWS = (1, 2, 4, 8)
PREFILL_GRAPH_LENS = (16, 32, 64, 128, 256)
"""With graphs, prefills of up to PREFILL_GRAPH_LENS[-1] positions replay a captured graph per (rows, length) bucket:
a group of sessions starting together is cut into pieces of these row counts and each piece's prompts are right-padded
to the next length bucket. A short prompt's eager prefill on a GPU costs the host one launch per op (777 for the
1.7B talker and its first draw: milliseconds of host time before the first frame). Longer prompts (GPU-bound
anyway) run eagerly."""
TOPK_GRAPH_KMAX = 64
"""With graphs, a second code-predictor graph per batch bucket samples with top-k only (no top-p: no full sort,
12 kernels fewer per codebook): used when every sampling row has top_p = 1 and top_k <= this, as the official
defaults (top_k 50, top_p 1.0) do. The ids are the general sampler's."""


def batch_buckets(max_sessions: int, buckets: Sequence[int] | None = None) -> tuple[int, ...]:
    """The batch sizes graphs are captured for: the given (or default) sizes up to max_sessions, plus max_sessions."""
    src = BATCH_BUCKETS if buckets is None else buckets
    bad = [b for b in src if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise ValueError(f"batch_buckets must be positive integers, got {list(src)!r}")
    return tuple(sorted({b for b in src if b < max_sessions} | {max_sessions}))


def length_buckets(max_len: int) -> tuple[int, ...]:
    """Key-length buckets: powers of two from MIN_LEN_BUCKET, and max_len itself."""
    out, n = [], MIN_LEN_BUCKET
    while n < max_len:
        out.append(n)
        n *= 2
    return (*out, max_len)


def read_length(n: int, max_len: int, buckets: Sequence[int] | None) -> int:
    """Keys a talker step reads for positions 0..n-1. buckets: a static engine's key-length buckets (the first
    >= n: the graphs' shapes, which its eager steps share so that the two agree bit for bit); None (a growing
    cache): n rounded up to a multiple of MIN_LEN_BUCKET, so the attention's reads follow the longest session within
    63 keys instead of up to twice it (keys past a row's position are masked; at 8 rows these reads weigh like the
    weights: 0.6B fp32 on a 2-core CPU, a talker step at position 300/600/1100 1.17x/1.34x/1.64x faster,
    `benchmarks/talker_keys.py`)."""
    if buckets is not None:
        return _first_at_least(buckets, n)
    return min(max_len, -(-n // MIN_LEN_BUCKET) * MIN_LEN_BUCKET)


@dataclass(frozen=True)
class Start:
    """A session to start: its slot, prompt embeds [T, C], trailing text embeddings, sampling, seed and (torch
    sampler) generator."""

    slot: int
    embeds: torch.Tensor
    trailing: list[torch.Tensor]
    sp: SamplingParams
    seed: int
    generator: torch.Generator | None = None


def packs_linears(talker: Talker, sampler: str) -> bool:
    """Whether a runner of `sampler` runs `talker`'s linears on oneDNN-packed weights (`packed_linears`), packing
    them now where it does: CPU, the device sampler's engines (the torch sampler's promise is the reference's exact
    numbers, so it keeps torch's GEMM), QTTS_ONEDNN not 0. An engine projects its prompts' text under the same
    context (`Engine.text_projection`)."""
    return sampler == "device" and onednn_enabled() and pack_linears_(talker)


def prefill_groups(lengths: Sequence[int], max_tokens: int = PREFILL_TOKENS, pad: bool = True) -> list[list[int]]:
    """Indices of prompts (by length) grouped into batched prefills: similar lengths together (shortest first), a
    group's padded size (rows x longest) at most `max_tokens` (a longer prompt goes alone) and its padding at most
    PREFILL_PAD_SLACK tokens plus a quarter of its real ones. pad=False: equal lengths only (no padding)."""
    groups: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda j: lengths[j]):
        T = lengths[i]
        if groups and (pad or lengths[groups[-1][0]] == T):
            g = groups[-1]
            padded = (len(g) + 1) * T
            if padded <= max_tokens and padded - (real + T) <= PREFILL_PAD_SLACK + (real + T) // 4:
                g.append(i)
                real += T
                continue
        groups.append([i])
        real = T
    return groups


def _plan_of(sps: Sequence[SamplingParams]) -> SamplePlan:
    """The talker sampling plan of these sessions' first draw."""
    return SamplePlan.of([p.do_sample for p in sps], [p.top_k for p in sps], [p.top_p for p in sps])


def _first_at_least(buckets: Sequence[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    return buckets[-1]


class StepRunner:
    def __init__(self, talker: Talker, max_sessions: int, max_len: int, *, tts_pad: torch.Tensor, eos_id: int,
                 suppress_from: int, static: bool, capture: GraphCapture | None = None,
                 buckets: Sequence[int] | None = None, sampler: str = "device", compile: bool | str = False,
                 initial_len: int = 256) -> None:
        if sampler not in ("device", "torch"):
            raise ValueError(f"sampler must be 'device' or 'torch', got {sampler!r}")
        if capture is not None and sampler != "device":
            raise ValueError("CUDA graphs need sampler='device' (the torch sampler draws on the host)")
        p = talker.codec_head.weight
        self.talker, self.device, self.dtype = talker, p.device, p.dtype
        self.S, self.max_len, self.sampler, self.capture = max_sessions, max_len, sampler, capture
        self.static = static or capture is not None
        self.layout = "gqa"     # the talker's decode attention layout (choose_decode_layout)
        self.cp_layout = "gqa"  # the code predictor's
        self.batch_buckets = batch_buckets(max_sessions, buckets)
        self.len_buckets = length_buckets(max_len)
        # compile "step": the bodies compiled whole (compiled.py), for batches of at least MIN_ROWS rows
        mode = compile_mode(compile, self.device, sampler, capture is not None)
        self.whole = mode == "step"
        if self.whole:
            self.S = max(max_sessions, MIN_ROWS)
        t = talker.cfg
        S, C, V = self.S, t.hidden_size, t.vocab_size
        Vc = t.code_predictor.vocab_size
        dev, lng = self.device, dict(dtype=torch.long, device=self.device)
        cap = max_len if self.static else min(max_len, max(initial_len, MIN_LEN_BUCKET))
        # compiled bodies: one position more than any step reads, so that no read covers the whole cache (a read
        # that did would be contiguous, which the graph would have to guard: a recompile when it flips)
        self.spare = int(self.whole)
        self.cache = talker.new_cache(S, cap + self.spare)
        # one code-predictor cache for every batch: a step of B rows uses rows 0..B-1 (a frame's <= 16 keys, written
        # from position 0 each frame, so steps and graphs of other batch sizes may share it)
        self.cp_cache = talker.code_predictor.new_cache(S)
        # --- per-slot state ----------------------------------------------------------------------------------
        self.pos, self.ngen, self.nframes = (torch.zeros(S, **lng) for _ in range(3))
        self.code0, self.text_pos, self.text_len = (torch.zeros(S, **lng) for _ in range(3))
        self.hidden = torch.zeros(S, C, dtype=self.dtype, device=dev)
        self.last_codes = torch.zeros(S, t.code_predictor.num_code_groups, **lng)
        self.seen = torch.zeros(S, V, dtype=torch.bool, device=dev)
        self._true = torch.ones((), dtype=torch.bool, device=dev)   # a device value to index_put_ (see _prefill_and_draw)
        self.text_buf = torch.zeros(S, cap, C, dtype=self.dtype, device=dev)
        self.tts_pad = tts_pad.to(self.dtype).reshape(C)
        self.seed_key = torch.zeros(S, **lng)
        f32 = dict(dtype=torch.float32, device=dev)
        self.t_do, self.c_do = torch.zeros(S, dtype=torch.bool, device=dev), torch.zeros(S, dtype=torch.bool,
                                                                                          device=dev)
        self.t_temp, self.t_top_p, self.t_pen = torch.ones(S, **f32), torch.ones(S, **f32), torch.ones(S, **f32)
        self.c_temp, self.c_top_p = torch.ones(S, **f32), torch.ones(S, **f32)
        self.t_top_k, self.c_top_k = torch.zeros(S, **lng), torch.zeros(S, **lng)
        # host mirrors of the sampling parameters (eager steps skip work no row needs; graphs run everything)
        self.host_params = np.zeros((S, 6), dtype=np.float64)  # t_do, t_top_k, t_top_p, c_do, c_top_k, c_top_p
        self.cp_mask = torch.zeros(S, dtype=torch.bool, device=dev)
        self.t_mask = torch.zeros(S, dtype=torch.bool, device=dev)
        self.out = torch.zeros(S, t.code_predictor.num_code_groups + 1, **lng)  # codes of the frame | next id
        pin = dev.type == "cuda"
        self._mask_host = torch.zeros(2, S, dtype=torch.bool, pin_memory=pin)
        self._idx_host = torch.zeros(S, dtype=torch.long, pin_memory=pin)
        self._idx = torch.zeros(S, **lng)
        self._mask_state: tuple | None = None
        # constants
        self.blocked = torch.zeros(V, dtype=torch.bool, device=dev)
        self.blocked[suppress_from:] = True
        self.blocked[eos_id] = False
        self.eos_id = eos_id
        self.tok_hash_t, self.tok_hash_c = token_hash(V, dev), token_hash(Vc, dev)
        self.cp_groups = torch.arange(1, t.code_predictor.num_code_groups, **lng)  # the codebooks the CP draws
        # torch sampler: the host's view of the rows being stepped (set by the engine before each step)
        self.torch_rows: dict[str, tuple[list[int], list[SamplingParams], list[torch.Generator | None]]] = {}
        self.packed = packs_linears(talker, sampler)
        self.graphs: dict[tuple, object] = {}
        self.capture_seconds: dict[tuple, float] = {}
        # compile "ops": the layers' elementwise pieces run torch.compiled (model/fused.py) in the step bodies
        self.compiled = mode == "ops"
        self.bodies: dict[str, Callable] = {"cp": self._cp_body, "talker": self._talker_body}
        if self.whole:
            self.bodies = {"cp": CompiledBody(self._cp_body, "code-predictor"),
                           "talker": CompiledBody(self._talker_body, "talker")}
        # prefills in (rows, length) buckets: with graphs (replayed), and in other static engines (eager: the same
        # shapes, so the same numbers as the graphs; bf16 sums differ in the last bit once a prompt is padded); the
        # default CPU engines (growing cache) prefill the exact lengths
        bucketed = sampler == "device" and self.static
        self.prefill_rows = tuple(n for n in PREFILL_GRAPH_ROWS if n <= S) if bucketed else ()
        self.prefill_lens = tuple(n for n in PREFILL_GRAPH_LENS if n <= max_len) if bucketed else ()
        if not self.prefill_lens:
            self.prefill_rows = ()
        nmax, tmax = max(self.prefill_rows, default=0), max(self.prefill_lens, default=0)
        self._pf_embeds = torch.zeros(nmax, tmax, C, dtype=self.dtype, device=dev)  # a piece's prompts, padded
        self._pf_slots, self._pf_last = torch.zeros(nmax, **lng), torch.zeros(nmax, **lng)

    # --- bodies (eager, or captured) ---------------------------------------------------------------------------
    def _cp_body(self, B: int, plan: SamplePlan | None = None) -> None:
        cache = self.cp_cache
        if self.sampler == "device":
            frame, drawn, memo = self.nframes[:B], [], {}

            def noise(g: int) -> torch.Tensor:
                # the noise of all 15 codebooks in one go, at the first draw that needs it (~25 kernels, not ~25
                # per codebook); the same values as drawing each codebook's alone
                if not drawn:
                    drawn.append(gumbel(noise_key(self.seed_key[:B], frame, self.cp_groups), self.tok_hash_c))
                return drawn[0][:, g - 1]

            def pick(logits: torch.Tensor, g: int) -> torch.Tensor:
                return sample_device(logits, self.c_do[:B], self.c_temp[:B], self.c_top_k[:B], self.c_top_p[:B],
                                     lambda: noise(g), plan, memo)
        else:
            pick = self._torch_picker("cp", B)
        codes = predict_codes(self.talker, cache, self.hidden[:B], self.code0[:B], pick, self.cp_layout)
        m = self.cp_mask[:B]
        self.last_codes[:B] = torch.where(m[:, None], codes, self.last_codes[:B])
        self.nframes[:B] += m.long()
        self.out[:B, :-1] = codes

    def _talker_body(self, B: int, L: int, plan: SamplePlan | None = None) -> None:
        tp = self.text_pos[:B]
        text = self.text_buf[torch.arange(B, device=self.device), tp.clamp(max=self.text_buf.shape[1] - 1)]
        text = torch.where((tp < self.text_len[:B])[:, None], text, self.tts_pad)
        embeds = self.talker.embed_frame(self.last_codes[:B]) + text
        hidden, logits = talker_step(self.talker, self.cache, self.pos[:B], embeds, L, self.layout)
        logits = talker_logits_batch(logits, self.seen[:B], self.t_pen[:B], self.ngen[:B], self.blocked, self.eos_id)
        ids = self._pick_talker(logits, B, plan=plan)
        m = self.t_mask[:B]
        self.code0[:B] = torch.where(m, ids, self.code0[:B])
        self.hidden[:B] = torch.where(m[:, None], hidden, self.hidden[:B])
        inc = m.long()
        self.pos[:B] += inc
        self.text_pos[:B] += inc
        self.ngen[:B] += inc
        seen = self.seen[:B]
        seen.scatter_(1, ids[:, None], seen.gather(1, ids[:, None]) | m[:, None])
        self.out[:B, -1] = ids

    def _pick_talker(self, logits: torch.Tensor, B: int, rows: slice | torch.Tensor | None = None,
                     plan: SamplePlan | None = None) -> torch.Tensor:
        rows = slice(0, B) if rows is None else rows
        if self.sampler == "device":
            # the rows' keys taken here, not in the closure: a compiled body would fix a slice's bound B there
            seed, ngen = self.seed_key[rows], self.ngen[rows]
            noise = lambda: gumbel(noise_key(seed, ngen, 0), self.tok_hash_t)  # noqa: E731
            return sample_device(logits, self.t_do[rows], self.t_temp[rows], self.t_top_k[rows], self.t_top_p[rows],
                                 noise, plan)
        return self._torch_picker("talker", B)(logits, 0)

    def _torch_picker(self, kind: str, B: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        rows, params, gens = self.torch_rows[kind]
        if kind == "talker":
            ds, te = [p.do_sample for p in params], [p.temperature for p in params]
            tk, tp = [p.top_k for p in params], [p.top_p for p in params]
        else:
            ds, te = [p.subtalker_dosample for p in params], [p.subtalker_temperature for p in params]
            tk, tp = [p.subtalker_top_k for p in params], [p.subtalker_top_p for p in params]
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)

        def pick(logits: torch.Tensor, g: int) -> torch.Tensor:
            ids = logits.argmax(-1)
            if rows:
                ids[idx] = pick_rows(logits[idx], ds, te, tk, tp, gens)
            return ids
        return pick

    # --- sessions ----------------------------------------------------------------------------------------------
    def start(self, slot: int, embeds: torch.Tensor, trailing: list[torch.Tensor], sp: SamplingParams, seed: int,
              generator: torch.Generator | None = None) -> None:
        """A new session in `slot` (see `start_many`)."""
        self.start_many([Start(slot, embeds, trailing, sp, seed, generator)])

    def start_many(self, starts: Sequence[Start]) -> None:
        """New sessions: reset each slot's state, prefill their prompt embeds in batched talker passes (rows
        right-padded; a row's padding only writes cache positions its decode overwrites before reading them) and
        draw each first id (kept on the device; the host reads it with the session's first frame). Each row's numbers
        are those of its prefill alone (the pad is masked out of its attention). One pass for all of them, or, with
        prefill buckets (graphs), one replay per piece (`_prefill_pieces`)."""
        if not starts:
            return
        slots = [x.slot for x in starts]
        if len(set(slots)) != len(slots):
            raise ValueError(f"start_many: slots must be distinct, got {slots}")
        lens = [x.embeds.shape[0] for x in starts]
        self._ensure_len(max(lens) + 1)
        for x in starts:
            sp = x.sp
            for t, v in ((self.pos, x.embeds.shape[0]), (self.ngen, 0), (self.nframes, 0), (self.text_pos, 0),
                         (self.seed_key, seed_key(x.seed)), (self.t_do, sp.do_sample), (self.t_temp, sp.temperature),
                         (self.t_top_k, sp.top_k), (self.t_top_p, sp.top_p), (self.t_pen, sp.repetition_penalty),
                         (self.c_do, sp.subtalker_dosample), (self.c_temp, sp.subtalker_temperature),
                         (self.c_top_k, sp.subtalker_top_k), (self.c_top_p, sp.subtalker_top_p)):
                t[x.slot].fill_(v)   # a fill kernel: `t[slot] = v` copies a host scalar, a GPU sync each on CUDA
            self.host_params[x.slot] = (sp.do_sample, sp.top_k, sp.top_p, sp.subtalker_dosample, sp.subtalker_top_k,
                                        sp.subtalker_top_p)
            self.seen[x.slot] = False
            self.text_len[x.slot].fill_(0)
            self.set_text(x.slot, x.trailing, 0)
        for piece, T in self._prefill_pieces(lens):
            part = [starts[i] for i in piece]
            if T is None:
                self._prefill_exact(part)
            else:
                self._prefill_bucketed(part, T)

    def prefill_groups(self, lengths: Sequence[int]) -> list[list[int]]:
        """The batched prefills of prompts of these lengths starting together (see `prefill_groups`). Only prompts
        of one length share an exact (eager) pass: a padded row's attention sums differ in the last bits from its
        prompt alone (SDPA's blocks follow the padded length), and a session's codes must not depend on who started
        with it. With buckets (graphs) a prompt within the longest bucket is padded to a bucket anyway and may
        share its pass; a longer one goes the exact way, so only with prompts of its own length (it was grouped
        with shorter ones and padded to the longest: 4.8e-7 off its prefill alone, a near-tie draw away from other
        codes)."""
        if not self.prefill_lens:
            return prefill_groups(lengths, pad=False)
        cap = self.prefill_lens[-1]
        out = []
        for pad, part in ((True, [i for i, n in enumerate(lengths) if n <= cap]),
                          (False, [i for i, n in enumerate(lengths) if n > cap])):
            out += [[part[j] for j in g] for g in prefill_groups([lengths[i] for i in part], pad=pad)]
        return out

    def _prefill_pieces(self, lens: Sequence[int]) -> list[tuple[list[int], int | None]]:
        """The passes of one start_many: (indices, padded length), the length None for one exact eager pass of all.
        With prefill buckets and every prompt within the longest: pieces of PREFILL_GRAPH_ROWS rows (largest first,
        in order), each padded to the length bucket above its longest prompt."""
        if not self.prefill_lens or max(lens) > self.prefill_lens[-1]:
            return [(list(range(len(lens))), None)]
        out, i = [], 0
        while i < len(lens):
            n = max(b for b in self.prefill_rows if b <= len(lens) - i)
            piece = list(range(i, i + n))
            out.append((piece, _first_at_least(self.prefill_lens, max(lens[j] for j in piece))))
            i += n
        return out

    def _prefill_exact(self, starts: Sequence[Start]) -> None:
        """One eager pass over the prompts (right-padded to the longest, where they differ: with graphs, past the
        prefill buckets)."""
        lens = [x.embeds.shape[0] for x in starts]
        T, n = max(lens), len(starts)
        embeds = starts[0].embeds.new_zeros(n, T, starts[0].embeds.shape[1])
        for i, x in enumerate(starts):
            embeds[i, : lens[i]] = x.embeds
        idx = torch.tensor([x.slot for x in starts], dtype=torch.long, device=self.device)
        last = torch.tensor(lens, dtype=torch.long, device=self.device) - 1
        sps = [x.sp for x in starts]
        if self.sampler == "device":
            pick = lambda logits: self._pick_talker(logits, n, idx, _plan_of(sps))  # noqa: E731
        else:
            pick = lambda logits: pick_rows(  # noqa: E731
                logits, [p.do_sample for p in sps], [p.temperature for p in sps], [p.top_k for p in sps],
                [p.top_p for p in sps], [x.generator for x in starts])
        with packed_linears(self.packed):
            self._prefill_and_draw(idx, embeds, last, pick)

    def _prefill_bucketed(self, starts: Sequence[Start], T: int) -> None:
        """One pass of a (rows, length) bucket through the static prefill inputs: a graph replay, or (no graphs) the
        same body eagerly. Plain ops, also with `compile`: a prefill is one pass per session (one launch with its
        graph), and compiling each length bucket would only add to the engine's start."""
        n = len(starts)
        buf = self._pf_embeds[:n, :T]
        buf.zero_()
        for i, x in enumerate(starts):
            buf[i, : x.embeds.shape[0]] = x.embeds
        host = torch.tensor([[x.slot for x in starts], [x.embeds.shape[0] - 1 for x in starts]], dtype=torch.long)
        if self._pf_slots.is_cuda:  # from pinned memory the copies do not wait for the GPU (a pageable one does);
            host = host.pin_memory()  # the caching host allocator keeps the block until they are done
        self._pf_slots[:n].copy_(host[0], non_blocking=True)
        self._pf_last[:n].copy_(host[1], non_blocking=True)
        with self._body_context(), compiled_ops(False):
            self._run(("prefill", n, T), self._prefill_body, n, T, self._eager_plan(_plan_of([x.sp for x in starts])))

    def _prefill_body(self, n: int, T: int, plan: SamplePlan | None = None) -> None:
        idx = self._pf_slots[:n]
        self._prefill_and_draw(idx, self._pf_embeds[:n, :T], self._pf_last[:n],
                               lambda logits: self._pick_talker(logits, n, idx, plan))

    def _prefill_and_draw(self, idx: torch.Tensor, embeds: torch.Tensor, last: torch.Tensor,
                          pick: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Prefill prompts `embeds` [n, T, C] into slots `idx`, draw each first id with `pick(logits)` and keep it
        (and its hidden state) in the slots."""
        hidden, logits = prefill(self.talker, self.cache, idx, embeds, last)
        logits = talker_logits_batch(logits, self.seen[idx], self.t_pen[idx], self.ngen[idx], self.blocked,
                                     self.eos_id)
        ids = pick(logits)
        self.code0[idx] = ids
        self.hidden[idx] = hidden
        # no Python number through a tensor index here (`ngen[idx] = 1`): on CUDA it is a blocking host->device copy
        # (torch 2.11), which a capture refuses; fill kernels and a device value capture
        self.ngen.index_fill_(0, idx, 1)
        self.seen.index_put_((idx, ids), self._true)

    def set_text(self, slot: int, trailing: list[torch.Tensor], start: int) -> None:
        """Trailing text embeddings trailing[start:] arrived for `slot` (at most what the positions can consume)."""
        n = min(len(trailing), self.max_len)
        if n > self.text_buf.shape[1]:
            self._grow_text(n)
        n = min(n, self.text_buf.shape[1])
        if n > start:
            self.text_buf[slot, start:n] = torch.stack(trailing[start:n])
        self.text_len[slot].fill_(n)

    def move(self, src: int, dst: int, npos: int, ntext: int) -> None:
        """Move a session from slot src to slot dst (keeps the active slots dense): its cache rows and state."""
        for k, v in zip(self.cache.k, self.cache.v):
            k[dst, :, :npos] = k[src, :, :npos]
            v[dst, :, :npos] = v[src, :, :npos]
        ntext = min(ntext, self.text_buf.shape[1])
        self.text_buf[dst, :ntext] = self.text_buf[src, :ntext]
        for t in (self.pos, self.ngen, self.nframes, self.code0, self.text_pos, self.text_len, self.hidden,
                  self.last_codes, self.seen, self.seed_key, self.t_do, self.c_do, self.t_temp,
                  self.t_top_p, self.t_pen, self.c_temp, self.c_top_p, self.t_top_k, self.c_top_k):
            t[dst] = t[src]
        self.host_params[dst] = self.host_params[src]

    # --- a step ------------------------------------------------------------------------------------------------
    def step(self, cp_slots: list[int], talker_slots: list[int], max_pos: int,
             between: Callable[[np.ndarray], None] | None = None, write_pos: int | None = None) -> np.ndarray:
        """Advance the code predictor for `cp_slots` (then) the talker for `talker_slots`; max_pos: the highest
        position a talker row writes; write_pos: the highest position of any row 0..B-1 (default max_pos): the rows
        the talker does not advance (a session waiting for text) run in the batch too and write a key at their own
        position, masked, so a growing cache must hold it. Returns the host copy of `out` rows 0..B-1: [:, :16] the frame codes of the
        code-predictor rows, [:, 16] the next codebook-0 id of the talker rows (the one read of the step).
        between: called with the host copy of `out` after the code predictor and before the talker (a second read:
        the frames can be used, e.g. decoded, before the talker step runs); its [:, 16] is stale then."""
        hi = max(cp_slots + talker_slots) + 1
        B = _first_at_least(self.batch_buckets, hi) if self.static else hi  # graphs: the captured shapes
        live = None
        if self.whole and B < MIN_ROWS:
            B, live = MIN_ROWS, hi  # the padding row costs no product (live_rows)
            # the padding row writes a (masked) key at its own position, maybe a finished session's
            write_pos = max(max_pos if write_pos is None else write_pos, int(self.pos[hi:B].max()))
        if not talker_slots:
            L = 0
        elif self.sampler == "torch" and not self.static:
            # the reference's numbers: its attention reads exactly the keys so far; keys padded to a bucket and masked
            # change SDPA's CPU kernels' sums (bf16: the last bit of the talker's hidden, enough to flip a code)
            L = max_pos + 1
        else:
            L = read_length(max_pos + 1, self.max_len, self.len_buckets if self.static else None)
        if talker_slots and not self.static:
            self._ensure_len(max(L, (max_pos if write_pos is None else write_pos) + 1))
        self._set_masks(cp_slots, talker_slots)
        if cp_slots:
            with self._body_context(live):
                plan = self._host_plan(cp_slots, 3)
                if self.capture is not None and not plan.top_p and plan.kmax <= TOPK_GRAPH_KMAX:
                    self._run(("cp", B, "topk"), self._cp_body, B)
                else:
                    self._run(("cp", B), self.bodies["cp"], B, self._eager_plan(plan))
            if between is not None:
                between(self._read(B))
        if talker_slots:
            with self._body_context(live):
                self._run(("talker", B, L), self.bodies["talker"], B, L,
                          self._eager_plan(self._host_plan(talker_slots, 0)))
        return self._read(B)

    def _read(self, B: int) -> np.ndarray:
        return self.out[:B].to("cpu", copy=True).numpy()  # a copy: `out` is rewritten by the next step

    def _host_plan(self, slots: list[int], col: int) -> SamplePlan:
        """What the host knows of these rows' sampling (col 0: the talker's parameters, 3: the code predictor's)."""
        h = self.host_params[slots, col:col + 3]
        return SamplePlan.of(h[:, 0] > 0, h[:, 1], h[:, 2])

    def _eager_plan(self, plan: SamplePlan) -> SamplePlan | None:
        """The plan a step passes to its body: None (the general code) with graphs, compiled bodies (one graph for
        every plan) or the torch sampler."""
        return None if self.capture is not None or self.whole or self.sampler != "device" else plan

    def frame_codes(self, slots: list[int]) -> torch.Tensor:
        """Codes [len(slots), 16] of this step's frames for these slots, on the device (a copy; no host sync: the
        slot numbers go up through a pinned buffer)."""
        n = len(slots)
        if slots == list(range(n)):
            return self.out[:n, :-1].clone()
        self._idx_host[:n] = torch.tensor(slots)
        self._idx[:n].copy_(self._idx_host[:n], non_blocking=True)
        return self.out.index_select(0, self._idx[:n])[:, :-1]

    def _body_context(self, live: int | None = None) -> contextlib.ExitStack:
        """What a step body runs in: the graphs' device (or CPU packed linears), compiled fused ops if asked; live:
        rows past it are padding (`layers.live_rows`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(live_rows(live))
        stack.enter_context(self.capture.device_context() if self.capture is not None
                            else packed_linears(self.packed))
        stack.enter_context(compiled_ops(self.compiled))
        return stack

    def _run(self, key: tuple, fn, *args) -> None:
        g = self.graphs.get(key)
        if g is not None:
            g.replay()
        elif self.capture is not None:
            raise RuntimeError(f"no graph captured for {key}; capture_all() covers every bucket")
        else:
            fn(*args)

    def _set_masks(self, cp_slots: list[int], talker_slots: list[int]) -> None:
        state = (tuple(cp_slots), tuple(talker_slots))
        if state == self._mask_state:
            return
        h = self._mask_host
        h.zero_()
        h[0, cp_slots] = True
        h[1, talker_slots] = True
        self.cp_mask.copy_(h[0], non_blocking=True)
        self.t_mask.copy_(h[1], non_blocking=True)
        self._mask_state = state

    # --- capacity ----------------------------------------------------------------------------------------------
    def _ensure_len(self, n: int) -> None:
        if n > self.max_len:
            raise ValueError(f"{n} positions needed; max_len is {self.max_len}")
        if n + self.spare <= self.cache.capacity:
            return
        if self.static:
            raise ValueError(f"static KV cache holds {self.cache.capacity - self.spare} positions, {n} needed")
        self.cache.ensure(n + self.spare, limit=self.max_len + self.spare)

    def _grow_text(self, n: int) -> None:
        if self.static:
            return  # fixed at max_len: text beyond it can never be consumed
        cap = min(self.max_len, max(n, 2 * self.text_buf.shape[1]))
        new = torch.zeros(self.S, cap, self.text_buf.shape[2], dtype=self.dtype, device=self.device)
        new[:, : self.text_buf.shape[1]] = self.text_buf
        self.text_buf = new

    # --- graphs ------------------------------------------------------------------------------------------------
    def capture_all(self) -> None:
        """Capture every (bucket) graph now, before traffic. Leaves every slot's state as it was (free)."""
        if self.capture is None or self.graphs:
            return
        with torch.inference_mode(), compiled_ops(self.compiled):
            saved = {k: v.clone() for k, v in self._state().items()}
            self._set_masks([], [])  # capture with every row masked: nothing advances
            topk = SamplePlan(sample=True, kmax=TOPK_GRAPH_KMAX, top_p=False)
            for B in self.batch_buckets:
                self._capture(("cp", B), self._cp_body, B)
                self._capture(("cp", B, "topk"), self._cp_body, B, topk)
                for L in self.len_buckets:
                    self._capture(("talker", B, L), self._talker_body, B, L)
            with compiled_ops(False):  # prefills run plain (see _prefill_bucketed)
                for n in self.prefill_rows:
                    for T in self.prefill_lens:
                        self._capture(("prefill", n, T), self._prefill_body, n, T)
            for k, v in self._state().items():
                v.copy_(saved[k])
        log.info("captured %d graphs (batch buckets %s, length buckets %s, prefill rows %s x lengths %s) in %.1fs",
                 len(self.graphs), self.batch_buckets, self.len_buckets, self.prefill_rows, self.prefill_lens,
                 sum(self.capture_seconds.values()))

    def compile_all(self) -> float:
        """With compiled bodies (CPU `compile`): compile both now, before traffic, on masked rows (every slot's state
        is left as it was). Returns the seconds it took (0 without compiled bodies, or once compiled)."""
        if not self.whole or all(b.graphs or b.broken for b in self.bodies.values()):
            return 0.0
        t = time.perf_counter()
        with torch.inference_mode():
            saved = {k: v.clone() for k, v in self._state().items()}
            self._set_masks([], [])
            with self._body_context():
                self.bodies["cp"](MIN_ROWS, None)
                self.bodies["talker"](MIN_ROWS, min(MIN_LEN_BUCKET, self.cache.capacity - self.spare), None)
            for k, v in self._state().items():
                v.copy_(saved[k])
        seconds = time.perf_counter() - t
        log.info("compiled the step bodies in %.1fs", seconds)
        return seconds

    def _capture(self, key: tuple, fn, *args) -> None:
        t = time.perf_counter()
        self.graphs[key] = self.capture.capture(lambda: fn(*args))  # its warm-up compiles the fused ops' shapes
        self.capture_seconds[key] = time.perf_counter() - t

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor) and k not in (
            "tts_pad", "blocked", "tok_hash_t", "tok_hash_c", "cp_groups", "_mask_host", "text_buf", "cp_mask",
            "t_mask", "_pf_embeds")}

    # --- attention layout --------------------------------------------------------------------------------------
    def set_decode_layout(self, layout: str, cp_layout: str | None = None) -> None:
        """This runner's talker steps use `layout`, its code-predictor steps `cp_layout` (None: unchanged); its own:
        other engines on the same model keep theirs."""
        self.layout = layout
        if cp_layout is not None:
            self.cp_layout = cp_layout

    def choose_decode_layout(self) -> dict[str, str]:
        """The one-query attention layouts of the talker and of the code predictor. On CUDA, the first whose SDPA call
        gets a fused kernel (not MATH), probing `torch._fused_sdp_choice` with this model's shapes. On CPU (measured on
        a 2-core Zen 4, torch 2.13): with the torch sampler (the reference's numbers) both take enable_gqa, the
        reference's SDPA call, in every dtype (in bf16 grouped summed some rows in another order: a last bit that
        flipped a greedy near tie; enable_gqa costs the talker ~6% a frame at 300 positions, 11% at 600). With the
        device sampler the talker takes grouped (its rows then do not depend on the batch: SDPA's fp32 kernel gives
        a row other last bits in a batch of 4 than alone; in bf16 enable_gqa takes a path ~7x slower at length) and
        the code predictor (one frame's <= 16 keys) enable_gqa in fp32 (2.7x faster than grouped at 8 rows), grouped
        in other dtypes (2.8x faster than enable_gqa at 8 rows, 2.3x at one). Returns what was found."""
        if self.device.type != "cuda":
            fp32, exact = self.dtype == torch.float32, self.sampler == "torch"
            layout = "gqa" if exact else "grouped"
            cp_layout = "gqa" if fp32 or exact else "grouped"
            self.set_decode_layout(layout, cp_layout)
            return {"layout": layout, "cp_layout": cp_layout}
        found = self.probe_decode_layouts()
        self.set_decode_layout(found["layout"], found["cp_layout"])
        log.info("decode attention layouts: talker %s, code predictor %s (SDPA kernels: %s)", found["layout"],
                 found["cp_layout"], found)
        return found

    def probe_decode_layouts(self) -> dict[str, str]:
        """`layers.probe_decode_layouts` with this runner's shapes (its largest batch bucket, its first key bucket,
        its cache) on its device."""
        B, L = max(self.batch_buckets), self.len_buckets[0]
        return probe_decode_layouts(self.talker.cfg, B, L, self.dtype, self.device, self.cache.k[0][:B, :, :L])


__all__ = ["Start", "StepRunner", "batch_buckets", "length_buckets", "packs_linears", "prefill_groups"]
