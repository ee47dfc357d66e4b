"""Reference-audio input: decode what callers send (path, base64, bytes, array, optional URL) into mono float32,
validate it, and resample to the 24 kHz the speaker encoder expects.

Every rejection is a `RequestError` (a ValueError) naming the argument (`argument=`) in its `field`, so HTTP layers can
map it to a 4xx naming the field.

Limits (`AudioLimits`, defaults in `DEFAULT_LIMITS`) are checked from the file's HEADER before anything is decoded:
bytes, sample rate (a WAV claiming 1 Hz would be resampled 24,000-fold), channels, duration and decoded size. The
header is read by libsndfile (`soundfile.SoundFile` exposes rate, channels and frames without decoding); for
RIFF/WAVE the duration is also taken from the `data` chunk's declared size, so a header that claims hours is refused
even where libsndfile trims the count to the bytes present. Arrays passed in directly get the same rate and length
checks before resampling.

What libsndfile cannot open (MP4/M4A/AAC phone recordings, WebM/Opus from browsers) falls back to PyAV when its first
bytes are such a container (`audio_decode_av.py`): the same limits, checked on the samples as they are decoded (no
declared duration is trusted), with the demuxer bounded. PyAV is imported only then (`pip install av`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import http.client
import io
import logging
import math
import os
import re
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np

from .errors import RequestError, RequestFetchError, RequestFileNotFound, RequestTypeError, shown
from .types import SAMPLE_RATE

if TYPE_CHECKING:
    import soundfile

logger = logging.getLogger(__name__)

TARGET_SR = SAMPLE_RATE
SILENCE_PEAK = 1e-4
MAX_PEAK = 100.0
"""Float audio lives in [-1, 1]; a slightly hot recording goes a little beyond (a warning), but a peak above this
is not a recording (integer PCM stored as floats, 1e30 in a float WAV): refused, where it gave NaN deep in the
speaker encoder and a voice that speaks noise."""
"""Audio whose every |sample| is below this is rejected as silent."""
MAX_URL_BYTES = 64 * 1024 * 1024
MAX_CHANNELS = 32


@dataclass(frozen=True)
class AudioLimits:
    """What one reference audio may cost. Checked before decoding (from the header) and before resampling."""

    max_bytes: int = 64 * 1024 * 1024     # encoded size (file, bytes, base64 payload, URL body)
    max_seconds: float = 120.0            # a voice reference needs seconds, not minutes
    min_sample_rate: int = 8000           # below telephone rate a voice is unusable (and resampling explodes)
    max_sample_rate: int = 384000
    max_channels: int = MAX_CHANNELS
    max_samples: int = 32 * 1024 * 1024   # frames x channels decoded at once (128 MiB of float32)

    def check_header(self, sr: int, channels: int, frames: int, argument: str, size: int | None = None) -> None:
        """RequestError naming `argument` when a header's numbers exceed a limit (nothing is decoded here)."""
        if size is not None and size > self.max_bytes:
            raise RequestError(argument, f"audio is larger than {self.max_bytes} bytes ({size})")
        if not self.min_sample_rate <= sr <= self.max_sample_rate:
            # shown(): an integer of over 4300 digits cannot be formatted at all (ValueError), and 10**400 echoed
            # 400 digits
            raise RequestError(argument, f"sample rate {shown(sr)} Hz is outside [{self.min_sample_rate}, "
                               f"{self.max_sample_rate}] Hz")
        if channels < 1 or channels > self.max_channels:
            raise RequestError(argument, f"{channels} channels; at most {self.max_channels} are accepted")
        if frames / sr > self.max_seconds:
            raise RequestError(argument, f"audio is {_duration(frames / sr)} long; at most {self.max_seconds:g} s "
                               "are accepted")
        if frames * channels > self.max_samples:
            raise RequestError(argument, f"audio has {frames * channels} samples ({channels} channels); at most "
                               f"{self.max_samples} are decoded")


DEFAULT_LIMITS = AudioLimits()


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds:.1f} s"


def _riff_declared_frames(data: bytes, block_align: int) -> int | None:
    """Frames the `data` chunk of a RIFF/WAVE file declares (header bytes only); None when not WAVE, when no data
    chunk header is found in the first 64 KiB, or when the size is a streaming placeholder (0 or 0xFFFFFFFF)."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE" or block_align < 1:
        return None
    order = "<" if data[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= min(len(data), 65536):
        cid, (size,) = data[pos:pos + 4], struct.unpack(order + "I", data[pos + 4:pos + 8])
        if cid == b"data":
            return None if size in (0, 0xFFFFFFFF) else size // block_align
        pos += 8 + size + (size & 1)
    return None

AudioInput = Union[str, os.PathLike, bytes, bytearray, tuple]  # noqa: UP007 (a runtime alias on py3.10)

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_MIN_BASE64_CHARS = 64


def _is_url(s: str) -> bool:
    try:
        parsed = urllib.parse.urlparse(s)
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _decode_base64(s: str, argument: str, limits: AudioLimits = DEFAULT_LIMITS) -> bytes:
    payload = s.strip()
    if len(payload) > limits.max_bytes * 4 // 3 + 4096:
        raise RequestError(argument, f"base64 audio is larger than {limits.max_bytes} bytes once decoded")
    if payload.startswith("data:"):
        header, sep, payload = payload.partition(",")
        if not sep or ";base64" not in header:
            raise RequestError(argument, "data URI must look like 'data:audio/<type>;base64,<data>'")
    payload = "".join(payload.split())
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(argument, f"invalid base64 audio ({exc})") from None


def _decode(f: soundfile.SoundFile, argument: str, what: str, limits: AudioLimits, size: int,
            head: bytes) -> tuple[np.ndarray, int]:
    """Check `f`'s header against `limits`, then decode it all (float32, [N] or [N, channels])."""
    import soundfile as sf  # lazily: array inputs (and GPU hosts without it) never need it
    sr, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
    block_align = channels * {"PCM_U8": 1, "PCM_S8": 1, "PCM_16": 2, "PCM_24": 3, "PCM_32": 4, "FLOAT": 4,
                              "DOUBLE": 8, "ULAW": 1, "ALAW": 1}.get(f.subtype, 0)
    declared = _riff_declared_frames(head, block_align) if block_align else None
    unknown = frames >= _UNKNOWN_FRAMES
    limits.check_header(sr, channels, 0 if unknown else max(frames, declared or 0), argument, size)
    try:
        if unknown:
            return _decode_unknown_length(f, argument, limits, sr, channels), sr
        audio = f.read(dtype="float32", always_2d=False)
    except RequestError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise RequestError(argument, f"could not decode {what} as audio ({_reason(exc)})") from None
    return audio, sr


_UNKNOWN_FRAMES = 2**63 - 1
"""libsndfile's frame count for a file whose header gives no length (SF_COUNT_MAX): a FLAC whose STREAMINFO
total_samples is 0 ("unknown", allowed by the spec, written by streaming encoders) was refused as 106751991167.3 h."""

_BLOCK_FRAMES = 1 << 16


def _decode_unknown_length(f: soundfile.SoundFile, argument: str, limits: AudioLimits, sr: int,
                           channels: int) -> np.ndarray:
    """Decode a file whose header gives no length in blocks, refusing it once what was decoded passes
    `limits.max_seconds` or `limits.max_samples` (never more than that is held)."""
    allowed = min(math.floor(limits.max_seconds * sr), limits.max_samples // channels)
    # soundfile seeks to where each read ended, and libsndfile cannot seek to the end of such a FLAC ("Internal
    # psf_fseek() failed" on the last block): read it as the stream it is
    f.seekable = lambda: False
    blocks, total = [], 0
    while True:
        block = f.read(min(_BLOCK_FRAMES, allowed + 1 - total), dtype="float32", always_2d=True)
        if block.shape[0] == 0:
            break
        blocks.append(block)
        total += block.shape[0]
        if total > allowed:
            raise RequestError(argument, f"audio is longer than {limits.max_seconds:g} s or {limits.max_samples} "
                                         "samples (its header gives no length; decoding stopped there)")
    audio = np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)
    return audio[:, 0] if channels == 1 else audio


def _reason(exc: Exception) -> str:
    """libsndfile's reason without what it was given ("Error opening <_io.BytesIO object at 0x7f...>: ...": an
    address of this process, and for a path the server's file names, do not go back to a client)."""
    return str(getattr(exc, "error_string", None) or exc).split(": ")[-1][:200]


def _read_bytes(data: bytes, argument: str, what: str,
                limits: AudioLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    import soundfile as sf  # lazily: array inputs (and GPU hosts without it) never need it
    if not data:
        raise RequestError(argument, f"{what} is empty")
    if len(data) > limits.max_bytes:
        raise RequestError(argument, f"{what} is larger than {limits.max_bytes} bytes ({len(data)})")
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        refused = RequestError(argument, f"could not decode {what} as audio ({_reason(exc)})")
    else:
        with f:
            return _decode(f, argument, what, limits, len(data), data[:65536])
    return _fallback(data, refused, argument, what, limits)


def _fallback(data: bytes, refused: RequestError, argument: str, what: str,
              limits: AudioLimits) -> tuple[np.ndarray, int]:
    """Bytes libsndfile refused: decoded through PyAV when they are a container it reads (MP4/M4A, AAC, WebM,
    Ogg; audio_decode_av.py, with the same limits), else libsndfile's error `refused`."""
    from . import audio_decode_av

    found = audio_decode_av.sniff(data[:65536])
    if found is None:
        raise refused
    fmt, kind = found
    return audio_decode_av.decode(data, fmt, kind, argument, what, limits)


def _read_path(path: Path, argument: str, limits: AudioLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    import soundfile as sf  # lazily: array inputs (and GPU hosts without it) never need it
    if not path.is_file():   # missing: also a FileNotFoundError, as a str path (and the reference) give
        raise (RequestError if path.exists() else RequestFileNotFound)(
            argument, f"no such audio file: {str(path)[:200]!r}")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise RequestError(argument, f"audio file {path.name!r} is larger than {limits.max_bytes} bytes ({size})")
    what, head = f"audio file {path.name!r}", b""
    try:
        with open(path, "rb") as raw:
            head = raw.read(65536)
        f = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OSError) as exc:
        refused = RequestError(argument, f"could not decode {what} ({_reason(exc)})")
    else:
        with f:
            return _decode(f, argument, what, limits, size, head)
    from .audio_decode_av import sniff

    if sniff(head) is None:
        raise refused
    try:
        with open(path, "rb") as raw:
            data = raw.read(limits.max_bytes + 1)
    except OSError as exc:
        raise RequestError(argument, f"could not read {what} ({exc.strerror})") from None
    if len(data) > limits.max_bytes:
        raise RequestError(argument, f"{what} is larger than {limits.max_bytes} bytes")
    return _fallback(data, refused, argument, what, limits)


_URL_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f-\x9f\s]")
"""Whitespace and control characters: http.client refuses them in a request line (InvalidURL) and they have no place
in a URL; percent-encoded (%20) they are fine."""


def _check_url(url: str, argument: str) -> None:
    """RequestError naming `argument` for a URL that cannot be sent as it is: whitespace or control characters, a
    port that is not a number in [0, 65535] (http.client raised InvalidURL for both)."""
    if _URL_UNSAFE_RE.search(url):
        raise RequestError(argument, "the URL contains whitespace or control characters; percent-encode them "
                                     "(a space is %20)")
    try:
        _ = urllib.parse.urlsplit(url).port
    except ValueError:
        raise RequestError(argument, "the URL's host or port is invalid (a port is a number in [0, 65535])") from None


def _fetch_reason(exc: BaseException) -> str:
    """What went wrong in a fetch, bounded (a bad status line is echoed by http.client, up to 64 KiB of it)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, http.client.HTTPException) and not isinstance(exc, http.client.IncompleteRead):
        text = f"{type(exc).__name__}: {text}"
    elif isinstance(exc, http.client.IncompleteRead):
        text = "the connection closed before the whole body was sent"
    return text if len(text) <= 200 else f"{text[:200]}..."


MAX_URL_REDIRECTS = 5
"""Redirects a URL fetch follows (each to http or https only)."""


class _Deadline:
    """One URL fetch's whole time (connect, TLS, headers, body, redirects included): `url_timeout` bounded each socket
    operation only, so a server sending a byte every half second held the call for as long as it liked.

    Each connection's socket is watched through a duplicate of it (its own descriptor, closed here, so a descriptor
    the fetch closed and the process reused is never touched); when the time passes a timer shuts the connection
    down, which ends whatever read is blocked on it. Name resolution is not interruptible (it never was)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._watched: list[socket.socket] = []
        self._passed = self._closed = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def passed(self) -> bool:
        return self._passed or time.monotonic() >= self.at

    def remaining(self) -> float:
        """Seconds left; TimeoutError once none are."""
        left = self.at - time.monotonic()
        if left <= 0 or self._passed:
            raise TimeoutError(f"not fetched within {self.seconds:g} s")
        return left

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            if self._closed:
                dup.close()
                return
            self._watched.append(dup)
            if self._passed:
                self._shut(dup)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _expire(self) -> None:
        with self._lock:
            self._passed = True
            for sock in self._watched:
                self._shut(sock)

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._closed = True
            for sock in self._watched:
                sock.close()
            self._watched.clear()


def _deadline_connection(base: type, deadline: _Deadline) -> type:
    """`base` (HTTPConnection or HTTPSConnection) connecting within what is left of `deadline`, its socket
    watched by it."""

    class Connection(base):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)

            def create(address, timeout=None, source_address=None, *rest, **kw):
                left = deadline.remaining()
                timeout = left if not isinstance(timeout, (int, float)) else min(timeout, left)
                sock = socket.create_connection(address, timeout, source_address, *rest, **kw)
                try:
                    deadline.watch(sock)
                except BaseException:
                    sock.close()
                    raise
                return sock

            self._create_connection = create

    return Connection


class _WithinDeadline:
    """Mixed into urllib's HTTP(S) handler: its connections are made within `deadline` (`_deadline_connection`)."""

    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self._deadline = deadline

    def do_open(self, http_class, req, **kwargs):
        return super().do_open(_deadline_connection(http_class, self._deadline), req, **kwargs)


class _DeadlineHTTPHandler(_WithinDeadline, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPSHandler(_WithinDeadline, urllib.request.HTTPSHandler):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most MAX_URL_REDIRECTS redirects, each to http or https: urllib's own handler also followed
    ftp:// (only the first URL's scheme was checked), and 10 redirects."""

    max_redirections = MAX_URL_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https") or _URL_UNSAFE_RE.search(newurl):
            raise urllib.error.HTTPError(newurl, code, f"a redirect to a {shown(scheme)} URL is not followed "
                                         "(only http and https are)", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(deadline: _Deadline) -> urllib.request.OpenerDirector:
    """urllib's opener for http(s) only: no ftp/file/data handlers, redirects bounded and to http(s) only, every
    connection within `deadline`."""
    opener = urllib.request.OpenerDirector()
    handlers = [urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), _DeadlineHTTPHandler(deadline),
                urllib.request.HTTPDefaultErrorHandler(), _HttpOnlyRedirects(), urllib.request.HTTPErrorProcessor()]
    if hasattr(urllib.request, "HTTPSHandler"):   # Python built with ssl
        handlers.append(_DeadlineHTTPSHandler(deadline))
    for handler in handlers:
        opener.add_handler(handler)
    return opener


def _fetch_url(url: str, argument: str, timeout: float, max_bytes: int = MAX_URL_BYTES) -> bytes:
    """GET an http(s) URL's body: at most `max_bytes`, within `timeout` seconds for the whole fetch."""
    _check_url(url, argument)   # (its scheme is http or https: `_is_url`, the one caller's test)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise RequestError("url_timeout", f"must be a positive number of seconds, got {shown(timeout)}")
    deadline = _Deadline(float(timeout))
    try:
        body = bytearray()
        with _opener(deadline).open(url, timeout=deadline.remaining()) as resp:
            while len(body) <= max_bytes:
                deadline.remaining()
                chunk = resp.read(min(65536, max_bytes + 1 - len(body)))
                if not chunk:
                    break
                body += chunk
        deadline.remaining()   # a read the timer cut short reads as the end of the body: not a complete one
        data = bytes(body)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        # http.client's errors (a bad status line, a truncated body, a header line past 64 KiB, over 100 headers)
        # are no OSError: they escaped raw
        if deadline.passed:
            raise RequestFetchError(argument, f"could not fetch audio URL within url_timeout={timeout:g} s") from None
        raise RequestFetchError(argument, f"could not fetch audio URL ({_fetch_reason(exc)})") from None
    finally:
        deadline.close()
    if len(data) > max_bytes:
        raise RequestError(argument, f"audio at URL is larger than {max_bytes} bytes")
    return data


def _decode_string(x: str, argument: str, allow_urls: bool, url_timeout: float,
                   limits: AudioLimits = DEFAULT_LIMITS) -> tuple[np.ndarray, int]:
    s = x.strip()
    if not s:
        raise RequestError(argument, "empty string; expected a file path, base64 audio or (array, sr)")
    if s.startswith("data:"):
        return _read_bytes(_decode_base64(s, argument, limits), argument, "base64 data URI", limits)
    if _is_url(s):
        if not allow_urls:
            raise RequestError(argument, "URLs are not accepted here (allow_urls=False); send a file path, base64 audio "
                "or (array, sr)"
            )
        return _read_bytes(_fetch_url(s, argument, url_timeout, limits.max_bytes), argument, "audio at URL",
                           limits)
    if "://" in s[:16]:
        raise RequestError(argument, "unsupported URL scheme; allowed: http, https (with allow_urls=True)")
    if len(s) < 4096:
        try:
            if Path(s).is_file():
                return _read_path(Path(s), argument, limits)
        except OSError:
            pass
    if len(s) >= _MIN_BASE64_CHARS and _BASE64_RE.match(s):
        return _read_bytes(_decode_base64(s, argument, limits), argument, "base64 audio", limits)
    raise RequestFileNotFound(argument, "string is neither an existing audio file, base64 audio, nor (with allow_urls=True) an "
        "http(s) URL"
    )


def _as_mono(audio: np.ndarray, argument: str, max_channels: int = MAX_CHANNELS) -> np.ndarray:
    """[N] or [N, channels] -> [N] float32 (channel mean, as the reference does over the last axis)."""
    if audio.ndim == 2:
        if not 1 <= audio.shape[1] <= max_channels:  # (0 channels: refused here, not averaged into NaN)
            raise RequestError(argument, f"2-D audio must be [samples, channels] with 1 to {max_channels} channels, "
                               f"got {audio.shape[1]} channels, shape {audio.shape} (transpose a [channels, samples] "
                               "array)")
        audio = audio.mean(axis=-1)
    if audio.ndim != 1:
        raise RequestError(argument, f"audio must be 1-D [samples] or 2-D [samples, channels], got shape "
                         f"{audio.shape}")
    return np.ascontiguousarray(audio, dtype=np.float32)


def validate_waveform(wav: np.ndarray, sr: int, *, argument: str = "ref_audio", silent_ok: bool = False) -> None:
    """Reject empty, non-finite or silent (unless `silent_ok`) mono audio and bad sample rates (ValueError naming
    `argument`)."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise RequestError(argument, f"sample rate must be a positive integer, got {shown(sr)}")
    if wav.size == 0:
        raise RequestError(argument, "audio is empty (0 samples)")
    if not np.isfinite(wav).all():
        raise RequestError(argument, "audio contains NaN or infinite samples")
    peak = float(np.abs(wav).max())
    if peak < float(np.float32(SILENCE_PEAK)) and not silent_ok:  # (a float32 peak of exactly 1e-4 is not silent)
        raise RequestError(argument, f"audio is silent (peak |x| = {peak:.2e} < {SILENCE_PEAK:g})")
    if peak > MAX_PEAK:
        raise RequestError(argument, f"audio peak |x| = {peak:.3g} is far beyond float audio's [-1, 1] (integer "
                                     "samples stored as floats?); scale it to [-1, 1]")
    if peak > 1.0:
        logger.warning("%s: audio peak %.3f exceeds 1.0", argument, peak)


def _is_whole(x: int | np.integer | float) -> bool:
    """x is an integer value (a float too): False for NaN and infinities, which int() refuses with its own errors."""
    return isinstance(x, int | np.integer) or (math.isfinite(x) and float(x).is_integer())


def load_audio(
    x: AudioInput,
    *,
    argument: str = "ref_audio",
    allow_urls: bool = False,
    url_timeout: float = 10.0,
    limits: AudioLimits = DEFAULT_LIMITS,
    silent_ok: bool = False,
) -> tuple[np.ndarray, int]:
    """Decode one reference audio into mono float32 at its own sample rate.

    Args:
        x: a local file path (str or PathLike; wav/flac/ogg/mp3 via libsndfile, m4a/mp4/aac/webm via PyAV),
            base64 audio (raw, or a `data:audio/...;base64,` URI), raw file bytes, a `(np.ndarray, sr)` tuple
            ([N] or [N, channels]), or an http(s) URL when `allow_urls=True`.
        argument: the caller-facing name used in error messages.
        allow_urls: fetch http(s) URLs (off by default: a server must not fetch arbitrary URLs for clients).
        url_timeout: seconds for a URL fetch.
        limits: bytes, sample rate, channels, duration and decoded size allowed (checked from the header of
            encoded audio before decoding it).
        silent_ok: take silent audio (the speech tokenizer encodes it; a voice reference must not be silent).

    Returns:
        (wav [N] float32 mono, sample rate). Multi-channel audio is averaged to mono.

    Raises:
        ValueError: naming `argument`, for unsupported types, undecodable/corrupt data, URLs when not allowed,
            empty, silent (peak < 1e-4) or non-finite audio, bad sample rates and audio outside `limits`.
    """
    if isinstance(x, tuple):
        if len(x) != 2 or not isinstance(x[0], np.ndarray):
            raise RequestTypeError(argument, "a tuple must be (np.ndarray waveform, sample_rate)")
        arr, sr = x
        if not np.issubdtype(arr.dtype, np.floating):
            raise RequestError(argument, f"waveform must be a float array in [-1, 1], got dtype {arr.dtype} "
                "(convert integer PCM first, e.g. x / 32768)"
            )
        if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float)) or not _is_whole(sr):
            raise RequestError(argument, f"sample rate must be a positive integer, got {shown(sr)}")
        wav, sr = _as_mono(arr, argument, limits.max_channels), int(sr)
        limits.check_header(sr, arr.shape[1] if arr.ndim == 2 else 1, wav.shape[0], argument)
        validate_waveform(wav, sr, argument=argument, silent_ok=silent_ok)
        return wav, sr
    elif isinstance(x, np.ndarray):
        raise RequestError(argument, "a bare array has no sample rate; pass (waveform, sample_rate)")
    elif isinstance(x, (bytes, bytearray, memoryview)):
        audio, sr = _read_bytes(bytes(x), argument, "audio bytes", limits)
    elif isinstance(x, os.PathLike):
        audio, sr = _read_path(Path(x), argument, limits)
    elif isinstance(x, str):
        audio, sr = _decode_string(x, argument, allow_urls, url_timeout, limits)
    else:
        raise RequestTypeError(argument, f"unsupported type {type(x).__name__}; allowed: file path, base64 string, bytes, "
            "(np.ndarray, sample_rate), http(s) URL with allow_urls=True"
        )
    wav = _as_mono(audio, argument, limits.max_channels)
    validate_waveform(wav, sr, argument=argument, silent_ok=silent_ok)
    return wav, sr


def to_24k(wav: np.ndarray, sr: int, *, argument: str = "ref_audio",
           limits: AudioLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Resample mono audio to 24 kHz like the reference (librosa.resample default: soxr "HQ", then trim/zero-pad
    to ceil(N * 24000 / sr) samples).

    Args:
        wav: [N] mono waveform (cast to float32).
        sr: its sample rate.
        limits: the sample rate range and length allowed (checked before resampling: its cost follows the ratio).

    Returns:
        float32 [ceil(N * 24000 / sr)]; the input itself (as float32) when sr is already 24000.
    """
    return resample(wav, sr, TARGET_SR, argument=argument, limits=limits)


def resample(wav: np.ndarray, sr: int, target_sr: int, *, argument: str = "ref_audio",
             limits: AudioLimits = DEFAULT_LIMITS) -> np.ndarray:
    """`to_24k` to any rate inside `limits`' sample-rate range (the tokenizer's `load_audio(x, target_sr)`):
    float32 [ceil(N * target_sr / sr)]; `target_sr` outside the range is a RequestError naming `target_sr`."""
    if isinstance(target_sr, bool) or not isinstance(target_sr, (int, np.integer)) or not (
            limits.min_sample_rate <= target_sr <= limits.max_sample_rate):
        raise RequestError("target_sr", f"must be an integer sample rate in [{limits.min_sample_rate}, "
                                        f"{limits.max_sample_rate}] Hz, got {shown(target_sr)}")
    target_sr = int(target_sr)
    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise RequestError(argument, f"resampling expects mono [N] audio, got shape {wav.shape}")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise RequestError(argument, f"sample rate must be a positive integer, got {shown(sr)}")
    limits.check_header(int(sr), 1, wav.shape[0], argument)
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise RequestError(argument, "audio contains NaN or infinite samples")
    if sr == target_sr:
        return wav
    import soxr  # lazily: 24 kHz input (and GPU hosts without it) never need it

    # librosa's length (the reference's): ceil(N * (target / sr)) with the ratio rounded first, one sample more than
    # the exact -(-N * target // sr) where N * target / sr is a whole number (44.1 and 22.05 kHz to 24 kHz). Kept for
    # parity, but never past what `limits.max_seconds` allowed: 120 s at 44.1 kHz came to 2,880,001 samples, one codec frame
    # past the limit generation enforces (MAX_REF_CODE_FRAMES, 1500), so the voice was made and every generation
    # refused it. Within the limit the cap is never below the exact ceiling (the input passed check_header).
    exact = -(-int(wav.shape[0]) * target_sr // int(sr))
    n_out = max(exact, min(int(np.ceil(wav.shape[0] * (float(target_sr) / sr))),
                           math.floor(limits.max_seconds * target_sr)))
    out = soxr.resample(wav, sr, target_sr, quality="soxr_hq")
    if out.shape[0] > n_out:
        out = out[:n_out]
    elif out.shape[0] < n_out:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.ascontiguousarray(out, dtype=np.float32)


def load_audio_24k(
    x: AudioInput, *, argument: str = "ref_audio", allow_urls: bool = False, url_timeout: float = 10.0,
    limits: AudioLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """`load_audio` then `to_24k`: mono float32 [N'] at 24 kHz, ready for `speaker_embedding`."""
    wav, sr = load_audio(x, argument=argument, allow_urls=allow_urls, url_timeout=url_timeout, limits=limits)
    return to_24k(wav, sr, argument=argument, limits=limits)
