"""Behaviour pinned by a second mutation review of the engine (voice prompt files, text -> ids -> prompt layout,
the codec's streaming state, sessions): each test here failed on a code change (a "mutant") that the rest of the
suite let pass; the change is named in its docstring.

The prompt layout is pinned against the ids of the published checkpoints' config (text specials 151644/151645,
tts pad/bos/eos 151671-151673, codec pad/bos 2148/2149, think 2154, nothink 2155, think bos/eos 2156/2157, english
2050, ryan 3061, ...), written out here row by row: a wrong id or offset in the prompt changes every frame's audio,
and the parity tests that would see it need the official package and minutes."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.text.prompt import build_prompt, extend_prompt

# text ids (Qwen2 tokenizer specials) and codec ids of the published 12Hz checkpoints
IM_START, IM_END = 151644, 151645
TTS_PAD, TTS_BOS, TTS_EOS = 151671, 151672, 151673
C_PAD, C_BOS = 2148, 2149
THINK, NOTHINK, THINK_BOS, THINK_EOS = 2154, 2155, 2156, 2157
ENGLISH, CHINESE, SICHUAN = 2050, 2055, 2062
RYAN, ERIC = 3061, 2875


def _emb(model):
    """P(ids) (projected text embeddings) and C(ids) (codec embeddings) of `model`'s talker, one row per id."""
    t = model.talker
    P = lambda *ids: torch.stack([t.embed_text(torch.tensor([i]))[0] for i in ids])  # noqa: E731
    C = lambda *ids: torch.stack([t.embed_codec(torch.tensor([i]))[0] for i in ids])  # noqa: E731
    return P, C


def _same(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _prefix(P, C, lang_rows, speaker_rows):
    """The rows after the role: the codec prefix summed with [tts_pad .. tts_pad, tts_bos] (bos pairs with the codec
    pad)."""
    codec = torch.cat([C(*lang_rows), speaker_rows, C(C_PAD)])
    text = torch.cat([P(*[TTS_PAD] * (codec.shape[0] - 1)), P(TTS_BOS)])
    return codec + text


# --- text -> ids ------------------------------------------------------------------------------------------------
def test_the_assistant_turn_splits_into_role_text_and_tail_at_their_ids(cv):
    """Mutants: ROLE_LEN / TAIL_LEN / REF_TAIL_LEN off by one, a template's newline dropped or its role changed
    (the role took a text token, or the text kept <|im_end|>)."""
    tok = cv.tokenizer
    vocab = tok.vocab()
    assistant, user, nl = vocab["assistant"], vocab["user"], vocab["\u010a"]   # byte-level "\n"
    text = tok.encode("Hello world.")
    assert IM_START not in text and IM_END not in text and len(text) >= 2
    target = tok.target("Hello world.")
    assert target.role == [IM_START, assistant, nl] and target.text == text
    assert tok.text_only("Hello world.") == text
    assert tok.encode("<|im_start|>assistant\nHello world.<|im_end|>\n<|im_start|>assistant\n") == (
        [IM_START, assistant, nl] + text + [IM_END, nl, IM_START, assistant, nl])
    assert tok.ref("Hello world.") == text
    assert tok.instruct("Hello world.") == [IM_START, user, nl] + text + [IM_END, nl]


def test_a_token_id_equal_to_the_text_vocabulary_size_is_refused_naming_its_file(cv):
    """The largest id must be below text_vocab_size (an id equal to it indexes past the text embedding). Mutant:
    `token_id >= text_vocab_size` made `>`."""
    tok, folder = cv.tokenizer, cv.path
    top = max(tok.vocab().values())
    tok.check_ids_below(top + 1, folder)
    with pytest.raises(ValueError, match=f"has id {top}, beyond") as e:
        tok.check_ids_below(top, folder)
    assert "tokenizer.json" in str(e.value) or "vocab.json" in str(e.value)


def test_a_chat_marker_split_into_several_ids_is_refused(cv, monkeypatch):
    """A tokenizer that encodes <|im_start|> as several ids (not one added token) builds every prompt with the
    wrong markers, even when one of the ids is the config's. Mutant: `got != [want]` made `want not in got`."""
    tok = cv.tokenizer
    tok.check_special_ids(IM_START, IM_END, "here")
    real = tok.encode
    monkeypatch.setattr(tok, "encode", lambda s: real(s) + ([real("<")[0]] if s == "<|im_start|>" else []))
    with pytest.raises(ValueError, match="encodes <\\|im_start\\|>"):
        tok.check_special_ids(IM_START, IM_END, "here")


# --- ids -> prompt layout ---------------------------------------------------------------------------------------
def test_streaming_custom_voice_prompt_layout(cv):
    """Mutants: the language tags in another order or without think_eos, the speaker id not looked up, tts_bos
    paired with another row, the first text token not summed with the codec bos, tts_eos not closing the trailing
    text."""
    P, C = _emb(cv)
    role, text = [IM_START, 77, 78], [40, 41, 42]
    p = build_prompt(cv.talker, cv.cfg, role_ids=role, text_ids=text, language="English", speaker="Ryan")
    want = torch.cat([P(*role), _prefix(P, C, [THINK, THINK_BOS, ENGLISH, THINK_EOS], C(RYAN)), P(40) + C(C_BOS)])
    _same(p.prefill, want)
    _same(torch.stack(p.trailing), P(41, 42, TTS_EOS))
    _same(p.tts_pad, P(TTS_PAD)[0])
    _same(p.tts_eos, P(TTS_EOS)[0])
    assert p.text_ended and p.num_text_tokens == 3 and p.ref_codes is None


@pytest.mark.parametrize("language,speaker,tags", [
    ("auto", "ryan", [NOTHINK, THINK_BOS, THINK_EOS]),
    ("chinese", "eric", [THINK, THINK_BOS, SICHUAN, THINK_EOS]),
    ("auto", "eric", [THINK, THINK_BOS, SICHUAN, THINK_EOS]),
    ("english", "eric", [THINK, THINK_BOS, ENGLISH, THINK_EOS]),
    ("chinese", "ryan", [THINK, THINK_BOS, CHINESE, THINK_EOS]),
])
def test_language_tags_and_the_dialect_rule(cv, language, speaker, tags):
    """Mutants: auto given the think tag (or no nothink), a dialect speaker's dialect applied to English (or not to
    Chinese / auto)."""
    P, C = _emb(cv)
    spk = {"ryan": RYAN, "eric": ERIC}[speaker]
    p = build_prompt(cv.talker, cv.cfg, role_ids=[IM_START, 77, 78], text_ids=[40], language=language,
                     speaker=speaker)
    _same(p.prefill[3:-1], _prefix(P, C, tags, C(spk)))


def test_non_streaming_prompt_layout(cv):
    """Mutants: the text paired with the codec bos instead of pad, tts_eos left out of the prefill, the last row not
    tts_pad + codec bos, trailing text left over."""
    P, C = _emb(cv)
    role, text = [IM_START, 77, 78], [40, 41, 42]
    p = build_prompt(cv.talker, cv.cfg, role_ids=role, text_ids=text, language="english", speaker="ryan",
                     non_streaming_mode=True)
    want = torch.cat([P(*role), _prefix(P, C, [THINK, THINK_BOS, ENGLISH, THINK_EOS], C(RYAN)),
                      P(40, 41, 42, TTS_EOS) + C(C_PAD), P(TTS_PAD) + C(C_BOS)])
    _same(p.prefill, want)
    assert p.trailing == [] and p.num_text_tokens == 3


def test_an_instruction_leads_and_a_speaker_vector_takes_the_speakers_row(base):
    """Mutants: the instruction after the role (or dropped), the speaker vector not placed between the language
    tags and the codec pad."""
    P, C = _emb(base)
    role, text, instruct = [IM_START, 77, 78], [40, 41], [IM_START, 90, 91, IM_END]
    vec = torch.randn(base.cfg.talker.hidden_size, generator=torch.Generator().manual_seed(0))
    p = build_prompt(base.talker, base.cfg, role_ids=role, text_ids=text, language="auto", speaker_vector=vec,
                     instruct_ids=instruct)
    want = torch.cat([P(*instruct), P(*role), _prefix(P, C, [NOTHINK, THINK_BOS, THINK_EOS], vec[None]),
                      P(40) + C(C_BOS)])
    _same(p.prefill, want)
    _same(torch.stack(p.trailing), P(41, TTS_EOS))


@pytest.mark.parametrize("non_streaming_mode", [False, True], ids=["streaming", "non-streaming"])
def test_a_prompt_without_text_tokens_is_refused_naming_text(cv, non_streaming_mode):
    """Mutant: the `not text_ids` check removed (the streaming layout raised an IndexError naming nothing; the
    non-streaming one built a prompt of tts_eos alone)."""
    from qwen_tts_core.errors import RequestError

    with pytest.raises(RequestError) as e:
        build_prompt(cv.talker, cv.cfg, role_ids=[IM_START, 77, 78], text_ids=[], language="english",
                     speaker="ryan", non_streaming_mode=non_streaming_mode)
    assert e.value.field == "text"


def _frames(model, n):
    t = model.cfg.talker
    return torch.randint(0, t.codebook_size, (n, t.num_code_groups), generator=torch.Generator().manual_seed(n))


@pytest.mark.parametrize("n_frames", [2, 4, 8])
def test_icl_streaming_prompt_layout(base, n_frames):
    """The transcript and text (then tts_eos) against the codec bos and the reference frames: text longer than the
    frames trails, shorter is padded with tts_pad. Mutants: the text/frame split off by one (`>` made `>=`, the
    trailing cut at another row), the pad not tts_pad, the frames not behind the codec bos."""
    P, C = _emb(base)
    role, ref, text = [IM_START, 77, 78], [50, 51], [40, 41]
    codes = _frames(base, n_frames)
    vec = torch.randn(base.cfg.talker.hidden_size, generator=torch.Generator().manual_seed(1))
    p = build_prompt(base.talker, base.cfg, role_ids=role, text_ids=text, language="english", speaker_vector=vec,
                     ref_ids=ref, ref_codes=codes)
    txt = P(50, 51, 40, 41, TTS_EOS)                              # 5 rows
    cod = torch.cat([C(C_BOS), base.talker.embed_frame(codes)])   # 1 + n_frames rows
    k = min(len(txt), len(cod))
    body = txt[:k] + cod[:k]
    if len(cod) > len(txt):
        body = torch.cat([body, P(*[TTS_PAD] * (len(cod) - len(txt))) + cod[k:]])
    want = torch.cat([P(*role), _prefix(P, C, [THINK, THINK_BOS, ENGLISH, THINK_EOS], vec[None]), body])
    _same(p.prefill, want)
    if len(txt) > len(cod):
        _same(torch.stack(p.trailing), txt[k:])
    else:
        assert p.trailing == []
    assert p.num_text_tokens == 2 and p.ref_codes is codes


def test_icl_non_streaming_prompt_layout(base):
    """Mutants: the text paired with the codec bos (not pad), the frames with tts_bos (not tts_pad), the two
    blocks swapped."""
    P, C = _emb(base)
    role, ref, text = [IM_START, 77, 78], [50, 51], [40]
    codes = _frames(base, 3)
    vec = torch.randn(base.cfg.talker.hidden_size, generator=torch.Generator().manual_seed(2))
    p = build_prompt(base.talker, base.cfg, role_ids=role, text_ids=text, language="auto", speaker_vector=vec,
                     ref_ids=ref, ref_codes=codes, non_streaming_mode=True)
    cod = torch.cat([C(C_BOS), base.talker.embed_frame(codes)])
    want = torch.cat([P(*role), _prefix(P, C, [NOTHINK, THINK_BOS, THINK_EOS], vec[None]),
                      P(50, 51, 40, TTS_EOS) + C(C_PAD), cod + P(TTS_PAD)])
    _same(p.prefill, want)
    assert p.trailing == []


def test_incremental_text_trails_without_eos_until_it_ends(cv):
    """Mutants: tts_eos appended before the text ended, extend_prompt not counting the new tokens, an end without
    tts_eos, text accepted after its end."""
    from qwen_tts_core.errors import RequestError

    P, _ = _emb(cv)
    p = build_prompt(cv.talker, cv.cfg, role_ids=[IM_START, 77, 78], text_ids=[40, 41], language="english",
                     speaker="ryan", text_ended=False)
    _same(torch.stack(p.trailing), P(41))
    assert not p.text_ended and p.num_text_tokens == 2
    extend_prompt(cv.talker, p, [42, 43], end=False)
    _same(torch.stack(p.trailing), P(41, 42, 43))
    assert not p.text_ended and p.num_text_tokens == 4
    extend_prompt(cv.talker, p, [], end=True)
    _same(torch.stack(p.trailing), P(41, 42, 43, TTS_EOS))
    assert p.text_ended and p.num_text_tokens == 4
    with pytest.raises(RequestError, match="already ended"):
        extend_prompt(cv.talker, p, [44], end=False)


# --- voice prompt files -----------------------------------------------------------------------------------------
def test_a_safetensors_file_without_metadata_is_not_a_voice_prompt_naming_the_file(tmp_path):
    """A safetensors file with no metadata at all (any tensor file a user names as a voice) is a ValueError naming
    the file, and so is one whose metadata has every part but the format. Mutants: `f.metadata() or {}` without the
    `or {}` (an AttributeError, which the service and the jobs report as an internal error, not as a bad voice);
    `meta.get("format", FORMAT_PREFIX)` (a file without a format taken as a voice)."""
    from safetensors.torch import save_file

    from qwen_tts_core import load_voice_prompt

    parts = {"x_vector_only_mode": "true", "icl_mode": "false", "ref_text": "null"}
    for name, meta in (("bare", None), ("no-format", parts)):
        path = tmp_path / f"{name}.safetensors"
        save_file({"ref_spk_embedding": torch.zeros(8)}, str(path), metadata=meta)
        with pytest.raises(ValueError, match="not a voice prompt file") as e:
            load_voice_prompt(path)
        assert str(path) in str(e.value)


def test_reference_codes_of_a_narrower_integer_dtype_are_stored_as_long(tmp_path):
    """A voice's codes are stored as int64 whatever integer dtype the item held (the item's documented dtype; a
    file's int32 or uint8 codes come back as such and every consumer must then cope). Mutant: `.long()` dropped
    from save_voice_prompt."""
    from qwen_tts_core import VoiceClonePromptItem, load_voice_prompt, save_voice_prompt

    for dtype in (torch.int32, torch.uint8):
        codes = torch.arange(48).reshape(3, 16).to(dtype)
        item = VoiceClonePromptItem(codes, torch.randn(8), False, True, "Words.")
        back = load_voice_prompt(save_voice_prompt(item, tmp_path / f"{dtype}.safetensors"))
        assert back.ref_code.dtype == torch.long and torch.equal(back.ref_code, codes.long())


def _raw_safetensors(path, tensors: dict, metadata: dict) -> None:
    """A safetensors file written by hand: tensors = name -> (dtype string, shape, byte count), zero bytes each."""
    import json
    import struct

    header, at = {"__metadata__": metadata}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + nbytes]}
        at += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * at)


@pytest.mark.parametrize("name", ["ref_spk_embedding", "ref_code"])
def test_a_tensor_of_a_dtype_torch_cannot_hold_is_a_value_error_naming_file_and_tensor(tmp_path, name):
    """safetensors parses an F6_E2M3 tensor's header and then fails to make it a torch tensor with its own error
    type (neither ValueError nor KeyError: an internal error in the service and the jobs). Mutants: either tensor
    read with `f.get_tensor` instead of `_tensor`."""
    from qwen_tts_core import load_voice_prompt

    meta = {"format": "qwen-tts-fleet/voice-prompt/1", "x_vector_only_mode": "false", "icl_mode": "true",
            "ref_text": '"Hello."'}
    tensors = {"ref_spk_embedding": ("F32", [8], 32), "ref_code": ("I64", [1, 16], 128)}
    tensors[name] = ("F6_E2M3", [8], 6)
    path = tmp_path / "v.safetensors"
    _raw_safetensors(path, tensors, meta)
    with pytest.raises(ValueError, match=f"the tensor {name} cannot be read") as e:
        load_voice_prompt(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("with_codes", [True, False], ids=["codes", "no-codes"])
def test_the_modes_come_back_as_they_were_saved(tmp_path, with_codes):
    """The two mode flags are stored as given, not derived from each other or from the codes (an item they make
    invalid is refused where it is used, naming it, not turned into another voice by a save and a load). Mutants:
    icl_mode stored as `ref_code is not None`, x_vector_only_mode as `not icl_mode`."""
    from qwen_tts_core import VoiceClonePromptItem, load_voice_prompt, save_voice_prompt

    codes = torch.zeros(3, 16, dtype=torch.long) if with_codes else None
    for i, (x_vector, icl) in enumerate(((True, False), (False, True), (False, False), (True, True))):
        item = VoiceClonePromptItem(codes, torch.randn(8), x_vector, icl, "Words.")
        back = load_voice_prompt(save_voice_prompt(item, tmp_path / f"{i}.safetensors"))
        assert (back.x_vector_only_mode, back.icl_mode) == (x_vector, icl)
        assert (back.ref_code is None) == (codes is None)


def test_strided_tensors_and_non_str_metadata_values_are_saved(tmp_path):
    """save_voice_prompt takes what an item may hold: a speaker vector or codes that are strided views (a slice, a
    transpose) and metadata values that are not str (written as their str). safetensors refuses both itself.
    Mutants: `.contiguous()` dropped from the speaker vector or from the codes; `str(v)` dropped from the
    metadata."""
    from safetensors import safe_open

    from qwen_tts_core import VoiceClonePromptItem, load_voice_prompt, save_voice_prompt

    spk = torch.randn(16)[::2]
    codes = torch.arange(48).reshape(16, 3).t()
    assert not spk.is_contiguous() and not codes.is_contiguous()
    path = save_voice_prompt(VoiceClonePromptItem(codes, spk, False, True, "Words."), tmp_path / "v.safetensors",
                             created=1700000000, name="a voice")
    back = load_voice_prompt(path)
    assert torch.equal(back.ref_spk_embedding, spk) and torch.equal(back.ref_code, codes)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["created"] == "1700000000" and meta["name"] == "a voice"


# --- the codec's streaming state: rows started over, taken out and written back ---------------------------------
SPF, TOL = 1920, 1e-4


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    from qwen_tts_core.codec.build import write_random_speech_tokenizer
    from qwen_tts_core.codec.load import load_codec

    return load_codec(write_random_speech_tokenizer(tmp_path_factory.mktemp("codec") / "speech_tokenizer", "tiny",
                                                    seed=0))


@pytest.fixture(scope="module")
def streams(codec):
    """Two rows of codes [2, 16, 24], their offline decode, and junk codes to decode before a row starts over."""
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 2048, (2, 16, 24), generator=g)
    junk = torch.randint(0, 2048, (2, 16, 7), generator=g)
    return codes, codec.decoder.decode(codes), junk


def _close(got, want):
    assert got.shape == want.shape and float((got - want).abs().max()) <= TOL


def test_reset_without_a_mask_starts_every_row_over(codec, streams):
    """Mutant: reset(None) building an all-False mask (nothing was reset: the next stream began with the last
    one's history)."""
    codes, offline, junk = streams
    state = codec.new_stream(2)
    codec.decode_chunk(junk, state)
    state.reset()
    assert state.positions.tolist() == [0, 0]
    out = torch.cat([codec.decode_chunk(codes[..., :3], state), codec.decode_chunk(codes[..., 3:10], state)], -1)
    _close(out, offline[:, : 10 * SPF])


def test_zero_rows_starts_the_given_rows_over_and_keeps_the_others(codec, streams):
    """Row 1 decodes junk, is zeroed in place while row 0 streams on; both then equal their offline decode at
    the seam. Mutants: zero_rows_ leaving positions, conv history or transposed-conv tails (`_tensors` without
    one of them)."""
    codes, offline, junk = streams
    state = codec.new_stream(2)
    first = codec.decode_chunk(torch.stack([codes[0, :, :7], junk[1]]), state)
    state.zero_rows_([1])
    assert state.positions.tolist() == [7, 0]
    nxt = codec.decode_chunk(torch.stack([codes[0, :, 7:12], codes[1, :, :5]]), state)
    _close(torch.cat([first[0], nxt[0]]), offline[0, : 12 * SPF])
    _close(nxt[1], offline[1, : 5 * SPF])


def test_rows_taken_out_and_scattered_back_stream_on_exactly(codec, streams):
    """Row 1 is taken out (`select`), streams ahead alone, and is written back (`scatter_`); then both rows stream
    on together, each equal to its offline decode across every seam. Mutants: scatter_ skipping positions, conv
    history, transposed-conv tails, or the attention values."""
    codes, offline, _ = streams
    state = codec.new_stream(2)
    a = codec.decode_chunk(codes[..., :5], state)
    sub = state.select([1])
    b = codec.decode_chunk(codes[1:, :, 5:9], sub)
    state.scatter_(torch.tensor([1]), sub)
    assert state.positions.tolist() == [5, 9]
    c = codec.decode_chunk(torch.stack([codes[0, :, 5:9], codes[1, :, 9:13]]), state)
    _close(torch.cat([a[0], c[0]]), offline[0, : 9 * SPF])
    _close(torch.cat([a[1], b[0], c[1]]), offline[1, : 13 * SPF])


def test_reset_refuses_an_integer_mask_naming_it(codec):
    """A 0/1 integer mask is not taken as a bool one (torch refuses it deep inside with a RuntimeError naming no
    argument). Mutant: the `mask.dtype != torch.bool` half of the check removed."""
    state = codec.new_stream(2)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        state.reset(torch.tensor([0, 1]))
    assert state.positions.tolist() == [0, 0]


def test_concat_of_no_states_is_a_value_error_naming_them():
    """Mutant: the empty-list check removed (an IndexError from `states[0]`)."""
    from qwen_tts_core.codec.state import CodecStreamState

    with pytest.raises(ValueError, match="states must be a non-empty list"):
        CodecStreamState.concat([])


# --- sessions ---------------------------------------------------------------------------------------------------
def _incremental(cv):
    from qwen_tts_core import Engine, SamplingParams, SynthesisRequest

    eng = Engine(cv, max_sessions=1)
    s = eng.add(SynthesisRequest(kind="custom_voice", text=None, speaker="ryan", language="english",
                                 sampling=SamplingParams(max_new_tokens=4, do_sample=False, subtalker_dosample=False),
                                 decode_audio=False))
    return eng, s


@pytest.mark.parametrize("piece", [5, None, ["Hello"], memoryview(b"Hello")], ids=["int", "None", "list", "view"])
def test_a_text_piece_that_is_neither_str_nor_bytes_is_refused_naming_text(cv, piece):
    """Mutant: the type check of append_text removed (None and an empty list vanished silently, an int or a
    memoryview reached the engine's thread and failed the session there, naming nothing)."""
    from qwen_tts_core.errors import RequestError

    _, s = _incremental(cv)
    with pytest.raises(RequestError, match="piece must be str or bytes") as e:
        s.append_text(piece)
    assert e.value.field == "text" and not s.has_pending_text()


def test_an_empty_piece_changes_nothing_and_text_ending_inside_a_character_is_refused(cv):
    """Empty pieces (str or bytes) queue nothing; end_text after half of a UTF-8 character is refused there, naming
    text, where the caller can be told. Mutants: the `if not piece: return` removed (empty pieces queued, each a
    wake-up of the engine for nothing); the final `decode(b"", final=True)` check of end_text removed (the session
    ended with half a character, for the engine's thread to trip on)."""
    from qwen_tts_core.errors import RequestError

    _, s = _incremental(cv)
    s.append_text("")
    s.append_text(b"")
    assert not s.has_pending_text()
    s.append_text(b"caf\xc3")
    with pytest.raises(RequestError, match="ends inside a UTF-8 character") as e:
        s.end_text()
    assert e.value.field == "text"


def test_a_session_without_frames_has_codes_of_shape_0_by_16(cv):
    """A session that ends at its prefill (max_new_tokens=1: its one id never gets a frame) has codes [0, 16] long,
    as any other session's [T, 16] (what callers concatenate or save). Mutant: the empty case made zeros(0)."""
    from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
    from tests.core.test_lifecycle import drain

    eng = Engine(cv, max_sessions=1)
    s = eng.add(SynthesisRequest(kind="custom_voice", text="Hello.", speaker="ryan", language="english",
                                 sampling=SamplingParams(max_new_tokens=1, do_sample=False, subtalker_dosample=False),
                                 decode_audio=False))
    drain(eng)
    assert s.done and s.num_frames == 0
    codes = s.codes()
    assert codes.shape == (0, 16) and codes.dtype == torch.long


def test_end_text_wakes_the_engine_as_append_text_does(cv):
    """An engine blocked in wait_for_work must wake when the text ends (the last words' frames waited out the
    caller's whole wait timeout otherwise). Counted at the session's wake-up hook, no timing. Mutant: end_text
    without `self._wake()`."""
    eng, s = _incremental(cv)
    woken = []
    real = s._notify
    s._notify = lambda: (woken.append(1), real())
    s.append_text("Hello.")
    assert len(woken) == 1
    s.end_text()
    assert len(woken) == 2 and eng.runnable()


def test_end_text_on_a_session_opened_with_its_full_text_is_refused(cv):
    """Mutant: end_text's `self.incremental is None` check removed (a None was queued for a session that takes no
    text pieces; append_text refused the same misuse)."""
    from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
    from qwen_tts_core.errors import RequestError

    s = Engine(cv, max_sessions=1).add(SynthesisRequest(kind="custom_voice", text="Hello.", speaker="ryan",
                                                        language="english", sampling=SamplingParams(max_new_tokens=2),
                                                        decode_audio=False))
    with pytest.raises(RequestError, match="full text") as e:
        s.end_text()
    assert e.value.field == "text" and not s.has_pending_text()


def test_a_cancelled_session_is_done_only_once_its_end_is_delivered(cv):
    """cancel() only asks: the session is done (and has its finish reason and last chunk) after the engine's next
    step, not before (a caller polling `done` read finish_reason None). Mutant: `done` true for `cancelled`."""
    from tests.core.test_lifecycle import drain, lasts

    eng, s = _incremental(cv)
    s.append_text("Hello there.")
    eng.cancel(s)
    assert not s.done and s.finish_reason is None
    chunks = drain(eng)
    assert s.done and s.finish_reason == "cancelled" and len(lasts(chunks, s.id)) == 1


# --- compiled step bodies ---------------------------------------------------------------------------------------
def test_a_compiled_call_raises_dynamos_graph_limit_where_it_runs():
    """Each engine's runner is a new `self` for dynamo's guards (one graph per engine): with torch's default limit
    (8) the 9th engine of a process ran eagerly, silently. torch keeps the limit per thread (torch >= 2.12), and an
    engine's steps run on another thread than the one that built it (a replica's scheduler, an API caller): a compiled
    call raises the limit to RECOMPILE_LIMIT on the thread (context) it runs on, and never lowers one set higher.
    Mutants: the limit raised where the body is built instead; the raise removed; `max` dropped."""
    import threading

    from torch._dynamo import config as cfg

    from qwen_tts_core.generate.compiled import CompiledBody
    from qwen_tts_core.model.fused import RECOMPILE_LIMIT

    limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    body = CompiledBody(lambda x: x + 1, "test")
    body.compiled = lambda x: (seen.append(getattr(cfg, limit)), x + 1)[1]   # what the call would compile under
    seen: list[int] = []

    def step(start: int | None) -> None:
        if start is not None:
            setattr(cfg, limit, start)
        assert body(1) == 2

    for start in (None, 8, RECOMPILE_LIMIT * 2):    # each on a new thread: torch's default, a low one, a higher one
        t = threading.Thread(target=step, args=(start,))
        t.start()
        t.join(30)
    assert seen == [RECOMPILE_LIMIT, RECOMPILE_LIMIT, RECOMPILE_LIMIT * 2]


def test_compile_step_where_it_can_run_is_the_step_mode():
    """compile="step" on a CPU with the device sampler and no graphs compiles whole step bodies. Mutant: the
    `compile == "step"` case dropped from compile_mode's answer (it fell back to the fused pieces, "ops")."""
    from qwen_tts_core.generate.compiled import compile_mode

    assert compile_mode("step", torch.device("cpu"), "device", False) == "step"
    assert compile_mode("ops", torch.device("cpu"), "device", False) == "ops"
