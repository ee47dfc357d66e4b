"""The fused elementwise ops of a decoder layer (`qwen_tts_core/model/fused.py`).

Plain calls are the reference's formulas bit for bit. Inside `compiled_ops()` they run torch.compiled (inductor; C++
kernels here, Triton kernels on a GPU): close to the plain numbers, and an engine built with `compile=True` gives the
plain engine's codes. Under a dispatch mode (the CUDA-graph stand-in, an op counter) the plain ops run, so the
stand-in records every op it must replay. A compile that fails leaves the plain ops running, for good.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.graphs import GraphCapture, OpCounter
from qwen_tts_core.generate.sampling import SamplePlan, gumbel, noise_key, sample_device, token_hash
from qwen_tts_core.model import fused
from qwen_tts_core.model.fused import (
    OPS,
    add_rms_norm,
    compiled_ops,
    qk_norm_rope,
    qk_norm_weight,
    silu_mul,
)

LAYER_OPS = (fused._add_rms_norm_op, fused._qk_norm_rope_op, fused._norm_rope_op, fused._silu_mul_op)

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=10)


def reference_rms_norm(x, w, eps):
    """The reference's Qwen3 RMSNorm: the variance in fp32, the normalised value cast back, then the weight."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


@functools.cache
def inductor_works() -> bool:
    try:
        return bool(torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3)).eq(3).all())
    except Exception:  # noqa: BLE001 - no C++ compiler, or a torch without inductor
        return False


@pytest.fixture
def fresh_ops(monkeypatch):
    """Each op starts uncompiled and unbroken, and is put back as it was after the test."""
    for op in OPS:
        monkeypatch.setattr(op, "compiled", None)
        monkeypatch.setattr(op, "broken", False)
    return OPS


def inputs(dtype, B=3, T=2, H=6, hq=4, D=16, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 2).to(dtype)  # noqa: E731
    cos, sin = r(B, 1, T, D), r(B, 1, T, D)
    return dict(x=r(B, T, C), h=r(B, T, C), w=r(C), qk=r(B, T, H, D), wq=r(D), wk=r(D), cos=cos, sin=sin, hq=hq,
                gu=r(B, T, 2 * C))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_ops_are_the_reference_formulas_bit_for_bit(dtype):
    a = inputs(dtype)
    s, n = add_rms_norm(a["x"], a["h"], a["w"], 1e-6)
    assert torch.equal(s, a["x"] + a["h"]) and torch.equal(n, reference_rms_norm(a["x"] + a["h"], a["w"], 1e-6))
    s0, n0 = add_rms_norm(a["x"], None, a["w"], 1e-6)
    assert torch.equal(s0, a["x"]) and torch.equal(n0, reference_rms_norm(a["x"], a["w"], 1e-6))
    gate, up = a["gu"].chunk(2, -1)
    assert torch.equal(silu_mul(a["gu"]), F.silu(gate) * up)
    # q/k: per-head norm with q's weight on the first hq heads and k's on the rest, then rotate-half RoPE
    qk, hq, D = a["qk"], a["hq"], a["qk"].shape[-1]
    q = reference_rms_norm(qk[:, :, :hq], a["wq"], 1e-6).transpose(1, 2)
    k = reference_rms_norm(qk[:, :, hq:], a["wk"], 1e-6).transpose(1, 2)
    rot = lambda t: torch.cat([-t[..., D // 2:], t[..., : D // 2]], -1)  # noqa: E731
    sin = torch.cat([-a["sin"][..., : D // 2], a["sin"][..., D // 2:]], -1)  # the table's signed sin -> sin
    want = torch.cat([q * a["cos"] + rot(q) * sin, k * a["cos"] + rot(k) * sin], dim=1)
    got = qk_norm_rope(qk, a["wq"], a["wk"], 1e-6, a["cos"], a["sin"], hq)
    assert torch.equal(got, want)
    w = qk_norm_weight(a["wq"], a["wk"], hq, qk.shape[-2] - hq)  # made once by a caller that reuses it
    assert torch.equal(qk_norm_rope(qk, a["wq"], a["wk"], 1e-6, a["cos"], a["sin"], hq, w), want)


@pytest.mark.skipif(not inductor_works(), reason="torch.compile (inductor) cannot build kernels on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ops_are_close_to_the_plain_ones(fresh_ops, dtype):
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    with torch.inference_mode():
        for B, T in ((3, 2), (1, 1), (5, 1)):  # shapes the engine steps take: new shapes compile once more
            a = inputs(dtype, B=B, T=T, seed=B + T)
            w = qk_norm_weight(a["wq"], a["wk"], a["hq"], a["qk"].shape[-2] - a["hq"])
            qk = (a["qk"], a["wq"], a["wk"], 1e-6, a["cos"], a["sin"], a["hq"])
            args = [(add_rms_norm, (a["x"], a["h"], a["w"], 1e-6)), (silu_mul, (a["gu"],)), (qk_norm_rope, qk),
                    (qk_norm_rope, (*qk, w))]
            for op, xs in args:
                plain = op(*xs)
                with compiled_ops():
                    fast = op(*xs)
                for p, f in zip(torch.utils._pytree.tree_leaves(plain), torch.utils._pytree.tree_leaves(fast)):
                    torch.testing.assert_close(f, p, **tol)
    assert all(op.compiled is not None and not op.broken for op in LAYER_OPS)


@pytest.mark.skipif(not inductor_works(), reason="torch.compile (inductor) cannot build kernels on this machine")
def test_the_compiled_sampler_draws_the_plain_samplers_ids(fresh_ops):
    """The device sampler's noise and both of its ways (top-k only; sort for top-p) compiled: same ids per row."""
    g = torch.Generator().manual_seed(3)
    B, V = 16, 2048
    logits = torch.randn(B, V, generator=g) * 3
    do = torch.arange(B) % 4 != 0                                 # a greedy row every 4
    temp = torch.rand(B, generator=g) + 0.5
    top_k = torch.tensor([0, 1, 5, 50] * 4)                        # 0: off
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0] * 4)
    key = noise_key(torch.arange(B) * 7919, torch.arange(B), 3)
    th = token_hash(V)
    plans = (None, SamplePlan(sample=True, kmax=64, top_p=False))
    with torch.inference_mode():
        noise = gumbel(key, th)
        plain = [sample_device(logits, do, temp, top_k, top_p if p is None else torch.ones(B), lambda: noise, p)
                 for p in plans]
        with compiled_ops():
            noise_c = gumbel(key, th)
            fast = [sample_device(logits, do, temp, top_k, top_p if p is None else torch.ones(B), lambda: noise_c, p)
                    for p in plans]
    torch.testing.assert_close(noise_c, noise, atol=1e-5, rtol=1e-5)
    for a, b in zip(plain, fast):
        assert (a == b).sum() >= B - 1, (a, b)  # equal here; a 1-ulp difference in the noise may flip a near-tie
    assert all(op.compiled is not None and not op.broken for op in OPS if op not in LAYER_OPS)


@pytest.mark.parametrize("plan", [None, SamplePlan(sample=True, kmax=64, top_p=False)], ids=["sorted", "topk"])
def test_draws_sharing_a_memo_equal_draws_without(plan):
    """The code predictor's 15 draws of a pass share one memo (the per-row filter indices made at the first draw):
    every draw equals the same draw made alone, for other logits and noise each time."""
    g = torch.Generator().manual_seed(4)
    B, V = 12, 2048
    do = torch.arange(B) % 4 != 0
    temp = torch.rand(B, generator=g) + 0.5
    top_k = torch.tensor([0, 1, 5, 50] * 3)
    top_p = torch.tensor([1.0, 0.9, 0.5, 1.0] * 3) if plan is None else torch.ones(B)
    memo, th = {}, token_hash(V)
    with torch.inference_mode():
        for step in range(5):
            logits = torch.randn(B, V, generator=g) * 3
            noise = gumbel(noise_key(torch.arange(B) * 7919, torch.arange(B), step + 1), th)
            shared = sample_device(logits, do, temp, top_k, top_p, lambda n=noise: n, plan, memo)
            alone = sample_device(logits, do, temp, top_k, top_p, lambda n=noise: n, plan)
            assert torch.equal(shared, alone)
    assert len(memo) == 1


def test_under_a_dispatch_mode_the_plain_ops_run(fresh_ops):
    """The graph stand-in and the op counter work at the dispatcher: compiled kernels would slip past them."""
    a = inputs(torch.float32)
    with torch.inference_mode():
        with OpCounter() as plain:
            add_rms_norm(a["x"], a["h"], a["w"], 1e-6)
        with compiled_ops(), OpCounter() as inside:
            add_rms_norm(a["x"], a["h"], a["w"], 1e-6)
    assert inside.by_name == plain.by_name and plain.kernels == 3  # add, rms_norm, mul
    assert all(op.compiled is None for op in OPS)  # nothing was compiled for it


@pytest.mark.skipif(not inductor_works(), reason="torch.compile (inductor) cannot build kernels on this machine")
def test_an_engine_with_compiled_ops_gives_the_plain_engines_codes(fresh_ops, model_factory):
    model = model_factory("custom_voice", "tiny")
    reqs = [SynthesisRequest(kind="custom_voice", text=t, speaker="vivian", language="english", sampling=GREEDY,
                             decode_audio=False) for t in ("Hello world.", "Press one for sales, two for support.")]
    plain = [r.codes() for r in Engine(model, max_sessions=2).run_all(reqs)]
    eng = Engine(model, max_sessions=2, compile="ops")
    fast = [r.codes() for r in eng.run_all(reqs)]
    assert eng.runner.compiled and all(op.compiled is not None and not op.broken for op in LAYER_OPS)
    for p, f in zip(plain, fast):
        assert p.shape == f.shape and (p == f).float().mean() >= 0.95, (p, f)  # equal here; a rare tie may flip


def test_a_failing_compile_leaves_the_plain_ops_running(fresh_ops, model_factory, monkeypatch):
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("inductor exploded")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = model_factory("custom_voice", "tiny")
    r = SynthesisRequest(kind="custom_voice", text="Hello world.", speaker="vivian", language="english",
                         sampling=GREEDY, decode_audio=False)
    want = Engine(model, max_sessions=1).run_all([r])[0].codes()
    got = Engine(model, max_sessions=2, compile="ops").run_all([r])[0].codes()
    assert torch.equal(got, want) and all(op.broken for op in LAYER_OPS)  # each tried, failed, and ran plain
    g = Engine(model, max_sessions=2, max_len=64, compile=True, graph_capture=GraphCapture("cpu", fake=True))
    # buckets 1, 2: two code-predictor graphs and one talker graph each, and prefills of 1 and 2 rows x 16, 32, 64
    assert len(g.runner.graphs) == 2 * 3 + 2 * 3
    assert torch.equal(g.run_all([r])[0].codes(), want)


def test_a_compiled_op_failing_inside_a_cuda_graph_capture_is_raised_not_hidden(fresh_ops, monkeypatch):
    """Outside a capture a failing compiled op runs plain from then on; inside one the capture is already spoilt
    (the plain ops would be recorded into an invalid graph), so the error goes up to the capture, which fails the
    engine's start instead of leaving a wrong graph, or an op marked broken for good by a passing fault."""
    def broken(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("out of memory while capturing")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    op = fused._silu_mul_op
    x = torch.randn(2, 8)
    monkeypatch.setattr(fused, "_capturing", lambda: True)
    with fused.compiled_ops(True), pytest.raises(RuntimeError, match="while capturing"):
        op(x)
    assert not op.broken
    monkeypatch.setattr(fused, "_capturing", lambda: False)
    with fused.compiled_ops(True):
        assert torch.equal(op(x), op.fn(x)) and op.broken


def test_the_switch_is_per_thread_and_restored():
    """`compiled_ops()` (and `packed_linears()`, the same kind of switch) set on one thread are not seen by another
    engine's thread, and a block restores what was there before, even when it raises."""
    import threading

    seen = []
    with compiled_ops():
        t = threading.Thread(target=lambda: seen.append(bool(compiled_ops)))
        t.start()
        t.join()
        with compiled_ops(False):
            assert not compiled_ops
        assert compiled_ops
    with pytest.raises(RuntimeError), compiled_ops():
        raise RuntimeError("boom")
    assert seen == [False] and not compiled_ops


def test_a_compiled_op_raises_dynamos_graph_limit_on_the_thread_it_runs_on(fresh_ops, monkeypatch):
    """torch keeps dynamo's recompile limit per thread (torch >= 2.12): an op first compiled on one thread raised the
    limit there only, and on an engine's step thread a shape past torch's default of 8 variants made the op run plain
    for good. Each compiled call raises it where it runs (never lowering a higher one)."""
    import threading

    from torch._dynamo import config as cfg

    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    op, seen = fused._silu_mul_op, []
    monkeypatch.setattr(op, "compiled", lambda x: (seen.append(getattr(cfg, limit)), op.fn(x))[1])

    def step() -> None:
        with compiled_ops():
            op(torch.randn(2, 8))

    for _ in range(2):
        t = threading.Thread(target=step)
        t.start()
        t.join(30)
    assert seen == [fused.RECOMPILE_LIMIT] * 2


def test_prefill_graphs_are_captured_plain_when_the_steps_compile(model_factory, monkeypatch):
    """compile=True compiles the step bodies' fused ops at capture, not the prefills': a prefill is one pass per
    session (one launch with its graph), and compiling every length bucket would only lengthen the engine's start."""
    from qwen_tts_core.generate.runner import StepRunner

    seen: dict[str, set[bool]] = {"prefill": set(), "cp": set(), "talker": set()}
    for kind in seen:
        real = getattr(StepRunner, f"_{kind}_body")

        def spy(self, *a, _real=real, _kind=kind):
            seen[_kind].add(bool(compiled_ops))
            return _real(self, *a)
        monkeypatch.setattr(StepRunner, f"_{kind}_body", spy)
    Engine(model_factory("custom_voice", "tiny"), max_sessions=2, max_len=64, compile=True,
           graph_capture=GraphCapture("cpu", fake=True))
    assert seen == {"prefill": {False}, "cp": {True}, "talker": {True}}
