"""Qwen3TTSTokenizer (qwen_tts_core/speech_tokenizer.py): loading, the input forms of encode and decode, and odd or
hostile input, on a tiny random 12Hz speech tokenizer. Parity with the official wrapper:
tests/codec/test_speech_tokenizer_parity.py."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from qwen_tts_core import Qwen3TTSTokenizer
from qwen_tts_core.codec.build import write_random_speech_tokenizer
from qwen_tts_core.errors import RequestError


def _wave(n: int, seed: int = 0) -> np.ndarray:
    t = np.arange(n) / 24000.0
    rng = np.random.RandomState(seed)
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.randn(n)).astype(np.float32)


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> Path:
    return write_random_speech_tokenizer(tmp_path_factory.mktemp("stok") / "speech_tokenizer", "tiny", seed=0)


@pytest.fixture(scope="module")
def tok(st_dir) -> Qwen3TTSTokenizer:
    return Qwen3TTSTokenizer.from_pretrained(st_dir)


@pytest.fixture(scope="module")
def model_dir(st_dir, tmp_path_factory) -> Path:
    """A model folder: its own config.json and the tokenizer in speech_tokenizer/."""
    root = tmp_path_factory.mktemp("model")
    (root / "config.json").write_text(json.dumps({"model_type": "qwen3_tts"}))
    shutil.copytree(st_dir, root / "speech_tokenizer")
    return root


def _raises(field: str, fn, *args, **kwargs) -> str:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    assert info.value.field == field, (info.value.field, str(info.value))
    return info.value.message


# --- loading ----------------------------------------------------------------------------------------------------

def test_loads_a_folder_a_model_folder_and_a_hub_id(tok, st_dir, model_dir, monkeypatch):
    a = [_wave(5000)]
    codes = tok.encode(a, sr=24000).audio_codes[0]
    from_model = Qwen3TTSTokenizer.from_pretrained(str(model_dir))
    assert from_model.path.name == "speech_tokenizer"
    assert torch.equal(from_model.encode(a, sr=24000).audio_codes[0], codes)

    import huggingface_hub

    calls = []

    def fake_download(repo, **kw):
        calls.append((repo, kw))
        return str(st_dir if "Tokenizer" in repo else model_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    hub = Qwen3TTSTokenizer.from_pretrained("Qwen/Qwen3-TTS-Tokenizer-12Hz", token="t", revision="main")
    assert calls[0][0] == "Qwen/Qwen3-TTS-Tokenizer-12Hz"
    assert calls[0][1]["token"] == "t" and calls[0][1]["revision"] == "main"
    assert "preprocessor_config.json" in calls[0][1]["allow_patterns"]
    assert torch.equal(hub.encode(a, sr=24000).audio_codes[0], codes)
    sub = Qwen3TTSTokenizer.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-Base", subfolder="speech_tokenizer")
    assert all(p.startswith("speech_tokenizer/") for p in calls[1][1]["allow_patterns"])
    assert torch.equal(sub.encode(a, sr=24000).audio_codes[0], codes)


def test_a_25hz_or_foreign_checkpoint_is_refused(st_dir, tmp_path):
    v1 = tmp_path / "v1"
    shutil.copytree(st_dir, v1)
    cfg = json.loads((v1 / "config.json").read_text())
    (v1 / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3_tts_tokenizer_25hz"}))
    with pytest.raises(ValueError, match="25Hz.*only the 12Hz"):
        Qwen3TTSTokenizer.from_pretrained(v1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen3_tts"}))  # a model without speech_tokenizer/
    with pytest.raises(ValueError, match="not a 12Hz speech tokenizer"):
        Qwen3TTSTokenizer.from_pretrained(other)
    with pytest.raises(ValueError, match="pretrained_model_name_or_path"):
        Qwen3TTSTokenizer.from_pretrained(tmp_path / "missing" / "folder")


def test_dtype_and_device_map_arguments(st_dir):
    bf = Qwen3TTSTokenizer.from_pretrained(st_dir, dtype=torch.bfloat16, device_map="cpu")
    assert bf.dtype == torch.bfloat16 and bf.device == torch.device("cpu")
    assert Qwen3TTSTokenizer.from_pretrained(st_dir, torch_dtype="auto").dtype == torch.float32  # config's
    assert Qwen3TTSTokenizer.from_pretrained(st_dir, device_map={"": "cpu"}).dtype == torch.float32
    codes = bf.encode(_wave(4000), sr=24000).audio_codes[0]
    assert codes.shape == (3, 16)
    wav = bf.decode({"audio_codes": codes})[0][0]
    assert wav.dtype == np.float32 and wav.shape == (3 * 1920,)
    with pytest.raises(ValueError, match="dtype"):
        Qwen3TTSTokenizer.from_pretrained(st_dir, dtype="int8")
    with pytest.raises(ValueError, match="device_map"):
        Qwen3TTSTokenizer.from_pretrained(st_dir, device_map="tpu:3")


def test_getters(tok):
    assert tok.get_model_type() == "qwen3_tts_tokenizer_12hz"
    assert (tok.get_input_sample_rate(), tok.get_output_sample_rate()) == (24000, 24000)
    assert (tok.get_encode_downsample_rate(), tok.get_decode_upsample_rate()) == (1920, 1920)


# --- input forms --------------------------------------------------------------------------------------------------

def test_encode_input_forms_give_the_same_codes(tok, tmp_path):
    a = _wave(7000)
    ref = tok.encode([a], sr=24000).audio_codes[0]
    assert ref.shape == (4, 16) and ref.dtype == torch.long
    path = tmp_path / "a.wav"
    sf.write(str(path), a, 24000, subtype="FLOAT")
    data = path.read_bytes()
    forms = [a, (a, 24000), str(path), path, data, "data:audio/wav;base64," + base64.b64encode(data).decode(),
             base64.b64encode(data).decode(), np.stack([a, a], axis=1), a.astype(np.float64)]
    for form in forms:
        out = tok.encode(form, sr=24000 if isinstance(form, np.ndarray) else None)
        assert len(out.audio_codes) == 1 and torch.equal(out.audio_codes[0], ref), type(form)
    out = tok.encode([str(path), (a, 24000), a], sr=24000)   # a mixed list (the official takes one kind)
    assert all(torch.equal(c, ref) for c in out.audio_codes)
    assert out["audio_codes"] is out.audio_codes and out[0] is out.audio_codes
    assert tok.encode(a, sr=24000, return_dict=False)[0][0].equal(ref)
    assert tok.encode((a, a), sr=24000).audio_codes[1].equal(ref)  # a tuple of two arrays is a batch
    assert tok.load_audio(str(path), 24000).shape == a.shape


def test_encode_output_is_a_dict_as_the_officials_model_output_is(tok):
    """The official encode returns a transformers ModelOutput, a dict: `"audio_codes" in out`, iteration, len,
    items/get were KeyError/TypeError/AttributeError here (a migrating user's code breaks; drop-in review)."""
    import pickle

    out = tok.encode(_wave(5000), sr=24000)
    assert isinstance(out, dict) and "audio_codes" in out and 0 not in out
    assert list(out) == ["audio_codes"] and len(out) == 1 and list(out.keys()) == ["audio_codes"]
    assert out.get("audio_codes") is out.audio_codes is out["audio_codes"] is out[0] and out[:1] == (out.audio_codes,)
    assert [k for k, _ in out.items()] == ["audio_codes"] and out.to_tuple() == (out.audio_codes,)
    assert {**out}.keys() == {"audio_codes"} and pickle.loads(pickle.dumps(out)).audio_codes[0].equal(out[0][0])
    with pytest.raises(KeyError):
        out["codes"]
    with pytest.raises(IndexError):
        out[1]
    wavs, sr = tok.decode(out)   # the official's round trip: decode(encode(...))
    assert sr == 24000 and len(wavs) == 1 and len(wavs[0]) == out.audio_codes[0].shape[0] * 1920


@pytest.mark.parametrize("target_sr", [8000, 16000, 22050, 44100, 48000])
def test_load_audio_resamples_to_any_target_rate_as_the_official(tok, tmp_path, target_sr):
    """The official load_audio(x, target_sr) gives any rate (librosa: soxr HQ, ceil(N * target / sr) samples); only
    24000 was taken here."""
    import soxr

    a = _wave(7000)
    path = tmp_path / "a.wav"
    sf.write(str(path), a, 24000, subtype="FLOAT")
    want_n = int(np.ceil(len(a) * (target_sr / 24000)))
    want = soxr.resample(a, 24000, target_sr, quality="soxr_hq")
    for form in (str(path), (a, 24000)):
        got = tok.load_audio(form, target_sr)
        assert got.dtype == np.float32 and got.shape == (want_n,), (form, got.shape)
        n = min(len(want), want_n)
        assert np.abs(got[:n] - want[:n]).max() < 1e-6


@pytest.mark.parametrize("target_sr", [0, -16000, 7999, 384001, 16000.0, True, "16000", None])
def test_load_audio_refuses_a_target_rate_it_cannot_make_naming_it(tok, target_sr):
    with pytest.raises(RequestError, match="^target_sr: "):
        tok.load_audio((_wave(2400), 24000), target_sr)


def test_encode_resamples_and_batches_different_lengths(tok):
    a, b = _wave(24000, 1), _wave(5000, 2)
    batch = tok.encode([a, b], sr=24000).audio_codes
    assert [c.shape[0] for c in batch] == [13, 3]
    # zero-padded to the longest as the official pads its batch: the last, partial frame of the shorter one sees
    # zeros where alone it sees the encoder's own padding (tests/codec/test_speech_tokenizer_parity.py: as official)
    alone = tok.encode(b, sr=24000).audio_codes[0]
    assert alone.shape == batch[1].shape and torch.equal(batch[1][:2], alone[:2])
    assert tok.encode(a[:16000], sr=16000).audio_codes[0].shape == (13, 16)  # 24000 samples at 24 kHz
    silence = tok.encode(np.zeros(4000, np.float32), sr=24000).audio_codes[0]  # silence is audio too
    assert silence.shape == (3, 16)
    # ... in a file as well (a voice reference must not be silent; the tokenizer encodes it, as the official does)
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(4000, np.float32), 24000, format="WAV", subtype="PCM_16")
    assert torch.equal(tok.encode(buf.getvalue()).audio_codes[0], silence)


def test_decode_input_forms_agree(tok):
    enc = tok.encode([_wave(9000), _wave(3000, 1)], sr=24000)
    c0, c1 = enc.audio_codes
    ref, sr = tok.decode(enc)
    assert sr == 24000 and [w.shape for w in ref] == [(5 * 1920,), (2 * 1920,)]
    assert all(w.dtype == np.float32 for w in ref)
    padded = torch.full((2, 5, 16), -1, dtype=torch.long)
    padded[0], padded[1, :2] = c0, c1
    forms = [{"audio_codes": [c0, c1]}, [{"audio_codes": c0}, {"audio_codes": c1}], [c0, c1],
             [c0.numpy(), c1.numpy().astype(np.int32)], {"audio_codes": padded}, padded, (c0, c1),
             {"audio_codes": [c0.tolist(), c1.tolist()]}]
    for form in forms:
        wavs, _ = tok.decode(form)
        assert len(wavs) == 2 and all(np.array_equal(w, r) for w, r in zip(wavs, ref))
    one, _ = tok.decode({"audio_codes": c0})   # one [T, 16] tensor: one waveform
    assert len(one) == 1 and np.abs(one[0] - ref[0]).max() <= 1e-5  # batch of one: kernels round differently


# --- odd and hostile input ----------------------------------------------------------------------------------------

def test_empty_inputs(tok):
    assert tok.encode([], sr=24000).audio_codes == []
    assert tok.decode([]) == ([], 24000)
    assert tok.decode({"audio_codes": []}) == ([], 24000)
    assert tok.decode(tok.encode([])) == ([], 24000)


def test_zero_length_audio_gives_zero_frames(tok):
    a = _wave(5000)
    out = tok.encode([a, np.zeros(0, np.float32)], sr=24000).audio_codes
    assert out[1].shape == (0, 16) and torch.equal(out[0], tok.encode(a, sr=24000).audio_codes[0])
    assert tok.encode(np.zeros(0, np.float32), sr=24000).audio_codes[0].shape == (0, 16)
    wavs, _ = tok.decode(out)
    assert wavs[1].shape == (0,) and wavs[0].shape == (3 * 1920,)


def test_bad_audio_is_refused_naming_the_argument(tok, tmp_path):
    a = _wave(4000)
    nan = a.copy()
    nan[10] = np.nan
    assert "NaN" in _raises("audios", tok.encode, nan, sr=24000)
    assert "NaN" in _raises("audios[1]", tok.encode, [a, nan], sr=24000)
    assert "int16" in _raises("audios", tok.encode, (a * 32767).astype(np.int16), sr=24000)
    assert "sr" in _raises("sr", tok.encode, a)
    for sr in (0, -16000, 1.5, "16000", True, None):
        _raises("sr", tok.encode, [a], sr=sr)
    _raises("audios", tok.encode, a, sr=10**9)             # sample rate beyond the limits
    _raises("audios", tok.encode, np.zeros((2, 3, 4), np.float32), sr=24000)
    _raises("audios", tok.encode, np.zeros((4000, 64), np.float32), sr=24000)  # [channels, samples] transposed
    _raises("audios", tok.encode, torch.from_numpy(a))
    _raises("audios", tok.encode, 12345)
    _raises("audios", tok.encode, {"audio": a})
    _raises("audios[0]", tok.encode, [str(tmp_path / "missing.wav")])
    _raises("audios", tok.encode, "not audio at all")
    _raises("audios[1]", tok.encode, [a, None], sr=24000)
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEjunk")
    _raises("audios", tok.encode, str(tmp_path / "junk.wav"))


def test_bad_codes_are_refused_naming_the_argument(tok):
    good = torch.randint(0, 2048, (3, 16))
    for bad in (torch.zeros(3, 8, dtype=torch.long), torch.zeros(16, dtype=torch.long),
                torch.zeros(1, 2, 3, 16, dtype=torch.long), [torch.zeros(3, 15, dtype=torch.long)]):
        assert "16" in _raises("encoded", tok.decode, {"audio_codes": bad})
    assert "2047" in _raises("encoded", tok.decode, {"audio_codes": torch.full((2, 16), 2048)})
    assert "2047" in _raises("encoded", tok.decode, [good, torch.full((2, 16), -5)])
    middle = good.clone()
    middle[1, 0] = -1                                    # -1 is right padding only
    assert "padding" in _raises("encoded", tok.decode, [middle])
    _raises("encoded", tok.decode, {"audio_codes": good.float()})
    _raises("encoded", tok.decode, {"audio_codes": good.bool()})
    _raises("encoded", tok.decode, [np.array(["a"] * 16)[None]])
    _raises("encoded", tok.decode, {"codes": good})
    _raises("encoded", tok.decode, [{"xvectors": good}])
    _raises("encoded", tok.decode, "codes")
    _raises("encoded", tok.decode, 7)
    _raises("encoded", tok.decode, {"audio_codes": 7})


def test_one_frame_and_padding(tok):
    codes = torch.randint(0, 2048, (6, 16), generator=torch.Generator().manual_seed(1))
    one, sr = tok.decode({"audio_codes": codes[:1]})
    assert sr == 24000 and one[0].shape == (1920,) and np.isfinite(one[0]).all()
    full = tok.decode({"audio_codes": codes})[0][0]
    assert np.abs(full[:1920] - one[0]).max() <= 1e-5            # the decoder is causal
    padded = torch.cat([codes[:1], torch.full((5, 16), -1)])      # a padded row of a batch, alone
    assert np.array_equal(tok.decode([padded])[0][0], one[0])
    all_pad = tok.decode([torch.full((4, 16), -1)])[0][0]         # nothing but padding: an empty waveform
    assert all_pad.shape == (0,)
