"""Sessions admitted in one step share batched prefills (runner.start_many): each row's codes are those of its
session alone, prompts are grouped (on CPU one length a pass: test_batch_invariance.py; padded to buckets under
graphs: test_graphs.py), and a failed prefill fails only its sessions."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate import runner as runner_mod
from qwen_tts_core.generate.runner import PREFILL_PAD_SLACK, prefill_groups

SAMPLED = SamplingParams(do_sample=True, subtalker_dosample=True, top_k=50, max_new_tokens=12)
GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=12)
TEXTS = ["Hi.", "The quick brown fox jumps over the lazy dog, twice, and then once more for luck.",
         "Good morning!", "Press one for sales, two for support, or stay on the line."]


def req(text: str, i: int, sampling=SAMPLED, **kw) -> SynthesisRequest:
    # non_streaming_mode puts the whole text in the prompt, so the prompts' lengths differ
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", sampling=sampling,
                            seed=100 + i, decode_audio=False, non_streaming_mode=i % 2 == 1, **kw)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.mark.parametrize("sampling", [SAMPLED, GREEDY], ids=["seeded-sampling", "greedy"])
def test_sessions_prefilled_together_equal_each_alone(model, prefill_rows, sampling):
    requests = [req(t, i, sampling) for i, t in enumerate(TEXTS)]
    lengths = []
    rows = prefill_rows
    eng = Engine(model, max_sessions=4)
    together = eng.run_all(requests)
    lengths = [s.prompt.prefill.shape[0] for s in together]
    assert len(set(lengths)) >= 3, lengths           # really padded: the prompts differ in length
    assert sum(rows) == 4 and len(rows) < 4, rows    # fewer passes than sessions
    for i, (t, s) in enumerate(zip(TEXTS, together)):
        alone = Engine(model, max_sessions=1).run_all([req(t, i, sampling)])[0]
        assert s.finish_reason == alone.finish_reason
        assert torch.equal(s.codes(), alone.codes()), (i, lengths)


def test_the_torch_sampler_prefills_together_too_with_each_rows_generator(model, prefill_rows):
    """The reference sampler draws each row's first id with that row's own generator, batched or not."""
    requests = [req(t, i) for i, t in enumerate(TEXTS[:3])]
    rows = prefill_rows
    together = Engine(model, max_sessions=3, sampler="torch").run_all(requests)
    assert len(rows) < 3
    for i, (t, s) in enumerate(zip(TEXTS, together)):
        alone = Engine(model, max_sessions=1, sampler="torch").run_all([req(t, i)])[0]
        assert torch.equal(s.codes(), alone.codes()), i


def test_a_late_session_prefills_alone_into_a_busy_batch(model):
    """The padding a batched prefill writes past a short row's prompt never reaches that row: a session admitted
    later, into a slot whose previous tenant was long, still equals itself alone."""
    eng = Engine(model, max_sessions=2)
    long_one, short_one = eng.add(req(TEXTS[1], 1)), eng.add(req(TEXTS[0], 0))
    eng.step()
    eng.cancel(long_one)
    eng.step()
    late = eng.add(req(TEXTS[2], 2))
    while eng.has_work():
        eng.step()
    for i, s in ((0, short_one), (2, late)):
        assert torch.equal(s.codes(), Engine(model, max_sessions=1).run_all([req(TEXTS[i], i)])[0].codes())


def test_a_failed_prefill_fails_its_sessions_visibly_frees_their_slots_and_the_engine_goes_on(model, monkeypatch):
    """A prefill that keeps failing (alone too: a shared batch that fails is retried session by session) fails its
    sessions visibly; slots come back and the engine goes on once it works again."""
    eng = Engine(model, max_sessions=3)
    real = eng.runner.start_many
    calls = []

    def broken(starts):
        calls.append(len(starts))
        raise RuntimeError("simulated out of memory in prefill")

    monkeypatch.setattr(eng.runner, "start_many", broken)
    first = [eng.add(req(t, i, GREEDY)) for i, t in enumerate(TEXTS[:3])]
    chunks = eng.step()
    failed = [s for s in first if s.finish_reason == "error"]
    assert len(failed) == 3 and all("simulated out of memory" in s.error for s in failed)
    assert {c.session_id for c in chunks if c.is_last and c.finish_reason == "error"} == {s.id for s in failed}
    assert sum(n == 1 for n in calls) == 3  # each tried alone before it failed
    monkeypatch.setattr(eng.runner, "start_many", real)
    while eng.has_work():
        eng.step()
    assert sorted(eng.free_slots) == [0, 1, 2] and eng.num_active == 0
    again = eng.run_all([req(TEXTS[0], 0, GREEDY)])[0]
    assert again.finish_reason == "max_new_tokens"
    assert torch.equal(again.codes(), Engine(model, max_sessions=1).run_all([req(TEXTS[0], 0, GREEDY)])[0].codes())


def test_a_prompt_that_fails_to_build_does_not_hold_back_the_others(model):
    eng = Engine(model, max_sessions=3, max_len=64)
    huge = "word " * 200
    sessions = eng.run_all([req(TEXTS[0], 0, GREEDY), req(huge, 1, GREEDY), req(TEXTS[2], 2, GREEDY)])
    assert sessions[1].finish_reason == "error" and sessions[1].error_field == "text"
    assert sessions[0].finish_reason == sessions[2].finish_reason == "max_new_tokens"
    assert sorted(eng.free_slots) == [0, 1, 2]


@pytest.mark.parametrize("lengths", [[], [10], [10] * 8, [10, 400, 12, 11], [5, 300, 310, 3000, 4000, 9],
                                     [1] * 70, [4096, 4096], [4097]])
def test_prefill_groups_cover_every_prompt_once_within_their_limits(lengths):
    groups = prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real, padded = sum(lengths[i] for i in g), len(g) * max(lengths[i] for i in g)
        if len(g) > 1:
            assert padded <= runner_mod.PREFILL_TOKENS
            assert padded - real <= PREFILL_PAD_SLACK + real // 4


def test_prefill_groups_put_similar_lengths_together():
    assert prefill_groups([10] * 8) == [list(range(8))]
    assert prefill_groups([10, 400, 12, 11]) == [[0, 3, 2], [1]]
    assert prefill_groups([4096, 4096]) == [[0], [1]]        # two would exceed PREFILL_TOKENS
    assert len(prefill_groups([1] * 70)) == 1


def test_voice_clones_with_references_of_different_lengths_start_together_as_each_alone(model_factory, ref_wav_path):
    """ICL prompts carry their reference's codes: a 0.8 s and a 2.5 s reference give very different prompt lengths.
    Started together (one engine step), each gives its codes and audio alone."""
    import numpy as np
    import soundfile as sf

    base = model_factory("base", "tiny")
    wav, sr = sf.read(ref_wav_path, dtype="float32")
    short, = base.create_voice_clone_prompt((wav[: int(0.8 * sr)], sr), ref_text="Good morning.")
    long_, = base.create_voice_clone_prompt((wav, sr), ref_text="Good morning, how are you today?")
    x_only, = base.create_voice_clone_prompt((wav, sr), x_vector_only_mode=True)

    def vc(i, prompt):
        return SynthesisRequest(kind="voice_clone", text=TEXTS[i], language="english", voice_clone_prompt=prompt,
                                sampling=SAMPLED, seed=7 + i)

    def run(eng, requests):
        sessions = [eng.add(r) for r in requests]
        pcm = {s.id: [] for s in sessions}
        while not all(s.done for s in sessions):
            for c in eng.step():
                pcm[c.session_id].append(c.pcm)
        return [(s, np.concatenate(pcm[s.id])) for s in sessions]

    prompts = [short, long_, x_only]
    together = run(Engine(base, max_sessions=3), [vc(i, p) for i, p in enumerate(prompts)])
    lengths = [s.prompt.prefill.shape[0] for s, _ in together]
    assert len(set(lengths)) == 3, lengths
    for i, (p, (s, pcm)) in enumerate(zip(prompts, together)):
        ((alone, alone_pcm),) = run(Engine(base, max_sessions=1), [vc(i, p)])
        assert torch.equal(s.codes(), alone.codes()), (i, lengths)
        # the batched codec call may take other kernels than a one-row call: equal to 1e-4, as every batched decode
        assert len(pcm) == len(alone_pcm) == s.num_frames * 1920 and np.abs(pcm - alone_pcm).max() <= 1e-4, i


def test_an_incremental_session_starts_with_full_text_ones_as_alone(model):
    def incremental(eng):
        s = eng.add(SynthesisRequest(kind="custom_voice", text=None, speaker="vivian", language="english",
                                     sampling=GREEDY, decode_audio=False))
        for piece in ("Press one ", "for sales, ", "two for support."):
            s.append_text(piece)
        s.end_text()
        return s

    eng = Engine(model, max_sessions=3)
    inc = incremental(eng)
    full = [eng.add(req(t, i, GREEDY)) for i, t in enumerate(TEXTS[:2])]
    while eng.has_work():
        eng.step()
    solo = Engine(model, max_sessions=1)
    inc_alone = incremental(solo)
    while solo.has_work():
        solo.step()
    assert torch.equal(inc.codes(), inc_alone.codes()) and inc.finish_reason == inc_alone.finish_reason
    for i, s in enumerate(full):
        assert torch.equal(s.codes(), Engine(model, max_sessions=1).run_all([req(TEXTS[i], i, GREEDY)])[0].codes())
