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
    ("bfloat16", "torch", "grouped", "grouped"),
])
def test_decode_attention_layout_on_cpu(checkpoint_factory, dtype, sampler, layout, cp_layout):
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu", dtype=dtype)
    assert Engine(m, max_sessions=2, sampler=sampler).sdpa == {"layout": layout, "cp_layout": cp_layout}
