"""Reference audio libsndfile cannot read (m4a/mp4/aac from phones, webm/opus from browsers) decoded through PyAV
(qwen_tts_core/audio_decode_av.py) with the libsndfile path's limits. Fixtures are encoded here with PyAV."""

from __future__ import annotations

import base64
import io
import struct
import sys
import tracemalloc

import numpy as np
import pytest

from qwen_tts_core.audio_io import AudioLimits, load_audio
from qwen_tts_core.errors import RequestError

av = pytest.importorskip("av")


def _signal(sr: int, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)


def _encode(fmt: str, codec: str, sr: int, n: int, channels: int = 1, bit_rate: int | None = None,
            signal: np.ndarray | None = None) -> bytes:
    """`n` samples of `signal` (default `_signal`) per channel encoded with `codec` into container `fmt`."""
    x = _signal(sr, n) if signal is None else signal
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        layout = "mono" if channels == 1 else "stereo"
        s = out.add_stream(codec, rate=sr, layout=layout)
        if bit_rate:
            s.codec_context.bit_rate = bit_rate
        step = s.codec_context.frame_size or 1024
        for i in range(0, n, step):
            block = np.stack([x[i:i + step] * (1.0 - 0.5 * c) for c in range(channels)])
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


def _aligned(src: np.ndarray, got: np.ndarray, max_lag: int = 2600) -> tuple[float, float]:
    """(correlation, SNR in dB) of `got` against `src` at the best lag in [0, max_lag] (ADTS keeps the encoder's
    priming) and the best gain."""
    best = (-1.0, -np.inf)
    for lag in range(0, max_lag + 1):
        m = min(len(src), len(got) - lag) - 2048    # codecs fade the last frame
        a, b = src[1024:m].astype(np.float64), got[lag + 1024:lag + m].astype(np.float64)
        c = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
        if c > best[0]:
            gain = np.dot(a, b) / np.dot(b, b)
            best = (c, 10 * np.log10(np.dot(a, a) / np.dot(a - gain * b, a - gain * b)))
    return best


@pytest.mark.parametrize("fmt,codec,sr,frames,exact", [
    ("ipod", "aac", 16000, 1024 * 40, True),        # .m4a, as iOS voice memos
    ("mp4", "aac", 44100, 1024 * 100, True),         # .mp4 (phone video)
    ("webm", "libopus", 48000, 96000, True),         # browser MediaRecorder
    ("adts", "aac", 24000, 1024 * 50, False),        # raw .aac: no container to trim the encoder's priming
])
def test_phone_and_browser_formats_decode_like_the_source(fmt, codec, sr, frames, exact, tmp_path):
    data = _encode(fmt, codec, sr, frames)
    src = _signal(sr, frames)
    path = tmp_path / f"ref.{ {'ipod': 'm4a', 'adts': 'aac'}.get(fmt, fmt)}"
    path.write_bytes(data)
    uri = "data:audio/mp4;base64," + base64.b64encode(data).decode()
    for given in (data, path, str(path), uri):
        wav, got_sr = load_audio(given)
        assert got_sr == sr and wav.dtype == np.float32 and wav.ndim == 1 and wav.flags.c_contiguous
        if exact:   # whole codec frames: the container trims the priming, the length is the source's
            assert abs(len(wav) - frames) <= 0.005 * sr, (len(wav), frames)
        else:
            assert 0 <= len(wav) - frames <= 2048 + 0.005 * sr, (len(wav), frames)
        corr, snr = _aligned(src, wav, 0 if exact else 2600)
        assert corr > 0.99 and snr > 20, (corr, snr)


def test_stereo_is_averaged_to_mono_as_the_libsndfile_path_does():
    sr, n = 48000, 48000
    wav, got_sr = load_audio(_encode("webm", "libopus", sr, n, channels=2, bit_rate=128000))
    src = _signal(sr, n)
    corr, snr = _aligned(src, wav, 0)
    assert got_sr == sr and corr > 0.99 and snr > 20
    # channels are the signal and half of it: their mean is 0.75 of it
    assert np.sqrt(np.mean(wav[4800:-4800] ** 2)) / np.sqrt(np.mean(src[4800:-4800] ** 2)) == pytest.approx(0.75, rel=0.03)


def _set_mp4_durations(data: bytearray, seconds: float) -> None:
    """Rewrite the declared durations of mvhd, tkhd and mdhd (version 0 boxes) to `seconds`: the header lies."""
    for box, scale_at, dur_at in ((b"mvhd", 12, 16), (b"mdhd", 12, 16), (b"tkhd", None, 20)):
        pos = data.find(box) + 4
        assert pos > 3 and data[pos] == 0, box
        scale = struct.unpack_from(">I", data, pos + scale_at)[0] if scale_at else \
            struct.unpack_from(">I", data, data.find(b"mvhd") + 4 + 12)[0]
        struct.pack_into(">I", data, pos + dur_at, int(seconds * scale))


def test_a_container_that_declares_a_short_duration_is_refused_on_its_decoded_length():
    sr, n = 16000, 1024 * 160   # 10.24 s
    data = bytearray(_encode("ipod", "aac", sr, n))
    _set_mp4_durations(data, 1.0)
    with av.open(io.BytesIO(bytes(data))) as c:   # the lie is in place: FFmpeg reports 1 s
        assert c.duration == pytest.approx(1_000_000, rel=0.01)
    with pytest.raises(RequestError) as e:
        load_audio(bytes(data), limits=AudioLimits(max_seconds=3.0))
    assert e.value.field == "ref_audio" and "at most 3 s are accepted" in e.value.message, e.value
    assert "decoding stopped" in e.value.message
    wav, _ = load_audio(bytes(data))   # within the limits it is its real length, not the declared one
    assert abs(len(wav) - n) <= 0.005 * sr
    with pytest.raises(RequestError, match=r"more than .* samples .* at most 40000 are decoded"):
        load_audio(bytes(data), limits=AudioLimits(max_samples=40000))


@pytest.fixture(scope="module")
def long_opus() -> bytes:
    """130 s of low-rate Opus in WebM: ~100 KB that decode to 25 MB of float32."""
    sr, n = 48000, 48000 * 130
    return _encode("webm", "libopus", sr, n, bit_rate=6000)


def test_audio_decoding_past_the_limit_stops_there_without_allocating_it(long_opus):
    assert len(long_opus) < 200_000
    with pytest.raises(RequestError) as e:
        load_audio(long_opus)   # default limits: 120 s
    assert e.value.field == "ref_audio" and "at most 120 s are accepted" in e.value.message, e.value
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match="at most 2 s are accepted"):
            load_audio(long_opus, argument="ref_audio[0]", limits=AudioLimits(max_seconds=2.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak   # 2 s and a frame decoded, not 130 s (25 MB)


def _patch_box(data: bytearray, box: bytes, at: int, value: int) -> None:
    """Write a 32-bit `value` at offset `at` of `box`'s payload (its version and flags are at 0)."""
    pos = data.find(box)
    assert pos > 0 and data.find(box, pos + 1) < 0, box
    struct.pack_into(">I", data, pos + 4 + at, value)


def test_mp4_sample_tables_that_declare_millions_of_samples_never_reach_ffmpeg(monkeypatch):
    """A 7 KiB m4a whose stsz/stts/stsc declare 50 M samples made FFmpeg allocate 1.8 GB of index when opened."""
    good = _encode("ipod", "aac", 16000, 1024 * 16)
    cases = {   # (box, payload offset, value): each alone declares what FFmpeg would allocate for
        "stsz sample count, constant size": ([(b"stsz", 4, 10), (b"stsz", 8, 50_000_000)], "declares 50000000 samples"),
        "stts run of 50 M samples": ([(b"stts", 8, 50_000_000)], "stts declares 50000000 samples"),
        "stsc 50 M samples per chunk": ([(b"stsc", 12, 50_000_000)], "stsc declares"),
        "stco with a million offsets": ([(b"stco", 4, 1_000_000)], "stco declares 1000000 entries that its bytes"),
        "stsz table larger than its box": ([(b"stsz", 8, 1_000_000)], "stsz declares 1000000 samples that its bytes"),
    }
    opened = []
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a) or pytest.fail("FFmpeg was reached"))
    for name, (patches, reason) in cases.items():
        data = bytearray(good)
        for box, at, value in patches:
            _patch_box(data, box, at, value)
        with pytest.raises(RequestError) as e:
            load_audio(bytes(data))
        assert e.value.field == "ref_audio" and "MP4/M4A" in e.value.message and reason in e.value.message, \
            (name, e.value)
    assert not opened


def test_truncated_and_corrupt_containers_are_request_errors_naming_the_argument(tmp_path):
    m4a = _encode("ipod", "aac", 16000, 1024 * 40)
    webm = _encode("webm", "libopus", 48000, 48000)
    rng = np.random.default_rng(0)
    cases = {
        "m4a cut before its moov": (m4a[: len(m4a) // 2], "MP4/M4A"),
        "m4a header then noise": (m4a[:32] + rng.bytes(4000), "MP4/M4A"),
        "webm header then noise": (webm[:4] + rng.bytes(4000), "WebM/Matroska"),
        "adts sync then noise": (b"\xff\xf1" + rng.bytes(4000), "AAC"),
    }
    for name, (data, kind) in cases.items():
        for given, argument in ((data, "ref_audio"), (tmp_path / "x.m4a", "ref_audio[2]")):
            (tmp_path / "x.m4a").write_bytes(data)
            with pytest.raises(RequestError) as e:
                load_audio(given, argument=argument)
            assert e.value.field == argument and kind in e.value.message, (name, e.value)
    # bytes flipped inside the audio: decoded or refused, never another exception
    for seed in range(8):
        data = bytearray(webm)
        at = np.random.default_rng(seed).integers(200, len(data) - 64, 8)
        for i in at:
            data[i] ^= 0xFF
        try:
            wav, _ = load_audio(bytes(data))
        except RequestError as e:
            assert e.field == "ref_audio"
        else:
            assert wav.dtype == np.float32 and np.isfinite(wav).all()


def test_a_codec_outside_the_allow_list_is_refused():
    with pytest.raises(RequestError) as e:
        load_audio(_encode("mp4", "ac3", 48000, 1536 * 20))
    assert e.value.field == "ref_audio" and "codec 'ac3' is not read" in e.value.message, e.value


def test_without_pyav_the_error_says_which_type_needs_it(monkeypatch):
    m4a, webm = _encode("ipod", "aac", 16000, 1024 * 20), _encode("webm", "libopus", 48000, 48000)
    monkeypatch.setitem(sys.modules, "av", None)   # `import av` raises ImportError
    for data, kind in ((m4a, "MP4/M4A"), (webm, "WebM/Matroska")):
        with pytest.raises(RequestError) as e:
            load_audio(data)
        assert e.value.field == "ref_audio" and kind in e.value.message and "pip install av" in e.value.message


def test_wav_flac_ogg_mp3_still_go_through_libsndfile_and_other_bytes_keep_its_error(monkeypatch, tmp_path):
    import soundfile as sf

    from qwen_tts_core import audio_decode_av

    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setattr(audio_decode_av, "decode", lambda *a, **k: pytest.fail("PyAV was used"))
    x = _signal(16000, 16000)
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None)):
        buf = io.BytesIO()
        sf.write(buf, x, 16000, format=fmt, subtype=subtype)
        want, want_sr = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
        for given in (buf.getvalue(), tmp_path / f"a.{fmt.lower()}"):
            (tmp_path / f"a.{fmt.lower()}").write_bytes(buf.getvalue())
            wav, sr = load_audio(given)
            assert sr == want_sr and wav.shape == want.shape, fmt   # mpg123 rounds differently from read to read
            assert np.array_equal(wav, want) if fmt != "MP3" else np.allclose(wav, want, rtol=0, atol=1e-6), fmt
    # bytes no container sniffs as its own (a playlist, an image, text): libsndfile's refusal, FFmpeg never asked
    for data in (b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b"hello" * 20):
        with pytest.raises(RequestError, match=r"^ref_audio: could not decode audio bytes as audio \("):
            load_audio(data)
