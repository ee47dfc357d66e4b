"""flac/mp3 streaming encoders keep O(1) memory: the libsndfile sink forgets what it has sent (but the header),
and the streamed bytes are exactly those of the sink that kept everything."""

from __future__ import annotations

import numpy as np
import pytest

from serve import audio_format
from serve.audio_format import _Sink, make_encoder, mp3_frame_length
from tests.serve.helpers import decode_av

SR = 24000
CHUNK = 1920 * 4   # one push per 4 codec frames (chunk_frames' default)


def _held(sink) -> int:
    return len(sink.buf) + len(getattr(sink, "head", b""))


@pytest.mark.parametrize("fmt,seconds", [("flac", 600.0), ("mp3", 120.0)])
def test_long_stream_holds_bounded_memory(fmt, seconds):
    """Before: _Sink.buf held every byte of the stream (~30 MB for 11 min of FLAC at speed 0.25)."""
    rng = np.random.default_rng(0)
    chunk = rng.uniform(-0.5, 0.5, CHUNK).astype(np.float32)
    enc = make_encoder(fmt, SR)
    sent = worst = 0
    for _ in range(int(seconds * SR) // CHUNK):
        sent += len(enc.push(chunk))
        worst = max(worst, _held(enc._sink))
    sent += len(enc.finish())
    assert sent > 1_000_000, sent          # the old sink held all of it
    assert worst < 64 * 1024, worst
    assert _held(enc._sink) < 64 * 1024


class _ReferenceSink:
    """The sink as it was (d516a70): keeps every byte; drain() hands out buf[sent:]."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.sent = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        end = self.pos + len(data)
        if end > len(self.buf):
            self.buf.extend(b"\0" * (end - len(self.buf)))
        self.buf[self.pos:end] = data
        self.pos = end
        return len(data)

    def read(self, n: int = -1) -> bytes:
        end = len(self.buf) if n is None or n < 0 else min(len(self.buf), self.pos + n)
        out = bytes(self.buf[self.pos:end])
        self.pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: len(self.buf)}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def drain(self) -> bytes:
        out = bytes(self.buf[self.sent:])
        self.sent = len(self.buf)
        return out


class _ReferenceEncoder:
    """SoundfileEncoder as it was (d516a70), on _ReferenceSink."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        import soundfile as sf

        major, subtype = audio_format._SF_FORMATS[fmt]
        self._sink = _ReferenceSink()
        extra = {"compression_level": 0.5, "bitrate_mode": "CONSTANT"} if fmt == "mp3" else {}
        self._file = sf.SoundFile(self._sink, mode="w", samplerate=sample_rate, channels=1, format=major,
                                  subtype=subtype, **extra)
        self._skip_tag = fmt == "mp3"
        self._pushed = False

    def _drain(self) -> bytes:
        if self._skip_tag:
            size = mp3_frame_length(bytes(self._sink.buf[:4]))
            if size is None or len(self._sink.buf) < size:
                return b""
            self._sink.sent, self._skip_tag = size, False
        return self._sink.drain()

    def push(self, pcm: np.ndarray) -> bytes:
        x = np.clip(np.asarray(pcm, dtype=np.float32), -1.0, 1.0)
        if x.size:
            self._file.write(x)
            self._pushed = True
        return self._drain()

    def finish(self) -> bytes:
        if not self._pushed:
            self._file.write(np.zeros(1, np.float32))
        self._file.close()
        return self._drain()


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    t = np.arange(SR * 8) / SR
    return {"noise": rng.uniform(-0.5, 0.5, SR * 8).astype(np.float32),
            "tone": (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
            "clipped": (rng.standard_normal(SR * 2) * 2).astype(np.float32),
            "silence": np.zeros(SR, np.float32),
            "tiny": rng.uniform(-1, 1, 7).astype(np.float32),
            "empty": np.zeros(0, np.float32)}


def _schedules(n: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(2)
    return {"chunks": [CHUNK] * (n // CHUNK + 1), "one": [max(n, 1)],
            "ragged": [int(c) for c in rng.integers(0, 20000, n // 10000 + 2)] + [n],
            "samples": [1] * min(n, 2000) + [max(n, 1)]}


def _run(enc, x: np.ndarray, schedule: list[int]) -> list[bytes]:
    parts, i = [], 0
    for c in schedule:
        parts.append(enc.push(x[i:i + c]))
        i += c
    parts.append(enc.finish())
    return parts


@pytest.mark.parametrize("rate", [24000, 16000])
@pytest.mark.parametrize("fmt", ["flac", "mp3"])
def test_streamed_bytes_are_those_of_the_sink_that_kept_everything(fmt, rate):
    """Push by push, byte for byte: header patches of sent bytes were dropped before and still are."""
    for name, x in _signals().items():
        for sched_name, schedule in _schedules(len(x)).items():
            want = _run(_ReferenceEncoder(fmt, rate), x, schedule)
            got = _run(make_encoder(fmt, rate), x, schedule)
            assert got == want, (name, sched_name)


def test_flac_stream_still_decodes_exactly():
    x = np.random.default_rng(3).uniform(-0.5, 0.5, SR * 30).astype(np.float32)
    enc = make_encoder("flac", SR)
    data = b"".join(enc.push(x[i:i + CHUNK]) for i in range(0, len(x), CHUNK)) + enc.finish()
    y, sr = decode_av(data)
    assert sr == SR and len(y) == len(x)
    assert np.abs(y - x).max() <= 1.5 / 32768    # lossless to within s16 rounding


def test_sink_keeps_the_header_and_drops_patches_of_sent_bytes():
    s = _Sink()
    s.write(b"A" * 10_000)
    assert s.drain() == b"A" * 10_000
    assert len(s.buf) == 0 and bytes(s.head) == b"A" * _Sink.HEAD
    s.seek(12)
    s.write(b"patch")                       # a STREAMINFO patch: sent, kept in the header, not re-sent
    s.seek(8000)
    s.write(b"late")                        # sent and not kept: dropped
    assert s.drain() == b""
    assert s.peek(20) == b"A" * 12 + b"patch" + b"A" * 3
    assert s.seek(0, 2) == 10_000 and s.tell() == 10_000
    s.seek(9998)
    s.write(b"xyz!")                        # straddles the sent mark: its unsent part goes out
    s.seek(10_010)
    s.write(b"B")                           # past the end: the gap is zeros, as in a file
    assert s.drain() == b"z!" + bytes(8) + b"B"
    assert s.size == 10_011 and len(s.buf) == 0
