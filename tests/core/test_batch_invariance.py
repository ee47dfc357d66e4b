"""A session's codes do not depend on who it is batched with (the device sampler's promise: the same codes alone or
batched, greedy or seeded), at the full 0.6B size where it is hardest: oneDNN's single-row kernels and SDPA over
padded prompts give other last bits than a batch does, and greedy bf16 codes follow the last bits within a few
frames. Tiny models hide this (their products are too small for the kernels that differ)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest, make_checkpoint
from qwen_tts_core.generate.runner import prefill_groups

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8)
SAMPLED = SamplingParams(max_new_tokens=8)
TEXTS = ["Hi.", "The quick brown fox jumps over the lazy dog, twice, and then once more for luck.", "Good morning!",
         "Press one for sales, two for support."]


def req(i: int, sampling: SamplingParams, non_streaming: bool) -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=TEXTS[i], speaker="vivian", language="english",
                            sampling=sampling, seed=40 + i, decode_audio=False, non_streaming_mode=non_streaming)


@pytest.fixture(scope="module")
def full_bf16(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("full") / "cv-0.6b", "custom_voice", "0.6b", dtype="bfloat16")
    return Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="bfloat16")


@pytest.mark.slow
def test_full_size_bf16_sessions_batched_equal_each_alone(full_bf16):
    """Four sessions started together (two prompt lengths in streaming mode, two longer ones in non-streaming mode),
    greedy and seeded: every session's codes equal its run alone."""
    eng = Engine(full_bf16, max_sessions=4)
    assert eng.sdpa == {"layout": "grouped", "cp_layout": "grouped"}
    reqs = [req(0, GREEDY, False), req(1, SAMPLED, True), req(2, GREEDY, True), req(3, SAMPLED, False)]
    together = eng.run_all(reqs)
    assert len({s.prompt.prefill.shape[0] for s in together}) >= 3
    for r, s in zip(reqs, together):
        alone = Engine(full_bf16, max_sessions=1).run_all([r])[0]
        assert s.error is None and torch.equal(s.codes(), alone.codes()), r.text


def test_without_buckets_only_prompts_of_one_length_share_a_prefill(model_factory, prefill_rows):
    model = model_factory("custom_voice", "tiny")
    reqs = [req(0, GREEDY, False), req(2, GREEDY, False), req(1, GREEDY, True)]  # two of one length, one longer
    eng = Engine(model, max_sessions=3)
    sessions = eng.run_all(reqs)
    lens = [s.prompt.prefill.shape[0] for s in sessions]
    assert lens[0] == lens[1] < lens[2], lens
    assert sorted(prefill_rows) == [1, 2], prefill_rows


def test_prefill_groups_without_padding_group_equal_lengths():
    assert prefill_groups([10, 12, 10, 12, 30], pad=False) == [[0, 2], [1, 3], [4]]
    assert prefill_groups([10] * 3, pad=False) == [[0, 1, 2]]
    assert prefill_groups([2048, 2048, 2048], pad=False) == [[0, 1], [2]]  # still within PREFILL_TOKENS


@pytest.mark.parametrize(("dtype", "sampler", "layout", "cp_layout"), [
    ("float32", "device", "grouped", "gqa"),   # batch-invariant talker; SDPA's kernel is faster for the predictor
    ("float32", "torch", "gqa", "gqa"),        # the reference's numbers
    ("bfloat16", "device", "grouped", "grouped"),
    ("bfloat16", "torch", "gqa", "gqa"),       # the reference's numbers in bf16 too (its SDPA call; grouped summed
])                                             # some rows in another order: a last bit that flipped a near tie)
def test_decode_attention_layout_on_cpu(checkpoint_factory, dtype, sampler, layout, cp_layout):
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu", dtype=dtype)
    assert Engine(m, max_sessions=2, sampler=sampler).sdpa == {"layout": layout, "cp_layout": cp_layout}


@pytest.mark.parametrize(("kernels", "layout", "cp_layout"), [
    ({}, "grouped", "gqa"),                                          # every layout fused
    ({"grouped": "MATH", "cp_gqa": "MATH"}, "grouped_float", "grouped"),
    ({"grouped": "MATH", "grouped_float": "MATH", "cp_gqa": "MATH", "cp_grouped": "MATH"}, "gqa", "gqa"),
])
def test_cuda_layout_probe_never_picks_math_where_a_fused_kernel_exists(checkpoint_factory, monkeypatch, kernels,
                                                                         layout, cp_layout):
    """The CUDA branch of `choose_decode_layout` (`probe_decode_layouts`), run here on CPU tensors with the SDPA
    kernel choice faked per layout: shapes are the model's (the predictor's keys: its 16 codebooks + 1)."""
    from qwen_tts_core.model import layers

    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu", dtype="float32")
    r = Engine(m, max_sessions=2).runner
    seen = []

    def fake(q, k, v, mask=None, is_causal=False, enable_gqa=False):
        cp = k.shape[2] == m.talker.code_predictor.cfg.num_code_groups + 1
        name = ("cp_" if cp else "") + ("gqa" if enable_gqa else "grouped_float" if mask is not None and
                                        mask.dtype != torch.bool else "grouped")
        assert enable_gqa or q.shape[1] == k.shape[1], name  # grouped: as many query heads as key heads
        seen.append(name)
        return kernels.get(name, "FLASH_ATTENTION")

    monkeypatch.setattr(layers, "sdpa_backend", fake)
    found = r.probe_decode_layouts()
    assert sorted(seen) == ["cp_gqa", "cp_grouped", "gqa", "grouped", "grouped_float"]
    assert (found["layout"], found["cp_layout"]) == (layout, cp_layout)


def test_with_buckets_a_prompt_past_the_longest_bucket_is_prefilled_as_alone(model_factory, monkeypatch):
    """Review of the engine: with buckets (static caches, graphs) sessions starting together were grouped with
    padding allowed, but a prompt longer than the longest prefill bucket goes the exact eager way, where it was padded
    to the longest prompt of its group: its prefill differed in the last bits from its prefill alone."""
    from qwen_tts_core.generate import runner as R

    model = model_factory("custom_voice", "tiny")
    base = "The quick brown fox jumps over the lazy dog while the rain keeps falling on the old town square. "
    texts = [base * 6, base * 6 + "Then it ended all.", "Hi."]
    caught: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    real = R.prefill

    def spy(talker, cache, slots, embeds, last):
        hidden, logits = real(talker, cache, slots, embeds, last)
        caught.extend((int(s), h.clone(), lg.clone()) for s, h, lg in zip(slots, hidden, logits))
        return hidden, logits

    monkeypatch.setattr(R, "prefill", spy)

    def prefill_of(reqs):
        caught.clear()
        eng = Engine(model, static=True, max_sessions=3, max_len=512, batch_buckets=(1, 2, 4))
        sessions = [eng.add(r) for r in reqs]
        eng.step()
        return sessions, {slot: (h, lg) for slot, h, lg in caught}

    def r(text):
        return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english",
                                sampling=GREEDY, decode_audio=False, non_streaming_mode=True)

    (alone,), one = prefill_of([r(texts[0])])
    together, three = prefill_of([r(t) for t in texts])
    lens = [s.prompt.prefill.shape[0] for s in together]
    assert lens[0] > R.PREFILL_GRAPH_LENS[-1] and lens[1] > lens[0] and lens[2] <= R.PREFILL_GRAPH_LENS[-1], lens
    h1, l1 = one[alone.slot]
    h3, l3 = three[together[0].slot]
    assert torch.equal(h1, h3) and torch.equal(l1, l3)
