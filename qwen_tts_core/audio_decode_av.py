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
from .mp4_check import MAX_EDITS, MAX_MP4_BOXES, MAX_MP4_SAMPLES, MAX_STREAMS, check_mp4

if TYPE_CHECKING:
    from .audio_io import AudioLimits

MAX_PACKETS = 1 << 20
"""Packets demuxed (all streams) before a file is refused: 120 s of 2.5 ms Opus frames are 48,000."""
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
