"""The batched step and the streaming audio pinned by a mutation review (qwen_tts_core/generate/runner.py,
audio_stream.py, session.py, driver.py): each test here failed on a one-line change (a "mutant") that the rest of
the suite let pass, named in its docstring. Frames neither lost nor repeated, stream == offline for the one-session
streamer, rows joining and leaving without touching another row's state, and what is given back on every ending.
Tiny random checkpoints on CPU; no Ray."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from qwen_tts_core import AudioChunk, Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.errors import SessionEnded
from qwen_tts_core.generate import runner as runner_mod
from qwen_tts_core.generate.audio_stream import AudioStreamer, BatchedAudio
from qwen_tts_core.generate.driver import EngineDriver
from qwen_tts_core.generate.runner import (
    PREFILL_PAD_SLACK,
    batch_buckets,
    length_buckets,
    prefill_groups,
    read_length,
)

SPF = 1920
TOL = 1e-4   # stream == offline (fp32)


@pytest.fixture(scope="module")
def codec(cv):
    return cv.codec


def _codes(seed: int, n: int) -> torch.Tensor:
    return torch.randint(0, 2048, (n, 16), generator=torch.Generator().manual_seed(seed))


def _offline(codec, codes: torch.Tensor) -> np.ndarray:
    return codec.decoder.decode(codes.T[None])[0].numpy()


# ---- AudioStreamer: one session's stream, chunk by chunk, equals its offline decode --------------------------------

@pytest.mark.parametrize("first, every, n", [(2, 3, 9), (1, 4, 6), (3, 1, 5)], ids=["2-3-tail", "1-4-tail", "3-1"])
def test_the_single_session_streamer_emits_its_chunk_schedule_and_the_offline_samples(codec, first, every, n):
    """A chunk as soon as `first` frames (then `every`) have gathered, each frame once, the rest at finish(), and
    the samples those of the offline decode (mutants: first/every swapped, `>= need` -> `>`, pending not cleared,
    finish() dropping the tail)."""
    codes = _codes(first * 10 + n, n)
    s = AudioStreamer(codec, first, every)
    sizes, pcm = [], []
    for i in range(n):
        out = s.push(codes[i])
        if out is not None:
            sizes.append(out.size // SPF)
            pcm.append(out)
            assert s.frame_start == sum(sizes[:-1])
    tail = s.finish()
    want, left = [first], n - first
    while left >= every:
        want.append(every)
        left -= every
    assert sizes == want
    assert tail.size == left * SPF and s.emitted_frames == n
    assert s.finish().size == 0   # nothing twice
    got = np.concatenate([*pcm, tail])
    assert float(np.abs(got - _offline(codec, codes)).max()) <= TOL


def test_the_single_session_streamer_decodes_after_its_reference_frames(codec):
    """ICL: the reference frames are the decode's left context, their audio not emitted (mutant: the reference
    decode skipped)."""
    ref, codes = _codes(1, 6), _codes(2, 5)
    s = AudioStreamer(codec, 2, 2, ref_codes=ref)
    pcm = [p for p in (s.push(c) for c in codes) if p is not None] + [s.finish()]
    want = _offline(codec, torch.cat([ref, codes]))[ref.shape[0] * SPF:]
    assert float(np.abs(np.concatenate(pcm) - want).max()) <= TOL


# ---- prefill groups: padding bounded at its exact value, no padding where it is not allowed ------------------------

def test_a_batched_prefill_takes_padding_up_to_its_slack_and_not_one_token_more():
    """Two prompts share a padded pass while the padding is at most PREFILL_PAD_SLACK + a quarter of their real
    tokens: 100 and 252 pad by 152 = 64 + 352 // 4 (shared), 100 and 253 by 153 > 64 + 353 // 4 (apart); 100 and 300
    pad by 200, within half but not a quarter (mutant: `(real + T) // 4` -> `// 2`)."""
    assert PREFILL_PAD_SLACK == 64
    assert prefill_groups([100, 252]) == [[0, 1]]
    assert prefill_groups([100, 253]) == [[0], [1]]
    assert prefill_groups([300, 100]) == [[1], [0]]


def test_an_exact_prefill_groups_only_prompts_of_one_length():
    """pad=False (the default CPU engine's exact passes): a padded row's sums differ in the last bits from its prompt
    alone, so only equal lengths share a pass, however little padding the others would need (mutant: the
    equal-length condition dropped)."""
    assert prefill_groups([10, 11, 10, 12], pad=False) == [[0, 2], [1], [3]]
    assert prefill_groups([10, 11, 10, 12]) == [[0, 2, 1, 3]]


# ---- the engine's step: each session gets its own frames ----------------------------------------------------------

def _req(text: str | None, seed: int, audio: bool, **kw) -> SynthesisRequest:
    kw.setdefault("sampling", SamplingParams(max_new_tokens=10))
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", seed=seed,
                            decode_audio=audio, **kw)


def _run(eng: Engine, reqs: list[SynthesisRequest]) -> tuple[list, dict[int, list[AudioChunk]]]:
    sessions = [eng.add(r) for r in reqs]
    chunks: dict[int, list[AudioChunk]] = {s.id: [] for s in sessions}
    for _ in range(200):
        if not eng.has_work():
            break
        for ch in eng.step():
            chunks[ch.session_id].append(ch)
    assert not eng.has_work()
    return sessions, chunks


def test_a_streaming_session_beside_a_codes_only_one_decodes_its_own_frames(cv):
    """The audio rows' frames are taken by slot: a session decoding audio in slot 1 beside a codes-only session in
    slot 0 streams the offline decode of its OWN codes, not its neighbour's (mutants: `frame_codes` taking rows
    0..n-1 for any slots, or the wrong columns)."""
    eng = Engine(cv, max_sessions=2)
    (quiet, loud), chunks = _run(eng, [_req("Press one for sales.", 1, False),
                                       _req("The quick brown fox.", 2, True, first_chunk_frames=1, chunk_frames=2)])
    assert (quiet.slot, loud.slot) == (0, 1) and loud.num_frames > 2
    assert not np.array_equal(quiet.codes().numpy()[:2], loud.codes().numpy()[:2])
    pcm = np.concatenate([c.pcm for c in chunks[loud.id]])
    assert float(np.abs(pcm - _offline(cv.codec, loud.codes())).max()) <= TOL
    assert eng.free_slots == [0, 1] and eng.audio.num_open == 0


def test_a_length_or_batch_exactly_at_a_bucket_takes_that_bucket():
    """A static engine's key reads and batch shapes are the first bucket AT LEAST the need: exactly 64 keys read 64,
    not 128; two rows run in the 2-row graph, not the 4-row one (mutant: `b >= n` -> `b > n` in
    `_first_at_least`)."""
    buckets = length_buckets(4096)
    assert [read_length(n, 4096, buckets) for n in (64, 128, 4096)] == [64, 128, 4096]
    assert runner_mod._first_at_least(batch_buckets(8), 2) == 2


def test_a_talker_that_prefers_eos_ends_the_session_at_its_third_id(cv):
    """EOS is the one special id never suppressed, and it is allowed from the third id on (min_new_tokens 2, the
    prefill's id counted): a talker whose EOS logit dominates ends every session with "eos" after exactly two
    frames (mutants: EOS left in the blocked set, the prefill's id not counted in `ngen`)."""
    eng = Engine(cv, max_sessions=2)
    eos = eng.eos_id
    hook = eng.talker.codec_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        sessions, _ = _run(eng, [_req("Hello there.", 1, False), _req("Good morning!", 2, False)])
    finally:
        hook.remove()
    assert [(s.finish_reason, s.num_frames) for s in sessions] == [("eos", 2), ("eos", 2)]
    assert all(s.history[-1] == eos and eos not in s.history[:-1] for s in sessions)


def test_the_special_ids_are_never_drawn_however_likely(cv):
    """The last 1024 talker ids (control tokens), EOS excepted, are never sampled: boosted far above the codes at
    both ends of that range, none is drawn and the sessions run to max_new_tokens (mutant: the blocked range
    starting one id late)."""
    eng = Engine(cv, max_sessions=2)
    special = torch.tensor([eng.suppress_from, eng.talker.cfg.vocab_size - 1])
    assert eng.eos_id not in special.tolist()
    hook = eng.talker.codec_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, special, torch.full((*out.shape[:-1], 2), 1e4)))
    try:
        sessions, _ = _run(eng, [_req("Hello there.", 1, False), _req("Good morning!", 2, False)])
    finally:
        hook.remove()
    for s in sessions:
        assert s.finish_reason == "max_new_tokens" and max(s.history) < eng.suppress_from


PIECES = ["The quick ", "brown ", "fox ", "jumps ", "over ", "the lazy ", "dog."]


def _waiting_beside(eng: Engine, neighbour: SynthesisRequest | None) -> tuple[torch.Tensor, int]:
    """An incremental session (slot 0) fed a piece every four steps, beside `neighbour` (slot 1, full text) or alone;
    returns its codes and how many steps it waited for text while its neighbour stepped."""
    s = eng.add(_req(None, 5, False, sampling=SamplingParams(max_new_tokens=40)))
    s.append_text(PIECES[0])
    other = eng.add(neighbour) if neighbour is not None else None
    waits = 0
    for p in PIECES[1:]:
        for _ in range(4):
            eng.step()
            pr = s.prompt
            waits += int(other is not None and not other.done and s.phase == "talker" and not pr.text_ended
                         and s.text_step >= len(pr.trailing))
        s.append_text(p)
    s.end_text()
    while eng.has_work():
        eng.step()
    assert s.slot == 0 and s.finish_reason == "max_new_tokens"
    return s.codes(), waits


@pytest.mark.parametrize("sampler", ["device", "torch"])
def test_a_session_waiting_for_text_in_a_running_batch_is_left_exactly_as_it_was(cv, sampler):
    """A row waiting for text sits in the batch while its neighbour steps: it computes and is discarded, its
    position, text position, frame counter, seen-set and last frame untouched, so its codes are those of the same
    schedule alone (mutants: `pos`, `text_pos`, `nframes` advanced, the seen-set marked, or `last_codes` written for
    rows their masks leave out)."""
    neighbour = _req("Good morning to you all!", 6, False, sampling=SamplingParams(max_new_tokens=40))
    beside, waits = _waiting_beside(Engine(cv, max_sessions=2, sampler=sampler), neighbour)
    alone, _ = _waiting_beside(Engine(cv, max_sessions=2, sampler=sampler), None)
    assert waits >= 2
    assert torch.equal(beside, alone)


def test_a_long_text_joining_grows_the_text_buffer_without_touching_the_others_text(cv):
    """The trailing-text buffer grows (a growing cache starts small) when a session with a longer text joins: every
    other session keeps its own text, so its codes are those it gives alone (mutant: the grown buffer not copied
    from the old one: the others' text read as zeros)."""
    short = _req("Press one for sales, two for support, or stay on the line for the next agent.", 7, False,
                 sampling=SamplingParams(max_new_tokens=14))
    long_ = _req(" ".join(["The quick brown fox jumps over the lazy dog."] * 10), 8, False,
                 sampling=SamplingParams(max_new_tokens=4))
    eng = Engine(cv, max_sessions=2, initial_cache_len=64)
    a = eng.add(short)
    for _ in range(3):
        eng.step()
    before = eng.runner.text_buf.shape[1]
    b = eng.add(long_)
    while eng.has_work():
        eng.step()
    assert eng.runner.text_buf.shape[1] > before and len(b.prompt.trailing) > before
    assert len(a.prompt.trailing) > 3 + 1
    alone = Engine(cv, max_sessions=2, initial_cache_len=64).run_all([short])[0]
    assert torch.equal(a.codes(), alone.codes())


@contextlib.contextmanager
def _favouring(eng: Engine):
    """The talker's logits of ids 0..3 raised by 40, 31, 22, 10: greedy with a repetition penalty of 3 draws
    0, 1, 2, then 0 for ever (a seen 0 at 13.3 still beats an unseen 3), each pick decided by the history."""
    boost = torch.tensor([40.0, 31.0, 22.0, 10.0])
    hook = eng.talker.codec_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, torch.arange(4), boost.expand(*out.shape[:-1], 4)))
    try:
        yield
    finally:
        hook.remove()


def test_the_prefill_id_is_in_the_repetition_history(cv):
    """The id drawn at prefill counts as generated for the repetition penalty, as each later one does (mutant: the
    prefill's id not put in the seen-set: the talker draws its favourite twice)."""
    eng = Engine(cv, max_sessions=1)
    with _favouring(eng):
        (s,), _ = _run(eng, [_req("Hello there.", 3, False, sampling=SamplingParams(
            do_sample=False, max_new_tokens=6, repetition_penalty=3.0))])
    assert s.history == [0, 1, 2, 0, 0, 0]


def test_a_session_moved_down_to_a_freed_slot_keeps_its_own_state(cv):
    """Compaction moves the session in the highest slot into a slot another user just left: it takes its cache rows
    and every per-slot value with it, so its codes are those it gives alone. A talker that prefers four ids makes
    the repetition history decide each greedy pick (`_favouring`) (mutants: the seen-set, the repetition penalty, the host's copy
    of the sampling parameters or `text_len` not moved: the slot keeps the previous user's)."""
    first = _req("Hi.", 9, False, sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=2,
                                                           repetition_penalty=1.0))
    moved = _req("The quick brown fox jumps over the lazy dog.", 10, False,   # greedy talker, sampled CP
                 sampling=SamplingParams(do_sample=False, max_new_tokens=12, repetition_penalty=3.0))

    def run(reqs: list[SynthesisRequest], moves: list) -> list:
        eng = Engine(cv, max_sessions=2)
        real_move = eng.runner.move
        eng.runner.move = lambda *a: (moves.append(a[:2]), real_move(*a))[1]
        with _favouring(eng):
            return _run(eng, reqs)[0]

    moves: list = []
    together = run([first, moved], moves)
    alone = run([moved], [])[0]
    assert moves == [(1, 0)] and together[1].slot == 0
    assert len(set(alone.history)) > 2   # the history decided: a greedy talker without it repeats its favourite
    assert together[1].history == alone.history and torch.equal(together[1].codes(), alone.codes())


# ---- BatchedAudio: rows given back on every ending ----------------------------------------------------------------

def test_a_row_whose_reference_fails_to_decode_is_given_back(codec):
    """open() with an ICL reference the decoder refuses raises, and the row it took is free again: the one row of
    a 1-row bank opens for the next key (mutant: the row not put back when the reset fails)."""
    audio = BatchedAudio(codec, max_rows=1)
    with pytest.raises((IndexError, ValueError)):   # codes past the codebook (the engine checks them before)
        audio.open(1, 1, 1, ref_codes=torch.full((3, 16), 5000))
    assert audio.num_open == 0 and 1 not in audio
    audio.open(2, 1, 1)
    audio.push([2], _codes(3, 1))
    (out,) = audio.decode()
    assert (out.key, out.num_frames) == (2, 1)


def test_a_long_chunk_decoded_ahead_in_pieces_is_emitted_when_due_with_every_frame_once(codec):
    """A chunk longer than `piece` frames is decoded as its frames gather and held: it is emitted when its frames
    (held and pending together) reach the chunk size, each frame once, its samples the offline decode's (mutants:
    held frames not counted in the due check, pieces decoded twice, held samples emitted twice or out of
    order)."""
    codes = _codes(4, 12)
    audio = BatchedAudio(codec, max_rows=1)
    audio.piece = 2
    audio.open(1, 5, 5)
    outs = []
    for i in range(12):
        audio.push([1], codes[i:i + 1])
        if i == 11:
            audio.finish(1)
        outs += [(i, o) for o in audio.decode()]
    assert [(i, o.frame_start, o.num_frames, o.final) for i, o in outs] == [(4, 0, 5, False), (9, 5, 5, False),
                                                                             (11, 10, 2, True)]
    pcm = np.concatenate([o.pcm for _, o in outs])
    assert float(np.abs(pcm - _offline(codec, codes)).max()) <= TOL
    assert audio.num_open == 0


# ---- Session: text for a session that has ended is refused, not dropped --------------------------------------------

def test_text_for_an_ended_or_cancelled_session_is_refused_naming_why(cv):
    """append_text / end_text after the session ended (a run to max_new_tokens), or after cancel() before the engine
    took it, raise SessionEnded naming `text` and why, instead of queueing text nobody reads (mutant: only a
    session both ended and cancelled refused)."""
    eng = Engine(cv, max_sessions=1)
    s = eng.add(_req(None, 4, False, sampling=SamplingParams(max_new_tokens=3)))
    s.append_text("Hello there, how are you today?")
    while eng.has_work():
        eng.step()
    assert s.done and not s.cancelled
    with pytest.raises(SessionEnded, match="max_new_tokens") as e:
        s.append_text("more")
    assert e.value.field == "text"
    with pytest.raises(SessionEnded):
        s.end_text()
    c = eng.add(_req(None, 5, False))
    eng.cancel(c)
    with pytest.raises(SessionEnded, match="cancelled"):
        c.append_text("late")
    assert not c.pending_text


# ---- EngineDriver: a released session leaves nothing behind --------------------------------------------------------

def test_a_released_session_drops_its_chunks_now_and_is_forgotten_once_ended(cv):
    """Closing a reader drops the chunks already delivered to its session at once (a thread still inside the
    reading gets none of them), and a session the engine already ended (a direct `engine.step()`) is forgotten at
    once, not kept until the next open (mutants: the queue not cleared on release; the `_out_of_engine` case
    dropped)."""
    driver = EngineDriver(Engine(cv, max_sessions=2))
    long_ = driver.open(_req("The quick brown fox jumps over the lazy dog.", 1, True, first_chunk_frames=1,
                             chunk_frames=1, sampling=SamplingParams(max_new_tokens=30)))
    short = driver.open(_req("Hi.", 2, False, sampling=SamplingParams(max_new_tokens=4)))
    assert [c.is_last for c in driver.chunks(short)] == [True]
    assert len(driver._queues[long_.id]) > 0          # delivered while the short one was read, not read yet
    driver.chunks(long_).close()
    assert not driver._queues.get(long_.id) and long_.cancelled
    assert [c.is_last for c in driver.chunks(driver.open(_req("Hi.", 3, False)))] == [True]   # steps past the end
    assert not driver._queues and not driver._abandoned

    ended = driver.open(_req("Hi.", 4, False, sampling=SamplingParams(max_new_tokens=4)))
    while not ended.done:
        driver.engine.step()                          # its last chunk never reaches the driver
    driver.chunks(ended).close()
    assert not driver._queues and not driver._abandoned
