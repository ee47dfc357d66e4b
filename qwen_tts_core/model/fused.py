"""The elementwise pieces of a decoder layer, each one function that `torch.compile` turns into one kernel (the
device sampler's noise and draws are `FusedOp`s too, in generate/sampling.py).

A captured decode step is launch-bound on a GPU (~2.3 us per kernel on an H200), and between its GEMMs and attention
a layer spends most of its kernels on small elementwise work: the residual add and RMSNorm (3 kernels, twice), the
q/k norm and RoPE (7), SiLU times up (2). Each of these is a function here:

    add_rms_norm(x, h, w, eps)       -> (x + h, w * rms_norm(x + h))
    qk_norm_rope(qk, wq, wk, eps, cos, sin, hq) -> q and k normed per head and rotated, [B, Hq+Hkv, T, D]
    silu_mul(gate_up)                -> silu(gate) * up

Plain calls run the spelled-out ops: the reference's numbers bit for bit. Inside `compiled_ops()` (this thread) each
call runs its `torch.compile`d version instead: inductor fuses it into one kernel (a Triton kernel on CUDA, C++ on
CPU), with the numbers close to (not equal to) the plain ones. The first call of a shape compiles. If compiling or
running the compiled version fails, the op logs it once and runs plain from then on. Under a torch dispatch mode
(the CPU graph stand-in, an op counter) the plain ops run, since compiled kernels would bypass the mode.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .flags import ThreadFlag

log = logging.getLogger(__name__)

compiled_ops = ThreadFlag()
"""`with compiled_ops(on):` within this block (this thread), the fused ops run compiled."""


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin (the reference's formula), as x * cos + roll(x, D/2) * signed_sin (see
    `layers.RotaryTable`)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


def _add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    s = x if h is None else x + h
    return s, weight * F.rms_norm(s, (s.shape[-1],), None, eps)


def qk_norm_weight(wq: torch.Tensor, wk: torch.Tensor, hq: int, hkv: int) -> torch.Tensor:
    """The per-head weight of the fused q/k norm: wq [D] on q's hq heads, wk [D] on k's hkv -> [hq + hkv, D]."""
    D = wq.shape[-1]
    return torch.cat([wq.expand(hq, D), wk.expand(hkv, D)])


def _norm_rope(qk: torch.Tensor, w: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return apply_rope(w * F.rms_norm(qk, (qk.shape[-1],), None, eps), cos, sin)


def _qk_norm_rope(qk: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, cos: torch.Tensor,
                  sin: torch.Tensor, hq: int) -> torch.Tensor:
    # the weight is read from the live norm weights every call
    return _norm_rope(qk, qk_norm_weight(wq, wk, hq, qk.shape[-2] - hq), eps, cos, sin)


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled function's code, for the ops here and the compiled step bodies
(generate/compiled.py). torch's default, 8, is too few: one process holds several dtypes and widths, and each engine's
step runner is a new `self` for the bodies' guards (one graph per engine); past the limit torch refuses to compile, and
an op runs plain, a body eagerly, from then on."""

_limit_raised: ContextVar[bool] = ContextVar("qwen_tts_recompile_limit_raised", default=False)


def raise_recompile_limit() -> None:
    """Raise dynamo's recompile limit to RECOMPILE_LIMIT (never lower it) where the caller runs, before a compiled
    call. torch keeps config overrides per thread (a ContextVar, torch >= 2.12): a limit set on the thread that built
    an engine is not the limit of the thread that runs its steps, nor of an asyncio task's copied context. Once per
    context: this flag lives in the same context as torch's override."""
    if _limit_raised.get():
        return
    cfg = torch._dynamo.config  # the limit's name before torch 2.6: cache_size_limit
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    if getattr(cfg, name) < RECOMPILE_LIMIT:
        setattr(cfg, name, RECOMPILE_LIMIT)
    _limit_raised.set(True)


OPS: list[FusedOp] = []
"""Every FusedOp made (the layer's here, the sampler's in generate/sampling.py)."""


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FusedOp:
    """A function of tensors run plain, or (inside `compiled_ops`, this thread) torch.compiled into as few kernels
    as inductor makes of it; compiled on first use per shape. Dim 0 of every tensor argument is marked dynamic where
    it can be (the callers here put batch, and time, there), so batch buckets make few variants."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.name = fn, fn.__name__.lstrip("_")
        self.compiled: Callable | None = None
        self.broken = False
        self.lock = threading.Lock()
        OPS.append(self)

    def __call__(self, *args):
        if not compiled_ops or self.broken or _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        try:
            if self.compiled is None:
                with self.lock:
                    if self.compiled is None:
                        self.compiled = torch.compile(self.fn, fullgraph=True)
            raise_recompile_limit()
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() > 0:
                    torch._dynamo.maybe_mark_dynamic(a, 0)  # a hint: torch keeps it static where it must
            return self.compiled(*args)
        except Exception:  # noqa: BLE001 - compiling is an optimisation: the plain ops give the same result
            if _capturing():
                raise  # a failure inside a CUDA graph capture has already spoilt the capture: plain ops cannot mend it
            log.warning("torch.compile of %s failed; it runs as plain ops from now on", self.name, exc_info=True)
            self.broken = True
            return self.fn(*args)


_add_rms_norm_op, _qk_norm_rope_op, _silu_mul_op = FusedOp(_add_rms_norm), FusedOp(_qk_norm_rope), FusedOp(_silu_mul)
_norm_rope_op = FusedOp(_norm_rope)


def add_rms_norm(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x, h [..., C] (h None: nothing to add) -> (x + h, weight * rms_norm(x + h)), the norm in fp32 and cast back
    before the weight (the reference's RMSNorm)."""
    C = x.shape[-1]
    s, n = _add_rms_norm_op(x.reshape(-1, C), None if h is None else h.reshape(-1, C), weight, eps)
    return s.view(x.shape), n.view(x.shape)


def qk_norm_rope(qk: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, eps: float, cos: torch.Tensor,
                 sin: torch.Tensor, hq: int, w: torch.Tensor | None = None) -> torch.Tensor:
    """qk [B, T, Hq+Hkv, D] (q's heads first) -> [B, Hq+Hkv, T, D]: each head RMS-normed (wq on q's heads, wk on
    k's), then rotated with cos / signed sin [B, 1, T, D] (`layers.RotaryTable`). w: `qk_norm_weight(wq, wk, ...)`
    made once for several calls (the code predictor's 15 steps per frame reuse its 5 layers'), else made here."""
    B, T, H, D = qk.shape
    flat, cos, sin = qk.reshape(B * T, H, D), cos.transpose(1, 2).reshape(B * T, 1, D), \
        sin.transpose(1, 2).reshape(B * T, 1, D)
    out = _qk_norm_rope_op(flat, wq, wk, eps, cos, sin, hq) if w is None else _norm_rope_op(flat, w, eps, cos, sin)
    return out.view(B, T, H, D).transpose(1, 2)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate | up) -> silu(gate) * up [..., I]."""
    out = _silu_mul_op(gate_up.reshape(-1, gate_up.shape[-1]))
    return out.view(*gate_up.shape[:-1], out.shape[-1])


__all__ = ["OPS", "FusedOp", "add_rms_norm", "apply_rope", "compiled_ops", "qk_norm_rope", "qk_norm_weight",
           "silu_mul"]
