"""Engine behaviour on tiny checkpoints (codes level): batching, joining, cancel, guard, limits, incremental text."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import Engine, EngineBusy, SamplingParams, SynthesisRequest
from qwen_tts_core.errors import SessionEnded

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=24)
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Good morning!", "Press one for sales."]


def req(text, speaker="vivian", sampling=GREEDY, **kw) -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker=speaker, language="english",
                            sampling=sampling, decode_audio=False, **kw)


def run_alone(model, r: SynthesisRequest) -> torch.Tensor:
    return Engine(model, max_sessions=1).run_all([r])[0].codes()


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


def test_batched_equals_alone(model):
    together = Engine(model, max_sessions=4).run_all([req(t) for t in TEXTS])
    for t, s in zip(TEXTS, together):
        assert s.finish_reason == "max_new_tokens"
        assert s.codes().shape == (GREEDY.max_new_tokens - 1, 16)  # N sampled ids -> N-1 frames, as HF
        assert torch.equal(s.codes(), run_alone(model, req(t)))


def test_session_joins_mid_utterance(model):
    eng = Engine(model, max_sessions=2)
    first = eng.add(req(TEXTS[0]))
    for _ in range(7):
        eng.step()
    late = eng.add(req(TEXTS[1]))
    while eng.has_work():
        eng.step()
    assert torch.equal(first.codes(), run_alone(model, req(TEXTS[0])))
    assert torch.equal(late.codes(), run_alone(model, req(TEXTS[1])))


def test_more_requests_than_slots_queue_then_run(model):
    eng = Engine(model, max_sessions=2, max_queue=8)
    sessions = [eng.add(req(t)) for t in TEXTS]
    eng.step()
    assert eng.num_active == 2 and eng.num_queued == 2
    while eng.has_work():
        eng.step()
    assert all(s.finish_reason == "max_new_tokens" for s in sessions)
    assert torch.equal(sessions[3].codes(), run_alone(model, req(TEXTS[3])))


def test_queue_full_is_busy_not_crash(model):
    eng = Engine(model, max_sessions=1, max_queue=2)
    eng.add(req(TEXTS[0]))
    eng.add(req(TEXTS[1]))
    with pytest.raises(EngineBusy, match="max_queue"):
        eng.add(req(TEXTS[2]))


def test_cancel_frees_slot_and_twice_is_noop(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(TEXTS[0]))
    eng.step()
    assert eng.num_active == 1 and eng.free_slots == []
    eng.cancel(s)
    eng.cancel(s)
    chunks = eng.step()
    assert s.finish_reason == "cancelled" and s.done
    assert eng.num_active == 0 and eng.free_slots == [0]
    assert [c.is_last for c in chunks if c.session_id == s.id] == [True]
    eng.cancel(s)  # after finishing: still a no-op
    other = eng.add(req(TEXTS[1]))
    while eng.has_work():
        eng.step()
    assert torch.equal(other.codes(), run_alone(model, req(TEXTS[1])))


def test_cancel_while_queued(model):
    eng = Engine(model, max_sessions=1)
    a, b = eng.add(req(TEXTS[0])), eng.add(req(TEXTS[1]))
    eng.cancel(b)
    while eng.has_work():
        eng.step()
    assert a.finish_reason == "max_new_tokens" and b.finish_reason == "cancelled" and b.num_frames == 0


def test_runaway_guard_trips(model):
    eng = Engine(model, max_sessions=1, guard_frames_per_token=1.0, guard_base_frames=3)
    s = eng.run_all([req("Hi.", sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                        max_new_tokens=500))])[0]
    assert s.finish_reason == "guard"
    assert s.num_frames == s.max_frames == 3 + s.prompt.num_text_tokens


def test_interactive_admitted_before_bulk(model):
    eng = Engine(model, max_sessions=1)
    bulk = eng.add(req(TEXTS[0], priority="bulk"))
    inter = eng.add(req(TEXTS[1], priority="interactive"))
    eng.step()
    assert inter.slot == 0 and bulk.phase == "queued"


def test_seeded_sampling_is_reproducible_and_batch_invariant(model):
    sp = SamplingParams(max_new_tokens=16)
    alone = run_alone(model, req(TEXTS[0], sampling=sp, seed=11))
    again = run_alone(model, req(TEXTS[0], sampling=sp, seed=11))
    other = run_alone(model, req(TEXTS[0], sampling=sp, seed=12))
    batch = Engine(model, max_sessions=2).run_all([req(TEXTS[1], sampling=sp, seed=5),
                                                   req(TEXTS[0], sampling=sp, seed=11)])
    assert torch.equal(alone, again) and torch.equal(alone, batch[1].codes())
    assert not torch.equal(alone, other)


@pytest.mark.parametrize("pieces", [
    pytest.param(["The quick brown fox jumps over the lazy dog."], id="one-piece"),
    pytest.param(["The qu", "ick bro", "wn fox ", "jumps over", " the lazy dog", "."], id="split-words"),
    pytest.param(list("The quick brown fox jumps over the lazy dog."), id="char-by-char"),
    pytest.param(["\n", "\nThe quick", " brown fox."], id="leading-newlines"),   # they merge into the role's "\n"
    pytest.param(["Hi <|im_e", "nd|> there."], id="added-token-split"),
])
def test_incremental_text_equals_all_at_once(model, pieces):
    full = run_alone(model, req("".join(pieces)))
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    waits = 0
    for p in pieces:
        s.append_text(p)
        for _ in range(2):  # the talker may run ahead of the text: it must wait, not invent the rest
            eng.step()
            p_ = s.prompt
            waits += int(p_ is not None and s.phase == "talker" and not p_.text_ended
                         and s.text_step >= len(p_.trailing))
    s.end_text()
    while eng.has_work():
        eng.step()
    assert torch.equal(s.codes(), full)
    if len(pieces) > 5:
        assert waits > 0


def test_incremental_bytes_split_multibyte_characters(model):
    text = "你好，世界。Hello."
    data = text.encode("utf-8")
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    for i in range(0, len(data), 2):  # cuts through 3-byte characters
        s.append_text(data[i:i + 2])
        eng.step()
    s.end_text()
    while eng.has_work():
        eng.step()
    assert torch.equal(s.codes(), run_alone(model, req(text)))


def test_incremental_misuse(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    s.append_text("Hello")
    s.end_text()
    with pytest.raises(ValueError, match="after end_text"):
        s.append_text("more")
    with pytest.raises(ValueError, match="twice"):
        s.end_text()
    full = eng.add(req("Hello"))
    with pytest.raises(ValueError, match="full text"):
        full.append_text("x")


def test_text_for_an_ended_session_is_refused_not_dropped(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None, sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=3)))
    s.append_text("Hello there, how are you today?")
    while eng.has_work():
        eng.step()
    assert s.finish_reason == "max_new_tokens"
    for send in (lambda: s.append_text(" more"), s.end_text):
        with pytest.raises(SessionEnded, match="already ended .max_new_tokens"):
            send()
    c = eng.add(req(None))
    eng.cancel(c)
    with pytest.raises(SessionEnded, match="cancelled"):
        c.append_text("x")


def test_incremental_blank_text_is_refused_as_whole_blank_text_is(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    s.append_text("   ")
    s.end_text()
    while eng.has_work():
        eng.step()
    assert s.finish_reason == "error" and s.error_field == "text" and "empty" in s.error
    assert eng.free_slots == [0]


@pytest.mark.parametrize("pieces", [["\u200b \u200b ", "\u200b"], ["\x00 \x00 ", "\x00"], ["  \n", "\t"]])
def test_incremental_text_blank_so_far_waits_and_blank_at_end_is_refused(model, pieces):
    """Text blank so far (zero-width characters, NULs, spaces) but with ids committed started the session: ended
    blank, it then spoke to max_new_tokens. It waits (no slot) until a visible character, and ends refused."""
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    for p in pieces[:-1]:
        s.append_text(p)
    for _ in range(3):
        eng.step()
    assert s.phase == "queued" and s.slot == -1 and not s.frames
    s.append_text(pieces[-1])
    s.end_text()
    while eng.has_work():
        eng.step()
    assert s.finish_reason == "error" and s.error_field == "text" and not s.frames
    assert eng.free_slots == [0]


def test_a_queued_session_waiting_for_visible_text_is_no_work(model):
    """Review: admission skipped a session whose text so far was blank but `runnable` counted it (ids committed):
    the step loop never waited, 51,282 empty steps a second."""
    eng = Engine(model, max_sessions=2)
    s = eng.add(req(None))
    s.append_text("\n\n ")
    eng.step()
    assert s.committed_ids and s.phase == "queued"
    assert not eng.runnable() and not eng.wait_for_work(0.05)
    s.append_text("Hi.")
    assert eng.runnable()


def test_incremental_text_starts_at_its_first_visible_character(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    s.append_text("\u200b ")
    eng.step()
    assert s.phase == "queued"
    s.append_text("Hello there, how are you today? ")
    eng.step()
    assert s.phase != "queued" and s.slot == 0


def test_numpy_chunk_sizes_are_taken_as_ints(model):
    import numpy as np

    r = req("Hello", first_chunk_frames=np.int64(2), chunk_frames=np.int32(3))
    r.decode_audio = True  # the audio decoder is where a numpy int used to fail the session
    s = Engine(model, max_sessions=1).run_all([r])[0]
    assert s.finish_reason != "error", s.error
    assert type(s.request.first_chunk_frames) is int and type(s.request.chunk_frames) is int  # the session's copy
    assert r.first_chunk_frames == 2 and type(r.first_chunk_frames) is np.int64   # the caller's object as it was


def test_incremental_empty_text_fails_cleanly(model):
    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    s.end_text()
    while eng.has_work():
        eng.step()
    assert s.finish_reason == "error" and "empty" in s.error
    assert eng.free_slots == [0]


@pytest.mark.parametrize("field,value,match", [
    ("speaker", "nobody", "speaker"),
    ("language", "klingon", "language"),
    ("language", "Sichuan_Dialect", "language"),
    ("language", "", "language"),   # only an absent language means auto, as the reference (one rule, in the core)  # a dialect comes with its speaker; the reference refuses it too
    ("text", "   ", "text"),
    ("text", "\x00\x00", "visible"),  # NULs alone: the model babbled up to max_new_tokens
    ("text", "\u200b\u200d\x07 \ufeff", "visible"),  # zero-width, control and format characters alone
    ("first_chunk_frames", 0, "first_chunk_frames"),
    ("chunk_frames", 0, "chunk_frames"),
    ("priority", "urgent", "priority"),
    ("kind", ["custom_voice"], "kind"),
    ("non_streaming_mode", "false", "non_streaming_mode"),  # a truthy string passed for True
    ("decode_audio", "no", "decode_audio"),
])
def test_bad_requests_name_the_field(model, field, value, match):
    r = req("Hello")
    setattr(r, field, value)
    with pytest.raises(ValueError, match=match):
        Engine(model, max_sessions=1).add(r)


def test_wrong_kind_for_checkpoint(model):
    r = SynthesisRequest(kind="voice_design", text="Hi", instruct="calm", sampling=GREEDY)
    with pytest.raises(ValueError, match="voice_design"):
        Engine(model, max_sessions=1).add(r)


def test_static_fast_path_matches_dynamic(model):
    """The fixed-shape path the GPU captures in CUDA graphs (padded batch buckets, full-length static cache)."""
    eng = Engine(model, max_sessions=5, static=True, max_len=128, cuda_graphs=False)
    first = eng.add(req(TEXTS[0]))
    for _ in range(3):
        eng.step()
    rest = [eng.add(req(t)) for t in TEXTS[1:]]  # 4 rows: a padded bucket, sessions at different positions
    while eng.has_work():
        eng.step()
    for s, t in zip([first, *rest], TEXTS):
        assert torch.equal(s.codes(), run_alone(model, req(t)))


def test_static_cache_length_limit_stops_cleanly(model):
    eng = Engine(model, max_sessions=1, static=True, max_len=40, cuda_graphs=False)
    s = eng.run_all([req(TEXTS[1], sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                           max_new_tokens=500))])[0]
    assert s.finish_reason == "max_new_tokens" and s.pos < 40


def test_device_sampler_respects_filters():
    from qwen_tts_core.generate.sampling import (
        SamplePlan,
        gumbel,
        noise_key,
        sample_device,
        token_hash,
    )

    torch.manual_seed(0)
    logits = torch.randn(4, 100) * 3
    B = 4
    do = torch.tensor([False, True, True, True])
    temp = torch.full((B,), 0.9)
    top_k = torch.tensor([0, 5, 0, 3])
    top_p = torch.tensor([1.0, 1.0, 0.5, 1.0])
    salt = token_hash(100)
    seeds = torch.arange(B)
    def noise(f):
        return lambda: gumbel(noise_key(seeds, torch.full((B,), f), 0), salt)

    draws = torch.stack([sample_device(logits, do, temp, top_k, top_p, noise(f)) for f in range(300)])
    # the eager shortcuts give the same ids: top-k without a full sort where no row uses top-p, argmax when none
    # samples
    no_p = torch.ones(B)
    for f in range(50):
        full = sample_device(logits, do, temp, top_k, no_p, noise(f))
        assert torch.equal(full, sample_device(logits, do, temp, top_k, no_p, noise(f),
                                               SamplePlan.of(do.tolist(), top_k.tolist(), no_p.tolist())))
    greedy = SamplePlan.of([False] * B, top_k.tolist(), top_p.tolist())
    assert torch.equal(sample_device(logits, do & False, temp, top_k, top_p, noise(0), greedy), logits.argmax(-1))
    assert (draws[:, 0] == logits[0].argmax()).all()
    assert set(draws[:, 1].tolist()) <= set(logits[1].topk(5).indices.tolist())
    assert len(set(draws[:, 1].tolist())) > 1
    assert set(draws[:, 3].tolist()) <= set(logits[3].topk(3).indices.tolist())
    probs = (logits[2] / 0.9).softmax(-1)
    sp, si = probs.sort(descending=True)
    nucleus = set(si[: int((sp.cumsum(0) < 0.5).sum()) + 1].tolist())
    assert set(draws[:, 2].tolist()) <= nucleus


def test_bulk_never_takes_reserved_interactive_slots(model):
    eng = Engine(model, max_sessions=2, interactive_reserve=1)
    bulk = [eng.add(req(t, priority="bulk")) for t in TEXTS[:2]]
    eng.step()
    assert eng.num_active == 1 and bulk[1].phase == "queued"
    inter = eng.add(req(TEXTS[2]))
    eng.step()
    assert inter.phase != "queued" and eng.num_active == 2
    while eng.has_work():
        eng.step()
    assert all(s.finish_reason == "max_new_tokens" for s in [*bulk, inter])


def test_device_sampler_draws_from_the_right_distribution():
    """20,000 draws (one per seed) from a known distribution: frequencies within 1.5% of softmax(logits / T); draws of
    neighbouring seeds, frames and codebooks are not correlated."""
    from qwen_tts_core.generate.sampling import (
        gumbel,
        noise_key,
        sample_device,
        seed_key,
        token_hash,
    )

    n, V = 20_000, 12
    logits = torch.linspace(-2.0, 2.0, V)[None].repeat(n, 1)
    keys = torch.tensor([seed_key(s) for s in range(n)])
    salt = token_hash(V)
    ones = torch.ones(n)

    def draw(frame, cb, temp=1.0):
        noise = lambda: gumbel(noise_key(keys, torch.full((n,), frame), cb), salt)  # noqa: E731
        return sample_device(logits, torch.ones(n, dtype=torch.bool), ones * temp, torch.zeros(n, dtype=torch.long),
                             ones, noise)

    a = draw(0, 0)
    want = logits[0].softmax(-1)
    assert (torch.bincount(a, minlength=V) / n - want).abs().max() < 0.015
    hot = draw(0, 0, temp=0.5)
    assert (torch.bincount(hot, minlength=V) / n - (logits[0] / 0.5).softmax(-1)).abs().max() < 0.015
    for other in (draw(1, 0), draw(0, 1), a.roll(1)):  # next frame, next codebook, next seed
        agree = (a == other).float().mean()
        assert abs(agree - (want ** 2).sum()) < 0.015  # what independent draws agree on


def test_device_noise_of_all_codebooks_at_once_equals_one_by_one():
    """The code predictor draws the noise of its 15 codebooks in one batch: the same bits as one codebook at a time,
    and different codebooks, frames and seeds get different noise."""
    from qwen_tts_core.generate.sampling import gumbel, noise_key, seed_key, token_hash

    salt = token_hash(2048)
    keys = torch.tensor([seed_key(s) for s in (0, 1, 2**40 + 5)])
    frame = torch.tensor([0, 7, 300])
    groups = torch.arange(1, 16)
    together = gumbel(noise_key(keys, frame, groups), salt)
    assert together.shape == (3, 15, 2048)
    for g in range(1, 16):
        assert torch.equal(together[:, g - 1], gumbel(noise_key(keys, frame, g), salt))
    assert not torch.equal(together[:, 0], together[:, 1])
    assert not torch.equal(together[0], together[1])


def test_max_queue_must_leave_room_for_one(model):
    """Every added session waits in the queue until a step admits it: with max_queue=0 every add was EngineBusy."""
    with pytest.raises(ValueError, match="max_queue"):
        Engine(model, max_sessions=2, max_queue=0)
    eng = Engine(model, max_sessions=1, max_queue=1)
    eng.add(req("Hello"))
    with pytest.raises(EngineBusy):
        eng.add(req("Hello"))


def test_engines_sharing_a_model_keep_their_own_attention_layout(model, monkeypatch):
    """The drop-in API's engine (torch sampler, fp32) keeps SDPA with enable_gqa, the reference's numbers; an engine
    built later on the same model (a service's, device sampler) takes the grouped layout. Each must keep its own:
    the layout was stored on the shared model, so the last engine built decided it for every engine."""
    from qwen_tts_core.model import layers

    calls = []
    real = layers.grouped_decode_attention
    monkeypatch.setattr(layers, "grouped_decode_attention", lambda *a: (calls.append(1), real(*a))[1])
    a = Engine(model, max_sessions=2, sampler="torch")
    b = Engine(model, max_sessions=2)
    assert (a.sdpa["layout"], b.sdpa["layout"]) == ("gqa", "grouped")
    a.run_all([req(TEXTS[0])])
    assert not calls  # A's talker steps ran SDPA with enable_gqa
    b.run_all([req(TEXTS[0])])
    assert calls  # B's ran the grouped layout


def test_device_noise_is_finite_at_the_top_of_its_grid():
    """The Gumbel noise must stay finite at the top of its uniform's 2**24 grid, which float32 rounds to 1.0: there
    the noise was +inf, filtered ids became NaN and argmax drew any id (a blocked special id, once in ~5500
    talker draws, crashed the codec decode of every stream sharing the call). Found by hash search: the key whose
    draw sits at the top of the grid for one token; the draw still picks a top-k id."""
    from qwen_tts_core.generate.sampling import grid_top_key, gumbel, sample_device, token_hash

    V, tok = 3072, 2370
    salt = token_hash(V)
    key = grid_top_key(salt, tok)
    assert key is not None
    noise = gumbel(key, salt)
    assert torch.isfinite(noise).all() and noise[0, tok] == noise.max()
    logits = torch.randn(1, V)
    logits[:, 2048:] = float("-inf")  # the talker's blocked special ids
    ids = sample_device(logits, torch.ones(1, dtype=torch.bool), torch.ones(1), torch.full((1,), 50, dtype=torch.long),
                        torch.ones(1), lambda: noise)
    assert int(ids) in set(torch.topk(logits[0], 50).indices.tolist())


def test_eager_steps_read_keys_up_to_the_longest_session_in_steps_of_64(model, monkeypatch):
    """A growing-cache engine's talker step reads the keys of the longest active session rounded up to 64, not to
    the next power of two (at 8 rows on CPU these reads cost as much as the weights); the keys it no longer reads
    are masked ones, so the codes are those of the power-of-two buckets bit for bit, sampled or greedy."""
    from qwen_tts_core.generate import runner as runner_mod

    seen: list[tuple[int, int]] = []
    step = runner_mod.talker_step

    def recording(talker, cache, positions, embeds, read_len, layout="gqa"):
        seen.append((read_len, int(positions.max())))
        return step(talker, cache, positions, embeds, read_len, layout)

    long = SamplingParams(max_new_tokens=150, top_k=20, subtalker_top_k=20)
    reqs = lambda: [req(TEXTS[1], sampling=long, seed=5), req(TEXTS[0], sampling=GREEDY)]  # noqa: E731
    monkeypatch.setattr(runner_mod, "talker_step", recording)
    grid = [s.codes() for s in Engine(model, max_sessions=2).run_all(reqs())]
    assert {L for L, _ in seen} >= {128, 192}, sorted({L for L, _ in seen})
    assert all(L % 64 == 0 and L - 64 <= top < L for L, top in seen)   # within 63 keys of the longest row
    buckets = runner_mod.length_buckets(4096)
    monkeypatch.setattr(runner_mod, "read_length", lambda n, max_len, b: runner_mod._first_at_least(buckets, n))
    seen.clear()
    pow2 = [s.codes() for s in Engine(model, max_sessions=2).run_all(reqs())]
    assert 256 in {L for L, _ in seen}
    assert grid[0].shape[0] == 149 and all(torch.equal(a, b) for a, b in zip(grid, pow2))


def test_read_length_rounds_to_64_or_takes_the_bucket():
    from qwen_tts_core.generate.runner import length_buckets, read_length

    assert [read_length(n, 4096, None) for n in (1, 64, 65, 129, 300, 4090)] == [64, 64, 128, 192, 320, 4096]
    assert read_length(100, 100, None) == 100          # never past max_len
    assert [read_length(n, 4096, length_buckets(4096)) for n in (65, 129, 300)] == [128, 256, 512]


def waiting_for_text(s) -> bool:
    """Incremental session `s` has used up the text it was given and waits for more."""
    return s.prompt is not None and not (s.text_step < len(s.prompt.trailing) or s.prompt.text_ended)


def feed_until_waiting_at(eng: Engine, a, pos: int) -> None:
    """One word per talker step until incremental session `a` waits for text at position `pos` or later."""
    for _ in range(500):
        if a.pos >= pos and waiting_for_text(a):
            return
        if a.prompt is None or waiting_for_text(a):
            a.append_text(" a")
        eng.step()


def test_a_session_waiting_for_text_at_the_cache_capacity_fails_no_one(model):
    """A growing cache grew to what the talker's advancing rows needed, but every row below the highest runs in the
    step and writes a key at its own position: a session waiting for text exactly at the capacity (it was the
    longest when it got there) wrote past the end, and the step's IndexError failed every active session (another
    user's too). The cache now holds every row's position."""
    eng = Engine(model, max_sessions=2, initial_cache_len=64)
    a = eng.add(req(None, sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=400)))
    a.append_text("Hello")
    feed_until_waiting_at(eng, a, 64)
    assert a.pos == 64 == eng.runner.cache.capacity and waiting_for_text(a) and a.slot == 0
    b = eng.add(req("Good morning!"))
    chunks = []
    while not b.done:
        chunks += eng.step()
    assert b.finish_reason == "max_new_tokens" and not a.done, [c.error for c in chunks if c.is_last]
    assert torch.equal(b.codes(), run_alone(model, req("Good morning!")))
    a.end_text()
    while not a.done:
        eng.step()
    assert a.finish_reason in ("eos", "max_new_tokens")


@pytest.mark.parametrize("size,kept", [("1b7", True), ("0b6", False), ("", False), ("b6", False), ("7", True)])
def test_instruct_is_dropped_for_the_sizes_the_reference_drops_it_for(size, kept):
    """The reference tests `tts_model_size in "0b6"`: a config without a size tag ("") drops instruct too."""
    from qwen_tts_core.generate.requests import instruct_supported

    assert instruct_supported(size) is kept


@pytest.mark.parametrize("kwargs, name", [
    (dict(guard_frames_per_token=float("nan")), "guard_frames_per_token"),
    (dict(guard_frames_per_token=-1.0), "guard_frames_per_token"),
    (dict(guard_frames_per_token=0), "guard_frames_per_token"),
    (dict(guard_frames_per_token=True), "guard_frames_per_token"),
    (dict(guard_base_frames=-100), "guard_base_frames"),
    (dict(guard_base_frames=1.5), "guard_base_frames"),
    (dict(interactive_reserve="1"), "interactive_reserve"),
    (dict(interactive_reserve=True), "interactive_reserve"),
])
def test_engine_guard_and_reserve_arguments_are_checked_naming_them(model, kwargs, name):
    """Review: a NaN guard failed every request at admission with an unnamed 'cannot convert float NaN to integer';
    a negative one ended requests after one frame as 'guard'; interactive_reserve='1' raised an unnamed TypeError."""
    with pytest.raises(ValueError, match=name):
        Engine(model, max_sessions=2, **kwargs)


def test_engine_accepts_numpy_and_int_guards(model):
    import numpy as np

    Engine(model, max_sessions=2, guard_frames_per_token=np.float32(2.5), guard_base_frames=0)
    Engine(model, max_sessions=2, guard_frames_per_token=3, guard_base_frames=np.int64(64),
           interactive_reserve=np.int64(1))  # NumPy integers passed before the checks came (second review)


def test_a_whole_text_is_tokenized_on_the_thread_that_adds_it(model, monkeypatch):
    """Review (stop 28, left open then): a whole text was tokenized when its session was admitted, on the step
    thread: a multi-MB text given to the core API (4M characters: 2.3 s) stalled every other session's steps before
    max_len refused it. `add` tokenizes it on the caller's thread now; the step only builds the prompt."""
    import threading

    threads = []
    target = model.tokenizer.target
    monkeypatch.setattr(model.tokenizer, "target", lambda text: threads.append(threading.get_ident()) or target(text))
    eng = Engine(model, max_sessions=2)
    added = []
    adder = threading.Thread(target=lambda: added.append(eng.add(req(TEXTS[0]))))
    adder.start()
    adder.join()
    (s,) = added
    assert threads == [adder.ident]
    while s.finish_reason is None:
        eng.step()
    assert threads == [adder.ident] and s.finish_reason in ("eos", "max_new_tokens") and s.frames
