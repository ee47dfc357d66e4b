"""Behaviour pinned by a mutation review of the inference engine (qwen_tts_core/generate, text feed, codec rows):
each test here failed on a code change (a "mutant") that the rest of the suite let pass; the change is named in its
docstring. Boundaries of the request checks, the accounting of max_len and max_new_tokens, per-session state."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest, VoiceClonePromptItem
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import (
    MAX_REF_CODE_FRAMES,
    RequestPolicy,
    check_voice_prompt,
    min_positions,
    request_from_fields,
)
from tests.core.test_lifecycle import drain

G = dict(do_sample=False, subtalker_dosample=False)


def req(text, max_new_tokens=8, **kw) -> SynthesisRequest:
    kw.setdefault("decode_audio", False)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english",
                            sampling=SamplingParams(max_new_tokens=max_new_tokens, **G), **kw)


def _icl(model, frames: int = 4, text: str | None = "Some words.") -> VoiceClonePromptItem:
    t = model.cfg.talker
    g = torch.Generator().manual_seed(0)
    return VoiceClonePromptItem(ref_code=torch.randint(0, t.codebook_size, (frames, t.num_code_groups), generator=g),
                                ref_spk_embedding=torch.randn(t.hidden_size, generator=g), x_vector_only_mode=False,
                                icl_mode=True, ref_text=text)


# --- request checks -------------------------------------------------------------------------------------------
def test_non_streaming_mode_without_the_whole_text_is_refused_naming_it(cv):
    """Mutant: the `non_streaming_mode and text is None` check removed (the session waited for text it could not
    take in that layout)."""
    with pytest.raises(RequestError) as e:
        Engine(cv, max_sessions=1).add(req(None, non_streaming_mode=True))
    assert e.value.field == "non_streaming_mode"


def test_an_icl_voice_with_incremental_text_is_refused_naming_text(base):
    """Mutant: the `icl_mode and text is None` check removed."""
    r = SynthesisRequest(kind="voice_clone", text=None, language="english", voice_clone_prompt=_icl(base),
                         sampling=SamplingParams(max_new_tokens=4, **G), decode_audio=False)
    with pytest.raises(RequestError) as e:
        Engine(base, max_sessions=1).add(r)
    assert e.value.field == "text" and "ICL" in e.value.message


def test_a_reference_of_the_longest_duration_is_taken_one_frame_more_is_not(base):
    """Mutant: `len(codes) > MAX_REF_CODE_FRAMES` made `>=` (a voice made from a 120 s reference refused)."""
    t = base.cfg.talker
    for frames, ok in ((MAX_REF_CODE_FRAMES, True), (MAX_REF_CODE_FRAMES + 1, False)):
        vp = VoiceClonePromptItem(torch.zeros(frames, t.num_code_groups, dtype=torch.long),
                                  torch.zeros(t.hidden_size), False, True, "Words.")
        if ok:
            check_voice_prompt(vp, t)
        else:
            with pytest.raises(RequestError, match="ref_code has"):
                check_voice_prompt(vp, t)


def test_a_deployment_cap_on_max_new_tokens_takes_the_cap_itself_and_refuses_one_more(cv):
    """Mutant: `want > policy.max_new_tokens` made `>=` (asking for exactly the cap was refused)."""
    policy = RequestPolicy(max_new_tokens=64)
    r = request_from_fields(cv, text="Hello.", sampling={"max_new_tokens": 64}, policy=policy)
    assert r.sampling.max_new_tokens == 64
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="Hello.", sampling={"max_new_tokens": 65}, policy=policy)
    assert e.value.field == "max_new_tokens"


def test_a_request_that_does_not_say_gets_the_deployment_default_never_more_than_the_checkpoints(cv):
    """Mutants: the default ignored for the cap (`cap = policy.max_new_tokens`), and the checkpoint's own default
    raised to the cap (`max_new_tokens=cap` instead of the smaller of the two)."""
    own = cv.sampling_params().max_new_tokens
    r = request_from_fields(cv, text="Hello.", policy=RequestPolicy(max_new_tokens=own, default_max_new_tokens=5))
    assert r.sampling.max_new_tokens == 5
    r = request_from_fields(cv, text="Hello.", policy=RequestPolicy(max_new_tokens=own + 100))
    assert r.sampling.max_new_tokens == own


# --- max_len: the prompt and its text ------------------------------------------------------------------------
def _positions(model, text: str) -> int:
    """The positions a session of `text` needs (prefill + trailing text), as the engine counts them."""
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(text, max_new_tokens=2))
    eng.step()
    n = s.prompt.prefill.shape[0] + len(s.prompt.trailing)
    drain(eng)
    return n


def test_a_text_needing_exactly_max_len_positions_is_refused_one_less_is_admitted(cv):
    """Mutant: `positions >= max_len` made `>` in check_positions: a session whose last text token would fall on
    the position where it is ended (s.pos + 1 >= max_len) was admitted, its last word never spoken."""
    text = "A sentence of several words, and then some more of them."
    n = _positions(cv, text)
    refused = Engine(cv, max_sessions=1, max_len=n).run_all([req(text)])[0]
    assert refused.finish_reason == "error" and refused.error_field == "text", refused.error
    taken = Engine(cv, max_sessions=1, max_len=n + 1).run_all([req(text)])[0]
    assert taken.error is None, taken.error


def test_an_instruction_that_leaves_no_room_for_one_text_token_is_refused_naming_instruct(cv):
    """Mutant: `min_positions(...) >= max_len` made `>` in make_prompt: at the boundary the instruction's fault was
    reported as the text's."""
    tok = cv.tokenizer
    target, instruct = tok.target("Hello."), "Speak slowly and calmly, with a warm voice."
    need = min_positions(target.role, target.text[:1], True, tok.instruct(instruct))
    s = Engine(cv, max_sessions=1, max_len=need).run_all([req("Hello.", instruct=instruct)])[0]
    assert s.finish_reason == "error" and s.error_field == "instruct", (s.error_field, s.error)


def test_a_refused_text_piece_leaves_no_half_surrogate_held(cv):
    """Mutant: PieceJoiner.push kept a refused piece's trailing high surrogate (set before the check): the caller's
    next, valid, text then ended with 'half of a surrogate pair'. Nothing is taken from a refused piece."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(None))
    with pytest.raises(RequestError):
        s.append_text("\udfffbad\ud83d")      # a lone low surrogate, and a high one at its end
    s.append_text("Hello there.")
    s.end_text()
    (last,) = [c for c in drain(eng) if c.is_last]
    assert last.error is None and last.finish_reason in ("eos", "max_new_tokens")


# --- chunk accounting ----------------------------------------------------------------------------------------
def test_a_codes_only_session_ends_with_a_last_chunk_that_starts_after_its_frames(cv):
    """Mutant: _end_now's start taken from audio_frames for every session: a session with decode_audio=False (no
    audio row, audio_frames stays 0) ended with a last chunk at frame 0 after its frames."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req("Hello there, how are you?", max_new_tokens=5))
    (last,) = [c for c in drain(eng) if c.is_last]
    assert s.finish_reason == "max_new_tokens" and s.num_frames == 4
    assert (last.frame_start, last.num_frames) == (4, 0)


def test_a_cancel_with_frames_not_yet_decoded_ends_where_the_emitted_audio_ends(cv):
    """Mutant: _end_now's start taken from the frames generated for an audio session too: cancelled with frames
    gathered for a chunk not yet decoded, its last chunk claimed to start after audio never emitted."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req("Hello there, how are you today?", max_new_tokens=200, decode_audio=True,
                    first_chunk_frames=1, chunk_frames=8))
    chunks = []
    for _ in range(100):
        chunks += eng.step()
        emitted = sum(c.num_frames for c in chunks)
        if emitted and s.num_frames > emitted + 1:
            break
    assert not s.done and s.num_frames > emitted > 0
    eng.cancel(s)
    chunks += drain(eng)
    last = chunks[-1]
    assert last.is_last and last.finish_reason == "cancelled"
    assert last.frame_start == sum(c.num_frames for c in chunks[:-1]) == emitted
    assert [c.frame_start for c in chunks] == [sum(c.num_frames for c in chunks[:i]) for i in range(len(chunks))]


def test_an_audio_decode_failing_for_one_session_ends_it_alone(cv, monkeypatch):
    """Mutant: _finish sent a failed session with an audio row down the normal ending (its row finished, for a
    final decode) instead of ending it now: the row the failed decode had already dropped was looked up again
    (KeyError), failing the step and with it every other session."""
    eng = Engine(cv, max_sessions=2)
    bad = eng.add(req("Hello there, how are you today?", max_new_tokens=12, decode_audio=True,
                      first_chunk_frames=2, chunk_frames=2))
    good = eng.add(req("Good morning to you all.", max_new_tokens=12, decode_audio=True,
                       first_chunk_frames=2, chunk_frames=2))
    eng.step()
    bank, row = eng.audio.bank, eng.audio.open_rows[bad.id].row
    real = bank.decode

    def decode(rows, lengths):
        if row in rows:
            raise RuntimeError("broken row")
        return real(rows, lengths)

    monkeypatch.setattr(bank, "decode", decode)
    chunks = drain(eng)
    (b_last,) = [c for c in chunks if c.session_id == bad.id and c.is_last]
    (g_last,) = [c for c in chunks if c.session_id == good.id and c.is_last]
    assert b_last.finish_reason == "error" and "broken row" in b_last.error
    assert g_last.error is None and good.finish_reason in ("eos", "max_new_tokens")
    assert sum(c.num_frames for c in chunks if c.session_id == good.id) == good.num_frames
    assert eng.free_slots == [0, 1] and eng.audio.num_open == 0


# --- isolation between sessions ------------------------------------------------------------------------------
SAMPLED = dict(do_sample=True, subtalker_dosample=True, temperature=1.3, top_k=0, top_p=1.0, subtalker_top_k=0)


def sampled(text, max_new_tokens, seed, **kw) -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english", seed=seed,
                            sampling=SamplingParams(max_new_tokens=max_new_tokens, **{**SAMPLED, **kw}),
                            decode_audio=False)


def test_a_session_moved_down_a_slot_keeps_its_seed_counters_and_parameters(cv):
    """Mutants: runner.move left a slot's seed key, its count of drawn ids (the draws' frame counter) or its host
    sampling parameters behind: a session compacted into a freed slot drew with the previous occupant's (here a
    greedy one that drew fewer ids). Each session's codes must be those it gets alone (the device sampler
    draws the same alone or batched)."""
    plan = [("Hi.", 6, 11, G), ("Hello there, how are you?", 16, 22, {}),
            ("Good morning to you all, friends.", 16, 33, {})]
    eng = Engine(cv, max_sessions=3)
    sessions = [eng.add(sampled(*p[:3], **p[3])) for p in plan[:2]]
    eng.step()
    eng.step()
    sessions.append(eng.add(sampled(*plan[2][:3], **plan[2][3])))   # two ids behind the first one
    moved = False
    while eng.has_work():
        eng.step()
        moved = moved or (not sessions[2].done and sessions[2].slot == 0)
    assert moved, "the last session was not compacted into the first one's slot"
    assert sessions[0].num_frames < 6 <= min(s.num_frames for s in sessions[1:])
    for s, p in zip(sessions, plan):
        alone = Engine(cv, max_sessions=1).run_all([sampled(*p[:3], **p[3])])[0]
        assert torch.equal(s.codes(), alone.codes()), (s.id, p)


def test_unseeded_sessions_draw_their_own_seeds(cv):
    """Mutant: every unseeded request got seed 0: two users who sent the same text without a seed got the same
    audio, and any one could replay another's. The seed comes from torch's generator (torch.manual_seed applies)."""
    def run(seed_before):
        torch.manual_seed(seed_before)
        eng = Engine(cv, max_sessions=2)
        return [s.codes() for s in eng.run_all([sampled("Hello there.", 10, None) for _ in range(2)])]

    a, b = run(1)
    assert not torch.equal(a, b)
    again = run(1)
    assert torch.equal(a, again[0]) and torch.equal(b, again[1])


# --- incremental text ----------------------------------------------------------------------------------------
def test_incremental_text_ending_in_whitespace_sent_before_admission_is_spoken(cv):
    """Mutant: IncrementalText forgot that an earlier committed segment was visible once a later, blank one was
    committed (`_done_visible = not is_blank(stable)`): a text whose last piece is a space or a newline, all sent
    before the session started, was refused as empty."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(None, max_new_tokens=4))
    for piece in ("Hello there.", " \n"):
        s.append_text(piece)
    s.end_text()
    drain(eng)
    assert s.error is None and s.finish_reason in ("eos", "max_new_tokens"), s.error
    assert s.incremental.text == "Hello there. \n" and not s.incremental.blank


def test_frames_a_prompt_leaves_room_for_grow_one_by_one_with_max_len_from_none(cv):
    """Mutant: the check after prefill made `s.pos >= max_len` (not `s.pos + 1 >= max_len`, the rule of every later
    id): a prompt one position short of max_len got a frame, as many as one with two positions to spare. A session
    gets max_len - prompt - 1 frames, its last drawn id never getting one (as HF)."""
    text = "Hello there."
    probe = Engine(cv, max_sessions=1)
    s = probe.add(req(text, max_new_tokens=2, non_streaming_mode=True))
    probe.step()
    P, K = s.prompt.prefill.shape[0], len(s.prompt.trailing)
    drain(probe)
    assert K == 0   # non-streaming: the whole text is in the prefill
    for room in (1, 2, 3):
        s = Engine(cv, max_sessions=1, max_len=P + room).run_all([req(text, 50, non_streaming_mode=True)])[0]
        assert (s.finish_reason, s.num_frames) == ("max_new_tokens", room - 1), room


# --- scheduling --------------------------------------------------------------------------------------------
def test_a_bulk_session_that_only_reserved_slots_could_take_is_no_work(cv):
    """Mutant: `runnable` counted a queued bulk session as work when the free slots were exactly the interactive
    reserve (`free < reserve`, admission says `free <= reserve`): wait_for_work returned at once and the loop
    spun on a step that could admit nothing."""
    eng = Engine(cv, max_sessions=2, interactive_reserve=1)
    a = eng.add(req(None, max_new_tokens=100))     # interactive, then waiting for more text
    a.append_text("Hello there, how are")
    for _ in range(50):
        if not eng.runnable():
            break
        eng.step()
    assert a.phase == "talker" and not eng.runnable()
    bulk = eng.add(req("Good morning.", priority="bulk"))
    assert len(eng.free_slots) == 1 and not eng.runnable() and not eng.wait_for_work(0.01)
    a.end_text()
    drain(eng)
    assert a.error is None and bulk.error is None and bulk.num_frames > 0


def test_a_session_moved_down_a_slot_keeps_its_repetition_history(cv):
    """Mutant: runner.move left the slot's repetition history (seen ids) behind: a greedy session compacted into
    the slot of a session that ended had that session's ids weighed as its own. A penalty below 1 favours the ids
    seen, so the history decides each draw."""
    greedy = dict(G, repetition_penalty=0.02)
    plan = [("Hi.", 6), ("Hello there, how are you?", 16), ("Good morning to you all, friends.", 16)]
    eng = Engine(cv, max_sessions=3)
    sessions = [eng.add(sampled(t, n, None, **greedy)) for t, n in plan[:2]]
    eng.step()
    eng.step()
    sessions.append(eng.add(sampled(*plan[2], None, **greedy)))
    moved = False
    while eng.has_work():
        eng.step()
        moved = moved or (not sessions[2].done and sessions[2].slot == 0)
    assert moved
    for s, (t, n) in zip(sessions, plan):
        alone = Engine(cv, max_sessions=1).run_all([sampled(t, n, None, **greedy)])[0]
        assert torch.equal(s.codes(), alone.codes()), s.id


# --- the graph stand-in --------------------------------------------------------------------------------------
def test_the_graph_stand_in_refuses_a_copy_to_the_host_by_to_while_capturing():
    """Mutant: the stand-in's check of `.to("cpu")` / `.to(torch.device("cpu"))` removed (only `.cpu()` left): a
    body that read a tensor back that way captured on CPU and failed only on a GPU."""
    from qwen_tts_core.generate.graphs import CaptureError, FakeCUDAGraph, fake_graph

    t = torch.ones(3)
    for read in (lambda x: x.to("cpu"), lambda x: x.to(torch.device("cpu")), lambda x: x.to(device="cpu")):
        with pytest.raises(CaptureError, match="host sync"), fake_graph(FakeCUDAGraph()):
            read(t * 2)
    with fake_graph(FakeCUDAGraph()):   # a cast on the device is no read
        (t * 2).to(torch.float64)


def test_the_graph_stand_in_captures_once():
    """Mutant: capture_begin's check removed: a second capture into a graph appended a second body to its tape,
    so each replay ran both (on CUDA, capturing into a captured graph is an error)."""
    from qwen_tts_core.generate.graphs import FakeCUDAGraph, fake_graph

    x, g = torch.zeros(1), FakeCUDAGraph()
    with fake_graph(g):
        x.add_(1)
    with pytest.raises(RuntimeError, match="already been captured"), fake_graph(g):
        x.add_(10)
    x.zero_()
    g.replay()
    assert x.tolist() == [1.0]


def test_incremental_text_commits_up_to_where_an_added_token_may_be_forming(cv):
    """Mutant: a boundary exactly at the start of an open added token ("<|im_" of "<|im_end|>") was not committed
    (`n < limit`): the text before it waited for the next piece. Everything before that start is final."""
    from qwen_tts_core.generate.text_feed import IncrementalText

    feed = IncrementalText.of(cv.tokenizer)
    ids = feed.append("Hello there.\n<|im_")
    assert (feed.text[:len(feed.text) - len(feed.tail)], feed.tail) == ("Hello there.\n", "<|im_")
    assert ids == cv.tokenizer.text_only("Hello there.\n")


# --- audio rows -------------------------------------------------------------------------------------------
def test_an_audio_row_whose_start_failed_is_free_for_the_next_session(cv, monkeypatch):
    """Mutant: BatchedAudio.open kept the row when resetting it raised (an ICL reference's decode failing, or an
    interrupt during it): with one slot, every later session failed with 'all 1 rows are in use'."""
    eng = Engine(cv, max_sessions=1)
    real, calls = eng.audio.bank.reset, []

    def reset(row, *args):
        calls.append(row)
        if len(calls) == 1:
            raise RuntimeError("reference decode failed")
        return real(row, *args)

    monkeypatch.setattr(eng.audio.bank, "reset", reset)
    first = eng.run_all([req("Hello there.", 4, decode_audio=True)])[0]
    assert first.finish_reason == "error" and "reference decode failed" in first.error
    second = eng.run_all([req("Hello there.", 4, decode_audio=True)])[0]
    assert second.error is None and second.audio_frames == second.num_frames > 0
    assert eng.audio.num_open == 0 and eng.free_slots == [0]


def test_an_icl_reference_longer_than_max_len_is_refused_before_its_prompt_is_built(base, monkeypatch):
    """Mutant: min_positions counted the text only (`fixed + text`), not the reference frames that pair with it: an
    ICL voice with a long reference and a short transcript was embedded (its codes and text) on the step thread
    before the exact count refused it."""
    import qwen_tts_core.generate.requests as requests

    built = []
    real = requests.build_prompt
    monkeypatch.setattr(requests, "build_prompt", lambda *a, **k: built.append(1) or real(*a, **k))
    r = SynthesisRequest(kind="voice_clone", text="Hi.", language="english", voice_clone_prompt=_icl(base, 200),
                         sampling=SamplingParams(max_new_tokens=4, **G), decode_audio=False)
    s = Engine(base, max_sessions=1, max_len=128).run_all([r])[0]
    assert s.finish_reason == "error" and s.error_field == "text" and "max_len" in s.error, s.error
    assert not built


# --- the driver --------------------------------------------------------------------------------------------
def test_a_reading_interrupted_inside_the_driver_cancels_its_session_and_leaves_nothing(cv):
    """Mutant: the reading generator's `finally` no longer released its session when the reading raised (an
    interrupt while it stepped the engine for everyone): the session went on generating for nobody, its chunks
    kept in the driver for good."""
    from qwen_tts_core.generate.driver import EngineDriver

    eng = Engine(cv, max_sessions=2)
    driver = EngineDriver(eng)
    real, calls = eng.wait_for_work, []

    def wait_for_work(timeout_s):
        calls.append(timeout_s)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(timeout_s)

    eng.wait_for_work = wait_for_work
    s = driver.open(req("Hello there, how are you?", max_new_tokens=30, decode_audio=True))
    with pytest.raises(KeyboardInterrupt):
        next(iter(driver.chunks(s)))
    assert s.cancelled
    (other,) = driver.run([req("Good morning.", max_new_tokens=4, decode_audio=True)])
    assert other.error is None and s.finish_reason == "cancelled"
    assert not driver._queues and not driver._abandoned and not eng.has_work()


# --- the device sampler ----------------------------------------------------------------------------------------
def test_eos_is_blocked_for_the_first_two_ids_only_in_the_batched_processors_as_per_row():
    """Mutant: talker_logits_batch blocked EOS while num_generated <= 2 (the per-row processors and HF: < 2), one id
    longer than the reference."""
    from qwen_tts_core.generate.sampling import talker_logits_batch, talker_logits_processors

    V, eos = 12, 9
    logits = torch.linspace(-1.0, 2.0, V).repeat(4, 1)
    blocked = torch.zeros(V, dtype=torch.bool)
    blocked[10:] = True
    got = talker_logits_batch(logits.clone(), torch.zeros(4, V, dtype=torch.bool), torch.ones(4),
                              torch.arange(4), blocked, eos)
    assert got[:, eos].isinf().tolist() == [True, True, False, False]
    for n in range(4):
        want = talker_logits_processors(logits[n].clone(), None, 1.0, n, eos, 10)
        assert torch.equal(got[n], want), n


def test_seeds_that_differ_only_in_their_high_bits_draw_differently():
    """Mutant: seed_key mixed in the seed's low 32 bits only: seeds s and s + 2**32 (any two of 2**31 seeds that
    share their low half) drew the very same audio."""
    from qwen_tts_core.generate.sampling import seed_key

    keys = {seed_key(s) for s in (7, 7 + 2**32, 7 + 2**40, 7 + 2**62)}
    assert len(keys) == 4


def test_a_tiny_top_p_keeps_the_most_likely_id():
    """Mutant: the sorted sampler's `drop_sorted[:, 0] = False` removed: with a top_p so small that 1 - top_p rounds
    to 1 in float32, every id was dropped and the draw fell on id 0 of an all -inf row (a special id)."""
    from qwen_tts_core.generate.sampling import gumbel, noise_key, sample_device, token_hash

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    B = logits.shape[0]
    for f in range(10):
        ids = sample_device(logits, torch.ones(B, dtype=torch.bool), torch.ones(B), torch.zeros(B, dtype=torch.long),
                            torch.full((B,), 1e-9),
                            lambda f=f: gumbel(noise_key(torch.arange(B), torch.full((B,), f), 0), token_hash(50)))
        assert torch.equal(ids, logits.argmax(-1)), f


def test_a_speaker_vector_changed_in_place_after_add_does_not_reach_the_session(base):
    """Mutant: Engine._on_device took the voice prompt's speaker vector with `.to(device, dtype)` and no copy (a
    no-op on the same device and dtype): a caller reusing its buffer after `add` changed the voice of the queued
    session. (The codes of a few greedy frames of the tiny model did not show it; the prompt does.)"""
    t = base.cfg.talker
    spk = torch.randn(t.hidden_size, generator=torch.Generator().manual_seed(5))

    def prefill(mutate: bool) -> torch.Tensor:
        vp = VoiceClonePromptItem(ref_code=None, ref_spk_embedding=spk.clone(), x_vector_only_mode=True,
                                  icl_mode=False)
        eng = Engine(base, max_sessions=1)
        s = eng.add(SynthesisRequest(kind="voice_clone", text="Hello there.", language="english",
                                     voice_clone_prompt=vp, sampling=SamplingParams(max_new_tokens=3, **G),
                                     decode_audio=False))
        if mutate:
            vp.ref_spk_embedding.mul_(-3)
        eng.step()
        out = s.prompt.prefill.clone()
        drain(eng)
        return out

    assert torch.equal(prefill(mutate=True), prefill(mutate=False))


def test_every_frame_and_codebook_of_a_session_draws_its_own_noise():
    """Mutant: noise_key mixed `frame + codebook` (not `frame * 16 + codebook`): frame f's codebook 1 drew with the
    very noise of frame f + 1's talker id, and so on: the draws of one session were correlated."""
    from qwen_tts_core.generate.sampling import noise_key

    key = torch.tensor([12345])
    keys = {int(noise_key(key, torch.tensor([f]), g)) for f in range(20) for g in range(16)}
    assert len(keys) == 20 * 16


def test_prompts_filling_a_batched_prefill_exactly_share_it():
    """Mutant: prefill_groups took `padded < max_tokens`: prompts whose padded size is exactly PREFILL_TOKENS were
    prefilled in two passes instead of one."""
    from qwen_tts_core.generate.runner import PREFILL_TOKENS, prefill_groups

    half = PREFILL_TOKENS // 2
    assert prefill_groups([half, half]) == [[0, 1]]
    assert prefill_groups([half + 1, half + 1]) == [[0], [1]]


def test_a_combining_mark_at_the_last_boundary_does_not_hold_back_the_words_before_it(cv):
    """Mutant: a piece checked only the last pre-tokenizer boundary (not the last CANDIDATES): when that one could
    still move under normalization (a combining mark that does not compose, "x" + U+0301, starts its piece), the
    finished words before it waited for more text."""
    from qwen_tts_core.generate.text_feed import IncrementalText

    feed = IncrementalText.of(cv.tokenizer)
    ids = feed.append("Hello there x\u0301")
    assert feed.tail == " x\u0301" and ids == cv.tokenizer.text_only("Hello there")
