"""Every session ends, and its end says how: one `is_last` chunk per session whatever happens (prefill-only
sessions, cancels, bad prompts, an engine failure), errors named on that chunk, `wait_for_work` blocking without
spinning, and incremental text whose cost does not grow with the text already committed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.text_feed import IncrementalText

G = dict(do_sample=False, subtalker_dosample=False)


def req(text, max_new_tokens=8, decode_audio=False, **kw) -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text=text, speaker="vivian", language="english",
                            sampling=SamplingParams(max_new_tokens=max_new_tokens, **G), decode_audio=decode_audio,
                            **kw)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


def drain(eng: Engine, max_steps: int = 500) -> list:
    chunks = []
    for _ in range(max_steps):
        if not eng.has_work():
            break
        chunks += eng.step()
    assert not eng.has_work(), "engine did not finish"
    return chunks


def lasts(chunks, sid):
    return [c for c in chunks if c.session_id == sid and c.is_last]


@pytest.mark.parametrize("decode_audio", [False, True], ids=["codes", "audio"])
def test_session_that_ends_at_prefill_delivers_its_last_chunk(model, decode_audio):
    eng = Engine(model, max_sessions=2)
    s = eng.add(req("Hello there.", max_new_tokens=1, decode_audio=decode_audio))
    other = eng.add(req("Good morning!", max_new_tokens=3, decode_audio=decode_audio))
    chunks = drain(eng)
    (last,) = lasts(chunks, s.id)
    assert last.finish_reason == "max_new_tokens" and last.error is None and s.num_frames == 0
    assert last.pcm.size == 0 and last.num_frames == 0
    assert len(lasts(chunks, other.id)) == 1 and other.num_frames == 2


def test_every_added_session_ends_exactly_once(model):
    eng = Engine(model, max_sessions=2, max_queue=16)
    ok = eng.add(req("Hello world."))
    one = eng.add(req("Hi.", max_new_tokens=1))
    queued_cancel = eng.add(req("Cancelled while queued."))
    empty = eng.add(req(None))        # incremental, ended with no text: fails when it starts
    empty.end_text()
    active_cancel = eng.add(req("Cancelled while running.", max_new_tokens=50))
    eng.cancel(queued_cancel)
    chunks = eng.step()
    for _ in range(3):
        chunks += eng.step()
    eng.cancel(active_cancel)
    chunks += drain(eng)
    sessions = [ok, one, queued_cancel, empty, active_cancel]
    for s in sessions:
        assert len(lasts(chunks, s.id)) == 1, s.id
    assert [s.finish_reason for s in sessions] == ["max_new_tokens", "max_new_tokens", "cancelled", "error",
                                                   "cancelled"]
    (err,) = lasts(chunks, empty.id)
    assert err.error and "empty" in err.error and err.error_field == "text"
    assert all(c.error is None for c in chunks if c.finish_reason != "error")
    assert sorted(eng.free_slots) == [0, 1]


def test_engine_failure_ends_active_sessions_with_an_error_and_engine_recovers(model, monkeypatch):
    eng = Engine(model, max_sessions=2)
    a, b = eng.add(req("Hello world.", max_new_tokens=20)), eng.add(req("Good morning!", max_new_tokens=20))
    chunks = eng.step() + eng.step()
    calls = {"n": 0}
    real = eng.talker.forward

    def boom(*args, **kw):
        calls["n"] += 1
        raise RuntimeError("device fell over")

    monkeypatch.setattr(eng.talker, "forward", boom)
    chunks += eng.step()
    monkeypatch.setattr(eng.talker, "forward", real)
    assert calls["n"] >= 1
    for s in (a, b):
        (last,) = lasts(chunks, s.id)
        assert last.finish_reason == "error" and "device fell over" in last.error and last.error_field is None
    assert eng.num_active == 0 and not eng.has_work()
    c = eng.add(req("After the failure.", max_new_tokens=4))
    chunks = drain(eng)
    assert lasts(chunks, c.id)[0].finish_reason == "max_new_tokens" and c.num_frames == 3


def test_wait_for_work_blocks_without_spinning_and_wakes_on_text(model):
    eng = Engine(model, max_sessions=1)
    assert not eng.runnable() and eng.wait_for_work(0.01) is False
    s = eng.add(req(None, max_new_tokens=40))
    assert not eng.runnable()  # nothing to say yet
    s.append_text("Hello ")
    assert eng.runnable()
    while eng.runnable():
        eng.step()
    assert eng.num_active == 1 and not s.done  # the talker ran out of text: the session waits for more
    cpu0, t0 = time.process_time(), time.perf_counter()
    assert eng.wait_for_work(0.4) is False
    assert time.perf_counter() - t0 >= 0.35
    assert time.process_time() - cpu0 < 0.1  # blocked, not polling
    timer = threading.Timer(0.1, lambda: s.append_text("world. "))
    timer.start()
    t0 = time.perf_counter()
    assert eng.wait_for_work(5.0) is True
    assert time.perf_counter() - t0 < 2.0
    timer.join()
    s.append_text("")  # empty pieces change nothing
    threading.Timer(0.05, s.end_text).start()
    chunks = []
    while not s.done:
        if eng.wait_for_work(5.0):
            chunks += eng.step()
    assert len(lasts(chunks, s.id)) == 1


def test_wait_for_work_wakes_on_add_and_cancel(model):
    eng = Engine(model, max_sessions=1)
    r = req("Hello.")
    threading.Timer(0.05, lambda: eng.add(r)).start()
    assert eng.wait_for_work(5.0) is True
    (s,) = list(eng.queues["interactive"])
    eng.step()
    s2 = eng.add(req("Queued behind."))
    while eng.runnable() and not s.done:
        eng.step()
    eng.cancel(s2)
    assert eng.runnable()
    drain(eng)
    assert s2.finish_reason == "cancelled"


def test_incremental_text_cost_does_not_grow_with_committed_text():
    """10,000 one-character pieces: every call re-reads only the uncommitted tail (a word), not the whole text."""
    seen = {"split": 0, "encode": 0}

    def split(t):
        seen["split"] += len(t)
        offs, start = [0], 0
        for i in range(1, len(t)):
            if t[i] == " " and t[i - 1] != " ":
                offs.append(i)
        return offs if start == 0 else offs

    def encode(t):
        seen["encode"] += len(t)
        return [ord(c) for c in t]

    feed = IncrementalText(encode, split)
    text = ("lorem ipsum dolor sit amet " * 400)[:10_000]
    got = []
    for ch in text:
        got += feed.append(ch)
    got += feed.end()
    assert got == [ord(c) for c in text]
    assert seen["encode"] == len(text)
    assert seen["split"] < 10 * len(text)  # whole-text re-splitting would be ~ n^2 / 2 = 5e7


@pytest.mark.parametrize("unit", ["a", "a\u0301", "\U0001F600", "\u0B47\u0B3E", "!"],
                         ids=["one-word", "combining", "emoji", "oriya", "punctuation"])
def test_a_tail_without_a_boundary_is_bounded(model, unit):
    """Review (WebSocket): a text with no point it can be split at (one long word, a combining mark after every
    letter) kept growing the uncommitted tail, and every piece re-split and re-normalized all of it on the engine's
    step thread: 2048 pieces of "a\u0301" cost 4.6 s, the square of the text. The tail is bounded: past
    MAX_OPEN_CHARS it is refused naming text; each piece checks only the last CANDIDATES boundaries."""
    from qwen_tts_core.errors import RequestError
    from qwen_tts_core.generate.text_feed import MAX_OPEN_CHARS

    feed = IncrementalText.of(model.tokenizer)
    t0 = time.perf_counter()
    with pytest.raises(RequestError) as e:
        for _ in range(4096):
            feed.append(unit)
    assert e.value.field == "text" and MAX_OPEN_CHARS < len(feed.tail) <= MAX_OPEN_CHARS + len(unit)
    assert time.perf_counter() - t0 < 10   # (a generous bound on a loaded CI host; 0.05-0.15 s here)


def test_a_refused_tail_fails_its_session_alone_queued_or_running(model):
    """The refusal reaches the session as a 400 naming text, whether its text was taken while it waited for a slot
    (it was outside any guard there: it would have failed the whole step) or while it ran; the others go on."""
    eng = Engine(model, max_sessions=2)
    other = eng.add(req("A normal request that speaks.", max_new_tokens=12))
    running = eng.add(req(None, max_new_tokens=40))
    running.append_text("Hello ")
    for _ in range(50):
        eng.step()
        if running.prompt is not None:
            break
    queued = eng.add(req(None, max_new_tokens=12))   # both slots are taken: it waits, its text taken meanwhile
    queued.append_text("a" * 2000)
    running.append_text("b" * 2000)
    chunks = drain(eng)
    for s in (running, queued):
        (last,) = lasts(chunks, s.id)
        assert last.finish_reason == "error" and last.error_field == "text", (last.finish_reason, last.error)
    (last,) = lasts(chunks, other.id)
    assert last.finish_reason in ("eos", "max_new_tokens") and not eng.has_work()


def test_incremental_text_with_the_real_tokenizer_matches_whole_text(model):
    text = "Hello  world,\n\nthis is   a test: 12345 dollars! Don't stop... 你好，世界。"
    assert fed_piece_by_piece(model.tokenizer, list(text)) == model.tokenizer.target(text).text


def fed_piece_by_piece(tok, pieces: list[str]) -> list[int]:
    """The ids IncrementalText commits for `pieces` sent one by one, then end."""
    feed = IncrementalText.of(tok)
    ids = []
    for p in pieces:
        ids += feed.append(p)
    return ids + feed.end()


@pytest.mark.parametrize("text", ["Cafe\u0301 au lait, please.", "e\u0301e\u0301 x", "A\u030a ring", "b\u0301\u0323 ok"])
@pytest.mark.parametrize("how", ["chars", "words"])
def test_incremental_text_with_decomposed_accents_matches_whole_text(model, text, how):
    """The tokenizer normalizes to NFC before it splits words: a piece boundary right before a combining accent
    would encode "e" and the accent apart ("Cafe" + U+0301), where the whole text has "Café"."""
    pieces = list(text) if how == "chars" else [w + " " for w in text.split(" ")[:-1]] + [text.split(" ")[-1]]
    assert "".join(pieces) == text
    assert fed_piece_by_piece(model.tokenizer, pieces) == model.tokenizer.target(text).text


@pytest.mark.parametrize("pieces", [["\u0958", "."], ["\u0958."], ["x \u0958", ". y"], list("a \u0958. b")])
def test_incremental_text_splits_where_the_normalized_text_splits(checkpoint_factory, tmp_path, pieces):
    """Review: split points came from the raw text but the tokenizer splits its NFC form: U+0958 (qa) decomposes
    into ka + nukta, and the nukta joins the "." after it in one piece; committed before the "." came, the two were
    encoded apart. The tiny vocabulary has no merge across that spot, so one is added (the kind a 151k vocabulary
    may hold: the nukta's last byte + ".")."""
    import json
    import shutil

    from qwen_tts_core.text.tokenizer import TextTokenizer

    d = Path(shutil.copytree(checkpoint_factory("custom_voice", "tiny"), tmp_path / "ck"))
    tj = json.loads((d / "tokenizer.json").read_text())
    new_id = max(tj["model"]["vocab"].values()) + 1
    tj["model"]["vocab"]["\u00bc."] = new_id
    tj["model"]["merges"].append("\u00bc ." if isinstance(tj["model"]["merges"][0], str) else ["\u00bc", "."])
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    vocab = json.loads((d / "vocab.json").read_text())
    (d / "vocab.json").write_text(json.dumps({**vocab, "\u00bc.": new_id}, ensure_ascii=False))
    with open(d / "merges.txt", "a") as f:
        f.write("\u00bc .\n")
    tok = TextTokenizer(d)
    text = "".join(pieces)
    whole = tok.target(text).text
    assert new_id in whole   # the merge is used: the case can fail
    assert fed_piece_by_piece(tok, pieces) == whole


@pytest.mark.parametrize("pieces", [["Hi <|im_end|>\u0338 there."], ["Hi <|im_end|>", "\u0338 there."],
                                    ["a <tts_pad>\u0338", "\u0301b c"],
                                    ["Hi <|im_e", "nd|> there."], ["Hi ", "<tts_text_eod>", " there."],
                                    ["Hi <tts_pad> there."], ["a<", "|", "im_start|", ">b"], ["x <tts_", "text_bos>"],
                                    ["<|endoftext|><|im_end|>", " <tts_pad"], ["<tts_pad", " >"]])
def test_incremental_text_with_added_tokens_matches_whole_text(model, pieces):
    """An added token written in the text ("<|im_end|>", "<tts_pad>") is one id in the whole text, as the reference
    encodes it; fed in pieces it was committed as the BPE pieces of its characters (the pre-tokenizer does not know
    added tokens), even when it came whole, and a piece ending in "<|im_e" committed "<|im" before "nd|>" came."""
    text = "".join(pieces)
    assert fed_piece_by_piece(model.tokenizer, pieces) == model.tokenizer.target(text).text


_FRAGMENTS = ["<|im_end|>", "<|im_", "end|>", "<", "|", ">", "<tts_pad>", "<tts_", "pad>", "<|endoftext|>", "_",
              "a", "b", " ", "  ", "\n", ".", "e\u0301", "\u0301", "你", "😀", "'s", "1"]


def test_incremental_text_matches_whole_text_for_any_split(model):
    """Hypothesis: any text of words, spaces, accents, CJK, emoji and pieces of added tokens, cut anywhere, commits
    the ids of the whole text."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    tok = model.tokenizer

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(st.lists(st.sampled_from(_FRAGMENTS), min_size=1, max_size=12), st.lists(st.integers(0, 60), max_size=5))
    def check(parts, cuts):
        text = "".join(parts)
        bounds = sorted({min(c, len(text)) for c in cuts})
        pieces = [text[a:b] for a, b in zip([0, *bounds], [*bounds, len(text)])]
        assert fed_piece_by_piece(tok, pieces) == tok.target(text).text, pieces

    check()


def test_a_failing_prefill_fails_only_its_own_session(model, monkeypatch):
    """Sessions that start together share one prefill; when it fails (here: a fault injected for the session
    whose text is poisoned), each is prefilled again alone and only the one at fault ends with an error; the others
    give the codes they give alone."""
    texts = ["Hello world.", "POISON here.", "Good morning!"]
    alone = [Engine(model, max_sessions=1).run_all([req(t, max_new_tokens=10)])[0].codes() for t in texts[::2]]
    eng = Engine(model, max_sessions=3)
    runner = eng.runner
    real = runner.start_many
    calls = []
    poisoned = {}

    def start_many(starts):
        calls.append(len(starts))
        if any(x.slot == poisoned["slot"] for x in starts):
            raise RuntimeError("prefill fell over")
        return real(starts)

    monkeypatch.setattr(runner, "start_many", start_many)
    sessions = [eng.add(req(t, max_new_tokens=10)) for t in texts]
    orig_prepare = eng._prepare

    def prepare(s, slot):
        if s.request.text.startswith("POISON"):
            poisoned["slot"] = slot
        return orig_prepare(s, slot)

    monkeypatch.setattr(eng, "_prepare", prepare)
    chunks = drain(eng)
    assert calls[0] == 3 and sorted(calls[1:]) == [1, 1, 1]  # together, then one by one
    (bad,) = lasts(chunks, sessions[1].id)
    assert bad.finish_reason == "error" and "prefill fell over" in bad.error
    for s, want in zip(sessions[::2], alone):
        assert lasts(chunks, s.id)[0].finish_reason == "max_new_tokens"
        assert torch.equal(s.codes(), want)
    assert sorted(eng.free_slots) == [0, 1, 2]


@pytest.mark.parametrize("sampler", ["torch", "device"])
@pytest.mark.parametrize("kw", [dict(temperature=1e-40), dict(temperature=1e-300), dict(repetition_penalty=1e-300),
                                dict(subtalker_temperature=1e-300)], ids=["temp-1e-40", "temp-1e-300", "pen-1e-300",
                                                                           "sub-temp-1e-300"])
def test_tiny_sampling_values_neither_fail_nor_touch_the_batch(model, sampler, kw):
    """A temperature or penalty so small that a logit becomes +inf made the reference sampler's multinomial raise,
    and with it the whole step: every session in the batch failed. The draw now takes that limit, the greedy id."""
    sp = SamplingParams(max_new_tokens=8, **kw)
    other = SynthesisRequest(kind="custom_voice", text="Good morning!", speaker="vivian", language="english",
                             sampling=SamplingParams(max_new_tokens=8), seed=3, decode_audio=False)
    alone = Engine(model, max_sessions=1, sampler=sampler).run_all([other])[0].codes()
    eng = Engine(model, max_sessions=2, sampler=sampler)
    odd = eng.add(SynthesisRequest(kind="custom_voice", text="Hello world.", speaker="vivian", language="english",
                                   sampling=sp, seed=1, decode_audio=False))
    s = eng.add(other)
    chunks = drain(eng)
    for x in (odd, s):
        assert lasts(chunks, x.id)[0].finish_reason in ("eos", "max_new_tokens"), lasts(chunks, x.id)[0].error
    if sampler == "device":  # its draws are independent of the other rows' (the torch sampler shares generators)
        assert torch.equal(s.codes(), alone)


@pytest.mark.parametrize("sampler", ["torch", "device"])
@pytest.mark.parametrize("tiny", [1e-45, 1e-300])
def test_tiny_temperature_draws_the_greedy_ids(model, sampler, tiny):
    """Both samplers take the limit, the greedy id (the device sampler's argmax over a row of +inf ties picked the
    first index instead: garbage codes)."""
    greedy = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8)
    tiny = SamplingParams(temperature=tiny, subtalker_temperature=tiny, max_new_tokens=8)
    runs = [Engine(model, max_sessions=1, sampler=sampler).run_all([SynthesisRequest(
        kind="custom_voice", text="Hello world.", speaker="vivian", language="english", sampling=sp, seed=1,
        decode_audio=False)])[0] for sp in (greedy, tiny)]
    assert runs[1].finish_reason == runs[0].finish_reason
    assert torch.equal(runs[0].codes(), runs[1].codes())


def test_a_cancel_between_the_drop_and_the_admission_ends_as_cancelled(model, monkeypatch):
    """cancel() from another thread can land after a step dropped the cancelled sessions and before it admits: the
    session ends as cancelled, not as an error, and takes no slot."""
    eng = Engine(model, max_sessions=1)
    s = eng.add(req("Hello world."))
    real = eng._drop_cancelled_queued

    def drop_then_cancel(out):
        real(out)
        eng.cancel(s)

    monkeypatch.setattr(eng, "_drop_cancelled_queued", drop_then_cancel)
    chunks = eng.step()
    (last,) = lasts(chunks, s.id)
    assert last.finish_reason == "cancelled" and last.error is None
    assert eng.free_slots == [0] and not eng.has_work()


def test_a_str_piece_inside_a_utf8_character_begun_by_bytes_is_refused(model):
    """The str would land before the character's last bytes ('Caf and teaé'): refused, and the text goes on."""
    from qwen_tts_core.errors import RequestError

    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None, max_new_tokens=4))
    s.append_text(b"Caf\xc3")
    with pytest.raises(RequestError, match="UTF-8 character"):
        s.append_text(" and tea")
    s.append_text("")  # an empty piece changes nothing, wherever it comes
    s.append_text(b"\xa9")
    s.append_text(" and tea")
    s.end_text()
    drain(eng)
    assert s.incremental.text == "Café and tea"


def test_a_request_reused_as_a_template_does_not_change_its_sessions(model):
    """Review finding: add() kept the caller's request object. Added again with another priority, a queued session
    cancelled later was removed from the wrong queue and every later step failed every session; a template's text
    or sampling changed after add() changed the queued session's. Each session keeps its own copy."""
    eng = Engine(model, max_sessions=1, max_queue=8)
    running = eng.add(req("A session that is running.", 30))
    eng.step()
    tmpl = req("Queued interactive.", 5)
    a = eng.add(tmpl)
    tmpl.priority = "bulk"
    b = eng.add(tmpl)
    tmpl.text, tmpl.sampling = "A completely different later text.", SamplingParams(max_new_tokens=12, **G)
    c = eng.add(tmpl)
    assert (a.request.priority, b.request.priority, a.request.text) == ("interactive", "bulk", "Queued interactive.")
    eng.cancel(a)
    chunks = drain(eng)
    last = {ch.session_id: ch for ch in chunks if ch.is_last}
    assert last[a.id].finish_reason == "cancelled"
    assert all(last[s.id].error is None for s in (running, b, c)), [last[s.id].error for s in (running, b, c)]
    alone = Engine(model, max_sessions=1).run_all([req("Queued interactive.", 5)])[0]
    assert torch.equal(b.codes(), alone.codes())
    assert eng.free_slots == [0] and not eng.has_work()


def test_a_voice_prompt_on_another_kind_is_refused_at_add(model):
    """Review finding: a voice_clone_prompt on a custom_voice request was never checked (only voice_clone's are) but
    was used: out-of-range codes failed inside the step (a device-side assert on CUDA, ending every session), a
    string raised AttributeError out of add(), a valid x-vector silently replaced the named speaker."""
    from qwen_tts_core.errors import RequestError
    from qwen_tts_core.voice_prompt import VoiceClonePromptItem

    eng = Engine(model, max_sessions=1)
    spk = torch.zeros(model.cfg.talker.hidden_size)   # a valid x-vector: refused for the kind, not its shape
    for vp in ("voice_0123", VoiceClonePromptItem(None, spk, True, False),
               VoiceClonePromptItem(torch.full((3, 16), 99999), spk, False, True, "ref")):
        with pytest.raises(RequestError) as e:
            eng.add(req("Hello.", voice_clone_prompt=vp))
        assert e.value.field == "voice_clone_prompt", e.value
    assert not eng.has_work()


def test_a_failed_slot_move_keeps_the_slot_free(model, monkeypatch):
    """Review finding: compaction took the free slot before moving a session into it; a move that raised lost the
    slot for good (every later step with two sessions failed them all: pop from an empty list)."""
    eng = Engine(model, max_sessions=3)
    a, b, c = (eng.add(req(t, n)) for t, n in (("Hello world.", 3), ("Good morning!", 30), ("Press one.", 30)))
    eng.step()
    while not a.done:
        eng.step()

    def boom(*args):
        raise RuntimeError("device error during move")

    monkeypatch.setattr(eng.runner, "move", boom)
    eng.step()
    monkeypatch.undo()
    assert (b.finish_reason, c.finish_reason) == ("error", "error")
    assert sorted(eng.free_slots) == [0, 1, 2]
    pair = [eng.add(req("After the failure.", 4)), eng.add(req("And another one.", 4))]
    chunks = drain(eng)
    assert [ch.error for ch in chunks if ch.is_last] == [None, None]
    assert all(s.finish_reason != "error" for s in pair) and sorted(eng.free_slots) == [0, 1, 2]


def test_text_after_end_is_refused_while_the_engine_takes_the_end(model):
    """Review finding: between the engine taking the pending end (take_pending) and applying it, a second end_text
    or a late append_text passed both checks and then failed the whole session inside the step."""
    from qwen_tts_core.errors import RequestError

    eng = Engine(model, max_sessions=1)
    s = eng.add(req(None))
    s.append_text("Hello there.")
    s.end_text()
    assert s.take_pending() == ["Hello there.", None]   # the engine's step has taken it and not yet applied it
    for call in (lambda: s.append_text(" more"), s.end_text):
        with pytest.raises(RequestError, match="after end_text|called twice"):
            call()
    s.pending_text[:] = ["Hello there.", None]          # hand it back as the step would have applied it
    chunks = drain(eng)
    assert [ch.finish_reason for ch in chunks if ch.is_last] != ["error"] and s.finish_reason != "error"
