"""The Engine (generate/engine.py) pinned by a second mutation review: its argument checks, the memory check and
positions it allows, what warm_up may touch, the keys a talker step reads and the cache it grows, and a queued
session whose text is refused. Each test here failed on a code change (a "mutant", named in its docstring) that the
engine's targeted tests (test_engine, test_lifecycle, test_review_mutants, test_review_mutants2,
test_review_mutants_engine, and test_graphs, test_review_hygiene or test_review_fuzz where they cover the code) let
pass. The rules: an argument that makes a setting useless is refused naming it, a session never runs past the
positions the model has, warm_up never writes into a slot a session may hold, a session's codes do not depend on
who joins it, and a session ends exactly once."""

from __future__ import annotations

import pytest

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.model.layers import RotaryTable
from tests.core.test_engine import feed_until_waiting_at, waiting_for_text
from tests.core.test_lifecycle import drain

G = SamplingParams(max_new_tokens=8, do_sample=False, subtalker_dosample=False)


def req(text: str = "Hello there.", **kw) -> SynthesisRequest:
    kw.setdefault("sampling", G)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english",
                            decode_audio=False, **kw)


@pytest.mark.parametrize("kwargs, name", [
    (dict(max_sessions=2, interactive_reserve=2), "interactive_reserve"),
    (dict(max_sessions=2, guard_base_frames=-1), "guard_base_frames"),
])
def test_arguments_at_the_edge_of_their_range_are_refused_naming_them(cv, kwargs, name):
    """E01: interactive_reserve == max_sessions was accepted: every slot reserved, so a bulk session is never
    admitted and waits forever. E02: guard_base_frames = -1 was accepted (only values below -1 were refused): a
    negative base lowers every session's runaway guard below what its text's tokens allow (with
    guard_frames_per_token=1 a one-token text ends as "guard" at its first frame). Both are refused, naming the
    argument, by the constructor and by check_arguments."""
    with pytest.raises(ValueError, match=name):
        Engine(cv, **kwargs)
    with pytest.raises(ValueError, match=name):
        Engine.check_arguments(**kwargs)
    Engine(cv, max_sessions=2, interactive_reserve=1, guard_base_frames=0)   # the edges inside the range


def test_max_len_is_bounded_by_the_positions_the_talker_has(cv):
    """E05: max_len was not bounded by the talker's rotary table: a session that reached the table's end failed with
    an IndexError ("index 40 is out of bounds") instead of ending as max_len says, with finish_reason
    "max_new_tokens". A table of 40 positions stands in for a checkpoint's max_position_embeddings."""
    t, rope = cv.cfg.talker, cv.talker.rope
    cv.talker.rope = RotaryTable(t.head_dim, t.rope_theta, 40)   # the shared model: restored below
    try:
        eng = Engine(cv, max_sessions=1)
        assert eng.max_len == 40
        s = eng.add(req(sampling=SamplingParams(max_new_tokens=100, do_sample=False, subtalker_dosample=False)))
        (last,) = [c for c in drain(eng) if c.is_last]
    finally:
        cv.talker.rope = rope
    assert (last.finish_reason, last.error) == ("max_new_tokens", None)
    assert s.pos == 39 and s.num_frames > 0


def test_warm_up_is_refused_while_a_session_is_queued_or_running_and_leaves_it_as_it_was(cv):
    """E70: warm_up ran on a busy engine: it prefills and steps slot 0, the slot a queued session is about to take
    or a running one holds, so that session's cache and sampling state were overwritten. It raises, and the
    session's codes are those of an engine that was never asked."""
    def codes(warm: bool):
        eng = Engine(cv, max_sessions=1)
        s = eng.add(req())
        if warm:
            with pytest.raises(RuntimeError, match="idle"):
                eng.warm_up()
        eng.step()
        if warm:
            with pytest.raises(RuntimeError, match="idle"):
                eng.warm_up()
        drain(eng)
        assert s.finish_reason == "max_new_tokens"
        return s.codes()

    assert codes(warm=True).equal(codes(warm=False))


def test_a_session_joining_late_leaves_the_longer_sessions_codes_as_alone(cv):
    """E64: the talker step read the keys up to the SHORTEST talker row's position: a session 80 frames in, joined
    by a new one, attended to its first 64 keys only (the new one's read length), and its codes changed. The read
    length follows the longest row, so both sessions' codes are those of each alone."""
    long = SamplingParams(max_new_tokens=120, do_sample=False, subtalker_dosample=False)

    def alone(r: SynthesisRequest):
        (s,) = Engine(cv, max_sessions=1).run_all([r])
        return s

    eng = Engine(cv, max_sessions=2)
    first = eng.add(req("The quick brown fox jumps over the lazy dog.", sampling=long))
    for _ in range(80):
        eng.step()
    assert first.pos > 64 + 20 and not first.done
    late = eng.add(req())
    drain(eng)
    for s, r in ((first, req("The quick brown fox jumps over the lazy dog.", sampling=long)), (late, req())):
        ref = alone(r)
        assert (s.finish_reason, s.error) == (ref.finish_reason, None)
        assert s.codes().equal(ref.codes())


def test_a_queued_session_whose_text_is_refused_ends_once_and_never_starts(cv):
    """E79: a queued session whose text was refused while it waited (a tail with no point it can be split at) got
    its error last chunk, and was then admitted all the same when it had ids committed (blank text so far): the
    ended session drew a frame and sat in its slot waiting for text for good, so the slot was lost and the engine
    never ran out of work. It ends once, naming text, and takes no slot."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(req(None))
    s.append_text("\n\n ")       # ids committed, text blank so far: it waits in the queue
    eng.step()
    assert s.committed_ids and s.phase == "queued"
    s.append_text("a" * 2000)    # refused when the engine takes it
    chunks = drain(eng)
    assert [(c.session_id, c.finish_reason, c.error_field) for c in chunks if c.is_last] == [(s.id, "error", "text")]
    assert not s.frames and not eng.active and eng.free_slots == [0]


def test_graphs_check_their_static_cache_against_memory_even_when_asked_for_a_growing_one(cv, monkeypatch):
    """E06: `static=False` with CUDA graphs skipped the memory check of the cache: the runner gives graphs a static
    cache of max_sessions x max_len whatever `static` says (their captured steps keep its addresses), so a cache
    bigger than the memory left was allocated instead of refused at start naming the settings (on a GPU an
    out-of-memory error mid-construction; on a CPU an OOM kill later, as its pages are touched)."""
    from qwen_tts_core.generate import engine as E
    from qwen_tts_core.generate.graphs import GraphCapture

    t = cv.cfg.talker
    need = (2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim + t.hidden_size) * 4 * 2 * 128   # fp32
    monkeypatch.setattr(E, "host_memory_available", lambda: need)          # 90% of it is not enough
    with pytest.raises(ValueError, match=r"max_sessions=2 x max_len=128 needs .* lower max_sessions or max_len"):
        Engine(cv, max_sessions=2, max_len=128, static=False, graph_capture=GraphCapture("cpu", fake=True))
    eng = Engine(cv, max_sessions=2, max_len=128, static=False)             # a growing cache is not checked here
    assert not eng.runner.static


def test_a_session_waiting_in_its_talker_phase_at_the_cache_capacity_fails_no_one(cv):
    """E81: the growing cache was sized for the rows that advance this step (code predictor and talker) only, not
    for every active row: a session waiting for text writes a masked key at its own position too. test_engine's
    capacity test adds the second session while the first still has its last frame to draw (so it advances, and the
    cache grows for it); here that frame is drawn first, alone (a step without talker rows grows nothing). The
    second session's step then wrote past the end, and the IndexError failed both sessions."""
    eng = Engine(cv, max_sessions=2, initial_cache_len=64)
    a = eng.add(req(None, sampling=SamplingParams(max_new_tokens=400, do_sample=False, subtalker_dosample=False)))
    a.append_text("Hello")
    feed_until_waiting_at(eng, a, 64)
    eng.step()                                # A's last frame, alone: no talker row, the cache stays as it is
    assert a.pos == 64 == eng.runner.cache.capacity and a.phase == "talker" and waiting_for_text(a) and a.slot == 0
    b = eng.add(req("Good morning!"))
    chunks = []
    while not b.done:
        chunks += eng.step()
    assert (b.finish_reason, b.error) == ("max_new_tokens", None) and not a.done
    (ref,) = Engine(cv, max_sessions=1).run_all([req("Good morning!")])
    assert b.codes().equal(ref.codes())
    a.end_text()
    drain(eng)
    assert a.finish_reason in ("eos", "max_new_tokens")
