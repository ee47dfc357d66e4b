"""Reference audio libsndfile cannot read, decoded through PyAV (FFmpeg): MP4/M4A/3GP (AAC, ALAC, ...), raw AAC
(ADTS), WebM/Matroska (Opus, Vorbis, AAC) and Ogg with codecs libsndfile lacks. `audio_io` calls `sniff` and
`decode` only after libsndfile has refused the bytes, so wav/flac/ogg/mp3 are read as before.

The libsndfile path's guarantees hold here too, without trusting anything the container declares:

* the type is taken from the first bytes (`sniff`) and the demuxer is forced to it: FFmpeg never probes for a
  format, so playlists (HLS, concat) and image or network demuxers are never reached from an upload;
* the container's duration and frame counts are never used: samples are counted AS THEY ARE DECODED, frame by
  frame, and decoding stops with the libsndfile path's error as soon as the count passes `max_seconds` or
  `max_samples` (a small file that decodes to hours costs one codec frame past the limit, not hours);
* the demuxer is bounded: probe size and analysis time, streams, packets read (`MAX_PACKETS`), the decoders it may
  open (`DECODERS`, each with a small frame; ALAC's declared frame length is checked), and for MP4 the sample
  tables are checked before FFmpeg reads them (`check_mp4`: FFmpeg allocates its index from the declared sample
  counts, so a 7 KiB file declaring 50 M samples made it allocate 1.8 GB when opened);
* sample rate and channels are checked on every decoded frame (`AudioLimits.check_header`); a rate that changes
  mid-stream is refused;
* every FFmpeg error (corrupt, truncated, unsupported) is a `RequestError` naming the argument.

Output: float32 mono (the mean of the channels, as `audio_io._as_mono`) at the stream's own rate.
"""

from __future__ import annotations

import io
import struct
from typing import TYPE_CHECKING

import numpy as np

from .audio_io import _duration
from .errors import RequestError

if TYPE_CHECKING:
    from .audio_io import AudioLimits

MAX_PACKETS = 1 << 20
"""Packets demuxed (all streams) before a file is refused: 120 s of 2.5 ms Opus frames are 48,000."""
MAX_MP4_SAMPLES = 1 << 21
"""Samples (packets) an MP4 track may declare: FFmpeg builds a 24-byte index entry for each when it opens the file.
120 s of AAC at 48 kHz are 5,625; PCM in MP4 counts one per frame (43 s at 48 kHz)."""
MAX_ALAC_FRAME = 1 << 16
"""ALAC's declared frame length (Apple's encoder writes 4096): FFmpeg allocates its buffers from it."""
PROBE_OPTIONS = {"probesize": str(1 << 20), "analyzeduration": str(2_000_000), "max_streams": "16"}
DECODERS = frozenset({"aac", "aac_fixed", "aac_latm", "mp3float", "mp3", "mp2float", "mp2", "opus", "libopus",
                      "vorbis", "libvorbis", "flac", "alac"})
"""Decoders allowed (besides `pcm_*`): each decodes a packet into a bounded frame (at most 8192 samples, FLAC
65535, ALAC its checked frame length; PCM as many as the packet's bytes)."""

_FORMATS = {"mp4": "MP4/M4A", "matroska": "WebM/Matroska", "aac": "AAC (ADTS)", "ogg": "Ogg"}
_MP4_TOP = {b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"}


def sniff(head: bytes) -> tuple[str, str] | None:
    """(FFmpeg demuxer, the type's name for messages) when the first bytes are a container this module reads, else
    None (the caller keeps libsndfile's error)."""
    if len(head) >= 8 and head[4:8] in _MP4_TOP:
        return "mp4", _FORMATS["mp4"]
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska", _FORMATS["matroska"]
    if head[:4] == b"OggS":
        return "ogg", _FORMATS["ogg"]
    body = head
    if body[:3] == b"ID3" and len(body) >= 10:   # an ID3v2 tag before ADTS frames (synchsafe size)
        size = (body[6] & 0x7F) << 21 | (body[7] & 0x7F) << 14 | (body[8] & 0x7F) << 7 | (body[9] & 0x7F)
        body = body[10 + size + (10 if body[5] & 0x10 else 0):]
    if len(body) >= 2 and body[0] == 0xFF and body[1] & 0xF6 == 0xF0:   # ADTS sync word, layer 0 (MP3's is not)
        return "aac", _FORMATS["aac"]
    return None


def import_av(kind: str, argument: str):
    """PyAV, or a RequestError naming `argument` that says which audio type needs it."""
    try:
        import av
    except ImportError:
        raise RequestError(argument, f"{kind} audio is decoded with PyAV, which is not installed (pip install av); "
                                     "wav, flac, ogg and mp3 need no more than soundfile") from None
    return av


# MP4 boxes whose payload is a table: (payload offset of the 32-bit entry count, bytes per entry at least;
# `_table` works out those that depend on the version or flags).
_TABLES = {b"stts": (4, 8), b"ctts": (4, 8), b"stsc": (4, 12), b"stco": (4, 4), b"co64": (4, 8), b"stss": (4, 4),
           b"stps": (4, 4), b"elst": (4, 12), b"sbgp": (8, 8), b"sgpd": (8, 1), b"stsd": (4, 8),
           b"dref": (4, 8), b"tfra": (12, 0), b"trun": (4, 0)}
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf", b"mvex", b"dinf", b"mfra"}
_REFUSED = {b"senc", b"saiz", b"saio", b"pssh", b"tenc", b"sinf"}   # encryption: FFmpeg sizes it by sample counts
_PIFF_SENC = bytes.fromhex("a2394f525a9b4f14a2446c427c648df4")   # the same as a `uuid` box


def _boxes(data: memoryview, start: int, end: int):
    """(type, payload start, payload end) of the boxes in data[start:end]; ValueError when one overruns."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            if pos + 16 > end:
                raise ValueError("truncated box header")
            size, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            if kind == b"mdat" or end == len(data) and kind in (b"free", b"skip"):   # a cut file's last box
                return
            raise ValueError(f"box {kind!r} overruns its parent")
        yield kind, pos + head, pos + size
        pos += size


def _u32(view: memoryview, at: int) -> int:
    return struct.unpack_from(">I", view, at)[0]


def _table(kind: bytes, view: memoryview, a: int, b: int) -> tuple[int, int, int]:
    """(entry count, payload offset of the first entry, bytes per entry at least) of table box `kind`."""
    version_flags = _u32(view, a) if b - a >= 4 else 0
    version, flags = version_flags >> 24, version_flags & 0xFFFFFF
    at, entry = _TABLES[kind]
    if kind == b"tfra":   # track_ID, then the sizes of three fields (2 bits each)
        at, sizes = 12, (_u32(view, a + 8) if b - a >= 12 else 0)
        entry = (16 if version == 1 else 8) + 3 + (sizes >> 4 & 3) + (sizes >> 2 & 3) + (sizes & 3)
    elif kind in (b"sbgp", b"sgpd"):   # grouping_type, then per version a parameter / default length / index
        at = 8 + (4 if version == 1 else 0) + (4 if kind == b"sgpd" and version >= 2 else 0)
    elif kind == b"elst":
        entry = 20 if version == 1 else 12
    elif kind == b"trun":   # data offset and first sample flags (optional), then per sample 0-4 fields
        entry = 4 * bin(flags & 0xF00).count("1")
    if b - a < at + 4:
        raise ValueError(f"short {kind.decode()} box")
    count = _u32(view, a + at)
    first = at + 4 + (((4 if flags & 1 else 0) + (4 if flags & 4 else 0)) if kind == b"trun" else 0)
    if count * entry > b - a - first:
        raise ValueError(f"{kind.decode()} declares {count} entries that its bytes do not hold")
    return count, a + first, entry


def _words(view: memoryview, at: int, n: int) -> np.ndarray:
    """n big-endian 32-bit words from `at`, as int64 (sums of them cannot wrap)."""
    return np.frombuffer(view, dtype=">u4", count=n, offset=at).astype(np.int64)


def check_mp4(data: bytes, argument: str, what: str, kind: str) -> None:
    """Refuse (RequestError naming `argument`) an MP4 whose tables declare more entries than their bytes hold or
    more samples than MAX_MP4_SAMPLES, or that is encrypted: FFmpeg sizes allocations from those counts when it
    opens the file, before a packet is read."""
    view = memoryview(data)
    fragments = 0

    def samples(what: str, n: int) -> None:
        if n > MAX_MP4_SAMPLES:
            raise ValueError(f"{what} declares {n} samples; at most {MAX_MP4_SAMPLES} are read")

    def walk(start: int, end: int, depth: int) -> None:
        nonlocal fragments
        if depth > 12:
            raise ValueError("boxes nested too deep")
        tables: dict[bytes, tuple[int, int, int]] = {}
        for box, a, b in _boxes(view, start, end):
            if box in _REFUSED or box == b"uuid" and bytes(view[a:a + 16]) == _PIFF_SENC:
                raise ValueError(f"encrypted or unsupported box {box.decode('latin-1')!r}")
            if box in _CONTAINERS:
                walk(a, b, depth + 1)
            elif box in (b"stsz", b"stz2"):
                if b - a < 12:
                    raise ValueError(f"short {box.decode()} box")
                size_field, count = _u32(view, a + 4), _u32(view, a + 8)
                samples("a track", count)
                if count * ((0 if size_field else 4) if box == b"stsz" else (size_field & 0xFF) / 8) > b - a - 12:
                    raise ValueError(f"{box.decode()} declares {count} samples that its bytes do not hold")
            elif box in _TABLES:
                count, at, _ = tables[box] = _table(box, view, a, b)
                if box in (b"stts", b"ctts"):   # (sample count, delta / offset) runs
                    samples(f"a track's {box.decode()}", int(_words(view, at, 2 * count)[0::2].sum()))
                elif box == b"trun":
                    fragments += count
                    samples("the fragments", fragments)
        if b"stsc" in tables:   # (first chunk, samples per chunk, description) runs; the last lasts to the last chunk
            count, at, _ = tables[b"stsc"]
            chunks = (tables.get(b"stco") or tables.get(b"co64") or (0, 0, 0))[0]
            runs = _words(view, at, 3 * count).reshape(-1, 3)
            first = np.minimum(runs[:, 0], chunks + 1)
            span = np.maximum(np.diff(np.append(first, chunks + 1)), 0)
            samples("a track's stsc", int((runs[:, 1] * span).sum()))

    try:
        walk(0, len(data), 0)
    except (ValueError, struct.error) as exc:
        raise RequestError(argument, f"could not decode {what} as {kind} audio (malformed MP4: {exc})") from None


def _check_stream(stream, argument: str, kind: str) -> None:
    ctx = stream.codec_context
    name = ctx.codec.name if ctx.codec is not None else "?"
    if name not in DECODERS and not name.startswith("pcm_"):
        raise RequestError(argument, f"{kind} audio in codec {name!r} is not read; accepted: AAC, MP3, Opus, "
                                     "Vorbis, FLAC, ALAC, PCM")
    if name == "alac":
        extra = bytes(ctx.extradata or b"")
        frame = struct.unpack_from(">I", extra, 12)[0] if len(extra) >= 16 else 0
        if not 0 < frame <= MAX_ALAC_FRAME:
            raise RequestError(argument, f"{kind} audio: ALAC frame length {frame} is outside [1, {MAX_ALAC_FRAME}]")


def _as_float(frame) -> np.ndarray:
    """One decoded frame -> [channels, samples] float32 scaled as libsndfile scales integer PCM."""
    fmt = frame.format
    arr = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not fmt.is_planar:
        arr = arr.reshape(-1, channels).T
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype == np.uint8:
        return (arr.astype(np.float32) - 128.0) / 128.0
    return (arr / float(2 ** (8 * arr.dtype.itemsize - 1))).astype(np.float32)


def decode(data: bytes, fmt: str, kind: str, argument: str, what: str,
           limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `data` with demuxer `fmt` (from `sniff`) into (float32 mono [N], rate)
    within `limits`; `kind` names the type and `what` the input in messages. RequestError naming `argument`."""
    av = import_av(kind, argument)
    if fmt == "mp4":
        check_mp4(data, argument, what, kind)
    options = {**PROBE_OPTIONS, "codec_whitelist": ",".join(sorted(DECODERS - {"alac"}))}
    if fmt == "mp4":
        options.update(enable_drefs="0", use_absolute_path="0")
    chunks: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data), mode="r", format=fmt, container_options=options) as container:
            audio = [s for s in container.streams if s.type == "audio"]
            if not audio:
                raise RequestError(argument, f"{what}: the {kind} file has no audio stream")
            stream = audio[0]
            _check_stream(stream, argument, kind)
            sr = frames = channels = packets = 0
            for packet in container.demux():
                packets += 1
                if packets > MAX_PACKETS:
                    raise RequestError(argument, f"{what}: more than {MAX_PACKETS} packets; not a voice reference")
                if packet.stream.index != stream.index:
                    continue
                for frame in stream.codec_context.decode(packet):
                    rate, n = int(frame.sample_rate), int(frame.samples)
                    if sr and rate != sr:
                        raise RequestError(argument, f"{what}: the sample rate changes mid-stream ({sr} -> {rate} Hz)")
                    sr, channels = rate, max(channels, int(frame.layout.nb_channels))
                    limits.check_header(sr, channels, 0, argument)   # rate and channels, before converting
                    frames += n
                    if frames / sr > limits.max_seconds:
                        raise RequestError(argument, f"audio is longer than {_duration(frames / sr)} (decoding "
                                           f"stopped there); at most {limits.max_seconds:g} s are accepted")
                    if frames * channels > limits.max_samples:
                        raise RequestError(argument, f"audio has more than {frames * channels} samples ({channels} "
                                           f"channels; decoding stopped there); at most {limits.max_samples} are "
                                           "decoded")
                    if n:
                        chunks.append(_as_float(frame).mean(axis=0, dtype=np.float32))
    except RequestError:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, MemoryError, RuntimeError, TypeError) as exc:
        reason = (getattr(exc, "strerror", None) or str(exc) or type(exc).__name__)[:200]
        raise RequestError(argument, f"could not decode {what} as {kind} audio ({reason})") from None
    if not chunks:
        raise RequestError(argument, f"{what}: the {kind} file holds no decodable audio")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), sr


__all__ = ["DECODERS", "MAX_ALAC_FRAME", "MAX_MP4_SAMPLES", "MAX_PACKETS", "check_mp4", "decode", "import_av", "sniff"]
