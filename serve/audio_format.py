"""Streaming audio encoders: float32 mono chunks in, bytes out as soon as the encoder has them.

    enc = make_encoder("wav", sample_rate=24000)
    for pcm in chunks: send(enc.push(pcm))    # pcm: [N] float32 in [-1, 1]
    send(enc.finish())

wav: a RIFF header whose sizes say "unknown length" (0xFFFFFFFF, as streaming servers do), then s16le samples.
pcm: raw s16le. flac and mp3: libsndfile through the `soundfile` wheel (libsndfile >= 1.1 writes MP3 via LAME), fed
chunk by chunk into an in-memory sink that hands out what was written since the last call and keeps only that
and the file's first 4 KiB (memory does not grow with the stream). When the encoder finishes
it may seek back to patch its header (FLAC STREAMINFO length); bytes already sent cannot change, so those patches are
dropped and the stream keeps its "length unknown" header. FFmpeg/PyAV decode such a FLAC stream exactly; libsndfile
(`soundfile`) cannot (it errors, or loses the last block), so FLAC streams are for FFmpeg clients. mp3 carries no
LAME/Xing tag in a stream (it is written last), so decoders keep LAME's encoder delay (1105 samples at 24 kHz) and
padding: 1105-1728 samples more than were pushed.
opus: Ogg/Opus through PyAV (FFmpeg's libopus encoder and Ogg muxer), not libsndfile: libsndfile holds Ogg pages
until ~4 KB, so no audio left until ~1 s of it had been pushed. See OpusEncoder.
aac: AAC-LC in ADTS frames (`audio/aac`, what OpenAI's `aac` is) through PyAV (FFmpeg's native encoder and ADTS
muxer): a stream of self-describing frames, no header to patch. ADTS cannot say how many samples are real, so
decoders keep the encoder's priming (1024 samples) and the last frame's padding: 1024-2047 samples more than pushed.
See AacEncoder.

Zero samples (the model may stop at once) still give a decodable file: wav is its 44-byte header, pcm an empty body
(both exactly 0 samples). flac, mp3, opus and aac cannot say "no samples": libsndfile writes no byte of FLAC or MP3
without a sample (and a FLAC STREAMINFO total of 0 means "unknown length"), and an Ogg Opus stream with no audio
page is refused by FFmpeg and libsndfile, and FFmpeg's AAC encoder writes no frame. So they get one sample of
silence, decoded as 1 sample (flac, opus: 2 at 48 kHz), LAME's smallest output, 1728 samples (mp3), or two AAC
frames, 2048 samples (aac).
"""

from __future__ import annotations

import struct
from typing import Protocol

import numpy as np

from qwen_tts_core.types import SAMPLE_RATE

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "flac": "audio/flac", "mp3": "audio/mpeg",
               "opus": "audio/ogg", "aac": "audio/aac"}
_SF_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III")}
_OPUS_PAGE_US = 20_000    # one Ogg page per 20 ms Opus packet (FFmpeg's default page_duration is 1 s)
_OPUS_BIT_RATE = 32_000   # libsndfile's default gave ~35 kbit/s for speech-like audio at 24 kHz mono
_AAC_BIT_RATE = 64_000    # AAC-LC mono at 24 kHz; FFmpeg's native encoder needs more bits than Opus for speech


def samples(pcm: np.ndarray) -> np.ndarray:
    """What every encoder is given: [N] float32, finite, in [-1, 1]. NaN becomes 0 and +-inf +-1 (a half-precision
    decoder can overflow): a clip keeps NaN, and one NaN aborts the whole process inside LAME (a C assertion), is
    refused by libsndfile's FLAC writer mid-stream and became 0 with a warning in the int16 cast."""
    x = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(x, -1.0, 1.0)


def to_s16le(pcm: np.ndarray) -> bytes:
    """[N] float32 -> little-endian int16 bytes (through `samples`)."""
    return (samples(pcm) * 32767.0).round().astype("<i2").tobytes()


def streaming_wav_header(sample_rate: int, channels: int = 1, bits: int = 16) -> bytes:
    """44-byte RIFF/WAVE header for a stream of unknown length (RIFF and data sizes 0xFFFFFFFF)."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, sample_rate * block, block, bits) +
            b"data" + struct.pack("<I", 0xFFFFFFFF))


class StreamEncoder(Protocol):
    media_type: str

    def push(self, pcm: np.ndarray) -> bytes: ...

    def finish(self) -> bytes: ...


class PcmEncoder:
    media_type = MEDIA_TYPES["pcm"]

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def push(self, pcm: np.ndarray) -> bytes:
        return to_s16le(pcm)

    def finish(self) -> bytes:
        return b""


class WavEncoder(PcmEncoder):
    media_type = MEDIA_TYPES["wav"]

    def __init__(self, sample_rate: int) -> None:
        super().__init__(sample_rate)
        self._header: bytes | None = streaming_wav_header(sample_rate)

    def _take_header(self) -> bytes:
        h, self._header = self._header or b"", None
        return h

    def push(self, pcm: np.ndarray) -> bytes:
        return self._take_header() + to_s16le(pcm)

    def finish(self) -> bytes:
        return self._take_header()


class _Sink:
    """A seekable in-memory file for libsndfile's virtual I/O that hands out, once, what was written since the last
    drain, and keeps in memory only what it has not sent yet plus the file's first `HEAD` bytes.

    libsndfile (1.2, verified by logging its calls) only appends while encoding; on close it seeks back to patch
    the header and writes nothing else behind the end: FLAC rewrites STREAMINFO fields in bytes 12-41 (total
    samples, frame sizes, MD5), MP3 rewrites its first frame (the Xing/Info tag, at most 1441 bytes) at byte 0 and
    seeks back to the end. It never reads. Bytes already sent cannot change, so a write into them is dropped (it
    used to land in a buffer that was never sent again: the streamed bytes are the same); the header's bytes are
    kept (patched) so that the sink still holds the file's real header. Memory: HEAD plus one push's output,
    whatever the stream's length (it used to be the whole stream: ~30 MB for 11 min of FLAC).
    """

    HEAD = 4096

    def __init__(self) -> None:
        self.head = bytearray()   # file bytes [0, len(head)), len(head) <= HEAD, kept for the whole stream
        self.buf = bytearray()    # file bytes [base, size): all not yet sent (base <= sent)
        self.base = 0
        self.size = 0
        self.pos = 0
        self.sent = 0

    def write(self, data: bytes) -> int:
        data = bytes(data)
        start, end = self.pos, self.pos + len(data)
        keep = min(end, self.HEAD)
        if keep > len(self.head):
            self.head.extend(bytes(keep - len(self.head)))
        if start < keep:
            self.head[start:keep] = data[:keep - start]
        lo = max(start, self.base)    # below base: sent and not kept (a header patch of sent bytes)
        if end > lo:
            if end - self.base > len(self.buf):
                self.buf.extend(bytes(end - self.base - len(self.buf)))
            self.buf[lo - self.base:end - self.base] = data[lo - start:]
        self.size = max(self.size, end)
        self.pos = end
        return len(data)

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if self.pos >= end:
            return b""
        if end <= len(self.head):
            out = bytes(self.head[self.pos:end])
        elif self.pos >= self.base:
            out = bytes(self.buf[self.pos - self.base:end - self.base])
        else:
            raise OSError(f"bytes {self.pos}-{end} of the stream were sent and are no longer kept")
        self.pos = end
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def peek(self, n: int) -> bytes:
        """The file's first n bytes (n <= HEAD), as written so far."""
        return bytes(self.head[:n])

    def skip(self, n: int) -> None:
        """Mark the first n unsent bytes sent without handing them out."""
        self.sent = min(self.size, self.sent + n)

    def drain(self) -> bytes:
        """Bytes appended since the last drain (rewrites of already-sent bytes are dropped); forgets them."""
        out = bytes(self.buf[self.sent - self.base:])
        self.buf = bytearray()
        self.base = self.sent = self.size
        return out


_MP3_KBPS = {  # bitrate index -> kbit/s for layer III: MPEG-1, MPEG-2/2.5
    1: ((32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320)),
    2: ((8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160)),
}
_MP3_SR = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def mp3_frame_length(header: bytes) -> int | None:
    """Byte length of the layer III frame starting with `header` (4 bytes), None when it is not one."""
    if len(header) < 4 or header[0] != 0xFF or (header[1] & 0xE0) != 0xE0 or (header[1] >> 1) & 3 != 1:
        return None
    version = (header[1] >> 3) & 3          # 3: MPEG-1, 2: MPEG-2, 0: MPEG-2.5
    b_idx, sr_idx, pad = header[2] >> 4, (header[2] >> 2) & 3, (header[2] >> 1) & 1
    if version == 1 or b_idx in (0, 15) or sr_idx == 3:
        return None
    kbps = _MP3_KBPS[1 if version == 3 else 2][b_idx - 1]
    coef = 144 if version == 3 else 72
    return coef * kbps * 1000 // _MP3_SR[version][sr_idx] + pad


class SoundfileEncoder:
    """flac / mp3 through libsndfile, chunk by chunk."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        import soundfile as sf

        self.fmt = fmt
        self.media_type = MEDIA_TYPES[fmt]
        major, subtype = _SF_FORMATS[fmt]
        self._sink = _Sink()
        extra = {"compression_level": 0.5, "bitrate_mode": "CONSTANT"} if fmt == "mp3" else {}  # CBR
        self._file = sf.SoundFile(self._sink, mode="w", samplerate=sample_rate, channels=1, format=major,
                                  subtype=subtype, **extra)
        self._skip_tag = fmt == "mp3"
        self._pushed = False

    def _drain(self) -> bytes:
        if self._skip_tag:
            # LAME starts with a blank frame that becomes the Xing/Info tag on close; a stream cannot patch it,
            # and a blank frame makes decoders lose sync, so it is never sent.
            size = mp3_frame_length(self._sink.peek(4))
            if size is None or self._sink.size < size:
                return b""
            self._sink.skip(size)
            self._skip_tag = False
        return self._sink.drain()

    def push(self, pcm: np.ndarray) -> bytes:
        x = samples(pcm)
        if x.size:
            self._file.write(x)
            self._pushed = True
        return self._drain()

    def finish(self) -> bytes:
        if not self._pushed:  # see the module docstring: these formats cannot hold zero samples
            self._file.write(np.zeros(1, np.float32))
        self._file.close()
        return self._drain()


class _Pipe:
    """A write-only file for PyAV's muxer: what was written since the last drain (never seeks: Ogg needs none)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def drain(self) -> bytes:
        out, self._parts = b"".join(self._parts), []
        return out


class _AvEncoder:
    """PyAV's encoder and muxer writing into a `_Pipe`: float32 mono in, what the muxer wrote so far out. Frames carry
    their sample position as pts (muxers that time their packets need it)."""

    media_type = ""

    def __init__(self, container: str, codec: str, sample_rate: int, bit_rate: int,
                 options: dict[str, str]) -> None:
        import av

        self._pipe = _Pipe()
        self._out = av.open(self._pipe, "w", format=container, options=options)
        self._stream = self._out.add_stream(codec, rate=sample_rate, layout="mono")
        self._stream.bit_rate = bit_rate
        self._rate = sample_rate
        self._samples = 0

    def _encode(self, x: np.ndarray) -> None:
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, :]), format="flt", layout="mono")
        frame.sample_rate = self._rate
        frame.pts = self._samples
        self._samples += x.size
        self._out.mux(self._stream.encode(frame))

    def push(self, pcm: np.ndarray) -> bytes:
        x = samples(pcm)
        if x.size:
            self._encode(x)
        return self._pipe.drain()

    def finish(self) -> bytes:
        if not self._samples:  # see the module docstring: these formats cannot hold zero samples
            self._encode(np.zeros(1, np.float32))
        self._out.mux(self._stream.encode(None))
        self._out.close()
        return self._pipe.drain()


class OpusEncoder(_AvEncoder):
    """Ogg/Opus through PyAV, each push's audio out at once but for its last 20 ms packet.

    libopus encodes at the input rate (24 kHz: OpusHead says 24000, pre-skip 312, as libsndfile wrote it), so the
    stream decodes at 48 kHz in FFmpeg and at 24 kHz in libsndfile. Ogg's muxer closes a page when it spans
    `page_duration` (one 20 ms packet here) and keeps the newest page back until the next (it may have to carry the
    end-of-stream flag), so a push hands out all but its last packet; the I/O buffer is flushed per packet. Frames
    carry their sample position as pts: without it the muxer's granules start one pre-skip late and the decoded end
    is trimmed wrong. finish() flushes libopus's lookahead; the last page's granule trims the stream to exactly the
    samples pushed. Each page costs 28 bytes (~11 kbit/s at one per 20 ms), the price of not buffering.
    """

    media_type = MEDIA_TYPES["opus"]

    def __init__(self, sample_rate: int) -> None:
        super().__init__("ogg", "libopus", sample_rate, _OPUS_BIT_RATE,
                         {"page_duration": str(_OPUS_PAGE_US), "flush_packets": "1"})
        self._stream.codec_context.format = "flt"


class AacEncoder(_AvEncoder):
    """AAC-LC in ADTS through PyAV (FFmpeg's native `aac` encoder, its `adts` muxer), each frame out as it is made.

    The encoder works in frames of 1024 samples and holds one frame of lookahead besides its 1024-sample priming, so
    nothing leaves before ~2048 samples were pushed (a 1-frame first chunk of 1920 samples gives no byte; the next
    chunk gives its frames): ~85 ms of audio, the price of AAC. Every ADTS frame carries its own 7-byte header, so
    the stream decodes from any frame boundary and needs no patch at the end; finish() flushes the lookahead."""

    media_type = MEDIA_TYPES["aac"]

    def __init__(self, sample_rate: int) -> None:
        super().__init__("adts", "aac", sample_rate, _AAC_BIT_RATE, {"flush_packets": "1"})


def make_encoder(fmt: str, sample_rate: int = SAMPLE_RATE) -> StreamEncoder:
    """A fresh streaming encoder; ValueError naming `response_format` for unknown formats."""
    if fmt == "pcm":
        return PcmEncoder(sample_rate)
    if fmt == "wav":
        return WavEncoder(sample_rate)
    if fmt == "opus":
        return OpusEncoder(sample_rate)
    if fmt == "aac":
        return AacEncoder(sample_rate)
    if fmt in _SF_FORMATS:
        return SoundfileEncoder(fmt, sample_rate)
    raise ValueError(f"response_format must be one of {sorted(MEDIA_TYPES)}, got {fmt!r}")
