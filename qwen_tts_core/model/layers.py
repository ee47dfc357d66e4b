"""Building blocks of the Qwen3 decoder stacks (talker and code predictor). Math only: no sampling, no loops.

Parameter names mirror the official checkpoint so its tensors load by name.
"""

from __future__ import annotations

import itertools
import logging
import os
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..config import DecoderStackConfig
from .flags import ThreadFlag, ThreadValue
from .fused import add_rms_norm, apply_rope, qk_norm_rope, qk_norm_weight, silu_mul
from .kv_cache import LayerCache

logger = logging.getLogger(__name__)

# --- linear layers: torch's default GEMM, or oneDNN with prepacked weights (CPU) ----------------------------------
# On CPU, torch's fp32 GEMM is MKL's, which on AMD cores runs a batch of 8 rows at ~3x the cost of one row; oneDNN with
# prepacked weights runs it at ~1.6x, and one row faster too. The reference uses torch's GEMM, so the packed path is
# switched on per thread (`packed_linears`) by engines that do not promise bit-exact reference parity.
packed_linears = ThreadFlag()
"""`with packed_linears(on):` within this block (this thread), linears given a `PackSlot` (`pack_linears_`) run on
its packed copy of their weight (not an inference tensor's: see `PackSlot.get`)."""

live_rows = ThreadValue(None)
"""`with live_rows(n):` in this block (this thread) the products of a compiled step (`slot_linear`) compute batch
rows 0..n-1 only and give zeros for the rest: rows a compiled graph runs beyond the sessions it steps (padding to
its smallest batch, generate/compiled.py), whose results are discarded. None: every row."""

decode_layout = ThreadValue("gqa")
"""`with decode_layout(name):` one-query attention steps in this block (this thread) use layout `name`: "gqa" (SDPA
with enable_gqa), "grouped" or "grouped_float" (see `grouped_decode_attention`). An engine sets it around its talker
step (`generate.step.talker_step`), so engines sharing one model each keep the layout they chose."""


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ W.T + bias with W packed by `pack_weight` (x's dtype must be the packed one's)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           slot: PackSlot | None = None) -> torch.Tensor:
    if slot is not None and torch.compiler.is_dynamo_compiling():
        # dynamo tracing a compiled step (generate/compiled.py), on this thread: the product stays one opaque op, run
        # by `_eager_linear` when the graph runs (is_compiling() would not do: torch sets it for the whole process
        # while any compile runs, and the op's own calls would come back here)
        return torch.ops.qwen_tts.slot_linear(x, weight, bias, slot.key)
    return _eager_linear(x, weight, bias, slot)


def _eager_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  slot: PackSlot | None) -> torch.Tensor:
    packed = slot.get(weight) if slot is not None and packed_linears else None
    if packed is not None:
        if packed.dtype == x.dtype:
            rows, limit = x.numel() // x.shape[-1], getattr(packed, "max_rows", None)
            if limit is not None and rows > limit:
                # pieces of at most `max_rows` rows, where a larger batch takes a kernel whose sums differ
                flat = x.reshape(rows, x.shape[-1])
                y = torch.cat([_packed_rows(flat[i:i + limit], packed, bias) for i in range(0, rows, limit)])
                return y.reshape(*x.shape[:-1], y.shape[-1])
            return _packed_rows(x, packed, bias)
        if x.numel() > x.shape[-1]:
            # bf16 on a CPU without a bf16 GEMM: two or more rows run in fp32 on the packed fp32 copy (~5x faster
            # at 8 rows than torch's bf16 GEMM there); one row stays a bf16 matrix-vector product (half the bytes).
            b = None if bias is None else bias.float()
            return onednn_linear(x.float(), packed, b).to(x.dtype)
    return F.linear(x, weight, bias)


def _packed_rows(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.numel() == x.shape[-1] and getattr(packed, "single_row_differs", False):
        # one row runs as two where oneDNN's single-row kernel sums in another order than its batched one
        # (`single_row_differs`): a session's numbers are then the same alone or batched
        y = onednn_linear(x.reshape(1, -1).expand(2, -1), packed, bias)
        return y[:1].reshape(*x.shape[:-1], y.shape[-1])
    return onednn_linear(x, packed, bias)


class Linear(nn.Linear):
    """nn.Linear that can also hold a oneDNN-packed copy of its weight (used inside `packed_linears`)."""

    pack_slot: PackSlot | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.pack_slot)


def onednn_enabled() -> bool:
    """Whether packed oneDNN linears may be used at all (QTTS_ONEDNN=0 turns them off, for the talker and codec)."""
    return os.environ.get("QTTS_ONEDNN", "1") != "0"


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A oneDNN-packed copy of the weight w [out, in] for `onednn_linear` (CPU; see `can_pack`). An opaque tensor:
    it cannot be deep-copied, and it does not follow later in-place changes of w."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


class PackSlot:
    """Where a module keeps the oneDNN-packed copy of one weight, in step with that weight: `get(weight)` packs it
    (with `make`) on first use and again once the weight changed since (in place: load_state_dict, copy_; its dtype,
    storage or device), so a packed product always computes with the live weight. `make(weight)` -> the packed
    tensor, or None where it cannot be packed (then callers use torch's product). A deep copy of the module gets an
    empty slot that packs its own copy (packed tensors cannot be copied)."""

    __slots__ = ("make", "held", "key", "__weakref__")

    def __init__(self, make: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        self.make = make
        self.held: tuple[tuple, torch.Tensor | None] | None = None  # (weight key, packed): replaced as one
        self.key = next(_SLOT_KEYS)  # how a compiled graph names this slot (`slot_linear`)
        _SLOTS[self.key] = self

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if weight.is_inference():  # no way to see it change (`weight_key`): torch's product, on the live weight
            self.held = None       # (a copy packed before the weight was converted under inference mode: freed)
            return None
        key, held = weight_key(weight), self.held
        if held is None or held[0] != key:
            held = self.held = (key, self.make(weight.detach()))
        return held[1]

    def __deepcopy__(self, memo) -> PackSlot:
        return PackSlot(self.make)


_SLOT_KEYS = itertools.count()
_SLOTS: weakref.WeakValueDictionary[int, PackSlot] = weakref.WeakValueDictionary()
"""Every live PackSlot by its key: a compiled graph holds the key (an int), not the slot. Keys count up from 0 in
the order slots are made, so one model packed the same way gets the same keys, and graphs the same code, in every
process (inductor's on-disk cache then serves a later process's compile)."""


@torch.library.custom_op("qwen_tts::slot_linear", mutates_args=())
def slot_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int) -> torch.Tensor:
    """`linear(x, weight, bias, slot)` for the slot with this key, as one op a compiled graph calls without looking
    inside (oneDNN's packed products cannot be traced): the same product, packed or not (`packed_linears` of the
    thread running the graph), as the eager step."""
    n = live_rows.get()
    if n is not None and n < x.shape[0]:  # padded rows: only the live ones cost a product (x's dim 0 is the batch)
        y = x.new_zeros(*x.shape[:-1], weight.shape[0])
        y[:n] = _eager_linear(x[:n], weight, bias, _SLOTS[key])
        return y
    return _eager_linear(x, weight, bias, _SLOTS[key]).contiguous()


@slot_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, key: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def weight_key(w: torch.Tensor) -> tuple:
    """(storage, version counter, dtype) of w: changes when w is written in place, converted or moved. An inference
    tensor (made under torch.inference_mode) keeps no version counter, yet inside inference mode it can be written in
    place (load_state_dict, copy_): its key equals no other key, so nothing cached for it is ever reused."""
    if w.is_inference():
        return w.data_ptr(), object(), w.dtype
    return w.data_ptr(), w._version, w.dtype


def packed_matrix(owner: nn.Module, weight: torch.Tensor, as_matrix: Callable[[torch.Tensor], torch.Tensor],
                  x: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of `as_matrix(weight)` ([out, in]) for `onednn_linear` of input x, held by `owner`: made
    on first use and again once the weight changed (in place, dtype, device), so a packed layer always computes with
    its live weight. None (use torch's product) off CPU, for an x of another dtype, where oneDNN cannot pack the
    dtype, with QTTS_ONEDNN=0, and under a torch dispatch mode (the CPU stand-in of a CUDA graph, an op counter: they
    see the ops a GPU would run)."""
    if weight.device.type != "cpu" or x.device.type != "cpu" or x.dtype != weight.dtype or not onednn_enabled() \
            or _get_current_dispatch_mode() is not None or not can_pack(weight):
        return None
    slot = owner.__dict__.get("_pack_slot")
    if slot is None:
        slot = owner.__dict__["_pack_slot"] = PackSlot(lambda w: pack_weight(as_matrix(w)))
    return slot.get(weight)


def _pack(w: torch.Tensor) -> torch.Tensor:
    packed = pack_weight(w)
    packed.single_row_differs = single_row_differs(w.shape[0], w.shape[1], w.dtype)
    packed.max_rows = max_batch_rows(w.shape[0], w.shape[1], w.dtype)
    return packed


_ROW_PROBE = (3, 4, 8, 9, 16, 17, 31, 32, 33, 48, 64, 65)   # batch sizes around the kernels' row blocks
_ROW_PROBES: dict[tuple, tuple[bool, int | None]] = {}


def _probe_rows(n: int, k: int, dtype: torch.dtype) -> tuple[bool, int | None]:
    """(single_row_differs, max_batch_rows) of packed [n, k] weights of `dtype`: one random weight, packed once,
    probed once per shape for both."""
    key = (n, k, dtype)
    if key not in _ROW_PROBES:
        g = torch.Generator().manual_seed(n * 7919 + k)
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to(dtype)
        x = torch.randn(_ROW_PROBE[-1] + 1, k, generator=g).to(dtype)
        packed = pack_weight(w)
        batch = onednn_linear(x[:8], packed)
        single = any(not torch.equal(onednn_linear(x[i:i + 1], packed)[0], batch[i]) for i in range(8))
        pairs = torch.cat([onednn_linear(x[i:i + 2], packed) for i in range(0, len(x), 2)])
        most, last = None, 2
        for m in _ROW_PROBE:
            if not torch.equal(onednn_linear(x[:m], packed), pairs[:m]):
                most = last
                break
            last = m
        _ROW_PROBES[key] = single, most
    return _ROW_PROBES[key]


def single_row_differs(n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether oneDNN gives a row alone other bits than the same row among others, for packed [n, k] weights of
    `dtype`. It runs a single row with a kernel of its own, whose sums differ from the batched kernel's for some
    shapes and inputs (on this project's CPUs: K >= 2048, in fp32 always, in bf16 for some inputs). From two rows on,
    a row's result does not depend on the batch (up to `max_batch_rows`). Where they can differ, `linear` runs one
    row as two (~1.5x the time of that product, so only there). Probed once per shape: 8 random rows, each alone and
    in the batch."""
    return _probe_rows(n, k, dtype)[0]


def max_batch_rows(n: int, k: int, dtype: torch.dtype) -> int | None:
    """The most rows oneDNN runs packed [n, k] weights of `dtype` with, giving every row the bits it gets in a batch
    of two; None when every probed batch does (up to 65 rows). On CPUs with AMX, bf16 products of 33 rows or more take
    another kernel whose sums differ (and differ between row counts): `linear` runs a larger batch in pieces of at
    most this many rows, so a session's numbers do not depend on how many sessions (or prompt tokens) share the
    product. Probed once per shape, at row counts around the kernels' blocks."""
    return _probe_rows(n, k, dtype)[1]


def _pack_upcast(w: torch.Tensor) -> torch.Tensor:
    return _pack(w.detach().float())


def _packs_as(p: torch.Tensor) -> torch.dtype | None:
    """The dtype of `linear`'s packed copy of a weight like p: p's where oneDNN packs it; fp32 for bf16 on a CPU
    without a bf16 GEMM (used for two or more rows, see `linear`); None where neither (off CPU too)."""
    if can_pack(p):
        return p.dtype
    if p.dtype == torch.bfloat16 and can_pack(p.new_zeros(1, dtype=torch.float32)):
        return torch.float32
    return None


def _pack_linear(w: torch.Tensor) -> torch.Tensor | None:
    """The packed copy `linear` runs on (see `_packs_as`), or None."""
    dtype = _packs_as(w)
    return None if dtype is None else _pack(w) if dtype == w.dtype else _pack_upcast(w)


_PACKABLE: dict[torch.dtype, bool] = {}


def can_pack(p: torch.Tensor) -> bool:
    """Whether oneDNN can pack (and run) linears of p's dtype on this CPU. bf16 needs AVX512-BW/VL/DQ or
    AVX-NE-CONVERT (a CPU without them raises on packing), so each dtype is tried once on a small weight."""
    if p.device.type != "cpu" or p.dtype not in (torch.float32, torch.bfloat16) or \
            not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    if p.dtype not in _PACKABLE:
        try:
            w = torch.ones(8, 16, dtype=p.dtype)
            y = onednn_linear(torch.ones(2, 16, dtype=p.dtype), _pack(w))
            _PACKABLE[p.dtype] = bool((y == 16).all())
        except RuntimeError:
            _PACKABLE[p.dtype] = False
    return _PACKABLE[p.dtype]


@torch.no_grad()
def pack_linears_(module: nn.Module) -> bool:
    """Give every linear under `module` a oneDNN-packed copy of its weight (CPU, fp32/bf16; once), held in a
    `PackSlot` that repacks a weight changed later (load_state_dict, an in-place edit, a dtype change). The plain
    weights stay (the reference-exact path and state_dict use them). Returns whether packing is in place.

    bf16 on a CPU that cannot pack bf16 (no AVX512-BW/VL/DQ or AVX-NE-CONVERT): the copies are fp32, used for two
    or more rows (see `linear`): the weights take 3x their bf16 memory in all. QTTS_ONEDNN=0 turns all packing off."""
    if getattr(module, "_packed_linears", False):
        return True
    params = list(module.parameters())
    if not params:
        return False
    dtype = _packs_as(params[0])
    if dtype is None:
        return False
    if dtype != params[0].dtype:  # no bf16 GEMM on this CPU: fp32 copies for batched rows (+2x the bf16 weights)
        logger.info("bf16 linears: this CPU cannot pack bf16; keeping fp32 packed copies for batched rows")
    def packed_now(w: torch.Tensor) -> PackSlot:  # packed here, not in the first step
        slot = PackSlot(_pack_linear)
        slot.get(w)
        return slot

    for m in module.modules():
        if type(m) is nn.Linear:
            m.__class__ = Linear
        if isinstance(m, Linear):
            m.pack_slot = packed_now(m.weight)
        elif isinstance(m, Attention) and m.qkv is not None:
            m.qkv_slot = packed_now(m.qkv)
        elif isinstance(m, MLP) and m.gate_up is not None:
            m.gate_up_slot = packed_now(m.gate_up)
    module._packed_linears = True
    return True


class RMSNorm(nn.Module):
    """y = w * x / rms(x), the normalisation computed in fp32 and cast back before the weight (as the reference).

    `F.rms_norm` without a weight is that normalisation: on CPU the same ops as the reference (bit for bit), on CUDA
    one fused kernel where torch has it (the 5-8 elementwise kernels of the spelled-out formula were 42 % of the
    kernels of a code-predictor pass: 315 norms). The weight is applied after the cast, as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)


class RotaryTable(nn.Module):
    """cos/sin of rotate-half RoPE for positions 0..max_pos-1, computed once in fp32. With equal position rows the
    talker's interleaved multimodal RoPE reduces to exactly this 1-D RoPE.

    The table holds cos and a signed sin (its first half negated) side by side, so a lookup is one gather and
    `apply_rope` needs no negation: rotate_half(x) * sin == roll(x, D/2) * signed_sin, bit for bit (negation is exact
    and rounding is symmetric in sign)."""

    def __init__(self, head_dim: int, theta: float, max_pos: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_pos, head_dim]
        sin = emb.sin()
        signed = torch.cat([-sin[:, : head_dim // 2], sin[:, head_dim // 2:]], dim=-1)
        self.register_buffer("table", torch.stack([emb.cos(), signed], dim=1), persistent=False)  # [max_pos, 2, D]

    @property
    def max_positions(self) -> int:
        return self.table.shape[0]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] -> cos, signed sin: [B, 1, T, D] (broadcast over heads; views of one lookup)."""
        cs = self.table[positions].to(dtype)  # [B, T, 2, D]
        return cs[:, None, :, 0], cs[:, None, :, 1]


class Attention(nn.Module):
    """GQA attention with per-head q/k RMSNorm (Qwen3), writing its keys/values into a slot of a passed-in cache."""

    def __init__(self, cfg: DecoderStackConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qkv: torch.Tensor | None = None  # fused [q; k; v] weight, set by fuse_()
        self.qkv_slot: PackSlot | None = None  # its oneDNN-packed copy (pack_linears_)

    @torch.no_grad()
    def fuse_(self, column_major: bool = False) -> None:
        """One matrix for q, k and v (one read, one call); the separate weights become views into it."""
        self.qkv = _fuse([self.q_proj, self.k_proj, self.v_proj], column_major)

    def qk_norm_weight(self) -> torch.Tensor | None:
        """The fused q/k norm's per-head weight [Hq+Hkv, D] (see `_qk_rope`), for callers that reuse it over several
        forwards; None where this layer norms q and k apart."""
        if self.qkv is None or self.q_proj.bias is not None:
            return None
        return qk_norm_weight(self.q_norm.weight, self.k_norm.weight, self.n_heads, self.n_kv)

    def _qk_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, qk_w: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, Hq, T, D], k, v [B, Hkv, T, D]: projected, q/k normed per head, q/k rotated.

        With the fused q/k/v weight (and no bias) q and k are normed and rotated as one [B, Hq+Hkv, T, D] tensor
        (`fused.qk_norm_rope`): one norm, one weight multiply and one RoPE instead of two of each (7 kernels instead
        of 14 per layer; one when compiled). The values are those of the separate path bit for bit: every op is
        elementwise or per head. qk_w: `qk_norm_weight()`, made once by a caller that reuses it."""
        B, T, _ = x.shape
        D, hq, hkv = self.head_dim, self.n_heads, self.n_kv
        if self.qkv is None or self.q_proj.bias is not None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = self.q_norm(q.reshape(B, T, hq, D)).transpose(1, 2)
            k = self.k_norm(k.reshape(B, T, hkv, D)).transpose(1, 2)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.reshape(B, T, hkv, D).transpose(1, 2)
        qkv = linear(x, self.qkv, None, self.qkv_slot)
        qk, v = qkv[..., : (hq + hkv) * D].unflatten(-1, (hq + hkv, D)), qkv[..., (hq + hkv) * D:]
        qk = qk_norm_rope(qk, self.q_norm.weight, self.k_norm.weight, self.q_norm.eps, cos, sin, hq, qk_w)
        return qk[:, :hq], qk[:, hq:], v.reshape(B, T, hkv, D).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache,
                positions: torch.Tensor | None, mask: torch.Tensor | None, qk_w: torch.Tensor | None = None
                ) -> torch.Tensor:
        """x: [B, T, C]; positions: [B, T] absolute positions (cache write index; None for a cache that writes from
        its `start`); mask: [B, 1, T, K] bool or None (None: causal over a fresh cache, all rows at the same positions
        starting at 0); qk_w: see `_qk_rope`."""
        B, T, _ = x.shape
        q, k, v = self._qk_rope(x, cos, sin, qk_w)
        keys, values = cache.update(k, v, positions)  # [B, Hkv, K, D]
        layout = decode_layout.get() if T == 1 else "gqa"
        if layout != "gqa":
            out = grouped_decode_attention(q, keys, values, mask, layout == "grouped_float")
        elif mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=T > 1, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


DECODE_LAYOUTS = ("gqa", "grouped", "grouped_float")


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                             float_mask: bool = False) -> torch.Tensor:
    """One-query (decode) GQA attention without `enable_gqa`: the query heads that share a key/value head become that
    head's queries ([B, Hq, 1, D] -> [B, Hkv, Hq/Hkv, D]), so q, k and v have equal head counts and a [B, 1, 1, K]
    mask broadcasts. That is the layout the fused SDPA kernels (flash with no mask, memory-efficient with one) take on
    CUDA, where a boolean mask with enable_gqa falls back to the math kernel. Same result as SDPA with enable_gqa.
    float_mask: pass the mask as an additive float tensor (0 / -inf) instead of bool."""
    B, Hq, _, D = q.shape
    hkv = keys.shape[1]
    qg = q.reshape(B, hkv, Hq // hkv, D)
    if mask is not None and float_mask:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask)
    return out.reshape(B, Hq, 1, D)


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                 is_causal: bool = False, enable_gqa: bool = False) -> str:
    """The SDPA kernel torch picks for these inputs ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION",
    "MATH", ...), from `torch._fused_sdp_choice`; "UNKNOWN" where this torch cannot tell."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=is_causal,
                                         enable_gqa=enable_gqa)
        return SDPBackend(choice).name
    except Exception:  # noqa: BLE001 - private API: absent or changed in some versions
        return "UNKNOWN"


def probe_decode_layouts(talker_cfg, batch: int, length: int, dtype: torch.dtype, device,
                         keys: torch.Tensor | None = None) -> dict[str, str]:
    """The SDPA kernel (`sdpa_backend`) of each decode layout with a model's one-query shapes, and the layouts
    picked from them: the talker's (boolean mask over `length` keys: "gqa", "grouped", "grouped_float"; picked: the
    first fused of grouped, grouped_float, gqa) and the code predictor's (its codebooks + 1 keys, no mask: "cp_gqa",
    "cp_grouped"; picked: the first fused of gqa, grouped). A layout that only gets MATH is never picked where another
    is fused. keys: the talker's [batch, Hkv, length, D] (a cache's slice); default a slice of a longer buffer, as a
    cache's is."""
    t, c = talker_cfg, talker_cfg.code_predictor
    B, D, hq, hkv = batch, t.head_dim, t.num_attention_heads, t.num_key_value_heads
    q = torch.zeros(B, hq, 1, D, dtype=dtype, device=device)
    k = keys if keys is not None else torch.zeros(B + 1, hkv, length + 1, D, dtype=dtype, device=device)[:B, :, :length]
    mask = torch.ones(B, 1, 1, length, dtype=torch.bool, device=device)
    qg = q.reshape(B, hkv, hq // hkv, D)
    found = {"gqa": sdpa_backend(q, k, k, mask, enable_gqa=True), "grouped": sdpa_backend(qg, k, k, mask),
             "grouped_float": sdpa_backend(qg, k, k, torch.zeros(B, 1, 1, length, dtype=dtype, device=device))}
    K, D, hq, hkv = c.num_code_groups + 1, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q = torch.zeros(B, hq, 1, D, dtype=dtype, device=device)
    k = torch.zeros(B + 1, hkv, K, D, dtype=dtype, device=device)[:B]
    found["cp_gqa"] = sdpa_backend(q, k, k, enable_gqa=True)
    found["cp_grouped"] = sdpa_backend(q.reshape(B, hkv, hq // hkv, D), k, k)
    fused = lambda name: found[name] not in ("MATH", "ERROR")  # noqa: E731
    found["layout"] = next((x for x in ("grouped", "grouped_float", "gqa") if fused(x)), "grouped")
    found["cp_layout"] = next((x for x in ("gqa", "grouped") if fused("cp_" + x)), "gqa")
    return found


def _fuse(linears: list[nn.Linear], column_major: bool = False) -> torch.Tensor:
    """Concatenate the weights of `linears` (rows) into one tensor and re-point each weight at its slice, so the
    memory is not doubled and state_dict() still yields the original names and values."""
    fused = torch.cat([lin.weight for lin in linears], dim=0)
    if column_major:
        fused = fused.t().contiguous().t()
    start = 0
    for lin in linears:
        n = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start:start + n], requires_grad=False)
        start += n
    return fused


def prepare_for_inference_(module: nn.Module, column_major: bool = False) -> None:
    """Fuse q/k/v and gate/up in every decoder layer under `module`. column_major: store every matrix transposed
    in memory (same shapes and values), which makes CPU fp32 matrix-vector products stream ~25% faster."""
    for m in module.modules():
        if isinstance(m, Attention | MLP):
            m.fuse_(column_major)
    if column_major:
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.Linear) and m.weight.is_contiguous():
                    m.weight = nn.Parameter(m.weight.t().contiguous().t(), requires_grad=False)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # fused [gate; up] weight, set by fuse_()
        self.gate_up_slot: PackSlot | None = None

    @torch.no_grad()
    def fuse_(self, column_major: bool = False) -> None:
        self.gate_up = _fuse([self.gate_proj, self.up_proj], column_major)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(silu_mul(linear(x, self.gate_up, None, self.gate_up_slot)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderStackConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None, cos, sin, cache: LayerCache, positions, mask,
                qk_w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is x + h (h: the previous layer's MLP output, None before the first layer), added
        here with this layer's first norm (one fused op). Returns (residual stream, this layer's MLP output): the
        next layer, or the stack's final norm, adds them. Same ops, in the same order, as x + attn(...) + mlp(...).
        qk_w: the attention's `qk_norm_weight()` made once by a caller that runs this layer several times."""
        x, n = add_rms_norm(x, h, self.input_layernorm.weight, self.input_layernorm.eps)
        x, n = add_rms_norm(x, self.self_attn(n, cos, sin, cache, positions, mask, qk_w),
                            self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return x, self.mlp(n)


class ResizeMLP(nn.Module):
    """The talker's text projection: fc2(silu(fc1(x)))."""

    def __init__(self, d_in: int, d_mid: int, d_out: int) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(d_in, d_mid, bias=True)
        self.linear_fc2 = nn.Linear(d_mid, d_out, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.silu(self.linear_fc1(x)))


def run_stack(layers: nn.ModuleList, norm: RMSNorm, rope: RotaryTable, x: torch.Tensor,
              positions: torch.Tensor | None, caches, mask: torch.Tensor | None,
              cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
              qk_weights: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Run decoder layers over x [B, T, C] at `positions` [B, T]; returns the final-normed hidden states.
    cos_sin: the rotation of these positions when the caller has it (then positions may be None for caches that
    write from their start); qk_weights: each layer's `qk_norm_weight()` when the caller reuses them."""
    cos, sin = rope(positions, x.dtype) if cos_sin is None else cos_sin
    h = None
    for i, (layer, cache) in enumerate(zip(layers, caches)):
        x, h = layer(x, h, cos, sin, cache, positions, mask, None if qk_weights is None else qk_weights[i])
    return add_rms_norm(x, h, norm.weight, norm.eps)[1]
