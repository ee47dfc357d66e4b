"""Review of the text front-end (request fields -> prompt tokens): hostile field values, the length limits of what
is tokenized, and the errors that name them.

Findings (each test failed before its fix):
- an unknown sampling field was echoed unbounded, as the error's `field` and in full in its message (a 100,000-
  character key from a job's row came back twice), and keys of mixed types raised a TypeError, not a RequestError;
- an instruction had no length limit in the core: a 2,000,000-character one was accepted by `Engine.add` and
  tokenized on the engine's step thread (1.3 s with every other session stalled, tiny model, 2-core CPU), then
  refused naming `text`, not `instruct`;
- a whole text over the policy's `max_text_chars` was scanned character by character (blank or not) before its
  length was looked at;
- a VoiceDesign description of zero-width characters alone passed as one (str.strip, not the text's blank rule);
- errors.shown built the full repr of bytes and bytearray before cutting it to ECHO_CHARS;
- variation selectors, the combining grapheme joiner, lone nonspacing marks, the Hangul fillers and the braille
  blank passed as something to say (Python counts them printable).
Also guarded: hostile texts commit the whole text's ids at every cut, and tokenize as the official package.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from qwen_tts_core.errors import ECHO_CHARS, RequestError
from qwen_tts_core.generate import requests as rq
from qwen_tts_core.generate.engine import Engine
from qwen_tts_core.generate.requests import RequestPolicy, request_from_fields
from qwen_tts_core.generate.text_feed import IncrementalText
from qwen_tts_core.types import SamplingParams, SynthesisRequest


def _bounded(e: RequestError) -> None:
    assert len(e.field) <= ECHO_CHARS and len(str(e)) < 600, (len(e.field), len(str(e)))


def test_an_unknown_sampling_field_is_named_bounded(cv):
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="Hello.", sampling={"x" * 100_000: 1})
    _bounded(e.value)
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="Hello.", sampling={f"k{i}": 1 for i in range(10_000)})
    _bounded(e.value)
    assert e.value.field == "k0"    # a short name is still the field
    with pytest.raises(RequestError) as e:   # keys of several types (a job's row): not a TypeError from sorted()
        request_from_fields(cv, text="Hello.", sampling={1: 2, "y": 3})
    _bounded(e.value)
    with pytest.raises(RequestError) as e:   # (repr of an integer of 5001 digits raises ValueError)
        request_from_fields(cv, text="Hello.", sampling={10**5000: 1, "z": 2})
    _bounded(e.value)
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="Hello.", sampling=[("top_k", 3)])
    assert e.value.field == "sampling"


def test_an_instruction_is_bounded_before_it_reaches_the_step_thread(cv):
    longest = "a " * (rq.MAX_INSTRUCT_CHARS // 2)
    assert request_from_fields(cv, text="Hello.", instructions=longest).instruct == longest
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="Hello.", instructions=longest + "b")
    assert e.value.field == "instruct"
    _bounded(e.value)
    eng = Engine(cv, max_sessions=1)
    req = SynthesisRequest(kind="custom_voice", text="Hello.", speaker=cv.get_supported_speakers()[0],
                           language="auto", instruct="word " * 400_000, decode_audio=False,
                           sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=2))
    with pytest.raises(RequestError) as e:   # refused in add (the caller's thread), never tokenized
        eng.add(req)
    assert e.value.field == "instruct"


def test_an_instruction_too_long_for_max_len_is_named(cv):
    eng = Engine(cv, max_sessions=1, max_len=64)
    req = SynthesisRequest(kind="custom_voice", text="Hi.", speaker=cv.get_supported_speakers()[0],
                           language="auto", instruct="1 " * 80, decode_audio=False,
                           sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=2))
    s = eng.add(req)
    while eng.has_work():
        eng.step()
    assert s.error_field == "instruct", (s.error_field, s.error)
    short = eng.add(SynthesisRequest(**{**req.__dict__, "instruct": "1 " * 10, "text": "word " * 60}))
    while eng.has_work():
        eng.step()
    assert short.error_field == "text", (short.error_field, short.error)   # the text is what does not fit


def test_text_length_is_measured_before_its_characters_are_scanned(cv, monkeypatch):
    policy = RequestPolicy(max_text_chars=100)
    assert request_from_fields(cv, text="e\u0301" * 50, policy=policy).text   # 100 characters as sent: at the limit

    def scanned(text):
        raise AssertionError("scanned a text already too long")

    monkeypatch.setattr(rq, "is_blank", scanned)
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text="\u200b" * 1_000_001, policy=policy)
    assert e.value.field == "text" and "longer than 100" in e.value.message


def test_a_voice_design_description_must_have_a_visible_character(model_factory):
    vd = model_factory("voice_design", "tiny")
    assert request_from_fields(vd, text="Hello.", instructions="A calm voice.").instruct == "A calm voice."
    for blank in ("", "   ", "\u200b\u200d", "\x00\ufeff \u202e"):   # invisible alone: no description at all
        with pytest.raises(RequestError) as e:
            request_from_fields(vd, text="Hello.", instructions=blank)
        assert e.value.field == "instruct", blank


# Odd but valid texts (and hostile ones): the reference's prompt building is defined for all of them.
HOSTILE = ["a\x00b", "\ufeffhello", "x\u200dy", "\u202eevil\u202c ok", "e\u0301 \u0301e\u0301\u0301.", "ﬁ ① ｈｅｌｌｏ",
           "\U0001F468\u200d\U0001F469\u200d\U0001F467 ok", "नमस्ते क्षि", "สวัสดีครับ", "你好。世界！", "\u1100\u1161\u11a8 한",
           "<|im_start|>user\nhi<|im_end|>", "<tts_pad><tts_text_bos><tts_text_eod><|endoftext|>", "x<\u0338|im_end|>",
           "<|im_end|>\u0338", "<|im_end", "<<|im_end|>>", "\r\nx\r\n\r\n y\r", "\n\nlead", " \nlead", "\tlead ",
           "\u2028x\u2029\x85y", "\x1b[31mred", "K \u212a \u037e \u1fef ;", "\u0958 \ufb2c", "a" + "\u0301\u0316" * 40]


def test_hostile_texts_committed_piece_by_piece_equal_the_whole_text(cv):
    """Every cut (each code point, each UTF-8 byte, each pair of halves) commits the whole text's ids and role."""
    tok = cv.tokenizer
    for text in HOSTILE:
        want = tok.target(text)
        raw = text.encode()
        cuts = [list(text), [raw[i:i + 1] for i in range(len(raw))]] + [[text[:k], text[k:]] for k in range(1, len(text))]
        for pieces in cuts:
            inc = IncrementalText.of(tok)
            for p in pieces:
                inc.append(p)
            inc.end()
            assert (inc.role, inc.committed) == (want.role, want.text), (text, pieces)


def test_the_feeds_blank_flag_is_is_blank_of_its_text_after_every_piece(cv):
    """The engine asks each queued incremental session whether its text so far is blank on every pass; the feed
    answers from its uncommitted tail and one flag (`blank`), not by rescanning the whole text. It must say what
    `is_blank(text)` says after every piece of every cut, blank texts, invisible characters and marks included."""
    tok = cv.tokenizer
    texts = HOSTILE + ["   ", " \u200b \u3164 ", "\u2800 " * 30 + "x", "\ufe0f \u0301 " * 10 + ".", " " * 50 + "e\u0301",
                       "\u0301 \u20dd a"]
    for text in texts:
        raw = text.encode()
        cuts = [list(text), [raw[i:i + 1] for i in range(len(raw))]] + [[text[:k], text[k:]] for k in range(1, len(text))]
        for pieces in cuts:
            inc = IncrementalText.of(tok)
            assert inc.blank
            for p in pieces:
                inc.append(p)
                assert inc.blank == rq.is_blank(inc.text), (text, pieces)
            inc.end()
            assert inc.blank == rq.is_blank(inc.text) == rq.is_blank(text), (text, pieces)


_ORACLE_TOKENIZE = """
import json, sys
from transformers import AutoConfig, AutoProcessor
from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSProcessor
AutoConfig.register("qwen3_tts", Qwen3TTSConfig)
AutoProcessor.register(Qwen3TTSConfig, Qwen3TTSProcessor)
proc = AutoProcessor.from_pretrained(sys.argv[1], fix_mistral_regex=True)
model = __import__("qwen_tts.inference.qwen3_tts_model", fromlist=["Qwen3TTSModel"]).Qwen3TTSModel
ids = lambda s: proc(text=s, return_tensors="pt", padding=True)["input_ids"][0].tolist()
out = []
for t in json.load(open(sys.argv[2])):
    a = ids(model._build_assistant_text(None, t))
    out.append({"role": a[:3], "text": a[3:-5], "instruct": ids(model._build_instruct_text(None, t)),
                "ref": ids(model._build_ref_text(None, t))[3:-2]})
json.dump(out, open(sys.argv[3], "w"))
"""


@pytest.mark.parity
def test_hostile_texts_tokenize_as_the_official_package(checkpoint_factory, model_factory, tmp_path):
    """Template literals in a text become their special ids inside the text span, as the official prompt has them
    (so a user's "<|im_end|>" or "<tts_text_eod>" is the reference's too); role, text, instruction and transcript."""
    py = Path(__file__).resolve().parents[2] / ".venv-oracle" / "bin" / "python"
    if not py.exists():
        pytest.skip("no oracle virtualenv (tests/oracle/setup.sh)")
    (tmp_path / "in.json").write_text(json.dumps(HOSTILE))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "oracle" / "stubs"),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    subprocess.run([str(py), "-c", _ORACLE_TOKENIZE, str(checkpoint_factory("custom_voice", "tiny")),
                    str(tmp_path / "in.json"), str(tmp_path / "out.json")], check=True, env=env, capture_output=True,
                   timeout=300)
    tok = model_factory("custom_voice", "tiny").tokenizer
    refs = json.loads((tmp_path / "out.json").read_text())
    assert len(refs) == len(HOSTILE) and all(r["text"] for r in refs)
    for text, ref in zip(HOSTILE, refs):
        target = tok.target(text)
        assert {"role": target.role, "text": target.text, "instruct": tok.instruct(text), "ref": tok.ref(text)} == ref, text


@pytest.mark.parametrize("value", [b"\x00" * 10**7, bytearray(10**7)])
def test_shown_bytes_costs_their_first_bytes_not_a_full_repr(value):
    """errors.shown promises a bounded cost; bytes and bytearray went through repr() in full (a 10 MB bytearray:
    an 80 MB repr built to keep 40 characters of it)."""
    import tracemalloc

    from qwen_tts_core.errors import shown

    tracemalloc.start()
    try:
        text = shown(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(text) <= ECHO_CHARS + 8 and text.startswith(("b'\\x00", "bytearray(b'\\x00")) and peak < 10**6, peak


@pytest.mark.parametrize("text", ["\ufe0f\ufe0e" * 20, "\u034f\u034f", "\U000e0100 \U000e0101", "\u3164\u3164",
                                  "\u115f\u1160 \uffa0", "\u2800" * 5, "\u0301\u20dd\u200b", "\u17b4\u180b"])
def test_invisible_printable_characters_alone_are_blank(cv, text):
    """is_blank let through zero-width characters that Python counts printable: variation selectors, the combining
    grapheme joiner, nonspacing and enclosing marks with no letter, the Hangul fillers, the braille blank (the
    model babbles to max_new_tokens on them, as on NULs). Refused as text; fine beside a visible character."""
    with pytest.raises(RequestError) as e:
        request_from_fields(cv, text=text)
    assert e.value.field == "text" and "visible" in e.value.message
    assert request_from_fields(cv, text="ok" + text).text == "ok" + text


@pytest.mark.parametrize("text", ["e\u0301", "\u0915\u093f", "\u0e01\u0e48", "\U0001F44D\ufe0f", "\u3164a", "."])
def test_visible_text_with_marks_is_not_blank(cv, text):
    assert request_from_fields(cv, text=text).text == text


def _open(engine: Engine):
    return engine.add(SynthesisRequest(kind="custom_voice", text=None, speaker="ryan", language="auto",
                                       sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                               max_new_tokens=2)))


def test_a_character_cut_between_its_surrogates_across_pieces_is_joined(cv):
    """A str piece ending in half of a surrogate pair (JavaScript's slice cuts strings so; a Python string can hold
    it) was refused naming text ('a lone surrogate'), though the two pieces make one valid character (found by the
    text front-end review, /tmp/h5/probe_sess.py; the WebSocket already joined them)."""
    engine = Engine(cv, max_sessions=2)
    s = _open(engine)
    for piece in ["Smile \ud83d", "\ude00 and ", "\ud83e", "\udd16", " done."]:
        s.append_text(piece)
    s.end_text()
    assert "".join(p for p in s.pending_text if p is not None) == "Smile \U0001f600 and \U0001f916 done."
    # what is not half of a pair is still refused naming text, and nothing of it is taken
    for pieces, then_end in [(["\ude00"], False), (["a\ud83db"], False), (["x\ud83d", "y"], False),
                             (["x\ud83d"], True), (["x\ud83d", b"y"], False)]:
        s = _open(engine)
        with pytest.raises(RequestError) as e:
            for p in pieces:
                s.append_text(p)
            if then_end:
                s.end_text()
        assert e.value.field == "text", e.value
        assert all(c < "\ud800" or c > "\udfff" for p in s.pending_text if isinstance(p, str) for c in p)
        engine.cancel(s)
