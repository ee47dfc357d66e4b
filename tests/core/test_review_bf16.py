"""The production dtype on CPU: a bf16 model (talker, code predictor, speaker encoder in bf16; the codec fp32 unless
audio_dtype says otherwise), on the tiny checkpoint. What is pinned here:
- the samplers get fp32 logits from the bf16 heads (as transformers' generate casts them before its processors:
  top-k/top-p/temperature/repetition penalty on bf16 logits would draw other ids);
- the device sampler's seeded sessions give the same codes batched with texts of other lengths as alone (README:
  "in fp32 and bf16"), and incremental text the whole text's codes;
- a voice made by a bf16 model survives save/load (stored fp32, exact for bf16 values) and gives the same codes;
- the streamed audio of a bf16 model (fp32 codec by default) equals the offline decode of its codes, finite, in [-1, 1].
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import qwen_tts_core.generate.runner as runner_mod
from qwen_tts_core import (
    Engine,
    Qwen3TTSModel,
    SamplingParams,
    SynthesisRequest,
    load_voice_prompt,
    save_voice_prompt,
)

SAMPLED = SamplingParams(max_new_tokens=16, top_k=20, subtalker_top_k=20, top_p=0.9, subtalker_top_p=0.85,
                         repetition_penalty=1.1)
GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=16)
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Good morning!"]


@pytest.fixture(scope="module")
def cv16(checkpoint_factory):
    return Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu",
                                         dtype="bfloat16")


@pytest.fixture(scope="module")
def base16(checkpoint_factory):
    return Qwen3TTSModel.from_pretrained(checkpoint_factory("base", "tiny"), device_map="cpu", dtype="bfloat16")


def cv_req(text, sampling=SAMPLED, seed=11, **kw) -> SynthesisRequest:
    kw.setdefault("decode_audio", False)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", sampling=sampling,
                            seed=seed, **kw)


def run(eng: Engine, reqs):
    sessions = [eng.add(r) for r in reqs]
    chunks = []
    while not all(s.done for s in sessions):
        chunks += eng.step()
    return sessions, chunks


def test_bf16_heads_hand_the_samplers_fp32_logits(cv16, monkeypatch):
    """The talker's and the code predictor's bf16 heads: their logits reach the device sampler (and the talker's
    processors) as fp32, every draw of a seeded, top-p, penalised session."""
    assert cv16.dtype == torch.bfloat16
    seen = {"talker": set(), "sample": set()}
    processors, sampler = runner_mod.talker_logits_batch, runner_mod.sample_device

    def processors_spy(logits, *a, **k):
        seen["talker"].add(logits.dtype)
        return processors(logits, *a, **k)

    def sampler_spy(logits, *a, **k):
        seen["sample"].add((logits.shape[-1], logits.dtype))
        return sampler(logits, *a, **k)

    monkeypatch.setattr(runner_mod, "talker_logits_batch", processors_spy)
    monkeypatch.setattr(runner_mod, "sample_device", sampler_spy)
    (s,), _ = run(Engine(cv16, max_sessions=2), [cv_req(TEXTS[0])])
    assert s.error is None and len(s.frames) >= 3
    vocab, codebook = cv16.cfg.talker.vocab_size, cv16.cfg.talker.code_predictor.vocab_size
    assert seen["talker"] == {torch.float32}
    assert seen["sample"] == {(vocab, torch.float32), (codebook, torch.float32)}


@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_bf16_seeded_sessions_batched_with_other_lengths_equal_each_alone(cv16, sampling):
    """README: on CPU the default engine's codes of a batched session equal the same request alone, bit for bit,
    sampled ones too, in bf16. Non-streaming-mode prompts of three lengths: the shorter rows' keys are read beside
    the longer ones' (with enable_gqa and exact key reads, as the torch sampler does, bf16 codes part at frame 6-12
    here)."""
    reqs = [cv_req(t, sampling=sampling, seed=11 + i, non_streaming_mode=True) for i, t in enumerate(TEXTS)]
    batched, _ = run(Engine(cv16, max_sessions=4), reqs)
    for r, b in zip(reqs, batched):
        (alone,), _ = run(Engine(cv16, max_sessions=1), [r])
        assert b.error is None and len(b.frames) >= 3
        assert torch.equal(b.codes(), alone.codes()), r.text


def test_bf16_incremental_text_equals_the_whole_text(cv16):
    """README: incremental text's codes equal the whole text's bit for bit with the device sampler on CPU, bf16
    included (where oneDNN runs bf16)."""
    if not runner_mod.packs_linears(cv16.talker, "device"):
        pytest.skip("oneDNN cannot pack bf16 on this CPU (the promise is to rounding there)")
    text = TEXTS[1]
    eng = Engine(cv16, max_sessions=2)
    (whole,), _ = run(eng, [cv_req(text, seed=4)])
    s = eng.add(cv_req(None, seed=4))
    for piece in (text[:7], text[7:20], text[20:]):
        s.append_text(piece)
        eng.step()
    s.end_text()
    while not s.done:
        eng.step()
    assert s.error is None
    assert torch.equal(s.codes(), whole.codes())


def test_a_bf16_models_voice_survives_save_and_load(base16, ref_wav_path, tmp_path):
    """create_voice_clone_prompt on a bf16 model gives a bf16 speaker vector; the file stores it as fp32 (exact) and
    the loaded voice gives the in-memory voice's codes, ICL and x-vector, greedy and seeded."""
    (icl,) = base16.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    (xvec,) = base16.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)
    assert icl.ref_spk_embedding.dtype == torch.bfloat16 and icl.ref_code.dtype == torch.long
    for i, item in enumerate((icl, xvec)):
        back = load_voice_prompt(save_voice_prompt(item, tmp_path / f"v{i}.safetensors"))
        assert back.ref_spk_embedding.dtype == torch.float32
        assert torch.equal(back.ref_spk_embedding.to(torch.bfloat16), item.ref_spk_embedding)
        assert torch.equal(back.ref_spk_embedding, item.ref_spk_embedding.float())
        for sp, seed in ((GREEDY, None), (SAMPLED, 3)):
            reqs = [SynthesisRequest(kind="voice_clone", text=TEXTS[0], language="english", voice_clone_prompt=vp,
                                     sampling=sp, seed=seed, decode_audio=False) for vp in (item, back)]
            (a,), _ = run(Engine(base16, max_sessions=1), reqs[:1])
            (b,), _ = run(Engine(base16, max_sessions=1), reqs[1:])
            assert a.error is None and b.error is None
            assert torch.equal(a.codes(), b.codes())


def test_bf16_models_streamed_audio_equals_the_offline_decode(cv16):
    """The codec stays fp32 for a bf16 model (audio_dtype None): the streamed chunks of two sessions decoded together
    equal the offline decode of each one's codes (< 1e-4), finite and within [-1, 1]."""
    reqs = [cv_req(t, seed=21 + i, decode_audio=True) for i, t in enumerate(TEXTS[:2])]
    sessions, chunks = run(Engine(cv16, max_sessions=2), reqs)
    offline = cv16.decode_codes([s.codes() for s in sessions])
    for s, off in zip(sessions, offline):
        pcm = np.concatenate([c.pcm for c in chunks if c.session_id == s.id])
        assert pcm.dtype == np.float32 and pcm.shape == off.shape and pcm.size > 0
        assert np.isfinite(pcm).all() and np.abs(pcm).max() <= 1.0
        assert np.abs(pcm - off).max() < 1e-4
