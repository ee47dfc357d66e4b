"""The batched step, the streaming audio and the sampling parameters, pinned by the second pass of a mutation
review of qwen_tts_core/generate/runner.py, audio_stream.py, session.py and driver.py (mutant ids R/A/N/D of that
review's file). These are the mutants its first pass did not run: each was applied alone and run against the
targeted fast suite (the review's own file first); each test here failed on one that the suite let pass, named in
its docstring. The rules: each sampling parameter reaches the draw it is meant for (the talker's or the code
predictor's, in both samplers, on the eager plan too); a row reads its own newest key at a key-length bucket's
edge and its last text embedding when the text fills the buffer; sessions starting together share the fewest
bucketed prefill passes; a long audio chunk is decoded in pieces of at most `piece` frames; a push naming a key twice
is refused; a reader never loses its last chunk to a step another thread took. Tiny random checkpoints on CPU; no
Ray."""

from __future__ import annotations

import threading

import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.driver import EngineDriver


def _req(text: str | None, seed: int, audio: bool = False, **kw) -> SynthesisRequest:
    kw.setdefault("sampling", SamplingParams(max_new_tokens=10))
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english", seed=seed,
                            decode_audio=audio, **kw)


def _codes(eng: Engine, sp: SamplingParams, seed: int = 11, text: str = "The quick brown fox jumps.") -> torch.Tensor:
    (s,) = eng.run_all([_req(text, seed, sampling=sp)])
    return s.codes()


GREEDY = dict(do_sample=False, subtalker_dosample=False)


# ---- each sampling parameter reaches its own draw -----------------------------------------------------------------

@pytest.mark.parametrize("sp, same_as_greedy", [
    pytest.param(dict(do_sample=False, subtalker_dosample=True, subtalker_top_k=1), True, id="cp-top-k-1"),
    pytest.param(dict(do_sample=False, subtalker_dosample=True, subtalker_top_k=1, subtalker_top_p=0.99), True,
                 id="cp-top-k-1-sorted"),
    pytest.param(dict(do_sample=True, top_k=0, top_p=1e-6, subtalker_dosample=False), True, id="talker-top-p-tiny"),
    pytest.param(dict(do_sample=True, top_k=50, subtalker_dosample=False), False, id="talker-sampled"),
    pytest.param(dict(do_sample=False, subtalker_dosample=True, subtalker_top_k=0, subtalker_top_p=1e-6), True,
                 id="cp-top-p-tiny"),
])
def test_each_filter_reaches_the_draw_it_belongs_to_on_the_eager_plan(cv, sp, same_as_greedy):
    """Device sampler, eager plan: a code predictor sampling with subtalker_top_k=1 (on the top-k plan and on the
    sorted one, which reads each row's top_k tensor), or either model with a top_p so
    small that only the most likely id is left, draws the greedy codes; a talker sampling with top_k=50 beside a
    greedy code predictor does not (mutants R25: the code predictor's top_k taken from the talker's; R55: the host
    plan ignoring the talker's top_p, so the eager step skips top-p; R42: the talker's plan made from the code
    predictor's parameters, so a greedy code predictor made the talker greedy; R43: the plan reading every row as
    greedy)."""
    eng = Engine(cv, max_sessions=1)
    got = _codes(eng, SamplingParams(max_new_tokens=12, repetition_penalty=1.0, **sp))
    greedy = _codes(eng, SamplingParams(max_new_tokens=12, repetition_penalty=1.0, **GREEDY))
    assert got.shape[0] >= 6
    assert torch.equal(got, greedy) is same_as_greedy


def _tie_first_two(mod, inp, out: torch.Tensor) -> torch.Tensor:
    out = out.clone()
    out[..., :2] = 1e4   # ids 0 and 1 tied, far above the rest: greedy takes 0, a draw either
    return out


@pytest.mark.parametrize("sampler", ["device", "torch"])
def test_a_greedy_talker_stays_greedy_beside_a_sampling_code_predictor(cv, sampler):
    """The talker draws with do_sample/temperature/top_k/top_p, the code predictor with the subtalker_* ones: with
    two talker ids tied far above the rest, a greedy talker takes the first of them every time, however the code
    predictor samples (mutant R19: the torch sampler's pickers given each other's parameters, so the talker sampled
    between the two)."""
    eng = Engine(cv, max_sessions=1, sampler=sampler)
    hook = eng.talker.codec_head.register_forward_hook(_tie_first_two)
    try:
        (s,) = eng.run_all([_req("Hello there.", 3, sampling=SamplingParams(
            do_sample=False, subtalker_dosample=True, subtalker_temperature=1.5, repetition_penalty=1.0,
            max_new_tokens=12))])
    finally:
        hook.remove()
    assert s.history == [0] * 12


# ---- the driver: a chunk delivered by another thread's step is read, and the end is reported once -----------------

class _TakenFirst:
    """The driver's step lock, with another reader's steps run just before this thread gets it: they deliver
    `s`'s last chunk and leave the engine with nothing to do (the window between a reader's look at its queue and
    its taking the lock)."""

    def __init__(self, driver: EngineDriver, s) -> None:
        self.driver, self.s, self.lock, self.armed = driver, s, threading.Lock(), True

    def acquire(self, blocking: bool = True) -> bool:
        if self.armed:
            self.armed = False
            d = self.driver
            while not d._queues.get(self.s.id):
                d._deliver(d.engine.step())
        return self.lock.acquire(blocking)

    def release(self) -> None:
        self.lock.release()


def test_a_last_chunk_delivered_while_the_reader_took_the_lock_is_read_not_an_error(cv):
    """A reader whose queue was empty takes the step lock after another thread's step delivered its last chunk and
    left the engine idle: it reads that chunk (mutant D18: it stepped anyway and raised "not in the engine any
    more")."""
    driver = EngineDriver(Engine(cv, max_sessions=1))
    s = driver.open(_req("Hi.", 1, sampling=SamplingParams(max_new_tokens=4)))
    driver._step_lock = _TakenFirst(driver, s)
    chunks = list(driver.chunks(s))
    assert [c.is_last for c in chunks] == [True] and chunks[0].finish_reason == "max_new_tokens"
    assert s.id not in driver._queues


def test_on_end_is_called_once_when_the_reading_ends_not_at_garbage_collection(cv):
    """on_end runs once, as soon as the reading is over (its last chunk read), and a close() after that does not
    run it again (mutants D13: on_end left to the garbage collector; D20: on_end run again by close())."""
    driver = EngineDriver(Engine(cv, max_sessions=1))
    ends: list[int] = []
    s = driver.open(_req("Hi.", 1, sampling=SamplingParams(max_new_tokens=4)))
    reader = driver.chunks(s, on_end=lambda: ends.append(1))
    assert [c.is_last for c in reader] == [True]
    assert ends == [1]
    reader.close()
    assert ends == [1]


# ---- the batched step: a row reads its own newest key at a bucket's edge ------------------------------------------

def _no_eos(eng: Engine):
    eos = eng.eos_id
    return eng.talker.codec_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), -1e4)))


FOX = "The quick brown fox jumps over the lazy dog."


def test_a_row_at_a_key_bucket_edge_reads_its_own_newest_key(cv):
    """A step reads keys up to the length bucket above the highest position written, that position included: a
    session crossing position 64 (a bucket edge) alone gives the codes it gives beside a longer session, whose
    positions set the read length then (mutant R36: keys read for positions 0..max_pos-1, so the row at the edge
    lost its own newest key whenever it was the longest)."""
    short = _req(" ".join([FOX] * 3), 21, non_streaming_mode=True, sampling=SamplingParams(max_new_tokens=8))
    long_ = _req(" ".join([FOX] * 8), 22, non_streaming_mode=True, sampling=SamplingParams(max_new_tokens=8))

    def run(reqs):
        eng = Engine(cv, max_sessions=2)
        hook = _no_eos(eng)
        try:
            return eng.run_all(reqs)
        finally:
            hook.remove()

    alone = run([short])[0]
    a, b = run([short, long_])
    T = a.prompt.prefill.shape[0]
    assert T < 64 < T + alone.num_frames and b.prompt.prefill.shape[0] > 64, T  # the edge crossed; b is longer
    assert torch.equal(alone.codes(), a.codes())


def test_the_last_text_embedding_of_a_full_text_buffer_is_read(cv, monkeypatch):
    """A session whose trailing text exactly fills the text buffer (64 embeddings in a 64-wide buffer) is fed its
    last one at text position 63, and the pad after it (mutant R52: the read index clamped one short, so the
    second-last embedding was fed twice and the last never)."""
    from qwen_tts_core.generate import runner as runner_mod

    eng = Engine(cv, max_sessions=1, initial_cache_len=64)
    r = eng.runner
    W, C = r.text_buf.shape[1], r.hidden.shape[1]
    g = torch.Generator().manual_seed(1)
    trailing = [torch.randn(C, generator=g) for _ in range(W)]
    fed: list[torch.Tensor] = []
    real = runner_mod.talker_step
    monkeypatch.setattr(runner_mod, "talker_step", lambda talker, cache, pos, embeds, *a: (
        fed.append(embeds.clone()), real(talker, cache, pos, embeds, *a))[1])
    with torch.inference_mode():
        r.start(0, torch.randn(5, C, generator=g) * 0.1, trailing, SamplingParams(**GREEDY), 1)
        frame = eng.talker.embed_frame(r.last_codes[:1])
        for tp, want in ((W - 1, trailing[-1]), (W, r.tts_pad)):
            r.text_pos[0] = tp
            r.step([], [0], int(r.pos[0]))
            torch.testing.assert_close(fed[-1][0], frame[0] + want)


def test_prompts_of_different_lengths_started_together_each_take_their_own_last_position(cv):
    """start_many right-pads prompts of different lengths into one pass: each row's first id and hidden state are
    those at its own last position, as started alone (mutant R48: the padded pass's last position taken for every
    row. Through the Engine an exact pass groups prompts of one length only, so this is the runner's contract)."""
    from qwen_tts_core.generate.runner import Start

    eng = Engine(cv, max_sessions=2)
    r = eng.runner
    g = torch.Generator().manual_seed(0)
    C = r.hidden.shape[1]
    a, b = torch.randn(5, C, generator=g) * 0.1, torch.randn(9, C, generator=g) * 0.1
    sp = SamplingParams(**GREEDY)
    with torch.inference_mode():
        r.start_many([Start(0, a, [], sp, 1), Start(1, b, [], sp, 2)])
        together = r.hidden[:2].clone(), r.code0[:2].clone()
        r.start(0, a, [], sp, 1)
        r.start(1, b, [], sp, 2)
    torch.testing.assert_close(together[0], r.hidden[:2], rtol=1e-4, atol=1e-5)
    assert torch.equal(together[1], r.code0[:2])


def test_a_static_engine_prefills_sessions_starting_together_in_the_fewest_bucket_pieces(cv, prefill_rows):
    """A static engine pads prompts within the largest prefill bucket into shared passes of 4, 2, 1 rows (largest
    first), each padded to the length bucket of its LONGEST prompt: three prompts across a bucket edge take two
    passes of 2 and 1 rows, and each session's codes are those it gives alone (mutants R49: pieces of one row each;
    R53: bucketed prompts grouped only by equal length; R50: a piece padded to its first (shortest) prompt's bucket,
    which the longer one does not fit: the pass fails and they start one by one)."""
    texts = ["Hi.", "Good morning to you all!", "Press one for sales, two for support, or stay on the line now."]
    reqs = [_req(t, 30 + i, sampling=SamplingParams(max_new_tokens=6), non_streaming_mode=True)
            for i, t in enumerate(texts)]
    eng = Engine(cv, max_sessions=4, static=True, max_len=512)
    together = eng.run_all(reqs)
    lens = sorted(s.prompt.prefill.shape[0] for s in together)
    assert lens[0] <= 16 < lens[1] <= 32 < lens[2] <= 64, lens
    assert prefill_rows == [2, 1]
    for r, s in zip(reqs, together):
        assert torch.equal(Engine(cv, max_sessions=4, static=True, max_len=512).run_all([r])[0].codes(), s.codes())


# ---- BatchedAudio: a long chunk is decoded ahead in pieces of at most `piece` frames --------------------------------

def test_a_long_chunk_is_decoded_ahead_as_soon_as_a_piece_has_gathered(cv):
    """A row gathering a chunk longer than `piece` frames is decoded `piece` frames a call as they gather: no
    decoder call takes more of its frames than that (the bound on a call's activations), and the chunk is still
    emitted whole when due (mutant A15: `pending > piece`, so every call took one frame more than the bound)."""
    from qwen_tts_core.generate.audio_stream import BatchedAudio

    audio = BatchedAudio(cv.codec, max_rows=1)
    audio.piece = 2
    calls: list[int] = []
    real = audio.bank.decode
    audio.bank.decode = lambda rows, lengths: (calls.append(max(lengths)), real(rows, lengths))[1]
    audio.open(1, 6, 6)
    codes = torch.randint(0, 2048, (6, 16), generator=torch.Generator().manual_seed(5))
    outs = []
    for i in range(6):
        audio.push([1], codes[i:i + 1])
        outs += audio.decode()
    assert calls == [2, 2, 2]
    assert [(o.frame_start, o.num_frames) for o in outs] == [(0, 6)]


def test_a_push_naming_a_key_twice_is_refused_and_loses_no_frame(cv):
    """push() takes one new frame per key: a key named twice in one push is refused and nothing of that push is
    kept, so the row's next frames still decode as its offline audio (mutant A05: the check dropped: both frames
    written at the same pending index, one lost and a stale one decoded in its place)."""
    from qwen_tts_core.generate.audio_stream import BatchedAudio

    audio = BatchedAudio(cv.codec, max_rows=2)
    audio.open(1, 2, 2)
    codes = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="repeat"):
        audio.push([1, 1], codes)
    audio.push([1], codes[:1])
    audio.push([1], codes[1:])
    (out,) = audio.decode()
    assert (out.frame_start, out.num_frames) == (0, 2)
    want = cv.codec.decoder.decode(codes.T[None])[0].numpy()
    assert float(abs(out.pcm - want).max()) <= 1e-4
