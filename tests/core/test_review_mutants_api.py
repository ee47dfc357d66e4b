"""The drop-in API pinned by a mutation review of qwen_tts_core/api.py (Qwen3TTSModel), speech_tokenizer.py
(Qwen3TTSTokenizer), voice_clone.py (create_voice_clone_prompt) and cli.py (`qtts say`): each test here failed on a
one-line change (a "mutant") that the rest of the suite let pass, named in its docstring. The long-lived engine's
defaults and options, argument checks naming the argument, the reference's defaults, the audio decode around a
voice's reference codes and beyond 300 frames, the tokenizer's input and padding rules, voice prompts per item, and
the options `qtts say` hands on. Tiny random-weight checkpoints, CPU, no Ray."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from qwen_tts_core import Qwen3TTSModel, Qwen3TTSTokenizer
from qwen_tts_core.audio_io import MAX_CHANNELS
from qwen_tts_core.cli import main
from qwen_tts_core.errors import ECHO_CHARS, RequestError
from qwen_tts_core.speaker.ecapa import min_speaker_samples
from tests.core.test_review_api import _refused

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)


@pytest.fixture(scope="module")
def tok(checkpoint_factory) -> Qwen3TTSTokenizer:
    return Qwen3TTSTokenizer.from_pretrained(checkpoint_factory("custom_voice", "tiny"))


def _wave(n: int, seed: int = 0, f0: float = 220.0) -> np.ndarray:
    t = np.arange(n) / 24000.0
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * f0 * t) + 0.05 * rng.randn(n)).astype(np.float32)


def _codes(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 2048, (frames, 16), generator=torch.Generator().manual_seed(seed))


# ---- loading -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_map", [{}, 1.5], ids=["empty-dict", "float"])
def test_a_device_map_that_names_no_device_is_refused_naming_it(checkpoint_factory, device_map):
    """(mutants: `len(devices) != 1` -> `> 1` let {} through to a KeyError; `except (RuntimeError, TypeError)` ->
    `except RuntimeError` let torch's TypeError for 1.5 escape) A device_map that names no one device is a ValueError
    naming device_map, as every other bad one is."""
    with pytest.raises(ValueError, match="device_map"):
        Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map=device_map)
    with pytest.raises(ValueError, match="device_map"):
        Qwen3TTSTokenizer.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map=device_map)


@pytest.mark.parametrize("device_map", ["cuda", "cuda:0", {"": 0}])
def test_a_cuda_device_map_without_cuda_says_cuda_is_not_available(checkpoint_factory, monkeypatch, device_map):
    """(mutant: the `torch.cuda.is_available()` check dropped: "cuda" then failed in torch.cuda.current_device with
    torch's own error, "cuda:0" blamed the device count) Asking for CUDA where there is none is a ValueError naming
    device_map and saying CUDA is not available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ck = checkpoint_factory("custom_voice", "tiny")
    with pytest.raises(ValueError, match=r"device_map=.* but CUDA is not available"):
        Qwen3TTSModel.from_pretrained(ck, device_map=device_map)
    with pytest.raises(ValueError, match=r"device_map=.* but CUDA is not available"):
        Qwen3TTSTokenizer.from_pretrained(ck, device_map=device_map)


def test_quantized_loading_names_the_first_quantization_argument(checkpoint_factory):
    """(mutant: quantized[0] -> quantized[-1]) Several quantization arguments: the refusal names the first in name
    order, so the message does not depend on the order the caller wrote them in."""
    with pytest.raises(ValueError, match=r"^load_in_4bit: quantized loading is not supported"):
        Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), quantization_config={},
                                      load_in_8bit=True, load_in_4bit=True)


def test_torch_dtype_is_the_dtype_when_dtype_is_not_given(checkpoint_factory):
    """(mutants: `wanted = dtype if dtype is not None else torch_dtype` -> `wanted = dtype`, in Qwen3TTSModel and in
    Qwen3TTSTokenizer) transformers' older name `torch_dtype=` loads in that dtype, as the reference does."""
    ck = checkpoint_factory("custom_voice", "tiny")
    assert Qwen3TTSModel.from_pretrained(ck, device_map="cpu", torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    assert Qwen3TTSTokenizer.from_pretrained(ck, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


# ---- the long-lived engine -----------------------------------------------------------------------------------------

def test_the_engine_defaults_and_configure_engine_options_add_up(checkpoint_factory):
    """(mutants: the default max_sessions 8 -> 1; the sampler of each mode swapped; max_len of each mode swapped;
    `{**opts, **options}` -> `{**options, **opts}`; configure_engine forgetting earlier options, resetting
    reference_sampling when it is not given, or not storing it) The engine behind generate_*/stream_*: 8 sessions,
    torch's sampler and the model's whole position range in reference mode; the device sampler and 4096 positions
    otherwise. Each configure_engine call adds to the options given before, and an option given wins over the mode's
    default."""
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    positions = m.cfg.talker.max_position_embeddings
    assert positions > 4096
    e = m.engine
    assert (e.max_sessions, e.sampler, e.max_len) == (8, "torch", positions)
    m.configure_engine(max_sessions=3)
    m.configure_engine(max_queue=5)
    e = m.engine
    assert (e.max_sessions, e.max_queue, e.sampler, m.reference_sampling) == (3, 5, "torch", True)
    m.configure_engine(reference_sampling=False)
    e = m.engine
    assert m.reference_sampling is False
    assert (e.max_sessions, e.max_queue, e.sampler, e.max_len) == (3, 5, "device", 4096)
    m.configure_engine(max_len=100)
    assert (m.engine.max_len, m.engine.sampler) == (100, "device")
    m.configure_engine(reference_sampling=True)
    assert (m.engine.max_len, m.engine.sampler) == (100, "torch")


def test_configure_engine_refuses_while_the_engine_runs_a_session_added_to_it_directly(checkpoint_factory):
    """(mutant: configure_engine looking only at generate/stream calls in flight, not at the engine) A session added
    through `model.engine` (public) keeps the engine busy: configure_engine refuses (RuntimeError, "busy") instead of
    dropping the engine under it; once the session is cancelled it goes ahead."""
    from qwen_tts_core import SamplingParams, SynthesisRequest

    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    engine = m.engine
    s = engine.add(SynthesisRequest(kind="custom_voice", text="Hello there.", speaker="ryan", language="english",
                                    sampling=SamplingParams(**G)))
    with pytest.raises(RuntimeError, match="busy"):
        m.configure_engine(max_sessions=2)
    assert m.engine is engine and m.engine_options == {}
    engine.cancel(s)
    m.configure_engine(max_sessions=2)
    assert m.engine is not engine and m.engine.max_sessions == 2


def test_a_call_the_engine_refuses_does_not_keep_the_engine_held(checkpoint_factory):
    """(mutants: the call's hold on the engine released only when the run succeeds, or when the stream opened) A
    generate_* or stream_* call the engine refuses (an unknown speaker) raises, and leaves the engine free:
    configure_engine then goes ahead instead of reporting a call in flight for ever."""
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    _refused("speaker", m.generate_custom_voice, ["Hello.", "Bye."], speaker=["vivian", "nobody"], **G)
    m.configure_engine(max_sessions=2)
    assert m.engine.max_sessions == 2
    _refused("speaker", m.stream_custom_voice, "Hello.", speaker="nobody", **G)
    m.configure_engine(max_sessions=3)
    assert m.engine.max_sessions == 3


def test_a_failed_session_raises_a_value_error_with_its_message_once(checkpoint_factory, monkeypatch):
    """(mutants: the session's "field: " prefix kept in the message, "text: text: ..."; a failure without a field
    raised as RuntimeError) A session that fails raises a ValueError: a RequestError naming its field with the
    message once, or, for a failure that is no argument's (audio that cannot be decoded), a plain ValueError."""
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    m.configure_engine(max_len=12)  # no prompt fits: the session fails when it starts, naming text
    e = _refused("text", m.generate_custom_voice, "Hello there.", speaker="ryan", **G)
    assert "max_len" in e.message and not e.message.startswith("text:") and str(e).count("text:") == 1
    m.configure_engine(max_len=4096)
    audio = m.engine.audio
    push = audio.push

    def corrupt(keys, codes):   # a code outside the codebook: the audio decode fails
        codes = codes.clone()
        codes[:, 3] = 5000
        return push(keys, codes)
    monkeypatch.setattr(audio, "push", corrupt)
    with pytest.raises(ValueError, match="index out of range") as info:
        list(m.stream_custom_voice("Hello there.", speaker="ryan", **G))
    assert not isinstance(info.value, RequestError)


# ---- generation arguments ------------------------------------------------------------------------------------------

def test_a_generation_argument_given_as_none_takes_the_checkpoints_default(cv):
    """(mutant: `user[k] if user.get(k) is not None` -> `user[k] if k in user`) top_k=None or max_new_tokens=None is
    "not given", as in the reference: generation_config.json's value, not None."""
    assert cv.sampling_params(top_k=None, max_new_tokens=None, temperature=None) == cv.sampling_params()


def test_an_unknown_argument_name_up_to_echo_chars_is_the_errors_field(cv):
    """(mutant: `len(first) <= ECHO_CHARS` -> `<`) A name of exactly ECHO_CHARS characters is echoed as the field;
    one longer is reported as "kwargs"."""
    name = "x" * ECHO_CHARS
    _refused(name, cv.sampling_params, **{name: 1})
    _refused("kwargs", cv.sampling_params, **{name + "x": 1})


def test_the_reference_defaults_of_the_generate_and_stream_methods():
    """(mutants: a non_streaming_mode default flipped in generate_custom_voice / voice_design / voice_clone, the
    stream's first_chunk_frames default 1 -> 4) Drop-in: the reference's defaults (non_streaming_mode True for
    CustomVoice and VoiceDesign, False for a clone); streams send their first frame as soon as it is decoded."""
    def defaults(fn):
        return {k: p.default for k, p in inspect.signature(fn).parameters.items()
                if p.default is not inspect.Parameter.empty}

    assert defaults(Qwen3TTSModel.generate_custom_voice)["non_streaming_mode"] is True
    assert defaults(Qwen3TTSModel.generate_voice_design)["non_streaming_mode"] is True
    assert defaults(Qwen3TTSModel.generate_voice_clone)["non_streaming_mode"] is False
    for fn in (Qwen3TTSModel.stream_custom_voice, Qwen3TTSModel.stream_voice_design, Qwen3TTSModel.stream_voice_clone):
        d = defaults(fn)
        assert (d["first_chunk_frames"], d["chunk_frames"]) == (1, 4), fn.__name__


def test_a_batch_with_a_speaker_per_text_speaks_each_in_its_own_voice(cv):
    """(mutant: the speaker list collapsed to its first name) speaker=[a, b] for two texts: each text is spoken by
    its own speaker."""
    (a, b), _ = cv.generate_custom_voice(["Hello there."] * 2, speaker=["ryan", "vivian"], **G)
    (alone,), _ = cv.generate_custom_voice("Hello there.", speaker="vivian", **G)
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b, alone, atol=1e-5)


def test_a_0b6_custom_voice_drops_a_falsy_instruct_too(checkpoint_factory, tmp_path):
    """(mutant: `instruct is not None` -> `instruct`, so 0, False or [] reached the checks) The 0.6B CustomVoice
    model drops any instruct given, as the reference does before any check: a falsy non-string one runs too."""
    import json
    import shutil

    dst = tmp_path / "c06"
    shutil.copytree(checkpoint_factory("custom_voice", "tiny"), dst)
    raw = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**raw, "tts_model_size": "0b6"}))
    m = Qwen3TTSModel.from_pretrained(dst, device_map="cpu")
    (plain,), _ = m.generate_custom_voice("Hello.", speaker="ryan", **G)
    for instruct in (0, False, []):
        (got,), _ = m.generate_custom_voice("Hello.", speaker="ryan", instruct=instruct, **G)
        assert np.array_equal(got, plain), instruct


# ---- streams ---------------------------------------------------------------------------------------------------------

def test_a_stream_sends_first_chunk_frames_first_and_never_an_empty_chunk(cv):
    """(mutants: first_chunk_frames replaced by chunk_frames; `if ch.pcm.size: yield` -> always yield) The first
    chunk holds first_chunk_frames frames (1920 samples each); a stream whose run makes no audio yields nothing, not
    an empty array."""
    chunks = list(cv.stream_custom_voice("Hello there.", speaker="ryan", first_chunk_frames=1, chunk_frames=3,
                                         **dict(G, max_new_tokens=8)))
    assert len(chunks) >= 2 and chunks[0].shape == (1920,)
    assert all(0 < c.size <= 3 * 1920 for c in chunks)
    assert list(cv.stream_custom_voice("Hello there.", speaker="ryan", **dict(G, max_new_tokens=1))) == []


# ---- decoding ------------------------------------------------------------------------------------------------------

def test_decode_codes_decodes_reference_codes_as_context_and_cuts_them_off(cv):
    """(mutants: the reference codes appended instead of prepended; the cut one frame short) A voice's reference
    codes are decoded before the new codes, as context, and their audio is cut off: what is left is exactly the new
    codes' part of the whole decode."""
    ref, new = _codes(3, 1), _codes(5, 2)
    whole = cv.codec.decode([torch.cat([ref, new])])[0]
    (got,) = cv.decode_codes([new], [ref])
    assert got.shape == (5 * 1920,) and got.dtype == np.float32
    np.testing.assert_allclose(got, whole[3 * 1920:], atol=1e-6)


def test_beyond_300_frames_generate_decodes_as_the_reference_unless_exact_decode(cv):
    """(mutants: exact_decode inverted; the reference decode never used) Past 300 frames decode_codes re-decodes
    300-frame pieces with 25 frames of context, as the reference does; exact_decode=True gives the exact causal
    decode instead."""
    codes = _codes(301, 3)
    exact = cv.codec.decode([codes])[0]
    like_ref = cv.codec.decoder.decode_like_reference(codes.T[None].long())[0].float().cpu().numpy()
    assert not np.allclose(exact, like_ref, atol=1e-6)   # the two decodes differ here, so the test can tell them apart
    assert cv.exact_decode is False
    np.testing.assert_allclose(cv.decode_codes([codes])[0], like_ref, atol=1e-6)
    cv.exact_decode = True
    try:
        np.testing.assert_allclose(cv.decode_codes([codes])[0], exact, atol=1e-6)
    finally:
        cv.exact_decode = False


def test_a_checkpoint_without_its_speech_tokenizer_refuses_audio_naming_it(checkpoint_factory, tmp_path):
    """(mutants: _stream's codec check dropped; decode_codes returning silence without a codec; `qtts say` letting
    such a ValueError out as a traceback) A checkpoint folder without speech_tokenizer/ loads (codes only), but
    asking it for audio, offline, streamed or from codes, is a ValueError saying speech_tokenizer/ is missing,
    before any generation; `qtts say` prints it as one line."""
    import shutil

    folder = tmp_path / "codes-only"
    shutil.copytree(checkpoint_factory("custom_voice", "tiny"), folder,
                    ignore=shutil.ignore_patterns("speech_tokenizer"))
    m = Qwen3TTSModel.from_pretrained(folder, device_map="cpu")
    assert m.codec is None
    with pytest.raises(ValueError, match="speech_tokenizer/: cannot decode audio"):
        m.generate_custom_voice("Hi.", speaker="ryan", **G)
    with pytest.raises(ValueError, match="speech_tokenizer/: cannot stream audio"):
        m.stream_custom_voice("Hi.", speaker="ryan", **G)
    with pytest.raises(ValueError, match="speech_tokenizer/: cannot decode audio"):
        m.decode_codes([_codes(2)])
    with pytest.raises(SystemExit) as e:   # `qtts say`: one line, no traceback
        main(["say", "Hi.", "--model", str(folder), "--out", str(tmp_path / "a.wav"), "--device", "cpu"])
    assert e.value.code == "qtts say: this checkpoint has no speech_tokenizer/: cannot decode audio"


# ---- Qwen3TTSTokenizer -----------------------------------------------------------------------------------------------

def test_tokenizer_padding_is_counted_on_codebook_0(tok):
    """(mutant: padding read from the last codebook) Right padding is a row whose codebook 0 is -1, as the official
    counts it: such a row is dropped whatever its other codebooks hold, and a row with -1 in another codebook only is
    refused naming encoded."""
    codes = _codes(4, 4)
    want = tok.decode([codes])[0][0]
    pad = torch.full((1, 16), 7)
    pad[0, 0] = -1
    assert np.array_equal(tok.decode([torch.cat([codes, pad])])[0][0], want)
    bad = torch.full((1, 16), 7)
    bad[0, 15] = -1
    _refused("encoded", tok.decode, [torch.cat([codes, bad])])


def test_tokenizer_decode_keeps_each_waveform_in_its_items_place(tok):
    """(mutant: decoded waveforms put at positions 0.. of the non-empty items) An empty item before a filled one:
    the empty waveform stays first and the audio second."""
    codes = _codes(3, 5)
    wavs, sr = tok.decode([torch.zeros(0, 16, dtype=torch.long), codes])
    assert sr == 24000 and wavs[0].shape == (0,)
    assert np.array_equal(wavs[1], tok.decode([codes])[0][0])


def test_tokenizer_decodes_beyond_300_frames_as_the_official(tok):
    """(mutant: the 300-frame pieces never used) Past 300 frames decode re-decodes 300-frame pieces with 25 frames of
    left context, as the official wrapper does (not the exact causal decode)."""
    codes = _codes(301, 6)
    like_ref = tok.codec.decoder.decode_like_reference(codes.T[None].long())[0].float().cpu().numpy()
    got = tok.decode([codes])[0][0]
    assert got.shape == (301 * 1920,)
    np.testing.assert_allclose(got, like_ref, atol=1e-6)
    assert not np.allclose(got, tok.codec.decode([codes])[0], atol=1e-6)


def test_tokenizer_channels_are_averaged_up_to_max_channels(tok):
    """(mutants: the first channel taken instead of the mean; `shape[1] > MAX_CHANNELS` -> `>=`; the torch tensor
    refusal dropped) A [samples, channels] waveform is encoded as the mean of its channels; MAX_CHANNELS channels are
    accepted, one more refused; a torch tensor is refused saying to pass a numpy array."""
    a, b = _wave(5000, 1), _wave(5000, 2, f0=330.0)
    stereo = np.stack([a, b], axis=1)
    want = tok.encode(stereo.mean(axis=1), sr=24000).audio_codes[0]
    assert not torch.equal(want, tok.encode(a, sr=24000).audio_codes[0])
    assert torch.equal(tok.encode(stereo, sr=24000).audio_codes[0], want)
    wide = np.repeat(a[:, None], MAX_CHANNELS, axis=1)
    assert torch.equal(tok.encode(wide, sr=24000).audio_codes[0], tok.encode(a, sr=24000).audio_codes[0])
    _refused("audios", tok.encode, np.repeat(a[:, None], MAX_CHANNELS + 1, axis=1), sr=24000)
    e = _refused("audios[0]", tok.encode, [torch.from_numpy(a)], sr=24000)
    assert "torch tensor is not accepted; pass a numpy array" in str(e)   # what to do instead


def test_tokenizer_decodes_an_empty_code_array_of_any_dtype(tok):
    """(mutant: `or arr.size == 0` dropped) An empty [0, 16] array (numpy gives float64 for an empty one) decodes to an
    empty waveform, as an empty Long tensor does."""
    wavs, sr = tok.decode([np.zeros((0, 16)), _codes(2, 7).numpy()])
    assert sr == 24000 and wavs[0].shape == (0,) and wavs[1].shape == (2 * 1920,)


# ---- voice prompts -----------------------------------------------------------------------------------------------

def test_url_references_are_refused_when_allow_urls_is_false(base):
    """(mutants: allow_urls not handed on by Qwen3TTSModel.create_voice_clone_prompt, or by voice_clone to
    load_audio) allow_urls=False (what services pass) refuses a URL naming ref_audio without fetching it."""
    e = _refused("ref_audio", base.create_voice_clone_prompt, "http://127.0.0.1:9/voice.wav",
                 x_vector_only_mode=True, allow_urls=False)
    assert "allow_urls=False" in str(e)


def test_a_voice_reference_of_exactly_the_speaker_encoders_window_is_accepted(base):
    """(mutant: `len(wav) < need` -> `<=`) Reference audio of exactly the speaker encoder's minimum length is a
    voice; one sample less is refused naming ref_audio."""
    need = min_speaker_samples(base.speaker_encoder.config)
    a = _wave(need, 8)
    (item,) = base.create_voice_clone_prompt((a, 24000), x_vector_only_mode=True)
    assert item.ref_spk_embedding is not None
    e = _refused("ref_audio", base.create_voice_clone_prompt, (a[:-1], 24000), x_vector_only_mode=True)
    assert "a voice reference needs at least" in str(e)


def test_prompt_items_keep_their_own_mode_codes_transcript_and_speaker(base):
    """(mutants: an x-vector item keeping its codes; icl_mode always True; an x-vector item losing its ref_text;
    every item's speaker vector taken from the first audio) Per item: an x-vector item has no codes and icl_mode
    False but keeps the transcript it was given (as the official); an ICL item has codes; each item's speaker vector
    is its own audio's."""
    a, b = _wave(48000, 1, f0=150.0), _wave(48000, 2, f0=400.0)
    xv, icl = base.create_voice_clone_prompt([(a, 24000), (b, 24000)], ref_text=["one", "two"],
                                             x_vector_only_mode=[True, False])
    assert (xv.x_vector_only_mode, xv.icl_mode, xv.ref_code, xv.ref_text) == (True, False, None, "one")
    assert (icl.x_vector_only_mode, icl.icl_mode, icl.ref_text) == (False, True, "two")
    assert icl.ref_code is not None and icl.ref_code.shape[1] == 16
    (b_alone,) = base.create_voice_clone_prompt((b, 24000), x_vector_only_mode=True)
    assert not torch.equal(xv.ref_spk_embedding, icl.ref_spk_embedding)
    torch.testing.assert_close(icl.ref_spk_embedding, b_alone.ref_spk_embedding)


def test_prompt_arguments_are_refused_naming_the_item(base, tmp_path):
    """(mutants: a scalar mode's error given an index; every audio of a list named `ref_audio`) A ref_text list with
    more items than ref_audio is refused naming ref_text; a bad scalar x_vector_only_mode is named without an index,
    and a bad audio of a list by its index."""
    a = (_wave(48000, 1), 24000)
    _refused("ref_text", base.create_voice_clone_prompt, [a], ref_text=["one", "two"])
    e = _refused("x_vector_only_mode", base.create_voice_clone_prompt, [a], x_vector_only_mode="yes")
    assert "x_vector_only_mode must be True or False" in str(e)
    _refused("ref_audio[1]", base.create_voice_clone_prompt, [a, str(tmp_path / "missing.wav")],
             x_vector_only_mode=True)


# ---- qtts ----------------------------------------------------------------------------------------------------------

def test_make_checkpoint_prints_the_folder_it_wrote(tmp_path, capsys):
    """(mutant: the path not printed) `qtts make-checkpoint DIR` prints the checkpoint's folder (scripts read it)."""
    assert main(["make-checkpoint", str(tmp_path / "ck"), "--seed", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out and (tmp_path / "ck").samefile(out[-1]) and (tmp_path / "ck" / "config.json").is_file()


def test_say_loads_the_model_with_the_given_dtype_and_device_and_names_a_bad_model(tmp_path, monkeypatch):
    """(mutants: --dtype not handed to from_pretrained; a ValueError from loading (a damaged checkpoint) let out as a
    traceback) `qtts say` loads with --dtype and --device; a checkpoint the loader refuses is one line naming
    --model."""
    seen = {}

    def load(path, **kw):
        seen.update(kw, path=path)
        raise ValueError("config.json: talker_config.hidden_size must be an integer")
    monkeypatch.setattr(Qwen3TTSModel, "from_pretrained", load)
    with pytest.raises(SystemExit) as e:
        main(["say", "Hi.", "--model", "some/model", "--out", str(tmp_path / "a.wav"), "--dtype", "bfloat16",
              "--device", "cpu"])
    assert e.value.code == "qtts say: --model some/model: config.json: talker_config.hidden_size must be an integer"
    assert seen == dict(path="some/model", device_map="cpu", dtype="bfloat16")


def test_say_x_vector_only_clones_without_a_transcript(checkpoint_factory, ref_wav_path, tmp_path):
    """(mutant: --x-vector-only not handed to generate_voice_clone) A Base checkpoint with --ref-audio and
    --x-vector-only needs no --ref-text."""
    out = tmp_path / "a.wav"
    assert main(["say", "Hi.", "--model", str(checkpoint_factory("base", "tiny")), "--ref-audio", str(ref_wav_path),
                 "--x-vector-only", "--out", str(out), "--max-new-tokens", "4", "--seed", "1",
                 "--device", "cpu"]) == 0
    assert out.stat().st_size > 44
