"""True streaming: audio chunks leave while codes are generated, and their concatenation equals the offline
waveform for any chunk schedule (the codec decoder carries its state; nothing is re-decoded)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.codec.context import ContextCache

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=20)
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.mark.parametrize("first,every", [
    pytest.param(1, 4, id="default-1-then-4"),
    pytest.param(1, 1, id="frame-by-frame"),
    pytest.param(3, 5, id="3-then-5"),
    pytest.param(50, 50, id="one-chunk"),
])
@pytest.mark.parametrize("non_streaming_mode", [True, False], ids=["nsm", "sm"])
def test_stream_equals_offline(model, first, every, non_streaming_mode):
    (offline,), _ = model.generate_custom_voice(TEXT, speaker="ryan", language="english",
                                                non_streaming_mode=non_streaming_mode, **G)
    chunks = list(model.stream_custom_voice(TEXT, speaker="ryan", language="english", first_chunk_frames=first,
                                            chunk_frames=every, non_streaming_mode=non_streaming_mode, **G))
    sizes = [len(c) // 1920 for c in chunks]
    assert sizes[0] == min(first, sum(sizes)) and all(s <= max(first, every) for s in sizes)
    stream = np.concatenate(chunks)
    assert stream.shape == offline.shape
    assert np.abs(stream - offline).max() <= 1e-4


def test_first_chunk_leaves_before_generation_ends(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(SynthesisRequest(kind="custom_voice", text=TEXT, speaker="ryan", language="english",
                                 sampling=SamplingParams(**G), first_chunk_frames=1, chunk_frames=4))
    first = eng.step()
    assert len(first) == 1 and first[0].num_frames == 1 and not first[0].is_last
    assert s.num_frames == 1 and not s.done


def test_sessions_stream_side_by_side(model):
    eng = Engine(model, max_sessions=3)
    texts = [TEXT, "Good morning!", "Press one for sales, two for support."]
    sessions = [eng.add(SynthesisRequest(kind="custom_voice", text=t, speaker="vivian", language="english",
                                         sampling=SamplingParams(**G), chunk_frames=3)) for t in texts]
    got: dict[int, list[np.ndarray]] = {s.id: [] for s in sessions}
    last: dict[int, str] = {}
    while eng.has_work():
        for ch in eng.step():
            got[ch.session_id].append(ch.pcm)
            if ch.is_last:
                last[ch.session_id] = ch.finish_reason
    for s, t in zip(sessions, texts):
        (offline,), _ = model.generate_custom_voice(t, speaker="vivian", language="english",
                                                    non_streaming_mode=False, **G)
        assert last[s.id] == "max_new_tokens"
        assert np.abs(np.concatenate(got[s.id]) - offline).max() <= 1e-4


def test_a_session_whose_audio_cannot_decode_fails_alone(model):
    """One session's frame the codec cannot decode (a code outside the codebook, as a NaN draw once gave) failed
    the batched decode of every session sharing the call. Now that session ends with an error and the others
    stream exactly their offline audio."""
    eng = Engine(model, max_sessions=3, audio_dtype=None)
    eng.audio.call_cost, eng.audio.max_call_frames = float("inf"), 0  # one call for every due row, as on a GPU
    texts = [TEXT, "Good morning!", "Press one for sales, two for support."]
    sessions = [eng.add(SynthesisRequest(kind="custom_voice", text=t, speaker="vivian", language="english",
                                         sampling=SamplingParams(**G), chunk_frames=3)) for t in texts]
    push, pushes = eng.audio.push, []

    def corrupting_push(keys, codes):
        pushes.append(1)
        if len(pushes) == 6 and sessions[1].id in keys:
            codes = codes.clone()
            codes[keys.index(sessions[1].id), 3] = 5000
        return push(keys, codes)
    eng.audio.push = corrupting_push
    got: dict[int, list[np.ndarray]] = {s.id: [] for s in sessions}
    last = {}
    while eng.has_work():
        for ch in eng.step():
            got[ch.session_id].append(ch.pcm)
            if ch.is_last:
                last[ch.session_id] = ch
    bad = last[sessions[1].id]
    assert bad.finish_reason == "error" and "index out of range" in bad.error
    assert sum(len(x) for x in got[sessions[1].id]) < 6 * 1920
    for s, t in ((sessions[0], texts[0]), (sessions[2], texts[2])):
        (offline,), _ = model.generate_custom_voice(t, speaker="vivian", language="english",
                                                    non_streaming_mode=False, **G)
        assert last[s.id].finish_reason == "max_new_tokens"
        assert np.abs(np.concatenate(got[s.id]) - offline).max() <= 1e-4
    assert eng.audio.num_open == 0 and not eng.has_work()


def test_voice_clone_icl_stream_equals_offline(model_factory, ref_wav_path):
    base = model_factory("base", "tiny")
    items = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    (offline,), _ = base.generate_voice_clone("Hello world.", voice_clone_prompt=items, language="english", **G)
    stream = np.concatenate(list(base.stream_voice_clone("Hello world.", voice_clone_prompt=items,
                                                         language="english", chunk_frames=2, **G)))
    # the reference cuts the reference audio at int(ratio * samples), which can keep one extra leading sample
    assert 0 <= len(offline) - len(stream) <= 1
    assert np.abs(stream - offline[len(offline) - len(stream):]).max() <= 1e-4


def test_voice_clone_sessions_of_one_voice_decode_its_reference_once(model_factory, ref_wav_path, monkeypatch):
    """The reference's decoder state is computed for the first session of a voice and copied for the next ones
    (in this engine or another on the model): the same audio bit for bit, from a voice prompt loaded again."""
    base = model_factory("base", "tiny")
    (item,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    again = dataclasses.replace(item, ref_code=item.ref_code.clone())  # e.g. the voice read from a store again
    cache = ContextCache()
    monkeypatch.setattr(base.codec.decoder, "context_cache", cache)  # empty: other tests used this voice
    misses = 0

    def run(engine, prompt):
        s = engine.add(SynthesisRequest(kind="voice_clone", text="Hello world.", voice_clone_prompt=prompt,
                                        language="english", sampling=SamplingParams(**G), chunk_frames=3))
        pcm = []
        while not s.done:
            pcm += [c.pcm for c in engine.step() if c.session_id == s.id]
        return np.concatenate(pcm)

    eng = Engine(base, max_sessions=2)
    first = run(eng, item)
    assert cache.misses == misses + 1
    for out in (run(eng, again), run(Engine(base, max_sessions=1), again)):
        assert np.array_equal(out, first)
    assert cache.misses == misses + 1


@pytest.mark.parametrize("kw", [dict(first_chunk_frames=0), dict(chunk_frames=0), dict(chunk_frames=-3)])
def test_bad_chunk_sizes(model, kw):
    with pytest.raises(ValueError, match="chunk_frames"):
        model.stream_custom_voice(TEXT, speaker="ryan", **kw)


def test_streaming_takes_one_text(model):
    with pytest.raises(ValueError, match="text"):
        model.stream_custom_voice([TEXT, TEXT], speaker="ryan")


def test_bf16_audio_decoder_streams_close_to_fp32(model):
    r = lambda: SynthesisRequest(kind="custom_voice", text=TEXT, speaker="ryan", language="english",  # noqa: E731
                                 sampling=SamplingParams(**G), chunk_frames=3)
    outs = []
    for dt in (None, "bfloat16"):
        eng = Engine(model, max_sessions=1, audio_dtype=dt)
        s = eng.add(r())
        pcm = []
        while not s.done:
            pcm += [c.pcm for c in eng.step()]
        outs.append(np.concatenate(pcm))
    assert outs[0].shape == outs[1].shape and np.isfinite(outs[1]).all()
    rms = lambda x: float(np.sqrt(np.mean(x ** 2)))  # noqa: E731
    # bf16 rounding, not another signal: under 5 % of the signal's RMS on earlier sessions' CPUs, 5.1 % on an
    # AVX-only CPU (no native bf16: other convolution kernels); a wrong state or frame is far above 10 %
    assert rms(outs[0] - outs[1]) < 0.1 * rms(outs[0])
    assert np.corrcoef(outs[0], outs[1])[0, 1] > 0.99
    with pytest.raises(ValueError, match="audio_dtype"):
        Engine(model, max_sessions=1, audio_dtype="int7")
