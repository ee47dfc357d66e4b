"""The Engine (generate/engine.py) pinned by a mutation review: admission, slots, the runaway guard, emit and decode
scheduling, ending and release. Each test here failed on a code change (a "mutant", named in its docstring) that the
engine's targeted tests (test_engine, test_lifecycle, test_review_mutants, test_review_mutants2, test_early_audio,
test_streaming) let pass. The rules: every session ends with one last chunk and leaves nothing behind (slot, audio
row, registry entry), what a caller hands over is the session's own, and audio is exactly the frames' audio."""

from __future__ import annotations

import numpy as np
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest, VoiceClonePromptItem
from qwen_tts_core.codec.context import codes_key
from tests.core.test_lifecycle import drain

G_KW = dict(do_sample=False, subtalker_dosample=False)
G = SamplingParams(max_new_tokens=8, **G_KW)
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Good morning!"]


def req(text: str = TEXTS[0], decode_audio: bool = False, **kw) -> SynthesisRequest:
    kw.setdefault("sampling", G)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english",
                            decode_audio=decode_audio, **kw)


def by_session(chunks) -> dict[int, list]:
    got: dict[int, list] = {}
    for c in chunks:
        got.setdefault(c.session_id, []).append(c)
    return got


def assert_released(eng: Engine) -> None:
    assert sorted(eng.free_slots) == list(range(eng.max_sessions)) and not eng.active
    assert not eng._live and not eng._audio_rows
    assert eng.audio is None or eng.audio.num_open == 0


# --- release ----------------------------------------------------------------------------------------------------
def test_every_ended_session_leaves_the_engine(cv):
    """E57: `_last_chunk` no longer took the session out of `_live`: every session ever added stayed referenced
    (its prompt, frames and request) for the engine's life, a leak that grows with every request served, and a
    later failed step ended those long-finished sessions again."""
    eng = Engine(cv, max_sessions=2)
    done = eng.add(req(TEXTS[0], decode_audio=True))
    cancelled = eng.add(req(TEXTS[1], decode_audio=True))
    eng.step()
    eng.cancel(cancelled)
    chunks = by_session(drain(eng))
    for s in (done, cancelled):
        assert sum(c.is_last for c in chunks[s.id]) == 1
    assert done.finish_reason == "max_new_tokens" and cancelled.finish_reason == "cancelled"
    assert_released(eng)


# --- what the caller hands over ---------------------------------------------------------------------------------
def test_reference_codes_changed_in_place_after_add_do_not_reach_the_session(base):
    """E12: `_on_device` took the voice prompt's reference codes with `.to("cpu", long)` and no copy (a no-op for
    CPU int64 codes): a caller reusing its buffer after `add` changed the session's decoder context, and the
    decoder state of the new codes was cached under the key of the old ones, for every later session of that
    voice. The session's codes, their key and its audio must be those of the codes as they were at `add`."""
    t = base.cfg.talker
    g = torch.Generator().manual_seed(7)
    spk = torch.randn(t.hidden_size, generator=g)
    codes = torch.randint(0, 2048, (6, 16), generator=g)

    def run(mutate: bool):
        vp = VoiceClonePromptItem(ref_code=codes.clone(), ref_spk_embedding=spk.clone(), x_vector_only_mode=True,
                                  icl_mode=False)
        eng = Engine(base, max_sessions=1)
        s = eng.add(SynthesisRequest(kind="voice_clone", text="Hello there.", language="english",
                                     voice_clone_prompt=vp, sampling=SamplingParams(max_new_tokens=4, **G_KW),
                                     decode_audio=True, first_chunk_frames=1, chunk_frames=2))
        if mutate:
            vp.ref_code.add_(1).remainder_(2048)
        pcm = np.concatenate([c.pcm for c in drain(eng) if c.session_id == s.id])
        return s, pcm

    s, pcm = run(mutate=True)
    assert torch.equal(s.request.voice_clone_prompt.ref_code.cpu(), codes) and s.ref_key == codes_key(codes)
    _, want = run(mutate=False)
    assert pcm.size and np.array_equal(pcm, want)


# --- failures ---------------------------------------------------------------------------------------------------
def test_a_failed_step_leaves_queued_sessions_queued_and_they_end_once(cv, monkeypatch):
    """E56: after a failed step `_close_lost` ended every live session not in a queue; with the queued ones taken
    in too, a session still waiting for a slot got an error last chunk, stayed queued, was admitted later and ran:
    two last chunks for one session (a client's stream closed, then written to again)."""
    eng = Engine(cv, max_sessions=1)
    running = eng.add(req(TEXTS[0]))
    eng.step()
    waiting = eng.add(req(TEXTS[1]))
    real, calls = eng.runner.step, []

    def broken(*a, **k):
        if not calls:
            calls.append(1)
            raise RuntimeError("simulated step failure")
        return real(*a, **k)

    monkeypatch.setattr(eng.runner, "step", broken)
    chunks = by_session(eng.step() + drain(eng))
    assert running.finish_reason == "error" and "simulated step failure" in running.error
    assert [c.is_last for c in chunks[waiting.id]][-1] and sum(c.is_last for c in chunks[waiting.id]) == 1
    assert waiting.finish_reason == "max_new_tokens" and waiting.error is None
    assert_released(eng)


def test_a_final_audio_decode_that_fails_ends_the_finishing_session_with_an_error(cv, monkeypatch):
    """E50: `_fail` of a session the talker had already ended (its last chunk still to come from the audio decode)
    no longer ended it: when that final decode raised, the session stayed in the engine's audio rows with no last
    chunk from the failing step, and its last chunk came later, after the failure, as if nothing had happened
    (finish_reason "max_new_tokens" with the error recorded on the session)."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(TEXTS[0], decode_audio=True, first_chunk_frames=1, chunk_frames=1))
    real = eng.audio.decode

    def broken():
        if s.phase == "done":
            raise RuntimeError("simulated final decode failure")
        return real()

    monkeypatch.setattr(eng.audio, "decode", broken)
    chunks = []
    for _ in range(100):
        chunks += eng.step()
        if s.done:
            break
    assert s.done
    lasts = [c for c in chunks if c.is_last]
    assert len(lasts) == 1 and lasts[0].finish_reason == "error" and "simulated final decode" in lasts[0].error
    monkeypatch.setattr(eng.audio, "decode", real)
    chunks += drain(eng)
    assert sum(c.is_last for c in chunks) == 1
    assert_released(eng)


def test_a_cancel_ends_the_audio_where_it_was_with_nothing_decoded_after(cv):
    """E51: `_finish` sent a cancelled session with an audio row down the finishing path (as EOS): its frames not
    yet decoded were decoded and sent in its last chunk, audio the caller had stopped (and paid decode time for)."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(TEXTS[1], decode_audio=True, first_chunk_frames=1, chunk_frames=6,
                    sampling=SamplingParams(max_new_tokens=20, **G_KW)))
    chunks = []
    while len(s.frames) < 4:  # the first chunk out, three frames waiting for the next one
        chunks += eng.step()
    emitted = sum(c.num_frames for c in chunks)
    assert 0 < emitted < len(s.frames)
    eng.cancel(s)
    chunks += drain(eng)
    (last,) = [c for c in chunks if c.is_last]
    assert last.finish_reason == "cancelled" and last.num_frames == 0 and last.pcm.size == 0
    assert last.frame_start == emitted and sum(c.num_frames for c in chunks) == emitted
    assert_released(eng)


def test_a_cancel_wakes_the_thread_waiting_for_work(cv):
    """E13: `cancel` set the flag without notifying the engine's condition: a loop thread blocked in
    `wait_for_work` (every session waiting for text) slept through the cancel until its timeout, so the cancelled
    session's last chunk (and its slot) came a whole wait late. The wake is counted here (no timing)."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(None))
    eng.step()
    assert s.phase == "queued" and not eng.runnable()
    woke = []
    real = eng._work.notify_all

    def notify_all():
        woke.append(1)
        real()

    eng._work.notify_all = notify_all
    eng.cancel(s)
    assert woke and eng.runnable()
    (last,) = [c for c in drain(eng) if c.is_last]
    assert last.session_id == s.id and last.finish_reason == "cancelled"
    assert_released(eng)


def test_a_cancelled_session_queued_behind_full_slots_is_work(cv):
    """E16: `runnable` skipped a cancelled queued session when no slot was free: the loop thread slept in
    `wait_for_work` (the only active session waiting for text) while `step()` would have ended the cancelled one
    at once (cancelled queued sessions end whether a slot is free or not): its last chunk waited on someone else's
    text."""
    eng = Engine(cv, max_sessions=1)
    talking = eng.add(req(None))
    talking.append_text("Hello there.")
    for _ in range(100):
        if not eng.runnable():
            break
        eng.step()
    assert talking.phase == "talker" and not eng.runnable()  # active, waiting for more text
    queued = eng.add(req(TEXTS[0]))
    assert not eng.runnable()
    eng.cancel(queued)
    assert eng.runnable()
    lasts = [c for c in eng.step() if c.is_last]
    assert [(c.session_id, c.finish_reason) for c in lasts] == [(queued.id, "cancelled")]
    talking.end_text()
    drain(eng)
    assert_released(eng)


def test_a_prompt_field_replaced_while_add_runs_does_not_reach_the_session(base, monkeypatch):
    """E71: `_own_copy` copied the request but not its voice prompt, so the session read the caller's prompt
    object again after validating it (`_on_device`): a field the caller replaced meanwhile (another thread
    reusing its prompt object for the next request) reached the session unvalidated. Here the caller's speaker
    vector is swapped right after validation: the session keeps the one it validated."""
    import qwen_tts_core.generate.engine as engine_mod

    t = base.cfg.talker
    spk = torch.randn(t.hidden_size, generator=torch.Generator().manual_seed(5))
    real = engine_mod.validate

    def prefill(swap: bool) -> torch.Tensor:
        vp = VoiceClonePromptItem(ref_code=None, ref_spk_embedding=spk.clone(), x_vector_only_mode=True,
                                  icl_mode=False)

        def validate(model, r):
            real(model, r)
            if swap:
                vp.ref_spk_embedding = spk * -3

        monkeypatch.setattr(engine_mod, "validate", validate)
        eng = Engine(base, max_sessions=1)
        s = eng.add(SynthesisRequest(kind="voice_clone", text="Hello there.", language="english",
                                     voice_clone_prompt=vp, sampling=SamplingParams(max_new_tokens=3, **G_KW),
                                     decode_audio=False))
        eng.step()
        out = s.prompt.prefill.clone()
        drain(eng)
        return out

    assert torch.equal(prefill(swap=True), prefill(swap=False))


# --- the runaway guard ------------------------------------------------------------------------------------------
def test_the_guard_of_an_incremental_session_grows_with_its_text(cv):
    """E35: `_absorb_text` no longer renewed the runaway guard: an incremental session kept the guard of the few
    tokens it was admitted on (base + per-token x those), so a long text streamed in afterwards was cut off with
    finish_reason "guard" partway through."""
    eng = Engine(cv, max_sessions=1, guard_frames_per_token=1.0, guard_base_frames=2)
    s = eng.add(req(None, sampling=SamplingParams(max_new_tokens=200, **G_KW)))
    s.append_text("Hi there. ")
    eng.step()
    admitted = s.max_frames
    assert s.phase != "queued" and admitted == int(2 + s.prompt.num_text_tokens)
    s.append_text("The quick brown fox jumps over the lazy dog, again and again, all day long.")
    s.end_text()
    eng.step()
    assert s.max_frames == int(2 + s.prompt.num_text_tokens) > admitted
    eng.cancel(s)
    drain(eng)


def test_incremental_text_past_max_len_fails_its_session_naming_text(cv):
    """E34: `_absorb_text` lost its `check_positions`: text streamed in after admission that no longer fit in
    max_len was taken, and the session spoke until max_len cut it off (finish_reason "max_new_tokens", the rest of
    the text silently never spoken) instead of failing naming `text`, as the same text sent whole is refused."""
    eng = Engine(cv, max_sessions=1, max_len=48)
    s = eng.add(req(None, sampling=SamplingParams(max_new_tokens=40, **G_KW)))
    s.append_text("Hi. ")
    eng.step()
    assert s.phase != "queued"
    s.append_text(" ".join(["word"] * 60))
    chunks = drain(eng)
    (last,) = [c for c in chunks if c.is_last]
    assert last.finish_reason == "error" and last.error_field == "text"
    assert_released(eng)


# --- slots ------------------------------------------------------------------------------------------------------
def test_occupied_slots_stay_the_lowest_after_every_step(cv):
    """E43, E74: compaction moved a session into the highest free slot (`free_slots[-1]`), or left the free list
    unsorted after a move so the next move took a hole that was not the lowest: the occupied slots were no longer
    0..n-1, and every later step ran (and with graphs, replayed) a batch as wide as the highest slot, not as the
    sessions in it."""
    eng = Engine(cv, max_sessions=4)
    sessions = [eng.add(req(TEXTS[i % 3], sampling=SamplingParams(max_new_tokens=n, **G_KW)))
                for i, n in enumerate((3, 5, 9, 14))]
    real, widths, seen = eng._compact, [], []

    def compact():  # the slots each step's batch runs on: right after the step's compaction (an assert raised
        real()      # here would only fail the step)
        seen.append((sorted(s.slot for s in eng.active), list(eng.free_slots)))
        widths.append(len(eng.active))

    eng._compact = compact
    for _ in range(200):
        if not eng.has_work():
            break
        eng.step()
    assert widths[0] == 4 and 2 in widths  # sessions moved down twice at least
    for active, free in seen:
        assert active == list(range(len(active))) and free == sorted(free), (active, free)
    assert all(s.finish_reason == "max_new_tokens" for s in sessions)
    assert_released(eng)
