"""Incremental text (`Engine.add` with text=None, then `append_text` / `end_text`) gives the same prompt embeddings,
bit for bit, and the same codes as the text sent whole, on the device sampler's CPU engine, at the real width of the
talker's text projection (text_hidden_size 2048). There torch's GEMM gives a row other last bits alone than among
others (fp32, K >= 2048: every single row), and an incremental session projects its text in the pieces it was
committed in: the engine projects text under its talker steps' packed oneDNN linears (`Engine.text_projection`),
whose rows do not depend on how many are projected together. Tiny models (text width 64) cannot show this.

Also: a growing KV cache never holds more than max_len positions."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest, make_checkpoint
from qwen_tts_core.model.kv_cache import KVCache
from qwen_tts_core.model.layers import ResizeMLP

TEXT_WIDTH = 2048  # the published text_hidden_size (0.6B and 1.7B)
TEXT = "The quick brown fox jumps over the lazy dog, twice. Good morning! How are you today?"


class CompactTextEmbedding(nn.Module):
    """A text embedding of width `width` for every id of a `vocab`-sized vocabulary, from a table of `rows` rows
    (id -> row id % rows): the real width without the real table (151936 x 2048 fp32 is 1.2 GB)."""

    def __init__(self, vocab: int, rows: int, width: int, g: torch.Generator) -> None:
        super().__init__()
        self.register_buffer("rows", torch.arange(vocab) % rows, persistent=False)
        self.table = nn.Parameter(torch.randn(rows, width, generator=g), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[self.rows[ids]]


@pytest.fixture(scope="module")
def wide_text_model(tmp_path_factory):
    """A tiny CustomVoice model (fp32) whose text embedding and projection have the real width: the projection is a
    ResizeMLP(2048, 2048, hidden) as in the 0.6B/1.7B checkpoints (fan-in scaled random weights), the rest tiny.
    Swapped in before any engine packs the talker's linears (the config keeps text_hidden_size 64: only the modules
    read it, at construction)."""
    path = make_checkpoint(tmp_path_factory.mktemp("wide-text") / "cv", "custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="float32")
    talker = model.talker
    assert not getattr(talker, "_packed_linears", False)
    g = torch.Generator().manual_seed(7)
    t = model.cfg.talker
    talker.model.text_embedding = CompactTextEmbedding(t.text_vocab_size, 1021, TEXT_WIDTH, g)
    proj = ResizeMLP(TEXT_WIDTH, TEXT_WIDTH, t.hidden_size)
    with torch.no_grad():
        for lin in (proj.linear_fc1, proj.linear_fc2):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.weight.shape[1] ** 0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
    talker.text_projection = proj.requires_grad_(False)
    return model


def request(text: str | None, sampling: SamplingParams) -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", sampling=sampling,
                            seed=11, decode_audio=False)


def pieces_of(text: str, rng: random.Random) -> list[str]:
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 9)
        out.append(text[i:i + n])
        i += n
    return out


GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=24)
SAMPLED = SamplingParams(max_new_tokens=24)


def test_torch_gemm_rows_depend_on_the_row_count_at_this_width(wide_text_model):
    """The premise: without the packed context, one text token projected alone gets other bits than among others
    (so this model can show the bug that the engine's text projection fixes)."""
    talker = wide_text_model.talker
    ids = torch.arange(100, 112)
    with torch.inference_mode():
        together = talker.embed_text(ids)
        alone = torch.cat([talker.embed_text(ids[i:i + 1]) for i in range(len(ids))])
    assert not torch.equal(together, alone)


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_incremental_text_equals_whole_text_bit_for_bit(wide_text_model, sampling):
    model = wide_text_model
    whole = Engine(model, max_sessions=1).run_all([request(TEXT, sampling)])[0]
    assert whole.error is None and len(whole.frames) > 1
    assert Engine(model, max_sessions=1).runner.packed  # the device sampler's CPU engine: packed linears
    rng = random.Random(3)
    partial_admissions = 0
    for split in range(4):
        pieces = pieces_of(TEXT, rng)
        eng = Engine(model, max_sessions=1)
        s = eng.add(request(None, sampling))
        admitted_with = None
        if split == 3:  # every piece before the first step: admitted with all but the tail, the rest at end_text
            for p in pieces:
                s.append_text(p)
        else:           # a piece per step, as a live client sends them
            for p in pieces:
                s.append_text(p)
                eng.step()
                if admitted_with is None and s.prompt is not None:
                    admitted_with = len(s.prompt.trailing)
        s.end_text()
        while not s.done:
            eng.step()
        assert s.error is None, s.error
        if admitted_with is not None and admitted_with + 2 < len(whole.prompt.trailing):
            partial_admissions += 1
        label = f"split {split}: {pieces}"
        prefill_equal = torch.equal(s.prompt.prefill, whole.prompt.prefill)
        assert prefill_equal, f"{label}: prefill embeddings differ"
        assert len(s.prompt.trailing) == len(whole.prompt.trailing), label
        differing = [j for j, (a, b) in enumerate(zip(s.prompt.trailing, whole.prompt.trailing))
                     if not torch.equal(a, b)]
        assert differing == [], f"{label}: trailing text embeddings {differing} differ"
        codes_equal = torch.equal(s.codes(), whole.codes())
        assert codes_equal, f"{label}: codes differ"
        assert s.finish_reason == whole.finish_reason, label
    assert partial_admissions >= 2  # sessions really started with part of the text and projected the rest later


@pytest.mark.parametrize("sampler", ["device", "torch"])
def test_the_pad_fed_after_the_text_is_the_prompts_own(wide_text_model, sampler):
    """The tts_pad a step feeds once a session's text is used up is the row of the [bos, eos, pad] projection that
    the prompt (and the reference) uses, bit for bit, in each sampler's linears (before: the pad projected alone)."""
    eng = Engine(wide_text_model, max_sessions=1, sampler=sampler)
    s = eng.run_all([request(TEXT, GREEDY)])[0]
    assert eng.runner.packed == (sampler == "device")
    pad_equal = torch.equal(eng.runner.tts_pad, s.prompt.tts_pad)
    assert pad_equal


def test_kv_cache_growth_stops_at_its_limit():
    c = KVCache(1, 1, 1, 4, 256)
    c.ensure(300, limit=400)
    assert c.capacity == 400 and c.k[0].shape[2] == 400
    c.ensure(400, limit=400)
    assert c.capacity == 400
    free = KVCache(1, 1, 1, 4, 256)
    free.ensure(300)  # no limit: doubles
    assert free.capacity == 512


def test_growing_engine_cache_never_exceeds_max_len(model_factory):
    model = model_factory("custom_voice", "tiny")
    eng = Engine(model, max_sessions=2, max_len=200, initial_cache_len=128)  # grows from 128 as sessions need
    assert eng.runner.cache.capacity == 128
    sp = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=1000, repetition_penalty=1.0)
    s = eng.add(request(TEXT * 2, sp))
    most = 0
    while not s.done:
        eng.step()
        most = max(most, eng.runner.cache.capacity)
    if s.pos <= 128:  # the session ended early (EOS): grow the cache as a longer session would
        eng.runner._ensure_len(s.pos + 100)
        most = eng.runner.cache.capacity
    assert most == 200, most  # doubling would make it 256
    assert all(k.shape[2] == 200 and v.shape[2] == 200 for k, v in zip(eng.runner.cache.k, eng.runner.cache.v))
