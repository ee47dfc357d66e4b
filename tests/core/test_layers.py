"""The building blocks' math, checked against the reference's formulas written out (not the code under test)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.model.layers import RMSNorm


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's order: normalise in fp32, cast to the input dtype, then multiply by the weight."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 128), (1, 1, 2048), (2, 16, 1, 64)])
def test_rms_norm_is_the_reference_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        got = norm(x)
    want = reference_rms_norm(x, norm.weight.detach(), 1e-6)
    assert got.dtype == dtype and torch.equal(got, want)
    # the weight applied after the cast matters in half precision: applying it in fp32 gives other values
    if dtype != torch.float32:
        fused = torch.nn.functional.rms_norm(x.float(), (shape[-1],), norm.weight.detach().float(), 1e-6).to(dtype)
        assert not torch.equal(fused, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_runs_where_onednn_cannot_pack(checkpoint_factory, monkeypatch, dtype):
    """A CPU without AVX512-BW (or AVX-NE-CONVERT) cannot pack bf16 linears: oneDNN raises. The engine must fall
    back to plain linears and give the same codes, not fail to start."""
    from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest
    from qwen_tts_core.model import layers

    def refuse(w):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    ckpt = checkpoint_factory("custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=dtype)
    req = SynthesisRequest(kind="custom_voice", text="Hello there.", speaker="vivian", language="english",
                           sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8),
                           decode_audio=False)
    monkeypatch.setenv("QTTS_ONEDNN", "0")
    plain = Engine(model, max_sessions=1).run_all([req])[0].codes()
    monkeypatch.delenv("QTTS_ONEDNN")
    monkeypatch.setattr(layers, "_pack", refuse)
    monkeypatch.setattr(layers, "_PACKABLE", {})
    assert not layers.can_pack(torch.zeros(1, dtype=dtype))
    eng = Engine(model, max_sessions=1)
    assert not eng.runner.packed
    assert torch.equal(eng.run_all([req])[0].codes(), plain)


def test_bf16_without_a_bf16_gemm_runs_batched_rows_on_fp32_copies(checkpoint_factory, monkeypatch):
    """A CPU that cannot pack bf16 (AVX2 only, as this one) but can pack fp32: bf16 linears keep fp32 packed copies.
    One row stays the plain bf16 product (bit for bit); two or more rows run in fp32 and round once to bf16 (within
    bf16 rounding of the plain product); the engine's greedy codes match the plain engine's."""
    from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest
    from qwen_tts_core.model import layers

    if not layers.can_pack(torch.zeros(1)):
        pytest.skip("oneDNN cannot pack fp32 linears here")
    native_bf16 = layers.can_pack(torch.zeros(1, dtype=torch.bfloat16))
    monkeypatch.setattr(layers, "_PACKABLE", {torch.float32: True, torch.bfloat16: False})
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 96).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 64, generator=g))
        lin.bias.copy_(torch.randn(96, generator=g))
    assert layers.pack_linears_(lin) and lin.pack_slot.get(lin.weight).dtype == torch.float32
    with layers.packed_linears(True):
        for rows in (1, 8):
            x = torch.randn(rows, 64, generator=g).to(torch.bfloat16)
            got, plain = lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias)
            want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float()).to(torch.bfloat16)
            assert got.dtype == torch.bfloat16
            if rows == 1:
                assert torch.equal(got, plain)
            else:
                torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
                torch.testing.assert_close(got, plain, rtol=2e-2, atol=5e-2)
        # the batched path reads the packed copy, not the bf16 weight
        lin.pack_slot.held = (layers.weight_key(lin.weight), layers._pack_upcast(lin.weight * 2))
        assert not torch.allclose(lin(x).float(), want.float(), rtol=1e-2, atol=1e-2)

    if native_bf16:
        # the engine-level check compares with torch's plain bf16 GEMM, which sums in fp32 and rounds once (as the
        # fp32 copies do) only where oneDNN has no bf16 kernel; here it runs oneDNN's bf16 (AMX) kernels
        return
    ckpt = checkpoint_factory("custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=torch.bfloat16)
    reqs = [SynthesisRequest(kind="custom_voice", text=t, speaker="vivian", language="english",
                             sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8),
                             decode_audio=False) for t in ("Hello there.", "A second one, longer.", "Third.")]
    monkeypatch.setenv("QTTS_ONEDNN", "0")
    plain = [s.codes() for s in Engine(model, max_sessions=3).run_all(reqs)]
    monkeypatch.delenv("QTTS_ONEDNN")
    eng = Engine(model, max_sessions=3)
    assert eng.runner.packed
    got = [s.codes() for s in eng.run_all(reqs)]
    same = sum(int(torch.equal(a[:n], b[:n])) for a, b in zip(got, plain) for n in [min(len(a), len(b))])
    assert same >= 2, "batched bf16 rows on fp32 copies must give the plain engine's greedy codes (a rare tie aside)"



def _greedy(text="Hello there, how are you today?", frames=12):
    from qwen_tts_core import SamplingParams, SynthesisRequest

    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english",
                            sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                    max_new_tokens=frames), decode_audio=False)


def test_packed_talker_follows_weights_loaded_after_packing(checkpoint_factory):
    """A CPU engine's talker runs on packed copies of its weights. Weights loaded into the model afterwards
    (load_state_dict: in-place copies, into the fused q/k/v and gate/up storage too) must be the ones the next
    engine computes with: its codes equal a freshly loaded model's with those weights. Stale packed copies gave the
    old weights' codes, silently."""
    from qwen_tts_core import Engine, Qwen3TTSModel

    ckpt = checkpoint_factory("custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    eng = Engine(model, max_sessions=1)
    if not eng.runner.packed:
        pytest.skip("oneDNN cannot pack linears here")
    before = eng.run_all([_greedy()])[0].codes()
    g = torch.Generator().manual_seed(5)
    sd = {k: v.clone() for k, v in model.talker.state_dict().items()}
    for k in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.1.self_attn.o_proj.weight"):
        key = next(n for n in sd if n.endswith(k))
        sd[key] += 0.05 * torch.randn(sd[key].shape, generator=g)
    model.talker.load_state_dict(sd)
    after = Engine(model, max_sessions=1).run_all([_greedy()])[0].codes()
    fresh = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    fresh.talker.load_state_dict(sd)
    want = Engine(fresh, max_sessions=1).run_all([_greedy()])[0].codes()
    assert not torch.equal(before, want), "the perturbation must change the codes for this test to mean anything"
    assert torch.equal(after, want)



def test_two_engines_that_first_step_together_after_a_weight_change_both_use_the_new_weights(checkpoint_factory):
    """Two engines on one model (two replicas' worth of sessions in one process) stepping in two threads right after
    the weights changed: both race to repack the same slots; each must compute with the new weights."""
    import threading

    from qwen_tts_core import Engine, Qwen3TTSModel

    ckpt = checkpoint_factory("custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    if not Engine(model, max_sessions=1).runner.packed:
        pytest.skip("oneDNN cannot pack linears here")
    sd = {k: v.clone() for k, v in model.talker.state_dict().items()}
    key = next(n for n in sd if n.endswith("model.layers.0.mlp.gate_proj.weight"))
    sd[key] += 0.05 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(9))
    fresh = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    fresh.talker.load_state_dict(sd)
    texts = ("Hello there, how are you today?", "A second voice joins in.")
    want = [Engine(fresh, max_sessions=1).run_all([_greedy(t)])[0].codes() for t in texts]
    model.talker.load_state_dict(sd)
    engines = [Engine(model, max_sessions=1) for _ in texts]
    got, start = {}, threading.Barrier(len(texts))

    def run(i: int) -> None:
        start.wait()
        got[i] = engines[i].run_all([_greedy(texts[i])])[0].codes()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(got[i], want[i]) for i in range(len(texts)))


def test_pack_slot_repacks_once_per_change_and_copies_pack_their_own():
    import copy

    from qwen_tts_core.model import layers

    if not layers.can_pack(torch.zeros(1)):
        pytest.skip("oneDNN cannot pack fp32 linears here")
    g = torch.Generator().manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32))
    assert layers.pack_linears_(net)
    made = []
    for m in net:
        make = m.pack_slot.make
        m.pack_slot.make = lambda w, make=make: made.append(w.shape) or make(w)
    x = torch.randn(4, 64, generator=g)

    def plain(module, x):
        for m in module:
            x = torch.nn.functional.linear(x, m.weight, m.bias)
        return x

    with layers.packed_linears(True):
        for _ in range(3):
            torch.testing.assert_close(net(x), plain(net, x), rtol=1e-5, atol=1e-5)
        assert made == []                                   # packed once, by pack_linears_
        with torch.no_grad():
            net[1].weight.mul_(-2)
        for _ in range(3):
            torch.testing.assert_close(net(x), plain(net, x), rtol=1e-5, atol=1e-5)
        assert made == [(32, 48)]                           # the changed weight only, once
        twin = copy.deepcopy(net)                           # packed tensors cannot be copied: the copy packs its own
        with torch.no_grad():
            twin[0].weight.add_(0.5)
        torch.testing.assert_close(twin(x), plain(twin, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x), plain(net, x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(twin(x), net(x))


def reference_rope(x, pos, head_dim, theta):
    """The reference's rotate-half RoPE written out: cos/sin cast to x's dtype, x*cos + rotate_half(x)*sin."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    f = pos.float()[..., None] * inv
    emb = torch.cat([f, f], -1)
    cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
    h = head_dim // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_is_the_reference_bit_for_bit(dtype):
    from qwen_tts_core.model.layers import RotaryTable, apply_rope

    g = torch.Generator().manual_seed(1)
    table = RotaryTable(128, 1e6, 4096)
    pos = torch.randint(0, 4096, (3, 5), generator=g)
    x = (torch.randn(3, 4, 5, 128, generator=g) * 2).to(dtype)
    cos, sin = table(pos, dtype)
    assert torch.equal(apply_rope(x, cos, sin), reference_rope(x, pos, 128, 1e6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 6])
def test_fused_qk_norm_and_rope_equal_the_separate_path(dtype, T):
    """q and k normed and rotated as one tensor (fused q/k/v weight) == each on its own, bit for bit; a perturbed
    k_norm weight (edited in place after fusing) changes k (the fused path reads the live weights)."""
    from qwen_tts_core.config import make_config
    from qwen_tts_core.model.layers import Attention, RotaryTable

    cfg = make_config("custom_voice", "tiny").talker
    torch.manual_seed(0)
    att = Attention(cfg).to(dtype).eval()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, T, cfg.hidden_size).to(dtype)
    cos, sin = RotaryTable(cfg.head_dim, cfg.rope_theta, 64)(torch.arange(T).repeat(2, 1) + 3, dtype)
    with torch.inference_mode():
        separate = att._qk_rope(x, cos, sin)
    att.fuse_()
    with torch.inference_mode():
        fused = att._qk_rope(x, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(separate, fused))
        att.k_norm.weight[0] += 1.0
        q2, k2, _ = att._qk_rope(x, cos, sin)
    assert torch.equal(q2, fused[0]) and not torch.equal(k2, fused[1])
    with torch.inference_mode():  # the weight made once by a caller that reuses it: the same numbers
        made_once = att._qk_rope(x, cos, sin, att.qk_norm_weight())
    assert all(torch.equal(a, b) for a, b in zip(made_once, (q2, k2)))


@pytest.mark.parametrize("size", ["tiny", "tiny-proj"])
def test_code_predictor_steps_with_pass_constants_equal_steps_without(size):
    """A frame's pass makes the RoPE table and the q/k norm weights once (`pass_constants`) and steps read views of
    them: the logits of every step equal those computed per step, bit for bit, and a perturbed norm weight reaches
    a pass whose constants are made after it (they are read from the live weights)."""
    from qwen_tts_core.config import make_config
    from qwen_tts_core.model.layers import prepare_for_inference_
    from qwen_tts_core.model.talker import Talker

    cfg = make_config("custom_voice", size).talker
    torch.manual_seed(1)
    talker = Talker(cfg, max_positions=64).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in talker.parameters():
            p.normal_(0, 0.1)
    prepare_for_inference_(talker)
    cp = talker.code_predictor
    B = 3
    x = torch.randn(B, 2, cfg.hidden_size).to(torch.bfloat16)
    steps = [torch.randint(0, 2048, (B,)) for _ in range(cp.num_steps - 1)]

    def run(with_consts: bool) -> list[torch.Tensor]:
        cache = cp.new_cache(B, dtype=torch.bfloat16)
        consts = cp.pass_constants(torch.bfloat16) if with_consts else None
        out = [cp(x, 0, cache, head=0, consts=consts)]
        for g, ids in enumerate(steps, start=1):
            out.append(cp(cp.embed(g, ids)[:, None], g + 1, cache, head=g, consts=consts))
        return out

    with torch.inference_mode():
        want, got = run(False), run(True)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
        cp.model.layers[-1].self_attn.k_norm.weight[3] += 0.5
        moved, moved_plain = run(True), run(False)
    assert all(torch.equal(a, b) for a, b in zip(moved, moved_plain)) and not torch.equal(moved[-1], want[-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("K", "N"), [(2048, 1024), (3072, 1024), (2048, 3072), (1024, 4096)])
def test_a_packed_linear_gives_a_row_the_same_numbers_alone_or_in_a_batch(dtype, K, N):
    """A session's numbers must not depend on who it is batched with. oneDNN runs a single row with another kernel
    (on this project's CPUs: K >= 2048) whose sums can differ in the last bits from the same row in a batch; `linear`
    runs one row as two for the shapes a probe flags at packing. Every row alone == in batches of 2, 3, 8, 33."""
    from qwen_tts_core.model.layers import PackSlot, _pack, can_pack, linear, packed_linears

    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(K + N)) * 0.05).to(dtype)
    if not can_pack(w):
        pytest.skip(f"oneDNN cannot pack {dtype} linears on this CPU")
    p = PackSlot(_pack)
    x = torch.randn(33, K, generator=torch.Generator().manual_seed(1)).to(dtype)
    with packed_linears():
        alone = [linear(x[i:i + 1], w, None, p) for i in range(8)]
        assert linear(x[0], w, None, p).shape == (N,)  # a 1-d row keeps its shape
        assert torch.equal(linear(x[0], w, None, p), alone[0][0])
        for M in (2, 3, 8, 33):
            batch = linear(x[:M], w, None, p)
            for i in range(min(M, 8)):
                assert torch.equal(batch[i], alone[i][0]), (M, i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_batch_over_max_rows_runs_in_pieces_with_each_rows_numbers(dtype, monkeypatch):
    """Where a probe finds that larger batches take another kernel (bf16 on AMX CPUs: 33 rows or more), `linear`
    runs them in pieces of at most `max_rows`: every row gets its bits from a small batch, a lone last row included.
    The limit is forced here so the piecewise path runs on every CPU."""
    from qwen_tts_core.model.layers import (
        PackSlot,
        _pack,
        can_pack,
        linear,
        max_batch_rows,
        packed_linears,
        weight_key,
    )

    w = (torch.randn(96, 2048, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    if not can_pack(w):
        pytest.skip(f"oneDNN cannot pack {dtype} linears on this CPU")
    limit = max_batch_rows(96, 2048, dtype)
    assert limit is None or 2 <= limit <= 64
    packed = _pack(w)
    packed.max_rows = 3
    p = PackSlot(_pack)
    p.held = (weight_key(w), packed)
    bias = torch.randn(96, generator=torch.Generator().manual_seed(6)).to(dtype)
    x = torch.randn(2, 5, 2048, generator=torch.Generator().manual_seed(7)).to(dtype)   # 10 rows: 3 + 3 + 3 + 1
    with packed_linears():
        got = linear(x, w, bias, p)
        alone = torch.stack([linear(x[i, j], w, bias, p) for i in range(2) for j in range(5)]).reshape(2, 5, 96)
    assert got.shape == (2, 5, 96) and torch.equal(got, alone)
    torch.testing.assert_close(got.float(), torch.nn.functional.linear(x, w, bias).float(), rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("B", "K"), [(1, 3), (8, 16), (4, 300)])
def test_grouped_decode_attention_is_sdpa_with_enable_gqa(dtype, masked, B, K):
    """The decode layouts are one attention: grouped (bool or float mask) == SDPA with enable_gqa, to rounding; a
    masked-out key is never attended, in either."""
    import torch.nn.functional as F

    from qwen_tts_core.model.layers import grouped_decode_attention

    g = torch.Generator().manual_seed(B * 1000 + K)
    q, k, v = (torch.randn(B, h, n, 64, generator=g).to(dtype) for h, n in ((16, 1), (8, K), (8, K)))
    mask = None
    if masked:
        mask = torch.rand(B, 1, 1, K, generator=g) < 0.7
        mask[..., 0] = True
        v = v.masked_fill(~mask[:, :, 0, :, None], 1e4)  # a masked key that leaked in would show
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for float_mask in (False, True):
        got = grouped_decode_attention(q, k, v, mask, float_mask)
        assert got.shape == (B, 16, 1, 64) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_code_predictor_steps_run_the_engines_layout(checkpoint_factory, monkeypatch):
    """The code predictor's one-query steps use the layout its engine chose (`StepRunner.cp_layout`): grouped in
    bf16 on CPU, where SDPA with enable_gqa is ~2.8x slower at 8 rows; before, they always ran enable_gqa."""
    from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest
    from qwen_tts_core.model import layers

    model = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu",
                                          dtype="bfloat16")
    cp_keys = model.talker.code_predictor.cfg.num_code_groups
    lens = []
    real = layers.grouped_decode_attention
    monkeypatch.setattr(layers, "grouped_decode_attention", lambda q, k, *a: (lens.append(k.shape[2]),
                                                                              real(q, k, *a))[1])
    req = SynthesisRequest(kind="custom_voice", text="Hello there.", speaker="vivian", language="english",
                           sampling=SamplingParams(max_new_tokens=3), seed=1, decode_audio=False)
    eng = Engine(model, max_sessions=2)
    assert eng.sdpa["cp_layout"] == "grouped"
    eng.run_all([req])
    assert sorted({n for n in lens if n <= cp_keys}) == list(range(3, cp_keys + 1))  # every step after its prefill
    lens.clear()
    eng.runner.set_decode_layout("grouped", "gqa")
    eng.run_all([req])
    assert lens and max(lens) > cp_keys  # the talker's only
