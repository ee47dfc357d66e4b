"""Reference audio libsndfile cannot read, decoded through PyAV (FFmpeg): MP4/M4A/3GP (AAC, ALAC, ...), raw AAC
(ADTS), WebM/Matroska (Opus, Vorbis, AAC) and Ogg with codecs libsndfile lacks. `audio_io` calls `sniff` and
`decode` only after libsndfile has refused the bytes, so wav/flac/ogg/mp3 are read as before.

The libsndfile path's guarantees hold here too, without trusting anything the container declares:

* the type is taken from the first bytes (`sniff`) and the demuxer is forced to it: FFmpeg never probes for a
  format, so playlists (HLS, concat) and image or network demuxers are never reached from an upload;
* the container's duration and frame counts are never used: samples are counted AS THEY ARE DECODED, frame by
  frame, and decoding stops with the libsndfile path's error as soon as the count passes `max_seconds` or
  `max_samples` (a small file that decodes to hours costs one codec frame past the limit, not hours);
* the demuxer is bounded: probe size and analysis time, streams (`MAX_STREAMS`: FFmpeg opens every stream's
  decoder at once while probing; one audio stream is read), packets read (`MAX_PACKETS`), the decoders it may
  open (`DECODERS`, each with a small frame; ALAC's declared frame length is checked), and for MP4 the boxes are
  checked before FFmpeg reads them (`check_mp4`: FFmpeg allocates its index from the declared sample counts, so a
  7 KiB file declaring 50 M samples made it allocate 1.8 GB when opened): every box is counted
  (`MAX_MP4_BOXES`), a sample table is read only in its own place (FFmpeg applies one hidden in `udta`, `wave`, ...
  to the last track), the samples of all tracks times their edits are capped (`MAX_MP4_SAMPLES`, `MAX_EDITS`), and
  segment indexes (`sidx`, `mfra`: quadratic in FFmpeg) and encryption are refused;
* FFmpeg runs in a child process (`decode`; `_child_main`), never in the caller's: a fresh interpreter that
  imports only numpy, PyAV and this module, then limits its own address space (`CHILD_MEMORY`, plus the input and
  the room a limit-sized output needs) and CPU time, and is killed after `CHILD_TIMEOUT_S` of wall-clock time. A
  file that gets past the checks above costs that child, not the service; its death is a `RequestError`. Where
  the OS does not enforce RLIMIT_AS (macOS, Windows) the wall-clock timeout still applies;
* sample rate and channels are checked on every decoded frame (`AudioLimits.check_header`); a rate that changes
  mid-stream is refused;
* every FFmpeg error (corrupt, truncated, unsupported) is a `RequestError` naming the argument.

Output: float32 mono (the mean of the channels, as `audio_io._as_mono`) at the stream's own rate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

import numpy as np

from .audio_io import _duration
from .errors import RequestError

if TYPE_CHECKING:
    from .audio_io import AudioLimits

MAX_PACKETS = 1 << 20
"""Packets demuxed (all streams) before a file is refused: 120 s of 2.5 ms Opus frames are 48,000."""
MAX_MP4_SAMPLES = 1 << 21
"""Samples (packets) the tracks of an MP4 may declare, all tracks and each track's edits together (FFmpeg builds a
24-byte index entry for each when it opens the file). 120 s of AAC at 48 kHz are 5,625; PCM in MP4 counts one per
frame (43 s at 48 kHz)."""
MAX_EDITS = 4
"""Entries of an MP4 edit list (phones write 1 or 2): FFmpeg builds the track's index again for each."""
MAX_MP4_BOXES = 100_000
"""MP4 boxes (all levels) before a file is refused: a 120 s m4a has a few dozen."""
MAX_STREAMS = 2
"""Streams a container may hold (a video's picture and sound); of those one may be audio."""
MAX_ALAC_FRAME = 1 << 16
"""ALAC's declared frame length (Apple's encoder writes 4096): FFmpeg allocates its buffers from it."""
PROBE_OPTIONS = {"probesize": str(1 << 20), "analyzeduration": str(2_000_000), "max_streams": str(MAX_STREAMS)}
DECODERS = frozenset({"aac", "aac_fixed", "aac_latm", "mp3float", "mp3", "mp2float", "mp2", "opus", "libopus",
                      "vorbis", "libvorbis", "flac", "alac"})
"""Decoders allowed (besides `pcm_*`): each decodes a packet into a bounded frame (at most 8192 samples, FLAC
65535, ALAC its checked frame length; PCM as many as the packet's bytes)."""
CHILD_TIMEOUT_S = 30.0
"""Wall-clock seconds the decoding child may take (spawn and imports included) before it is killed; its CPU time
is limited to as much."""
CHILD_MEMORY = 1 << 30
"""Address space the decoding child may add to what its imports take, besides the input and 8 bytes per sample of
`AudioLimits.max_samples` (the decoded chunks and their concatenation)."""

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


def _no_av(kind: str, argument: str) -> RequestError:
    return RequestError(argument, f"{kind} audio is decoded with PyAV, which is not installed (pip install av); "
                                  "wav, flac, ogg and mp3 need no more than soundfile")


def import_av(kind: str, argument: str):
    """PyAV, or a RequestError naming `argument` that says which audio type needs it."""
    try:
        import av
    except ImportError:
        raise _no_av(kind, argument) from None
    return av


# MP4 boxes whose payload is a table: (payload offset of the 32-bit entry count, bytes per entry at least;
# `_table` works out those that depend on the version or flags).
_TABLES = {b"stts": (4, 8), b"ctts": (4, 8), b"stsc": (4, 12), b"stco": (4, 4), b"co64": (4, 8), b"stss": (4, 4),
           b"stps": (4, 4), b"elst": (4, 12), b"sbgp": (8, 8), b"sgpd": (8, 1), b"stsd": (4, 8),
           b"dref": (4, 8), b"trun": (4, 0)}
_STBL = (b"moov", b"trak", b"mdia", b"minf", b"stbl")
_TRAF = (b"moof", b"traf")
_PLACES = {**dict.fromkeys((b"stsz", b"stz2", b"stts", b"ctts", b"stsc", b"stco", b"co64", b"stss", b"stps",
                            b"stsd"), (_STBL,)),
           b"sbgp": (_STBL, _TRAF), b"sgpd": (_STBL, _TRAF), b"trun": (_TRAF,),
           b"elst": ((b"moov", b"trak", b"edts"),), b"dref": ((b"moov", b"trak", b"mdia", b"minf", b"dinf"),)}
"""Where FFmpeg may read each table box: it reads one found under any parent (udta, tref, wave, meta, a sample
entry, ...) into the last track, so a table anywhere else is refused."""
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf", b"mvex", b"dinf", b"udta",
               b"tref", b"wave", b"clip", b"tapt", b"iprp"}
_ONCE = {b"mdia", b"minf", b"stbl", b"edts", b"dinf"} | (_PLACES.keys() - {b"trun"})   # at most one per parent
_REFUSED = {b"senc", b"saiz", b"saio", b"pssh", b"tenc", b"sinf",   # encryption: FFmpeg sizes it by sample counts
            b"sidx", b"ssix", b"mfra", b"tfra", b"mfro"}   # segment indexes: FFmpeg sorts them in quadratic time
_PIFF_SENC = bytes.fromhex("a2394f525a9b4f14a2446c427c648df4")   # the same as a `uuid` box


def _boxes(data: memoryview, start: int, end: int):
    """(type, payload start, payload end, the type's offset) of the boxes in data[start:end]; ValueError when one
    overruns (a cut file's last mdat, free or skip box ends where the file does)."""
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
            if kind == b"mdat" or end == len(data) and kind in (b"free", b"skip"):
                yield kind, min(pos + head, end), end, pos + 4
                return
            raise ValueError(f"box {kind!r} overruns its parent")
        yield kind, pos + head, pos + size, pos + 4
        pos += size


def _u32(view: memoryview, at: int) -> int:
    return struct.unpack_from(">I", view, at)[0]


def _table(kind: bytes, view: memoryview, a: int, b: int) -> tuple[int, int, int]:
    """(entry count, payload offset of the first entry, bytes per entry at least) of table box `kind`."""
    version_flags = _u32(view, a) if b - a >= 4 else 0
    version, flags = version_flags >> 24, version_flags & 0xFFFFFF
    at, entry = _TABLES[kind]
    if kind in (b"sbgp", b"sgpd"):   # grouping_type, then per version a parameter / default length / index
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
    """Refuse (RequestError naming `argument`) an MP4 that FFmpeg would spend memory or time on before a packet is
    read: more than MAX_MP4_BOXES boxes or MAX_STREAMS tracks; a table that declares more entries than its bytes
    hold, or outside its place (`_PLACES`); more samples than MAX_MP4_SAMPLES (all tracks, each times its edits);
    more than MAX_EDITS edits; a segment index; encryption."""
    view = memoryview(data)
    boxes, fragments = 0, 0
    tracks: list[list[int]] = []   # [samples, edits] of each trak
    placed: set[int] = set()       # offsets of the table boxes read in their place
    mdats: list[tuple[int, int]] = []

    def samples(what: str, n: int) -> None:
        total = fragments + sum(s * max(e, 1) for s, e in tracks)
        if n > MAX_MP4_SAMPLES:
            raise ValueError(f"{what} declares {n} samples; at most {MAX_MP4_SAMPLES} are read")
        if total > MAX_MP4_SAMPLES:
            raise ValueError(f"{what}: the tracks declare {total} samples (each times its edits); at most "
                             f"{MAX_MP4_SAMPLES} are read")

    def track(what: str, n: int) -> None:   # the current trak has (at least) n samples
        tracks[-1][0] = max(tracks[-1][0], n)
        samples(what, n)

    def walk(start: int, end: int, path: tuple[bytes, ...]) -> None:
        nonlocal boxes, fragments
        if len(path) > 12:
            raise ValueError("boxes nested too deep")
        tables: dict[bytes, tuple[int, int, int]] = {}
        seen: set[bytes] = set()
        for box, a, b, at_type in _boxes(view, start, end):
            boxes += 1
            if boxes > MAX_MP4_BOXES:
                raise ValueError(f"more than {MAX_MP4_BOXES} boxes")
            name = box.decode("latin-1")
            if box in _REFUSED or box == b"uuid" and bytes(view[a:a + 16]) == _PIFF_SENC:
                raise ValueError(f"encrypted or unsupported box {name!r}")
            if box in _ONCE:
                if box in seen:
                    raise ValueError(f"a second {name!r} box in {b'/'.join(path).decode('latin-1')}")
                seen.add(box)
            if box in _PLACES:
                if path not in _PLACES[box]:
                    raise ValueError(f"a {name!r} box outside its place ({'/'.join(p.decode() for p in path)})")
                placed.add(at_type)
            if not path and box == b"mdat":
                mdats.append((a, b))
            elif box == b"trak" and path == (b"moov",):
                tracks.append([0, 0])
                if len(tracks) > MAX_STREAMS:
                    raise ValueError(f"more than {MAX_STREAMS} tracks")
            if box in _CONTAINERS:
                walk(a, b, (*path, box))
            elif box in (b"stsz", b"stz2"):
                if b - a < 12:
                    raise ValueError(f"short {name} box")
                size_field, count = _u32(view, a + 4), _u32(view, a + 8)
                if count * ((0 if size_field else 4) if box == b"stsz" else (size_field & 0xFF) / 8) > b - a - 12:
                    raise ValueError(f"{name} declares {count} samples that its bytes do not hold")
                track("a track", count)
            elif box in _TABLES:
                count, at, _ = tables[box] = _table(box, view, a, b)
                if box in (b"stts", b"ctts") and count:   # (sample count, delta / offset) runs
                    track(f"a track's {name}", int(_words(view, at, 2 * count)[0::2].sum()))
                elif box == b"elst":
                    if count > MAX_EDITS:
                        raise ValueError(f"an edit list of {count} entries; at most {MAX_EDITS} are read")
                    tracks[-1][1] = count
                    samples("a track's edit list", 0)
                elif box == b"trun":
                    fragments += count
                    samples("the fragments", 0)
        if tables.get(b"stsc", (0,))[0]:   # (first chunk, samples per chunk, description) runs to the last chunk
            count, at, _ = tables[b"stsc"]
            chunks = (tables.get(b"stco") or tables.get(b"co64") or (0, 0, 0))[0]
            runs = _words(view, at, 3 * count).reshape(-1, 3)
            first = np.minimum(runs[:, 0], chunks + 1)
            span = np.maximum(np.diff(np.append(first, chunks + 1)), 0)
            track("a track's stsc", int((runs[:, 1] * span).sum()))

    def hidden() -> None:
        """A table's or an index's type anywhere outside the boxes read above (and the audio): inside a box this
        walk does not open (meta, a sample entry, ...), where FFmpeg may still read it."""
        cuts = [0, *(x for span in sorted(mdats) for x in span), len(data)]
        for start, end in zip(cuts[0::2], cuts[1::2]):
            for box in (*_PLACES, *_REFUSED):
                at = data.find(box, start, end)
                while at >= 0:
                    if at not in placed:
                        raise ValueError(f"a {box.decode()!r} box outside its place")
                    at = data.find(box, at + 1, end)

    try:
        walk(0, len(data), ())
        hidden()
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
    return arr.astype(np.float32) * np.float32(1 / 2 ** (8 * arr.dtype.itemsize - 1))   # no float64 copy


def decode_here(data: bytes, fmt: str, kind: str, argument: str, what: str,
                limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Decode the first audio stream of `data` with demuxer `fmt` (from `sniff`) into (float32 mono [N], rate)
    within `limits`, in THIS process (the child's work; callers use `decode`); `kind` names the type and `what`
    the input in messages. RequestError naming `argument`."""
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
            if len(audio) > 1:
                raise RequestError(argument, f"{what}: the {kind} file has {len(audio)} audio streams; one is read")
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
        if isinstance(exc, MemoryError):
            reason = f"it needs more memory than a voice reference may ({reason})"
        raise RequestError(argument, f"could not decode {what} as {kind} audio ({reason})") from None
    if not chunks:
        raise RequestError(argument, f"{what}: the {kind} file holds no decodable audio")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), sr


def decode(data: bytes, fmt: str, kind: str, argument: str, what: str,
           limits: AudioLimits) -> tuple[np.ndarray, int]:
    """`decode_here` in a child process with hard limits (see the module's docstring): the MP4 checks run here
    first (a refused file costs no child), then the child decodes; its refusals come back as they are, and its
    death, timeout or a reply that is not a limit-sized waveform are RequestErrors naming `argument`."""
    if importlib.util.find_spec("av") is None:
        raise _no_av(kind, argument)
    if fmt == "mp4":
        check_mp4(data, argument, what, kind)
    return _decode_in_child(data, fmt, kind, argument, what, limits)


_HEADER = 4096
"""Bytes of the child's reply header (JSON, space-padded): the samples after it are aligned."""
_CHILD_ENV = ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "SYSTEMROOT", "PYTHONHOME")
# The child imports this module by path under a bare package: qwen_tts_core/__init__.py (torch and the model) is
# never run, and the working directory is not on its path.
_CHILD_CODE = ("import sys, types; del sys.path[0]; p = types.ModuleType('qwen_tts_core'); p.__path__ = "
               "[sys.argv[1]]; sys.modules['qwen_tts_core'] = p; from qwen_tts_core.audio_decode_av import "
               "_child_main; _child_main()")


def _child_memory(limits: AudioLimits) -> int:
    """Bytes of address space the child may map past its imports and input: CHILD_MEMORY, and 8 per sample a
    limit-sized decode holds (its chunks and their concatenation)."""
    return CHILD_MEMORY + 8 * limits.max_samples


def _decode_in_child(data: bytes, fmt: str, kind: str, argument: str, what: str,
                     limits: AudioLimits) -> tuple[np.ndarray, int]:
    def failed(reason: str) -> RequestError:
        return RequestError(argument, f"could not decode {what} as {kind} audio ({reason})")

    job = json.dumps({"fmt": fmt, "kind": kind, "argument": argument, "what": what, "size": len(data),
                      "limits": dataclasses.asdict(limits), "memory": _child_memory(limits),
                      "cpu": CHILD_TIMEOUT_S}).encode() + b"\n"
    env = {k: os.environ[k] for k in _CHILD_ENV if k in os.environ}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    cap = _HEADER + 4 * limits.max_samples   # mono: at most max_samples samples
    reply, over = bytearray(), []
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, os.path.dirname(os.path.abspath(__file__))],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            close_fds=True)

    def feed() -> None:
        try:
            proc.stdin.write(job)
            proc.stdin.write(data)
            proc.stdin.close()
        except OSError:   # the child died or refused early
            pass

    def drain() -> None:
        fd = proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 20):
            reply.extend(chunk)
            if len(reply) > cap:
                over.append(True)
                proc.kill()
                return

    threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
    for t in threads:
        t.start()
    try:
        code = proc.wait(CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for t in threads:
            t.join(5)
        proc.stdout.close()
    if code is None:
        raise failed(f"decoding took more than {CHILD_TIMEOUT_S:g} s; stopped")
    if over:
        raise failed("the decoder's output is longer than the limits allow")
    if code != 0:   # a limit hit where Python could not report it (SIGKILL, SIGXCPU, SIGSEGV, ...)
        raise failed(f"the decoder stopped: {_ended(code)}; the file needs more than a voice reference may")
    try:
        head = json.loads(bytes(reply[:_HEADER]))
    except ValueError:
        raise failed("the decoder's reply is malformed") from None
    if "error" in head:
        raise RequestError(argument, str(head["error"]))
    sr, n = head.get("sr"), head.get("n")
    if (not isinstance(sr, int) or not isinstance(n, int) or not 0 < n <= limits.max_samples
            or len(reply) != _HEADER + 4 * n):
        raise failed("the decoder's reply is malformed")
    limits.check_header(sr, 1, n, argument)
    return np.frombuffer(reply, dtype=np.float32, offset=_HEADER), sr


def _ended(code: int) -> str:
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def _limit_self(memory: int, cpu: float) -> None:
    """Cap this process: address space at what it maps now plus `memory` (where /proc says; RLIMIT_AS is POSIX
    and Linux enforces it), CPU seconds, no core dumps, no files written."""
    try:
        import resource
    except ImportError:   # Windows: the parent's timeout is the only bound
        return
    limits = [(resource.RLIMIT_CPU, int(cpu) + 1), (resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 0)]
    try:
        with open("/proc/self/status") as f:
            mapped = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        limits.append((resource.RLIMIT_AS, mapped + memory))
    except (OSError, StopIteration, ValueError):
        pass
    for which, value in limits:
        with contextlib.suppress(ValueError, OSError):   # not enforced here (RLIMIT_AS on macOS)
            resource.setrlimit(which, (value, value))


def _child_main() -> None:
    """The decoding child (`_CHILD_CODE`): the job's JSON line, then the file's bytes on stdin; replies on stdout
    with a `_HEADER`-byte JSON header ({"sr", "n"} or {"error"}) and n float32 samples."""
    from .audio_io import AudioLimits

    stdin, out = sys.stdin.buffer, sys.stdout.buffer
    job = json.loads(stdin.readline())
    with contextlib.suppress(RequestError):   # before the limits: trusted imports are not the file's cost
        import_av(job["kind"], job["argument"])
    _limit_self(job["memory"] + job["size"], job["cpu"])
    data = stdin.read(job["size"] + 1)
    try:
        if len(data) != job["size"]:
            raise RequestError(job["argument"], "the decoder got a different input")
        wav, sr = decode_here(data, job["fmt"], job["kind"], job["argument"], job["what"],
                              AudioLimits(**job["limits"]))
    except RequestError as exc:
        out.write(json.dumps({"error": exc.message[:500]}).encode().ljust(_HEADER))
    else:
        out.write(json.dumps({"sr": sr, "n": len(wav)}).encode().ljust(_HEADER))
        out.write(wav.tobytes())
    out.flush()


__all__ = ["CHILD_MEMORY", "CHILD_TIMEOUT_S", "DECODERS", "MAX_ALAC_FRAME", "MAX_EDITS", "MAX_MP4_BOXES",
           "MAX_MP4_SAMPLES", "MAX_PACKETS", "MAX_STREAMS", "check_mp4", "decode", "decode_here", "import_av", "sniff"]
