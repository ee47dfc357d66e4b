"""Review of the Python API (Qwen3TTSModel, Qwen3TTSTokenizer, reference audio) as a user, an attacker and a crash:
bad input is a RequestError naming the argument, never another exception, a silent wrong result or work done first.

Defects found here (each test failed before its fix):
- a missing file given as a `pathlib.Path` was a plain ValueError, where a str path (and the README) give a
  FileNotFoundError;
- `Qwen3TTSTokenizer.encode` took `(array, sr)` and arrays with `sr` without load_audio's peak check: integer PCM cast
  to float (peak 32767) or 1e30 was encoded into codes of nothing (a path or bytes with the same samples is refused);
- `non_streaming_mode="false"` (or `[]`, 2, ...) was run through `bool()` by the API (the truthy string as True), where
  the service and the jobs refuse it; a NumPy array there raised NumPy's "truth value is ambiguous";
- speakers or instructions given as a NumPy array (a DataFrame column's `.values`) raised NumPy's "truth value is
  ambiguous", naming no argument; `instruct=0` was dropped silently;
- a list of reference audios of another length than the texts was refused naming `voice_clone_prompt` (an argument
  the caller did not pass) after every reference had been decoded and encoded;
- a list of x_vector_only_mode of another length than ref_audio was refused naming ref_text;
- uint64 codes of 2**64-1 at the end of an item were taken for -1 right padding and dropped by the tokenizer's
  decode instead of being refused as out of range.
The other tests pin documented promises not pinned elsewhere (batch and sampling arguments refused by name, top_k=0,
a pickled voice prompt file refused without being unpickled).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_tts_core import Qwen3TTSTokenizer
from qwen_tts_core.audio_io import load_audio
from qwen_tts_core.codec.build import write_random_speech_tokenizer
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import validate
from qwen_tts_core.types import SAMPLING_FIELDS

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=4)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Qwen3TTSTokenizer:
    folder = write_random_speech_tokenizer(tmp_path_factory.mktemp("stok") / "speech_tokenizer", "tiny", seed=0)
    return Qwen3TTSTokenizer.from_pretrained(folder)


def _wave(n: int) -> np.ndarray:
    t = np.arange(n) / 24000.0
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def _refused(field: str, fn, *args, **kwargs) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.field == field, (info.value.field, str(info.value))
    return info.value


# --- reference audio ----------------------------------------------------------------------------------------------

def test_a_missing_file_given_as_a_path_object_is_a_file_not_found_error(base, tok, tmp_path):
    """README: 'a missing file is a FileNotFoundError' (the reference's type); a str path was one, a Path was not."""
    missing = tmp_path / "missing.wav"
    for call, field in ((lambda: load_audio(missing), "ref_audio"),
                        (lambda: base.create_voice_clone_prompt(missing, x_vector_only_mode=True), "ref_audio"),
                        (lambda: tok.encode(missing), "audios")):
        with pytest.raises(FileNotFoundError) as e:
            call()
        assert isinstance(e.value, RequestError) and e.value.field == field
    (tmp_path / "folder.wav").mkdir()   # there, but not a file: still refused naming the argument
    _refused("ref_audio", load_audio, tmp_path / "folder.wav")


@pytest.mark.parametrize("form", ["array-with-sr", "pair"])
@pytest.mark.parametrize("peak", [32767.0, 1e30], ids=["int16-as-float", "1e30"])
def test_the_tokenizer_refuses_integer_pcm_stored_as_floats_as_load_audio_does(tok, form, peak):
    """`x.astype(np.float32)` of int16 PCM (without / 32768) is no audio: load_audio refuses it (a file, bytes or a
    voice reference's pair), the tokenizer encoded it into codes of nothing."""
    bad = _wave(4000) / 0.3 * np.float32(peak)
    with pytest.raises(RequestError, match="far beyond") as e:
        tok.encode(bad, sr=24000) if form == "array-with-sr" else tok.encode((bad, 24000))
    assert e.value.field == "audios"
    _refused("audios[1]", tok.encode, [_wave(4000), bad], sr=24000)
    assert tok.encode(np.zeros(4000, np.float32), sr=24000).audio_codes[0].shape == (3, 16)  # silence still is


# --- generate_* arguments -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["false", "no", [], [False], 2, 0.5, np.array([True, False])],
                         ids=["false-str", "no-str", "empty-list", "list", "two", "half", "array"])
def test_non_streaming_mode_that_is_not_a_switch_is_refused_naming_it(cv, value):
    """The service and the jobs refuse these (validate: 'a truthy "false" must not pass for True'); the API ran
    `bool()` on them first, so "false" synthesized in non-streaming mode."""
    _refused("non_streaming_mode", cv.generate_custom_voice, "Hi.", speaker="ryan", non_streaming_mode=value, **G)
    _refused("non_streaming_mode", cv.stream_custom_voice, "Hi.", speaker="ryan", non_streaming_mode=value, **G)


@pytest.mark.parametrize("value,want", [(True, True), (1, True), (np.True_, True), (False, False), (0, False),
                                        (None, False), (np.False_, False)])
def test_the_switch_forms_the_reference_runs_still_run(cv, value, want):
    (req,) = cv._requests("custom_voice", "Hi.", None, None, value, {}, speaker="ryan")
    assert req.non_streaming_mode is want
    validate(cv, req)


@pytest.mark.parametrize("kw,field", [
    (dict(speaker=np.array(["ryan", "eric"])), "speaker"),
    (dict(speaker="ryan", instruct=np.array(["calm", "warm"])), "instruct"),
    (dict(speaker="ryan", instruct=0), "instruct"),
    (dict(speaker="ryan", instruct=False), "instruct"),
    (dict(speaker="ryan", language=np.array(["english", "german"])), "language"),
], ids=["speaker-array", "instruct-array", "instruct-0", "instruct-false", "language-array"])
def test_batch_arguments_given_as_arrays_or_falsy_non_strings_are_refused_naming_them(cv, kw, field):
    """A DataFrame column's `.values` is an array, not a list: it is one (bad) value, refused naming the argument,
    not NumPy's 'truth value of an array is ambiguous'; instruct=0 was dropped silently."""
    _refused(field, cv.generate_custom_voice, ["Hello.", "Bye."], **kw, **G)


@pytest.mark.parametrize("kw,field", [
    (dict(text=["Hello.", None]), "text"), (dict(text=["Hello.", b"Bye."]), "text"),
    (dict(text=["Hello.", " \t\n"]), "text"), (dict(text=[]), "text"), (dict(text=("Hello.", "Bye.")), "text"),
    (dict(text=["a", "b"], language=["english"] * 3), "language"),
    (dict(text=["a", "b", "c"], instruct=["calm", "warm"]), "instruct"),
    (dict(text=["a", "b"], seed=[1, 2, 3]), "seed"),
    (dict(text=["a", "b"], speaker=["ryan", None, "eric"]), "speaker"),
    (dict(text="a", max_new_tokens=True), "max_new_tokens"), (dict(text="a", max_new_tokens=-1), "max_new_tokens"),
    (dict(text="a", max_new_tokens=10**40), "max_new_tokens"), (dict(text="a", top_p=0), "top_p"),
    (dict(text="a", temperature=float("nan")), "temperature"), (dict(text="a", temperature=-1), "temperature"),
    (dict(text="a", repetition_penalty=0), "repetition_penalty"), (dict(text="a", top_k=-1), "top_k"),
])
def test_bad_batches_and_sampling_values_are_refused_naming_the_argument(cv, kw, field):
    kw = {"speaker": "ryan", **kw}
    _refused(field, cv.generate_custom_voice, **kw)


def test_max_new_tokens_1_gives_an_empty_waveform(cv, base, ref_wav_path):
    """max_new_tokens=1 yields no frame (the id drawn at prefill never gets one, as HF): an empty float32 waveform,
    for an ICL voice too (its reference's samples are cut, none of them is returned)."""
    (w,), sr = cv.generate_custom_voice("Hi.", speaker="ryan", max_new_tokens=1)
    assert sr == 24000 and w.shape == (0,) and w.dtype == np.float32
    (w,), _ = base.generate_voice_clone("Hi.", ref_audio=str(ref_wav_path), ref_text="Good morning.",
                                        max_new_tokens=1)
    assert w.shape == (0,) and w.dtype == np.float32


def test_top_k_0_disables_top_k_and_runs(cv):
    (w,), sr = cv.generate_custom_voice("Hi.", speaker="ryan", top_k=0, subtalker_top_k=0, max_new_tokens=4, seed=1)
    assert sr == 24000 and w.dtype == np.float32 and np.isfinite(w).all()


_scalar = (st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6)
           | st.sampled_from(["ryan", "english", "Hello.", "", " ", "\ud800", 2 ** 70, b"ryan", ("ryan", "eric")])
           | st.sampled_from(["array", "array1", "tensor"]).map(
               lambda k: {"array": np.array(["ryan", "eric"]), "array1": np.array([1]),
                          "tensor": torch.tensor([1, 2])}[k]))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3), max_leaves=4)
ARGS = ("text", "speaker", "language", "instruct", "seed", "non_streaming_mode", "top_k", "temperature",
        "max_new_tokens", "do_sample")


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(fields=st.fixed_dictionaries({}, optional={k: _value for k in ARGS}))
def test_any_arguments_of_generate_custom_voice_are_taken_or_refused_by_name(cv, fields):
    """Whatever a caller passes is a request every check took, or a RequestError naming one of the arguments
    (nothing is generated: the built requests are validated as the engine's add does)."""
    fields.setdefault("text", "Hello.")
    fields.setdefault("speaker", "ryan")
    built = []
    cv._run = lambda reqs: [validate(cv, r) or built.append(r) for r in reqs] and []   # instead of the engine
    try:
        cv.generate_custom_voice(**fields)
    except RequestError as e:
        assert e.field in {*ARGS, *SAMPLING_FIELDS}, e
        return
    finally:
        del cv._run
    for r in built:
        assert isinstance(r.text, str) and isinstance(r.language, str) and isinstance(r.non_streaming_mode, bool)
        assert r.speaker is None or isinstance(r.speaker, str)
        assert r.instruct is None or isinstance(r.instruct, str)


# --- voice clone ----------------------------------------------------------------------------------------------------

def test_a_ref_audio_list_that_does_not_match_the_texts_is_refused_naming_it_before_any_is_encoded(
        base, ref_wav_path, monkeypatch):
    import qwen_tts_core.voice_clone as voice_clone

    loaded = []
    real = voice_clone.load_audio
    monkeypatch.setattr(voice_clone, "load_audio", lambda *a, **k: loaded.append(a) or real(*a, **k))
    two = [str(ref_wav_path)] * 2
    _refused("ref_audio", base.generate_voice_clone, ["One.", "Two.", "Three."], ref_audio=two,
             x_vector_only_mode=True, **G)
    _refused("ref_audio", base.stream_voice_clone, "One.", ref_audio=two, x_vector_only_mode=True, **G)
    assert not loaded
    (w,), _ = base.generate_voice_clone("One.", ref_audio=[str(ref_wav_path)], x_vector_only_mode=True, **G)
    assert len(loaded) == 1 and w.size   # one reference for one text (and one for many) still runs


@pytest.mark.parametrize("bad,field", [
    pytest.param({"language": "klingon"}, "language", id="unsupported-language"),
    pytest.param({"language": ""}, "language", id="empty-language"),
    pytest.param({"temprature": 0.7}, "temprature", id="misspelt-generation-argument"),
    pytest.param({"eos_token_id": 3}, "eos_token_id", id="generate-argument-not-taken"),
    pytest.param({"seed": "5"}, "seed", id="seed-string"),
    pytest.param({"text": "  "}, "text", id="blank-text"),
])
def test_voice_clone_refuses_its_cheap_arguments_before_the_reference_is_fetched_or_encoded(
        base, ref_wav_path, monkeypatch, bad, field):
    """The reference checks the language before it touches the reference audio; here a bad language, a misspelt
    generation argument, a bad seed or a blank text came only after the reference was fetched (a URL), decoded,
    resampled and run through the codec and speaker encoders, and a missing file's error came instead of the
    language's (drop-in review, /tmp/h4/err_order.py)."""
    import qwen_tts_core.voice_clone as voice_clone

    loaded = []
    real = voice_clone.load_audio
    monkeypatch.setattr(voice_clone, "load_audio", lambda *a, **k: loaded.append(a) or real(*a, **k))
    args = {"text": "One.", "ref_audio": str(ref_wav_path), "x_vector_only_mode": True, **G, **bad}
    _refused(field, base.generate_voice_clone, **args)
    _refused(field, base.stream_voice_clone, **args)
    _refused(field, base.generate_voice_clone, **{**args, "ref_audio": "/nonexistent/ref.wav"})
    _refused(field, base.generate_voice_clone, **{**args, "text": [args["text"]] * 2, "ref_audio": str(ref_wav_path)})
    assert not loaded


def test_a_mode_list_of_another_length_is_refused_naming_x_vector_only_mode(base, ref_wav_path):
    """It was refused naming ref_text, which the caller had not passed."""
    _refused("x_vector_only_mode", base.create_voice_clone_prompt, str(ref_wav_path),
             x_vector_only_mode=[True, True])
    _refused("ref_text", base.create_voice_clone_prompt, str(ref_wav_path), ref_text=["a", "b"])


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))   # unpickling it creates the marker file


def test_a_pickled_voice_prompt_is_refused_without_being_unpickled(tmp_path):
    """A voice prompt file is read with safetensors only: a torch.save (pickle) file that would run code when
    unpickled is a ValueError naming the file, and its code never runs."""
    from qwen_tts_core import load_voice_prompt

    marker = tmp_path / "ran"
    for name in ("voice.safetensors", "voice.pt"):
        path = tmp_path / name
        torch.save({"ref_spk_embedding": torch.zeros(8), "x": _Payload(str(marker))}, path)
        with pytest.raises(ValueError, match="not a safetensors file") as e:
            load_voice_prompt(path)
        assert str(path) in str(e.value) and not marker.exists()


# --- speech tokenizer decode ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,sr", [(1, 24000), (2, 24000), (1, 8000), (1, 384000), (1920, 24000), (1921, 24000)])
def test_the_shortest_audio_encodes_to_its_frames(tok, n, sr):
    import math

    codes = tok.encode(np.full(n, 0.1, np.float32), sr=sr).audio_codes[0]
    assert codes.shape == (math.ceil(math.ceil(n * 24000 / sr) / 1920), 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tok.config.codebook_size


@pytest.mark.parametrize("as_tensor", [False, True], ids=["numpy", "torch"])
def test_uint64_codes_past_int64_are_refused_not_taken_for_padding(tok, as_tensor):
    good = np.random.RandomState(0).randint(0, 2048, (3, 16)).astype(np.uint64)
    bad = np.concatenate([good, np.full((1, 16), 2 ** 64 - 1, np.uint64)])   # -1 once cast to int64
    codes = torch.from_numpy(bad) if as_tensor else bad
    _refused("encoded", tok.decode, [codes])
    _refused("encoded", tok.decode, {"audio_codes": codes[None]})
    wavs, _ = tok.decode([torch.from_numpy(good) if as_tensor else good])   # in range: decoded as int64 codes
    assert wavs[0].shape == (3 * 1920,)


def test_threads_encoding_and_decoding_at_once_get_what_each_gets_alone(tok):
    """One tokenizer shared by threads (its encoder is built at the first encode, its decoder's packed weights at the
    first decode): each thread's codes and waveforms are the ones it gets alone."""
    import threading

    fresh = Qwen3TTSTokenizer.from_pretrained(tok.path)   # nothing built or packed yet
    waves = [_wave(5000 + 1500 * i) for i in range(3)]
    got: dict[int, list] = {i: [] for i in range(3)}
    start = threading.Barrier(3)

    def work(i: int) -> None:
        start.wait()
        for _ in range(2):
            codes = fresh.encode(waves[i], sr=24000).audio_codes[0]
            got[i].append((codes, fresh.decode([codes])[0][0]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, w in enumerate(waves):
        codes = tok.encode(w, sr=24000).audio_codes[0]
        wav = tok.decode([codes])[0][0]
        assert len(got[i]) == 2 and all(torch.equal(c, codes) and np.array_equal(x, wav) for c, x in got[i])


def test_an_unknown_generation_argument_is_echoed_bounded(cv):
    """A **kwargs name of 100,000 characters came back whole as the error's field and twice in its message."""
    e = _refused("kwargs", cv.generate_custom_voice, "Hi.", speaker="ryan", **{"x" * 100_000: 1})
    assert len(str(e)) < 1000, len(str(e))
    e = _refused("eos_token_id", cv.generate_custom_voice, "Hi.", speaker="ryan", eos_token_id=3)
    assert "eos_token_id" in str(e) and "temperature" in str(e)
