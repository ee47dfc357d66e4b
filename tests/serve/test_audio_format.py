"""Streaming encoders: every format decodes back to the input, and bytes come out while audio is pushed."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import soundfile as sf

from serve.audio_format import make_encoder, mp3_frame_length, streaming_wav_header
from tests.serve.helpers import decode_audio, decode_av

SR = 24000


def _tone(seconds: float = 1.5) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t))).astype(np.float32)


def _stream(fmt: str, x: np.ndarray, chunk: int = 1920 * 4) -> list[bytes]:
    enc = make_encoder(fmt, SR)
    parts = [enc.push(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    parts.append(enc.finish())
    return parts


@pytest.mark.parametrize("fmt,min_corr,exact_len", [
    pytest.param("pcm", 0.9999, True, id="pcm"),
    pytest.param("wav", 0.9999, True, id="wav"),
    pytest.param("flac", 0.9999, True, id="flac"),  # decoded with PyAV: exact
    pytest.param("opus", 0.95, True, id="opus"),
    pytest.param("mp3", 0.95, False, id="mp3"),
    pytest.param("aac", 0.95, False, id="aac"),
])
def test_stream_decodes_to_input(fmt, min_corr, exact_len):
    x = _tone()
    parts = _stream(fmt, x)
    y, sr = decode_audio(b"".join(parts), fmt)
    assert sr == SR
    if exact_len:
        assert len(y) == len(x)
    else:
        assert abs(len(y) - len(x)) < 4096, (len(y), len(x))
    # codecs add delay (mp3 encoder/decoder padding): compare at the best lag
    n = min(len(x), len(y)) - 2500
    best = max(np.corrcoef(x[500:n], y[500 + lag:n + lag])[0, 1] for lag in range(0, 2000, 8))
    assert best > min_corr, best


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "mp3", "opus", "aac"])
def test_bytes_flow_before_the_end(fmt):
    """Streaming, not buffering: most bytes leave during push(), not at finish()."""
    parts = _stream(fmt, _tone(3.0))
    assert sum(len(p) for p in parts[:-1]) > 0.8 * sum(len(p) for p in parts)
    assert parts[0] or parts[1]


def _ogg_granules(data: bytes) -> list[int]:
    """Granule positions of the Ogg pages in `data` (header pages are 0; an audio page's is past its audio)."""
    out, i = [], 0
    while i < len(data):
        assert data[i:i + 4] == b"OggS", i
        segments = data[i + 27:i + 27 + data[i + 26]]
        out.append(struct.unpack("<q", data[i + 6:i + 14])[0])
        i += 27 + len(segments) + sum(segments)
    return out


def test_opus_audio_leaves_with_the_first_chunk():
    """A client hears the first chunk at once: libsndfile held Ogg pages until ~1 s of audio had been pushed (the first
    push gave only OpusHead/OpusTags). Chunks as the engine yields them: 2 codec frames, then 4 (160 / 320 ms)."""
    x, enc, pushed = _tone(3.0), make_encoder("opus", SR), 0
    for n in [1920 * 2] + [1920 * 4] * 8:
        data = enc.push(x[pushed:pushed + n])
        pushed += n
        if any(_ogg_granules(data)):
            break
    assert pushed <= 0.2 * SR, pushed / SR


@pytest.mark.parametrize("n,chunk", [(24000, 1920 * 4), (24077, 333), (1920 * 5 + 7, 1920)])
def test_opus_decodes_exactly_with_ffmpeg(n, chunk):
    """A client may read Opus with FFmpeg/PyAV (48 kHz) as well as libsndfile: twice the samples, tail included (the
    last page's granule trims libopus's padding; a lost final page would shorten it)."""
    x = _tone(2.0)[:n]
    y, sr = decode_av(b"".join(_stream("opus", x, chunk)))
    assert (sr, len(y)) == (48000, 2 * n)
    tail = slice(n - 2400, n - 240)   # the last 100 ms but the codec's final 10 ms fade
    assert np.corrcoef(x[tail], y[::2][tail])[0, 1] > 0.95


@pytest.mark.parametrize("push_empty", [False, True], ids=["no-push", "empty-push"])
@pytest.mark.parametrize("fmt,samples,rate", [
    ("wav", 0, SR),       # the header alone: exactly 0 samples
    ("flac", 1, SR),      # one silent sample: the formats below cannot hold none
    ("opus", 2, 48000),   # 1 sample at 24 kHz decodes as 2 at Opus's 48 kHz
    ("mp3", 1728, SR),    # LAME's smallest output: delay + one frame
    ("aac", 2048, SR),    # the encoder's priming frame + the frame of the one sample
])
def test_zero_samples_give_a_decodable_file(fmt, samples, rate, push_empty):
    """The model may end at once (max_new_tokens=1 gives 0 frames): the body is still a file decoders read, not 0 bytes
    or Ogg headers alone."""
    enc = make_encoder(fmt, SR)
    data = (enc.push(np.zeros(0, np.float32)) if push_empty else b"") + enc.finish()
    y, sr = decode_av(data)
    assert (sr, len(y)) == (rate, samples)
    assert np.abs(y).max(initial=0.0) < 1e-3
    if fmt not in ("flac", "aac"):  # libsndfile cannot read FLAC streams of unknown length (serve/README.md), nor AAC
        z, zsr = sf.read(io.BytesIO(data), dtype="float32")
        assert zsr == SR and len(z) == samples * SR // rate


def test_zero_samples_of_pcm_are_an_empty_body():
    enc = make_encoder("pcm", SR)
    assert enc.push(np.zeros(0, np.float32)) + enc.finish() == b""


def test_wav_header_says_unknown_length():
    h = streaming_wav_header(SR)
    assert len(h) == 44 and h[:4] == b"RIFF" and h[4:8] == b"\xff\xff\xff\xff" and h[40:44] == b"\xff\xff\xff\xff"
    assert int.from_bytes(h[24:28], "little") == SR
    parts = _stream("wav", _tone(0.2))
    assert b"".join(parts)[:44] == h


def test_pcm_clips_and_scales():
    enc = make_encoder("pcm")
    out = np.frombuffer(enc.push(np.array([0.0, 0.5, 2.0, -2.0], np.float32)), "<i2")
    assert out.tolist() == [0, 16384, 32767, -32767]


_NONFINITE = r"""
import sys
import numpy as np
from serve.audio_format import make_encoder
t = np.arange(24000) / 24000
x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
x[5000], x[9000], x[13000] = np.nan, np.inf, -np.inf
enc = make_encoder(sys.argv[1], 24000)
data = b"".join(enc.push(x[i:i + 7680]) for i in range(0, len(x), 7680)) + enc.finish()
sys.stdout.buffer.write(data)
"""


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac", "mp3", "opus", "aac"])
def test_nonfinite_samples_are_encoded_not_fatal(fmt):
    """A NaN or inf sample (a half-precision decoder overflow) must not end the stream, still less the process: LAME
    aborted the ingress process on one NaN (a C assertion, SIGABRT) and libsndfile's FLAC writer refused it mid-stream.
    Run in a child so the old failure is a failed test, not a dead test run."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", _NONFINITE, fmt],
                       capture_output=True, timeout=120, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, (r.returncode, r.stderr.decode(errors="replace")[-400:])
    y, sr = decode_audio(r.stdout, fmt)
    assert np.isfinite(y).all() and np.abs(y).max() <= (1.0 if fmt in ("pcm", "wav", "flac") else 1.1)  # lossy ring
    if fmt in ("pcm", "wav"):   # exact: NaN -> 0, +inf -> full scale, -inf -> -full scale
        assert (sr, len(y)) == (SR, SR)
        assert y[5000] == 0.0 and y[9000] > 0.999 and y[13000] < -0.999
        assert abs(y[4000] - 0.3 * np.sin(2 * np.pi * 220 * 4000 / SR)) < 1e-3


def test_mp3_frame_length_parses_headers():
    assert mp3_frame_length(bytes([0xFF, 0xF3, 0x84, 0xC4])) == 192      # MPEG-2, 64 kbit/s, 24 kHz
    assert mp3_frame_length(bytes([0xFF, 0xFB, 0x90, 0x64])) == 417      # MPEG-1, 128 kbit/s, 44.1 kHz
    assert mp3_frame_length(b"RIFF") is None


def test_unknown_format_names_the_field():
    with pytest.raises(ValueError, match="response_format"):
        make_encoder("m4a")


def _adts_frames(data: bytes) -> list[int]:
    """Byte lengths of the ADTS frames that `data` is made of; fails unless `data` is whole frames, back to back."""
    out, i = [], 0
    while i < len(data):
        h = data[i:i + 7]
        assert len(h) == 7 and h[0] == 0xFF and h[1] & 0xF6 == 0xF0, (i, h.hex())   # sync, MPEG-4/2, layer 0
        assert (h[2] >> 6) + 1 == 2 and (h[2] >> 2) & 0xF == 6, h.hex()            # AAC-LC, 24 kHz
        assert ((h[2] & 1) << 2 | h[3] >> 6) == 1, h.hex()                          # mono
        size = (h[3] & 3) << 11 | h[4] << 3 | h[5] >> 5
        assert size >= 7, size
        out.append(size)
        i += size
    assert i == len(data)
    return out


@pytest.mark.parametrize("n,chunks", [
    pytest.param(24000, [1920] + [1920 * 4] * 4, id="engine-chunks"),
    pytest.param(24077, [333] * 73, id="odd-chunks"),
    pytest.param(1920 * 3 + 7, [1920 * 3 + 7], id="one-push"),
])
def test_aac_streams_whole_adts_frames(n, chunks):
    """OpenAI's `aac` is AAC in ADTS: every push hands out whole frames (a client may decode from any push), the first
    bytes leave once the encoder's priming and lookahead (2048 samples) were pushed, and the stream decodes to the
    input after the encoder's 1024-sample priming, padded to whole 1024-sample frames."""
    x, enc, pushed, first = _tone(1.1)[:n], make_encoder("aac", SR), 0, None
    parts = []
    for c in chunks:
        parts.append(enc.push(x[pushed:pushed + c]))
        pushed += c
        _adts_frames(parts[-1])
        if parts[-1] and first is None:
            first = pushed
    parts.append(enc.finish())
    frames = _adts_frames(parts[-1])
    assert frames, "finish() flushes the lookahead"
    assert first is None or 2048 <= first <= 2048 + max(chunks), first
    assert enc.media_type == "audio/aac"
    data = b"".join(parts)
    y, sr = decode_av(data)
    assert (sr, len(y)) == (SR, -(-(n + 1024) // 1024) * 1024)
    assert len(_adts_frames(data)) == len(y) // 1024
    body = slice(2400, n - 2400)
    assert np.corrcoef(x[body], y[1024:][body])[0, 1] > 0.95
