"""The model code every engine path runs, pinned by a mutation review (qwen_tts_core/model/layers.py, kv_cache.py,
fused.py, talker.py, code_predictor.py, flags.py; generate/step.py, compiled.py): each test here failed on a one-line
change (a "mutant") that the rest of the suite, the oracle parity tests aside, let pass, named in its docstring.

The references are written apart from the code under test: a session's steps are checked against one causal pass over
its whole sequence (an explicit mask, a fresh cache, rows at positions 0..T-1), so a batched step's rows of different
lengths, slots left dirty by an earlier session, key reads past a row's position and the code predictor's per-frame
cache are each compared with the numbers that session gets alone. Also pinned: the fused q/k/v and gate/up matrices kept
in step with the named weights, a packed linear following a replaced weight, a frame's embedding sum, the stack's
residual formula and the norms' epsilon. Tiny random models built from `make_config` on CPU (fp32, bf16 where
named); no checkpoint, no Ray."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.config import make_config
from qwen_tts_core.generate.step import predict_codes, prefill, talker_step
from qwen_tts_core.model.kv_cache import KVCache
from qwen_tts_core.model.layers import DECODE_LAYOUTS, prepare_for_inference_, run_stack
from qwen_tts_core.model.talker import Talker

TOL = dict(atol=1e-5, rtol=1e-5)   # fp32: a step and the whole-sequence pass sum in other orders


def _talker(seed: int = 0, size: str = "tiny", fuse: bool = True) -> Talker:
    """A random tiny talker (norm weights near 1, every other weight ~N(0, 0.1)), fused as the loader leaves it."""
    torch.manual_seed(seed)
    talker = Talker(make_config("custom_voice", size).talker, max_positions=64).eval()
    with torch.no_grad():
        for name, p in talker.named_parameters():
            p.normal_(0, 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    if fuse:
        prepare_for_inference_(talker)
    return talker


def _dirty(cache: KVCache, seed: int) -> KVCache:
    """Every slot and position holds keys and values an earlier session left (random, finite)."""
    g = torch.Generator().manual_seed(seed)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return cache


def _causal(T: int, B: int = 1) -> torch.Tensor:
    return torch.ones(T, T, dtype=torch.bool).tril()[None, None].expand(B, 1, T, T)


def _alone(talker: Talker, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One session's whole sequence of input embeds [T, C] in one causal pass over a fresh cache: (hidden, logits)
    [T, ...] at every position."""
    T = seq.shape[0]
    hidden, logits = talker(seq[None], torch.arange(T)[None], talker.new_cache(1, T), mask=_causal(T))
    return hidden[0], logits[0]


def _frame_reference(talker: Talker, hidden: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The code predictor's logits [B, 15, V] for codebooks 1..15 of frames whose codes are `codes` [B, 16], from
    one causal pass over the whole frame (talker hidden, codebook 0, codebooks 1..14: 16 positions) with an explicit
    mask and a fresh cache, reading the embedding tables and heads by index."""
    cp = talker.code_predictor
    B = hidden.shape[0]
    embs = [hidden, talker.model.codec_embedding(codes[:, 0])]
    embs += [cp.model.codec_embedding[g - 1](codes[:, g]) for g in range(1, cp.num_steps)]
    x = cp.small_to_mtp_projection(torch.stack(embs, 1))
    T = x.shape[1]
    cache = KVCache(cp.cfg.num_hidden_layers, B, cp.cfg.num_key_value_heads, cp.cfg.head_dim, T)
    h = run_stack(cp.model.layers, cp.model.norm, cp.rope, x, torch.arange(T)[None].expand(B, T),
                  cache.layers(torch.arange(B), T), _causal(T, B))
    return torch.stack([cp.lm_head[g - 1](h[:, g]) for g in range(1, cp.num_steps + 1)], 1)


@pytest.mark.parametrize("size", ["tiny", "tiny-proj"])
@pytest.mark.parametrize("layout", ["gqa", "grouped"])
def test_a_frames_code_predictor_pass_is_one_causal_pass_over_the_frame_even_in_a_used_cache(size, layout):
    """M02 M24 M25 M26 M27 M29 M51 M52 P06 P07 P08 P09: `predict_codes` draws codebooks 1..15 in order (pick sees
    group g for codebook g) and each draw's logits are those of one causal pass over [talker hidden, codebook 0,
    codebooks 1..g-1]: its prompt in that order, each step at its own position and rotation, codebook g's own
    embedding table and head, the prefill's logits from its last position, a one-query step seeing every earlier key
    and nothing past its position. The per-frame cache is reused by every frame and session (rows 0..B-1): whatever
    an earlier frame left at a later position is never read."""
    talker = _talker(size=size)
    cp = talker.code_predictor
    B = 3
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(B, talker.cfg.hidden_size, generator=g)
    code0 = torch.randint(0, talker.cfg.vocab_size, (B,), generator=g)
    groups, seen = [], []

    def pick(logits: torch.Tensor, group: int) -> torch.Tensor:
        groups.append(group)
        seen.append(logits)
        return logits.argmax(-1)

    with torch.inference_mode():
        codes = predict_codes(talker, _dirty(cp.new_cache(B), 2), hidden, code0, pick, layout)
        want = _frame_reference(talker, hidden, codes)
    assert groups == list(range(1, cp.num_steps + 1))
    assert codes.shape == (B, 16) and torch.equal(codes[:, 0], code0)
    assert torch.equal(codes[:, 1:], torch.stack(seen, 1).argmax(-1))
    torch.testing.assert_close(torch.stack(seen, 1), want, **TOL)


@pytest.mark.parametrize("layout", DECODE_LAYOUTS)
def test_rows_of_different_lengths_in_used_slots_step_as_each_session_alone(layout):
    """M03 M04 M13 M14 M15 M16 M17 M22 M43 M53 M57 P01 P02 P03: two sessions with prompts of 5 and 3 positions are
    prefilled together (right-padded, into slots named in another order than the rows) into slots an earlier session
    left full, then step together at their own positions, reading keys up to a bucket (the cache's whole length)
    past both: each row's hidden state and logits at every position are those of its session's whole sequence run
    alone. A row sees its own keys up to its own position: not another row's, not past its position (the earlier
    session's keys, its own prompt's padding), not the row-0 positions or rotation."""
    talker = _talker()
    lens, steps, cap = [5, 3], 4, 64
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randn(n + steps, talker.cfg.hidden_size, generator=g) for n in lens]
    cache = _dirty(talker.new_cache(4, cap, static=True), 4)
    order = [1, 0]                      # prompt row r goes into slot order[r]
    T = max(lens)
    prompt = torch.zeros(2, T, talker.cfg.hidden_size)
    for r, s in enumerate(order):
        prompt[r, :lens[s]] = seqs[s][:lens[s]]
    got_h = {s: [] for s in order}
    got_l = {s: [] for s in order}
    with torch.inference_mode():
        h, logits = prefill(talker, cache, torch.tensor(order), prompt, torch.tensor([lens[s] - 1 for s in order]))
        for r, s in enumerate(order):
            got_h[s].append(h[r])
            got_l[s].append(logits[r])
        pos = torch.tensor(lens)        # decode rows are slots 0, 1
        for i in range(steps):
            embeds = torch.stack([seqs[s][lens[s] + i] for s in (0, 1)])
            h, logits = talker_step(talker, cache, pos, embeds, cap, layout)
            pos += 1
            for s in (0, 1):
                got_h[s].append(h[s])
                got_l[s].append(logits[s])
        for s in (0, 1):
            want_h, want_l = _alone(talker, seqs[s])
            at = slice(lens[s] - 1, None)
            torch.testing.assert_close(torch.stack(got_h[s]), want_h[at], **TOL)
            torch.testing.assert_close(torch.stack(got_l[s]), want_l[at].float(), **TOL)


def test_a_static_cache_reads_and_writes_its_last_position_and_refuses_one_past_it():
    """M07 M03 M04: a static cache of 8 positions reads all 8 and takes a write at position 7 into the named slot
    only (the other slot stays as it was); 9 positions is a ValueError, never a silent reallocation."""
    cache = KVCache(2, 2, 2, 4, 8, static=True)
    k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    for layer in cache.layers(torch.tensor([1]), 8):
        keys, values = layer.update(k, v, torch.tensor([[7]]))
        assert keys.shape == (1, 2, 8, 4)
        assert torch.equal(keys[:, :, 7], k[:, :, 0]) and torch.equal(values[:, :, 7], v[:, :, 0])
    assert all(not t[0].any() for t in cache.k + cache.v)
    with pytest.raises(ValueError, match="static KV cache holds 8 positions, 9 needed"):
        cache.layers(None, 9)


def test_a_growing_cache_keeps_its_keys_and_grows_to_the_limit_but_never_below_what_is_needed():
    """M06 M08 M09 M10: a growing cache keeps every key it held when it grows; it grows by doubling (at least 64
    positions) but to no more than the session's limit, and never to fewer positions than asked for; `layers()`
    makes room for the keys it reads."""
    cache = KVCache(1, 2, 1, 2, 4)
    k = torch.randn(1, 1, 4, 2)
    cache.layers(torch.tensor([1]), 4)[0].update(k, k, torch.arange(4)[None])
    cache.ensure(5, limit=6)
    assert cache.capacity == 6 and torch.equal(cache.k[0][1:, :, :4], k)
    cache.ensure(10, limit=6)
    assert cache.capacity == 10 and torch.equal(cache.v[0][1:, :, :4], k)
    cache.layers(None, 30)
    assert cache.capacity == 64 and torch.equal(cache.k[0][1:, :, :4], k)


@pytest.mark.parametrize("column_major", [False, True])
def test_fused_weights_follow_a_state_dict_loaded_after_fusing(column_major):
    """M58 M60: after `prepare_for_inference_` the q/k/v and gate/up weights are views into the fused matrices, so
    a state dict loaded later (a reload, a fine-tune swap) reaches the fused products: the fused talker computes what
    an unfused talker with the same state computes (column-major storage too)."""
    fused, plain = _talker(seed=1, fuse=False), _talker(seed=2, fuse=False)
    prepare_for_inference_(fused, column_major=column_major)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, plain.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = plain(x, torch.arange(3)[None].expand(2, 3), plain.new_cache(2, 3))
        got = fused(x, torch.arange(3)[None].expand(2, 3), fused.new_cache(2, 3))
    assert fused.model.layers[0].self_attn.qkv is not None
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_fusing_changes_no_layers_numbers_and_a_biased_attention_keeps_its_bias():
    """M45 M46 M47 M62: `fuse_` gives q/k/v and gate/up one matrix each and a layer computes what it computed
    before (the unfused MLP is silu(gate) * up, as the fused one); an attention with q/k/v biases (a config's
    `attention_bias`) keeps the separate, biased products after fusing: the fused matrix carries no bias."""
    from dataclasses import replace

    from qwen_tts_core.model.layers import MLP, Attention, RotaryTable

    torch.manual_seed(7)
    cfg = make_config("custom_voice", "tiny").talker
    x = torch.randn(2, 3, cfg.hidden_size)
    cos, sin = RotaryTable(cfg.head_dim, cfg.rope_theta, 8)(torch.arange(3)[None].expand(2, 3), x.dtype)
    for bias in (False, True):
        att = Attention(replace(cfg, attention_bias=bias)).eval()
        with torch.no_grad():
            for p in att.parameters():
                p.normal_(0, 0.3)
        want = att._qk_rope(x, cos, sin)
        att.fuse_()
        assert att.qkv is not None and (att.qk_norm_weight() is None) == bias
        for a, b in zip(att._qk_rope(x, cos, sin, att.qk_norm_weight()), want):
            torch.testing.assert_close(a, b, **TOL)
    mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
    want = mlp(x)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    torch.testing.assert_close(want, mlp.down_proj(torch.nn.functional.silu(gate) * up), **TOL)
    mlp.fuse_()
    assert mlp.gate_up is not None
    torch.testing.assert_close(mlp(x), want, **TOL)


def test_a_layers_norms_use_the_configured_epsilon():
    """M77: the residual norm (`fused.add_rms_norm`) divides by sqrt(mean(x^2) + eps) with the layer's own eps, not
    a fixed 1e-6 (the tiny and official configs both say 1e-6, which hid it)."""
    from qwen_tts_core.model.fused import add_rms_norm

    x, h, w = torch.randn(3, 8) * 0.01, torch.randn(3, 8) * 0.01, torch.rand(8) + 0.5
    s, n = add_rms_norm(x, h, w, 0.5)
    want = w * (x + h) * torch.rsqrt((x + h).pow(2).mean(-1, keepdim=True) + 0.5)
    assert torch.equal(s, x + h)
    torch.testing.assert_close(n, want, **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_frames_embedding_is_the_reference_sum_of_its_sixteen_codebooks(dtype):
    """M18 M19: the talker's input for a frame is codebook 0's embedding (the talker's table) plus codebook g's from
    the code predictor's table g-1 (g = 1..15), summed as the reference does (`codec_hiddens.sum(1)` over the
    stacked 16: in bf16 one fp32 accumulation rounded once, not 15 chained bf16 adds)."""
    talker = _talker(seed=3, fuse=False).to(dtype)
    codes = torch.randint(0, 2048, (4, 5, 16), generator=torch.Generator().manual_seed(8))
    tables = [talker.model.codec_embedding] + list(talker.code_predictor.model.codec_embedding)
    want = torch.stack([tables[g](codes[..., g]) for g in range(16)], dim=-2).sum(-2)
    with torch.inference_mode():
        got = talker.embed_frame(codes)
    assert got.dtype == dtype and torch.equal(got, want)


def test_new_caches_take_the_dtype_asked_for_and_the_models_by_default():
    """M21: `Talker.new_cache(dtype=...)` makes its buffers in that dtype (a bf16 cache for an fp32 model, as asked);
    without one, the model's; the code predictor's per-frame cache holds its 16 positions' keys, static."""
    talker = _talker(fuse=False)
    assert talker.new_cache(2, 8, dtype=torch.bfloat16).k[0].dtype == torch.bfloat16
    assert talker.new_cache(2, 8).v[-1].dtype == torch.float32
    cp_cache = talker.code_predictor.new_cache(3)
    assert cp_cache.static and cp_cache.capacity >= talker.code_predictor.cfg.num_code_groups


def test_a_packed_linear_follows_a_weight_replaced_by_a_new_tensor():
    """M38: a packed linear whose weight is replaced by a new tensor (`load_state_dict(assign=True)`, a new
    Parameter: a fresh version counter, equal to the old one's) computes with the new weight: the packed copy is
    keyed on the weight's storage as well as its version."""
    from qwen_tts_core.model.layers import pack_linears_, packed_linears

    lin = torch.nn.Linear(16, 8, bias=False)
    lin.load_state_dict({"weight": torch.randn(8, 16)}, assign=True)   # a fresh tensor: version 0
    if not pack_linears_(lin):
        pytest.skip("oneDNN cannot pack linears on this CPU")
    x = torch.randn(2, 16)
    with packed_linears(True):
        lin(x)
        lin.load_state_dict({"weight": torch.randn(8, 16)}, assign=True)
        torch.testing.assert_close(lin(x), x @ lin.weight.T, **TOL)


def test_a_stack_is_the_pre_norm_residual_formula_written_out():
    """M65 M76 M63: `run_stack` (each layer's norms fused with the residual adds) is the reference's pre-norm
    decoder written out: h += attn(input_norm(h)); h += mlp(post_attention_norm(h)) per layer, then the final norm
    of h, the last layer's MLP output included."""
    talker = _talker(seed=4)
    stack = talker.model
    B, T = 2, 4
    x = torch.randn(B, T, talker.cfg.hidden_size, generator=torch.Generator().manual_seed(9))
    pos = torch.arange(T)[None].expand(B, T)
    with torch.inference_mode():
        got = run_stack(stack.layers, stack.norm, talker.rope, x, pos, talker.new_cache(B, T).layers(None, T),
                        _causal(T, B))
        cos, sin = talker.rope(pos, x.dtype)
        h = x
        for layer, cache in zip(stack.layers, talker.new_cache(B, T).layers(None, T)):
            h = h + layer.self_attn(layer.input_layernorm(h), cos, sin, cache, pos, _causal(T, B))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        want = stack.norm(h)
    torch.testing.assert_close(got, want, **TOL)


def test_packed_products_follow_an_inference_tensor_weight_changed_in_inference_mode():
    """DEFECT (fixed with this test, model review): a talker whose weights are inference tensors (built or loaded under
    `torch.inference_mode()`, as a job may do) and packed for CPU (`pack_linears_`), then given new weights in place
    inside inference mode (`load_state_dict`), computed with the stale packed copies: such a weight has no version
    counter and `weight_key` took it as unchangeable. A packed product computes with the live weight."""
    from qwen_tts_core.model.layers import pack_linears_, packed_linears

    with torch.inference_mode():
        talker = _talker(seed=1)
    new = _talker(seed=2)
    if not pack_linears_(talker):
        pytest.skip("oneDNN cannot pack linears on this CPU")
    x = torch.randn(2, 3, talker.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    pos = torch.arange(3)[None].expand(2, 3)
    with torch.inference_mode(), packed_linears(True):
        talker(x, pos, talker.new_cache(2, 3))          # packs every weight
        talker.load_state_dict(new.state_dict())
        got = talker(x, pos, talker.new_cache(2, 3))
        want = new(x, pos, new.new_cache(2, 3))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)


def test_a_model_loaded_under_inference_mode_keeps_weights_that_packed_products_can_follow(checkpoint_factory):
    """The fix above leaves an inference tensor's linears unpacked; so that a caller who loads under
    `torch.inference_mode()` (a job's or a notebook's whole script) keeps the packed CPU products, the loaders make
    normal tensors there (`Qwen3TTSModel.from_pretrained`, `load_codec`): their version counters let a packed copy
    follow a weight replaced in place inside inference mode."""
    from qwen_tts_core import Qwen3TTSModel
    from qwen_tts_core.codec.load import load_codec
    from qwen_tts_core.model.layers import pack_linears_, packed_linears

    path = checkpoint_factory()
    with torch.inference_mode():
        m = Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="float32")
        codec = load_codec(path / "speech_tokenizer")
    assert not any(p.is_inference() for p in m.talker.parameters())
    assert not any(p.is_inference() for p in codec.decoder.parameters())
    talker = m.talker
    if not pack_linears_(talker):
        pytest.skip("oneDNN cannot pack linears on this CPU")
    new = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3)) if v.is_floating_point()
           else v for k, v in talker.state_dict().items()}
    x = torch.randn(2, 3, talker.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    pos = torch.arange(3)[None].expand(2, 3)
    with torch.inference_mode():
        with packed_linears(True):
            talker(x, pos, talker.new_cache(2, 3))          # packs every weight
        talker.load_state_dict(new)
        with packed_linears(True):
            got = talker(x, pos, talker.new_cache(2, 3))
        want = talker(x, pos, talker.new_cache(2, 3))      # torch's products on the live weights
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
