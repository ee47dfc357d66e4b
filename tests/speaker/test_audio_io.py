"""Reference-audio input: decoding equals the official wrapper, resampling equals librosa, bad input is rejected."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file, save_file

from qwen_tts_core.audio_io import load_audio, load_audio_24k, to_24k
from tests.oracle.common import run_oracle

RATES = {"r16k": 16000, "r44k": 44100, "r48k": 48000, "r8k": 8000, "r22k": 22050}


def _tone(sr: int, seconds: float, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.RandomState(seed)
    t = np.arange(int(sr * seconds)) / sr
    cols = [0.4 * np.sin(2 * np.pi * (180 + 90 * c) * t) + 0.05 * rng.randn(t.size) for c in range(channels)]
    wav = np.stack(cols, axis=-1) if channels > 1 else cols[0]
    return wav.astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speaker_audio")
    out = {}
    for name, fmt, subtype, channels, sr in [
        ("pcm16.wav", "WAV", "PCM_16", 1, 16000),
        ("float.wav", "WAV", "FLOAT", 1, 44100),
        ("stereo.wav", "WAV", "PCM_24", 2, 22050),
        ("mono.flac", "FLAC", "PCM_16", 1, 48000),
        ("stereo.ogg", "OGG", "VORBIS", 2, 24000),
    ]:
        path = d / name
        sf.write(str(path), _tone(sr, 0.4, len(name), channels), sr, format=fmt, subtype=subtype)
        out[name] = path
    return out


def _data_uri(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, files):
    """The official wrapper's decoding of each file (and of one data URI), plus librosa resampling."""
    d = tmp_path_factory.mktemp("speaker_audio_oracle")
    seconds = {"r16k": 0.73, "r44k": 0.61, "r48k": 0.5, "r8k": 0.9, "r22k": 0.37}
    wavs = {k: _tone(RATES[k], seconds[k], i) for i, k in enumerate(RATES)}
    wavs["t16k"] = _tone(16000, 0.3, 6).astype(np.float64)
    manifest = {
        "load": [str(p) for p in files.values()] + [_data_uri(files["stereo.wav"])],
        "tuples": [["t16k", 16000]],
        "resample": [[k, RATES[k]] for k in wavs if k.startswith("r")],
    }
    (d / "m.json").write_text(json.dumps(manifest))
    save_file(wavs, str(d / "in.safetensors"))
    run_oracle("speaker_ref.py", "audio", d / "m.json", d / "in.safetensors", d / "out.safetensors")
    return manifest, wavs, load_file(str(d / "out.safetensors"))


# ---- parity ---------------------------------------------------------------------------------------------------------


@pytest.mark.parity
def test_decoding_equals_reference(oracle):
    manifest, _, ref = oracle
    for i, item in enumerate(manifest["load"]):
        wav, sr = load_audio(item)
        assert sr == int(ref[f"load_sr.{i}"][0]), item[:60]
        assert wav.dtype == np.float32 and wav.ndim == 1
        assert wav.shape == ref[f"load.{i}"].shape, item[:60]
        np.testing.assert_allclose(wav, ref[f"load.{i}"], rtol=0, atol=1e-6, err_msg=item[:60])


@pytest.mark.parity
def test_tuple_input_equals_reference(oracle):
    _, wavs, ref = oracle
    wav, sr = load_audio((wavs["t16k"], 16000))
    assert sr == 16000 and wav.dtype == np.float32
    np.testing.assert_array_equal(wav, ref["tuple.t16k"])


@pytest.mark.parity
@pytest.mark.parametrize("key", ["r16k", "r44k", "r48k", "r8k", "r22k"])
def test_resampling_equals_librosa(oracle, key):
    manifest, wavs, ref = oracle
    sr = RATES[key]
    ours = to_24k(wavs[key], sr)
    assert ours.dtype == np.float32
    # Length is ceil(N * (24000 / sr)) with the ratio rounded first, as librosa does (44.1 kHz: one more sample
    # than the exact ceil(N * 24000 / sr) for this N).
    assert ours.shape == ref[f"resample.{key}"].shape == (int(np.ceil(wavs[key].size * (24000 / sr))),)
    assert np.abs(ours - ref[f"resample.{key}"]).max() <= 1e-5


@pytest.mark.parity
def test_resampling_parity_can_fail(oracle):
    """A different soxr quality is measurably different, so the comparison above is not vacuous."""
    import soxr

    manifest, wavs, ref = oracle
    low = soxr.resample(wavs["r44k"], 44100, 24000, quality="LQ")
    n = min(low.size, ref["resample.r44k"].size)
    assert np.abs(low[:n] - ref["resample.r44k"][:n]).max() > 1e-3


# ---- forms of input ---------------------------------------------------------------------------------------------------


def test_forms_of_the_same_audio_agree(files):
    path = files["stereo.wav"]
    want, sr = load_audio(str(path))
    raw_b64 = base64.b64encode(path.read_bytes()).decode()
    assert "/" in raw_b64 or "+" in raw_b64  # the reference's "no slash" heuristic would take it for a path
    for form in (path, raw_b64, _data_uri(path), path.read_bytes(), "\n" + raw_b64[:100] + "\n" + raw_b64[100:]):
        wav, sr2 = load_audio(form)
        assert sr2 == sr
        np.testing.assert_array_equal(wav, want)
    file_data, _ = sf.read(str(path), dtype="float32")
    assert file_data.shape[1] == 2
    np.testing.assert_allclose(want, file_data.mean(axis=1), atol=1e-7)


def test_stereo_tuple_is_averaged():
    stereo = _tone(16000, 0.2, 9, channels=2)
    wav, sr = load_audio((stereo, 16000))
    np.testing.assert_allclose(wav, stereo.mean(axis=-1), atol=1e-7)


def test_load_audio_24k(files):
    wav = load_audio_24k(files["pcm16.wav"])
    assert wav.dtype == np.float32 and wav.shape == (int(np.ceil(0.4 * 16000 * 1.5)),)
    same = np.full(2400, 0.2, dtype=np.float32)
    assert to_24k(same, 24000) is not None and np.array_equal(to_24k(same, 24000), same)


# ---- URLs -------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http_base(files):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(files["pcm16.wav"].parent))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_urls_are_refused_by_default(http_base):
    with pytest.raises(ValueError, match=r"^ref_audio: URLs are not accepted"):
        load_audio(f"{http_base}/pcm16.wav")
    with pytest.raises(ValueError, match=r"^voice: URLs are not accepted"):
        load_audio("https://example.invalid/a.wav", argument="voice")
    with pytest.raises(ValueError, match=r"^ref_audio: unsupported URL scheme"):
        load_audio("ftp://127.0.0.1/a.wav", allow_urls=True)


def test_urls_when_allowed(http_base, files):
    wav, sr = load_audio(f"{http_base}/pcm16.wav", allow_urls=True)
    want, want_sr = load_audio(files["pcm16.wav"])
    assert sr == want_sr
    np.testing.assert_array_equal(wav, want)
    with pytest.raises(ValueError, match=r"^ref_audio: could not fetch audio URL"):
        load_audio(f"{http_base}/missing.wav", allow_urls=True)


# ---- bad input ------------------------------------------------------------------------------------------------------


def _wav_bytes(data: np.ndarray, sr: int = 16000, subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def _write(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


def _with(value: float, index: int) -> np.ndarray:
    wav = _tone(16000, 0.2, 1)
    wav[index] = value
    return wav


_TONE = _tone(16000, 0.1, 1)

# id -> (build the input inside a temporary folder, expected message fragment)
BAD_INPUTS = {
    "corrupt-file": (lambda t: _write(t, "g.wav", np.random.RandomState(0).bytes(3000)), "could not decode"),
    "empty-file": (lambda t: _write(t, "e.wav", b""), "could not decode"),
    "truncated-file": (lambda t: _write(t, "t.wav", _wav_bytes(_TONE)[:30]), "could not decode"),
    "missing-path": (lambda t: str(t / "nope.wav"), "neither an existing audio file"),
    "missing-pathlike": (lambda t: t / "nope.wav", "no such audio file"),
    "garbage-bytes": (lambda t: np.random.RandomState(1).bytes(500), "could not decode"),
    "empty-bytes": (lambda t: b"", "is empty"),
    "base64-garbage": (lambda t: base64.b64encode(np.random.RandomState(2).bytes(600)).decode(),
                       "could not decode"),
    "data-uri-bad-b64": (lambda t: "data:audio/wav;base64,@@@not-base64@@@", "invalid base64"),
    "data-uri-no-base64": (lambda t: "data:audio/wav,abcd", "data URI must look like"),
    "empty-string": (lambda t: "", "empty string"),
    "zero-samples": (lambda t: _wav_bytes(np.zeros(0, dtype=np.float32)), "empty"),
    "silent-zeros": (lambda t: _wav_bytes(np.zeros(8000, dtype=np.float32)), "silent"),
    "silent-hum": (lambda t: (np.full(8000, 5e-5, dtype=np.float32), 16000), "silent"),
    "nan-in-file": (lambda t: _wav_bytes(_with(np.nan, 100)), "NaN or infinite"),
    "inf-in-array": (lambda t: (_with(np.inf, 5), 16000), "NaN or infinite"),
    "huge-peak-file": (lambda t: _wav_bytes(_with(1e30, 100)), "far beyond"),
    "int16-scaled-floats": (lambda t: ((_TONE * 30000).astype(np.float32), 16000), "far beyond"),
    "sr-zero": (lambda t: (_TONE, 0), "sample rate"),
    "sr-negative": (lambda t: (_TONE, -8000), "sample rate"),
    "sr-fraction": (lambda t: (_TONE, 16000.5), "sample rate"),
    "sr-bool": (lambda t: (_TONE, True), "sample rate"),
    "sr-inf": (lambda t: (_TONE, float("inf")), "sample rate"),          # int() raised OverflowError
    "sr-nan": (lambda t: (_TONE, np.float64("nan")), "sample rate"),     # int() raised its own ValueError
    "sr-huge": (lambda t: (_TONE, 10 ** 400), "sample rate"),
    "sr-string": (lambda t: (_TONE, "16000"), "sample rate"),
    "int-pcm": (lambda t: ((_TONE * 30000).astype(np.int16), 16000), "float array"),
    "3-d-array": (lambda t: (np.zeros((2, 3, 4), dtype=np.float32) + 0.1, 16000), "1-D"),
    "channels-first": (lambda t: (np.stack([_TONE, _TONE]), 16000), r"\[samples, channels\]"),
    "one-tuple": (lambda t: (_TONE,), "tuple must be"),
    "bare-array": (lambda t: _TONE, "no sample rate"),
    "int": (lambda t: 12345, "unsupported type int"),
    "list": (lambda t: [b"x"], "unsupported type list"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error_naming_the_argument(tmp_path, case):
    build, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=rf"^speaker_wav: .*{message}"):
        load_audio(build(tmp_path), argument="speaker_wav")


def test_decode_errors_tell_the_reason_without_the_process_internals(tmp_path):
    """libsndfile names what it was given ("Error opening <_io.BytesIO object at 0x7f...>"): only its reason goes
    into the message a client reads."""
    with pytest.raises(ValueError) as e:
        load_audio(np.random.RandomState(1).bytes(500), argument="file")
    assert "0x" not in str(e.value) and "BytesIO" not in str(e.value) and "not recognised" in str(e.value)


def test_a_hot_recording_is_still_accepted():
    wav, sr = load_audio((np.clip(_TONE * 12, -1.6, 1.6), 16000), argument="ref_audio")
    assert np.abs(wav).max() == pytest.approx(1.6)


def test_to_24k_rejects_bad_input():
    with pytest.raises(ValueError, match="^ref_audio: resampling expects mono"):
        to_24k(np.zeros((100, 2), dtype=np.float32), 16000)
    with pytest.raises(ValueError, match="^ref_audio: sample rate"):
        to_24k(np.zeros(100, dtype=np.float32), 0)
    with pytest.raises(ValueError, match="^clip: audio contains NaN"):
        to_24k(np.array([0.1, np.nan], dtype=np.float32), 16000, argument="clip")


def test_the_silence_threshold_is_what_its_message_says():
    """A float32 peak of exactly 1e-4 (below 1e-4 as a double) was refused as 'peak |x| = 1.00e-04 < 0.0001'
    (drop-in review): the threshold is compared in float32, so 1e-4 passes and a quieter peak is refused."""
    from qwen_tts_core.audio_io import validate_waveform

    wav = np.zeros(16000, np.float32)
    wav[100] = np.float32(1e-4)
    validate_waveform(wav, 16000)
    wav[100] = np.float32(9.99e-5)
    with pytest.raises(ValueError, match=r"^ref_audio: audio is silent \(peak \|x\| = 9\.99e-05 < 0\.0001\)"):
        validate_waveform(wav, 16000)
