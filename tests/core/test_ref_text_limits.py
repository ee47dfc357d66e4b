"""An ICL voice's transcript (`ref_text`) is bounded by the core (MAX_REF_TEXT_CHARS) where a prompt is made and
where one is used, and the engine admits a session only when its prompt AND the text it will be fed (an ICL
transcript trails into generation) fit max_len, refused before that text is embedded.

Review finding (HIGH): a stored voice with a 2,000,000-character transcript was accepted and stalled every other
session of its replica for 21 s per request (tokenized and embedded on the step loop), and max_len never refused it:
the transcript went into the trailing text, which the admission check did not count."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import VoiceClonePromptItem
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.engine import Engine
from qwen_tts_core.generate.requests import MAX_REF_TEXT_CHARS, check_ref_text
from qwen_tts_core.types import SamplingParams, SynthesisRequest

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=400)


def _icl(model, ref_text: str, frames: int = 8) -> VoiceClonePromptItem:
    t = model.cfg.talker
    g = torch.Generator().manual_seed(0)
    return VoiceClonePromptItem(ref_code=torch.randint(0, t.codebook_size, (frames, t.num_code_groups), generator=g),
                                ref_spk_embedding=torch.randn(t.hidden_size, generator=g), x_vector_only_mode=False,
                                icl_mode=True, ref_text=ref_text)


def _clone(model, prompt: VoiceClonePromptItem, text: str = "Hello there.") -> SynthesisRequest:
    return SynthesisRequest(kind="voice_clone", text=text, language="english", voice_clone_prompt=prompt,
                            sampling=GREEDY, decode_audio=False)


def _embedded_rows(monkeypatch, model) -> list[int]:
    """The rows of every text embedding the talker makes from now on."""
    rows: list[int] = []
    real = model.talker.embed_text

    def counted(ids):
        rows.append(int(ids.numel()))
        return real(ids)

    monkeypatch.setattr(model.talker, "embed_text", counted)
    return rows


def test_the_limit_is_the_cores_and_counts_characters():
    assert MAX_REF_TEXT_CHARS == 2000
    assert check_ref_text("a" * MAX_REF_TEXT_CHARS) == "a" * MAX_REF_TEXT_CHARS
    with pytest.raises(RequestError) as e:
        check_ref_text("a" * (MAX_REF_TEXT_CHARS + 1))
    assert e.value.field == "ref_text" and f"at most {MAX_REF_TEXT_CHARS}" in e.value.message


def test_create_voice_clone_prompt_refuses_a_long_transcript(base, ref_wav_path):
    with pytest.raises(RequestError) as e:
        base.create_voice_clone_prompt(str(ref_wav_path), ref_text="word " * 100_000, x_vector_only_mode=False)
    assert e.value.field == "ref_text" and "500000 characters" in e.value.message, e.value


def test_x_vector_mode_ignores_the_transcript_as_the_official_does(base, ref_wav_path):
    """x_vector_only_mode never speaks ref_text: the official package keeps it on the item unchecked, so a drop-in
    must not refuse a long or odd one (review: it did after the limit came)."""
    for text in ("word " * 1000, "\ud800"):
        (item,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text=text, x_vector_only_mode=True)
        assert item.ref_text == text and item.x_vector_only_mode and item.ref_code is None


def test_a_stored_icl_voice_with_a_long_transcript_is_refused_before_it_is_tokenized(base, monkeypatch):
    """A voice stored before the limit (or passed to the Python API) is refused at engine.add, naming ref_text."""
    engine = Engine(base, max_sessions=1)
    calls = []
    monkeypatch.setattr(base.tokenizer, "ref", lambda text: calls.append(text) or [])
    with pytest.raises(RequestError) as e:
        engine.add(_clone(base, _icl(base, "word " * 400_000)))
    assert e.value.field == "voice_clone_prompt" and "ref_text" in e.value.message, e.value
    assert not calls and engine.num_queued == 0


def test_a_transcript_at_the_limit_is_spoken(base):
    s = Engine(base, max_sessions=1).run_all([_clone(base, _icl(base, "w" * MAX_REF_TEXT_CHARS))])[0]
    assert s.error is None and s.finish_reason in ("eos", "max_new_tokens"), (s.error, s.finish_reason)


def test_trailing_icl_transcript_counts_against_max_len_before_it_is_embedded(base, monkeypatch):
    """The transcript trails (ICL streaming layout: text longer than the reference's frames): its tokens are
    counted with the prompt's positions, and a session they do not fit is refused before they are embedded."""
    engine = Engine(base, max_sessions=1, max_len=128)
    prompt = _icl(base, "word " * 300)       # ~300 transcript tokens, 8 reference frames: a short prefill
    assert len(base.tokenizer.ref(prompt.ref_text)) > 200
    rows = _embedded_rows(monkeypatch, base)
    s = engine.run_all([_clone(base, prompt)])[0]
    assert s.finish_reason == "error" and s.error_field == "text" and "max_len" in s.error, (s.finish_reason, s.error)
    assert sum(rows) < 16, f"the refused transcript was embedded: {rows}"


def test_trailing_text_counts_against_max_len(model_factory):
    """A whole text whose tokens do not fit max_len was admitted and cut off at max_len (its prefill is short in the
    streaming layout); now it is refused naming text, as a prompt that does not fit was."""
    cv = model_factory("custom_voice", "tiny")
    engine = Engine(cv, max_sessions=1, max_len=64)
    text = "A sentence of several words. " * 20
    assert len(cv.tokenizer.target(text).text) > 64
    s = engine.run_all([SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english",
                                         sampling=GREEDY, decode_audio=False)])[0]
    assert s.finish_reason == "error" and s.error_field == "text" and "max_len" in s.error, (s.finish_reason, s.error)


def test_a_text_that_fits_is_still_admitted(model_factory):
    cv = model_factory("custom_voice", "tiny")
    s = Engine(cv, max_sessions=1, max_len=64).run_all([SynthesisRequest(
        kind="custom_voice", text="Hello world.", speaker="ryan", language="english",
        sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8), decode_audio=False)])[0]
    assert s.error is None and s.finish_reason in ("eos", "max_new_tokens")


def test_incremental_text_past_max_len_fails_the_session_as_the_whole_text_is_refused(model_factory):
    """Review: text appended after admission was embedded and never spoken (the session ended by max_new_tokens,
    no error) where the same text sent whole was refused naming text."""
    cv = model_factory("custom_voice", "tiny")
    text = "A sentence of several words. " * 20
    engine = Engine(cv, max_sessions=1, max_len=64)
    s = engine.add(SynthesisRequest(kind="custom_voice", text=None, speaker="ryan", language="english",
                                    sampling=GREEDY, decode_audio=False))
    s.append_text("A sentence ")
    for _ in range(200):
        engine.step()
        if s.prompt is not None:
            break
    s.append_text(text[11:])
    s.end_text()
    while engine.has_work():
        engine.step()
    assert s.finish_reason == "error" and s.error_field == "text" and "max_len" in s.error, (s.finish_reason, s.error)
