"""Text tokenizer, the tiny tokenizer, request types, the reference-audio encoder and the allocator policy, pinned by a
mutation review.

Reviewed: qwen_tts_core/text/tokenizer.py (`TextTokenizer`: templates, slicing, `normalize`, `split_offsets`,
`open_added_token`, the load-time checks), text/tiny_tokenizer.py (the tokenizer every tiny checkpoint carries),
types.py (`SamplingParams` and the request defaults), codec/encoder.py (`MimiEncoder.encode`, the weight mapping),
codec/quantizer.py and cpu_alloc.py. Each test here failed on a one-line change (a "mutant", named in its docstring)
that the rest of the fast suite let pass.

The rules: the tiny tokenizer cuts text as Qwen2's does (each digit apart, runs of spaces before a word as the
Qwen2 regex cuts them, NFC before the pre-tokenizer, added tokens matched on the raw text, "\\n\\n" in its
vocabulary); a literal template marker in a user's text becomes its special id, as transformers 4.57.3 (the
official package's pin) and 5.x give it for the same tokenizer files (checked by this review: identical ids for
empty text, CJK, emoji, decomposed accents, 5000-letter words, "<|im_start|>" / "<|im_end|>" / "<tts_pad>" inside a
text; both refuse lone surrogates, which the request checks refuse first); the incremental feed's helpers give the
piece starts and the open added-token tail of a text; sampling defaults are the official `hard_defaults`. Tiny random
checkpoints, CPU, no Ray. The tiny tokenizer's tokenizer.json is also read with the `tokenizers` library alone (as
transformers 4.57 reads it): transformers 5 rebuilds Qwen2's normalizer and pre-tokenizer itself, so a wrong file was
visible to the parity oracle only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_tts_core import SamplingParams, cpu_alloc
from qwen_tts_core.errors import RequestError
from tests.core.test_review_api import _refused

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
TTS_PAD, TTS_BOS, TTS_EOS = 151671, 151672, 151673


# --- the tiny tokenizer cuts text as Qwen2's --------------------------------------------------------------------
def test_each_digit_is_a_piece_of_its_own(cv):
    """Qwen2's pre-tokenizer regex takes one digit at a time (`\\p{N}`); grouped digits would tokenize numbers into
    ids the real vocabulary never gives. Mutant N05: `\\p{N}` made `\\p{N}+`."""
    tok = cv.tokenizer
    assert tok.split_offsets("12345 67") == [0, 1, 2, 3, 4, 5, 6, 7]
    assert tok.encode("12345") == [i for d in "12345" for i in tok.encode(d)]


def test_a_run_of_spaces_leaves_its_last_space_to_the_word_after_it(cv):
    """`\\s+(?!\\S)` leaves the last space of a run to the next word (" b"), as Qwen2's regex does. Mutant N10: the
    lookahead alternative dropped (the whole run one piece, the word bare)."""
    tok = cv.tokenizer
    assert tok.split_offsets("a  b") == [0, 1, 2]
    assert tok.encode("a  b")[-1] == tok.encode(" b")[-1]


def test_a_decomposed_accent_tokenizes_as_its_composed_form(cv):
    """The tiny tokenizer normalizes NFC before its pre-tokenizer, as the real Qwen2 tokenizer.json does (and as
    transformers 5 applies whatever the file says): without it transformers 4.57 (the official package) and 5
    tokenize "e" + U+0301 differently. Mutant N02: the NFC normalizer dropped."""
    tok = cv.tokenizer
    assert tok.encode("e\u0301") == tok.encode("\u00e9")
    assert tok.normalize("e\u0301 x") == "\u00e9 x"


def test_an_added_token_is_matched_on_the_raw_text_before_normalization(cv):
    """Added tokens are `normalized: false`: "<|im_end|>" + U+0338 keeps its marker (NFC would compose ">" with the
    mark and lose it), in the tokenizer and in `normalize`. Mutants N03 (`normalized: true`), T18 (the whole text
    normalized across added tokens)."""
    tok = cv.tokenizer
    assert tok.encode("<|im_end|>\u0338")[0] == IM_END
    assert tok.normalize("a<|im_end|>\u0338") == "a<|im_end|>\u0338"
    assert tok.normalize("e\u0301<|im_end|>e\u0301") == "\u00e9<|im_end|>\u00e9"


def test_the_vocabulary_has_a_paragraph_token_that_a_leading_newline_merges_into(cv):
    """The real vocabulary has "\\n\\n": a text starting with a newline merges it into the role's "assistant\\n"
    (the prompt follows the reference there). Mutant N08: the tiny corpus without paragraphs (no "\\n\\n" token: a
    case the tests could no longer reach)."""
    tok = cv.tokenizer
    vocab = tok.vocab()
    assert "\u010a\u010a" in vocab
    assert tok.target("\nlead").role == [IM_START, vocab["assistant"], vocab["\u010a\u010a"]]


def test_a_template_marker_in_a_users_text_is_its_special_id_as_the_reference_gives_it(cv):
    """What the official prompt does with a user's literal markers (the tokenizer's added tokens match inside the
    text): checked by this review against transformers 4.57.3 and 5.x on the same files, all giving these ids. The
    markers stay inside the text span (role and tail sliced by position)."""
    tok = cv.tokenizer
    a, b = tok.encode("a"), tok.encode("b")
    assert tok.encode("a<|im_end|>b") == a + [IM_END] + b
    assert tok.encode("<tts_pad>a<tts_text_bos>") == [TTS_PAD] + a + [TTS_BOS]
    assert tok.encode("<|im_start|>" * 3) == [IM_START] * 3
    target = tok.target("<|im_start|>user\na<|im_end|>")
    assert target.text[0] == IM_START and target.text[-1] == IM_END
    assert tok.encode("") == [] and tok.target("").text == []
    # a near miss is plain text
    assert IM_START not in tok.encode("<|IM_START|>") and IM_START not in tok.encode("<|im_start")



ODD_TEXTS = ["", "hello", "12345 67", "a  b   c", "I'M it's", "e\u0301 \u00e9", "\ufb01 \u2460 \uff48", "\u212b \u2126",
             "\U0001F600\U0001F468\u200d\U0001F469", "\u4f60\u597d\uff0c\u4e16\u754c\u3002", "a" * 3000,
             "\r\n\n\nx", "<|im_start|>user\nhi<|im_end|>", "<|im_end|>\u0338", "<tts_pad>x<tts_text_eod>",
             "<|im_start", "<|IM_START|>", "\x00\x01", "\u0958 \ufb2c."]


def test_the_tiny_tokenizer_json_itself_tokenizes_as_the_engine_does(cv):
    """transformers 5 (the engine's) builds Qwen2's normalizer, pre-tokenizer and added tokens itself; transformers
    4.57 (the official package's, the parity oracle's) takes them from tokenizer.json as written. The file, read by
    the `tokenizers` library alone, must give the engine's ids on odd texts, or the two sides of every parity test
    tokenize differently. Mutants N02 (no NFC), N03 (added tokens normalized), N05 (digits grouped), N10 (the
    trailing-space lookahead dropped), each only visible to the oracle before."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(cv.path / "tokenizer.json"))
    tok = cv.tokenizer
    for text in ODD_TEXTS:
        assert raw.encode(text, add_special_tokens=False).ids == tok.encode(text), text
        if text and "<" not in text:   # the file's own pre-tokenizer cuts where the engine's does (each digit apart)
            assert [a for _, (a, _) in raw.pre_tokenizer.pre_tokenize_str(text)] == tok.split_offsets(text), text

# --- the incremental feed's helpers -----------------------------------------------------------------------------
def test_the_open_added_token_tail_starts_where_a_marker_may_still_form(cv):
    """`open_added_token`: the offset from which the end of a text may still become an added token. Mutants T13 (a
    lone "<" not counted), T14 (the longest open prefix missed), T15 (offset 0 never looked at), T16 (offset + 1)."""
    tok = cv.tokenizer
    assert tok.open_added_token("ab") == 2
    assert tok.open_added_token("ab<") == 2
    assert tok.open_added_token("<") == 0
    assert tok.open_added_token("<|im_e") == 0
    assert tok.open_added_token("ab<|im_e") == 2
    longest = "<tts_text_bos>"
    assert tok.open_added_token("x" + longest[:-1]) == 1
    assert tok.open_added_token("x" + longest) == len(longest) + 1   # complete: nothing open


def test_an_added_token_is_a_piece_of_its_own_and_the_text_after_it_keeps_its_offsets(cv):
    """`split_offsets`: an added token starts a piece, and the pieces after the last one are offset by where they
    start. Mutants T19 (the token's own start dropped), T20 (offsets after the last token not shifted)."""
    tok = cv.tokenizer
    assert tok.split_offsets("ab<|im_end|>cd ef") == [0, 2, 12, 14]
    assert tok.split_offsets("<tts_pad>") == [0] and tok.split_offsets("<tts_pad>x") == [0, 9]


# --- request types ----------------------------------------------------------------------------------------------
def test_sampling_defaults_are_the_official_hard_defaults():
    """The official `Qwen3TTSModel._merge_generate_kwargs` hard_defaults (qwen_tts 0.1: top_k 50, top_p 1.0,
    temperature 0.9, repetition_penalty 1.05, the same for the code predictor, max_new_tokens 2048): a request
    without sampling fields samples as the reference does. Mutants Y19-Y23, Y31."""
    assert SamplingParams() == SamplingParams(
        do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05, subtalker_dosample=True,
        subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9, max_new_tokens=2048)
    p = SamplingParams()
    assert (p.top_k, p.temperature, p.repetition_penalty, p.max_new_tokens) == (50, 0.9, 1.05, 2048)
    assert (p.subtalker_top_k, p.subtalker_temperature) == (50, 0.9)


# --- load-time checks -------------------------------------------------------------------------------------------
def test_a_missing_tokenizer_config_is_named_with_the_files_a_tokenizer_needs(tmp_path):
    """Mutant T08: the check dropped (the JSON reader's "not a readable JSON file (FileNotFoundError ...)" instead
    of naming what is missing and the files the Qwen2 tokenizer needs)."""
    from qwen_tts_core.text.tokenizer import check_tokenizer_config

    with pytest.raises(ValueError, match="missing tokenizer_config.json .*vocab.json, merges.txt"):
        check_tokenizer_config(tmp_path)



def test_both_chat_markers_must_encode_to_the_configs_ids(cv):
    """A tokenizer whose <|im_end|> is not the config's id built every prompt with a wrong end marker (and every
    instruction and transcript). Mutant T25: only <|im_start|> checked."""
    tok = cv.tokenizer
    tok.check_special_ids(IM_START, IM_END, "here")
    with pytest.raises(ValueError, match="encodes <\\|im_end\\|> as \\[151645\\]"):
        tok.check_special_ids(IM_START, IM_END + 1, "here")


def test_an_id_only_among_tokenizer_jsons_added_tokens_is_named_in_that_file(tmp_path):
    """The published tokenizer.json holds its specials (151643 up) in `added_tokens`, not in the BPE vocabulary: an
    offending special id is named in tokenizer.json, the file that gives it. Mutant T28: added_tokens not searched
    (tokenizer_config.json named instead)."""
    import json

    from qwen_tts_core.text.tokenizer import _file_with_id

    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"model": {"vocab": {"a": 0}}, "added_tokens": [{"id": 9, "content": "<x>"}]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"9": {"content": "<x>"}}}))
    assert _file_with_id(tmp_path, 9) == tmp_path / "tokenizer.json"
    assert _file_with_id(tmp_path, 0) == tmp_path / "tokenizer.json"
    assert _file_with_id(tmp_path, 5) == tmp_path

# --- the reference-audio encoder --------------------------------------------------------------------------------
def _wave(n: int, seed: int) -> np.ndarray:
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / 24000) + 0.05 * rng.randn(n)).astype(np.float32)


@pytest.fixture(scope="module")
def speech_tok(tmp_path_factory):
    from qwen_tts_core import Qwen3TTSTokenizer
    from qwen_tts_core.codec.build import write_random_speech_tokenizer

    return Qwen3TTSTokenizer.from_pretrained(
        write_random_speech_tokenizer(tmp_path_factory.mktemp("stok") / "speech_tokenizer", "tiny", seed=0))


def test_a_batch_pads_its_shorter_audio_after_its_end_with_zeros(speech_tok):
    """The reference right-pads a batch with zeros: the shorter item encodes as that item followed by silence, its
    last, partial frame included (alone it would see the encoder's own padding). Mutants E09 (padded with ones),
    E20 (padded on the left)."""
    a, b = _wave(24000, 1), _wave(5000, 2)
    batch = speech_tok.encode([a, b], sr=24000).audio_codes[1]
    padded = np.concatenate([b, np.zeros(a.size - b.size, np.float32)])
    assert torch.equal(batch, speech_tok.encode([a, padded], sr=24000).audio_codes[1][:batch.shape[0]])



def test_the_encoder_keeps_up_to_all_its_codebooks_and_refuses_more(speech_tok):
    """encoder_valid_num_quantizers may be the encoder's num_quantizers (all kept) but not more (the codes came out
    with fewer codebooks than asked for). Mutants E03 (all refused), E04 (one more taken)."""
    from qwen_tts_core.codec.encoder import MimiEncoder

    cfg = speech_tok.codec.cfg.encoder
    total = int(cfg.get("num_quantizers", 32))
    assert MimiEncoder(cfg, num_quantizers=total).num_quantizers == total
    with pytest.raises(ValueError, match="exceeds"):
        MimiEncoder(cfg, num_quantizers=total + 1)


def test_the_encoder_takes_an_empty_batch_and_refuses_what_is_not_a_finite_mono_waveform(speech_tok):
    """`MimiEncoder.encode`: no audio gives no codes; a 2-D array, an empty one and one with NaN or inf are refused
    naming the item. Mutants E05, E06, E07, E08."""
    enc = speech_tok.codec.encoder
    assert enc.encode([]) == []
    good = _wave(3000, 0)
    for bad, match in ((np.stack([good, good]), "1-D"), (np.zeros(0, np.float32), "empty"),
                       (np.where(np.arange(3000) == 7, np.inf, good), "NaN or inf"),
                       (np.where(np.arange(3000) == 7, np.nan, good), "NaN or inf")):
        with pytest.raises(ValueError, match=f"audios\\[1\\].*{match}"):
            enc.encode([good, bad])


def test_codes_are_mimis_first_codebooks_one_frame_per_started_1920_samples(speech_tok):
    """The codes are the first `encoder_valid_num_quantizers` codebooks of MimiModel's encode (codebook 0 the
    semantic one the talker reads), ceil(len / 1920) frames each, also when a longer item in the batch gives the
    encoder more frames. Mutants E10 (codebooks 1..16), E12 (an extra frame on an exact multiple of 1920)."""
    enc = speech_tok.codec.encoder
    a = _wave(3840, 3)
    (codes,) = enc.encode([a])
    weight = next(enc.model.parameters())
    x = torch.from_numpy(a).to(weight.dtype)[None, None]
    with torch.inference_mode():
        mimi = enc.model.encode(x, return_dict=True).audio_codes[0]   # [Q, T]
    assert codes.shape == (2, enc.num_quantizers)
    assert torch.equal(codes, mimi[: enc.num_quantizers, :2].T.long())
    assert [c.shape[0] for c in enc.encode([a, _wave(24000, 4), _wave(1921, 5)])] == [2, 13, 2]


def test_the_quantizer_decodes_codebook_0_apart_and_the_rest_summed():
    """SplitResidualQuantizer.decode: codebook 0 through rvq_first, codebooks 1.. through rvq_rest, each split's
    vectors summed then projected (the reference's layout; the last codebook counts). Mutant Q03: the rest read
    codebooks 0..n-2 (audio from the wrong codes; the codec's own streaming/offline tests share the quantizer, so only
    the parity oracle saw it)."""
    from qwen_tts_core.codec.quantizer import SplitResidualQuantizer

    torch.manual_seed(0)
    q = SplitResidualQuantizer(num_quantizers=4, codebook_dim=8, codebook_size=16)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.rand_like(p) + 0.1)
    codes = torch.randint(0, 16, (2, 4, 3))
    first = q.rvq_first.vq.layers[0]._codebook.vectors()[codes[:, 0]]
    rest = sum(q.rvq_rest.vq.layers[i - 1]._codebook.vectors()[codes[:, i]] for i in range(1, 4))
    want = q.rvq_first.output_proj(first.transpose(1, 2)) + q.rvq_rest.output_proj(rest.transpose(1, 2))
    torch.testing.assert_close(q.decode(codes), want)

# --- cpu_alloc --------------------------------------------------------------------------------------------------
class _Libc:
    def __init__(self, ok: int = 1, glibc: bool = True) -> None:
        self.calls: list[tuple[int, int]] = []
        self.ok = ok
        if glibc:
            self.gnu_get_libc_version = lambda: b"2.39"

        class _Fn:
            argtypes = None

            def __call__(fn, param, value):
                self.calls.append((param, value))
                return self.ok

        self.mallopt = _Fn()


def _keep(monkeypatch, libc) -> bool:
    monkeypatch.setattr(cpu_alloc, "_done", None)
    monkeypatch.delenv("QTTS_MALLOC_TUNE", raising=False)
    monkeypatch.setattr(cpu_alloc.sys, "platform", "linux")
    monkeypatch.setattr(cpu_alloc.ctypes, "CDLL", lambda name: libc)
    return cpu_alloc.keep_freed_memory()


def test_the_policy_is_set_once_and_only_on_glibc_where_mallopt_takes_it(monkeypatch):
    """A libc without gnu_get_libc_version (musl) is left alone, not a crash at engine start; a mallopt that
    refuses is not reported as applied; the three settings are set once per process. Mutants C03 (AttributeError
    not caught), C07 (always True), C06 (applied on every call), C04/C05/C08 (the values)."""
    assert _keep(monkeypatch, _Libc(glibc=False)) is False
    assert _keep(monkeypatch, _Libc(ok=0)) is False
    libc = _Libc()
    assert _keep(monkeypatch, libc) is True
    assert cpu_alloc.keep_freed_memory() is True
    assert libc.calls == [(-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20)]


def test_sampling_bounds_are_the_bounds():
    """Each bound taken at its edge and refused just past it, naming the field. Mutants Y01 (temperature 0; also
    seen by test_api.py's loose-forms test), Y02 (top_p 0), Y03 (top_p 1 refused), Y04/Y05 (top_k edges), Y06
    (penalty 0), Y07/Y08 (max_new_tokens edges), Y11 (a float32 overflow taken), Y28/Y29 (the bounds raised past
    what device integers hold)."""
    from qwen_tts_core.types import FLOAT32_MAX, MAX_NEW_TOKENS, MAX_TOP_K

    assert (MAX_TOP_K, MAX_NEW_TOKENS) == (1 << 20, 1 << 24)
    SamplingParams(top_p=1, subtalker_top_p=1, top_k=0, subtalker_top_k=MAX_TOP_K, max_new_tokens=MAX_NEW_TOKENS,
                   temperature=FLOAT32_MAX, repetition_penalty=1e-30)
    SamplingParams(max_new_tokens=1, top_k=MAX_TOP_K)
    for field, bad in (("temperature", 0), ("subtalker_temperature", 0.0), ("top_p", 0), ("subtalker_top_p", 0.0),
                       ("top_p", 1.0000001), ("top_k", MAX_TOP_K + 1), ("top_k", -1), ("repetition_penalty", 0),
                       ("max_new_tokens", 0), ("max_new_tokens", MAX_NEW_TOKENS + 1), ("temperature", 5e38)):
        _refused(field, SamplingParams, **{field: bad})


def test_loose_forms_are_taken_as_the_reference_takes_them_and_nothing_else():
    """0/1 switches, integral floats as counts, numpy scalars as Python's, the greedy idiom temperature=0 beside
    do_sample=False; but True is not a count, 50.5 is not 50 and a negative temperature is refused even greedy.
    Mutants Y09 (True taken as top_k=1), Y12 (numpy floats kept: the device's per-slot tensors refused them); Y13-Y16
    and Y30 also fail tests/core/test_api.py's loose-forms test, checked here without generating."""
    p = SamplingParams(do_sample=0, subtalker_dosample=1, top_k=50.0, temperature=np.float32(0.5),
                       max_new_tokens=np.int64(7))
    assert p.do_sample is False and p.subtalker_dosample is True and type(p.top_k) is int
    assert type(p.temperature) is float and type(p.max_new_tokens) is int
    g = SamplingParams(do_sample=False, temperature=0, top_p=0)
    assert (g.temperature, g.top_p) == (1.0, 1.0)
    _refused("temperature", SamplingParams, do_sample=True, temperature=0)
    _refused("temperature", SamplingParams, do_sample=False, temperature=-1)
    _refused("top_k", SamplingParams, top_k=True)
    _refused("top_k", SamplingParams, top_k=50.5)
    _refused("do_sample", SamplingParams, do_sample=2)


def test_overrides_keep_what_is_none_and_name_an_unknown_field():
    """Mutants Y17 (None replaced the value), Y18 (an unknown field a TypeError, not a RequestError naming it)."""
    p = SamplingParams().with_overrides(top_k=None, temperature=0.5)
    assert (p.top_k, p.temperature) == (50, 0.5)
    with pytest.raises(RequestError) as e:
        SamplingParams().with_overrides(topk=3)
    assert e.value.field == "topk"


def test_request_defaults():
    """A request without options: automatic language, streaming text feed, audio decoded, first chunk one frame
    then four (the latency the service promises). Mutants Y24-Y27, Y32."""
    from qwen_tts_core import SynthesisRequest

    r = SynthesisRequest(kind="custom_voice", text="x")
    assert (r.language, r.non_streaming_mode, r.decode_audio, r.first_chunk_frames, r.chunk_frames) == (
        "auto", False, True, 1, 4)
    assert (r.priority, r.seed, r.sampling) == ("interactive", None, SamplingParams())
