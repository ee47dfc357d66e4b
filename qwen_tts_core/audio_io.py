"""Reference-audio input: decode what callers send (path, base64, bytes, array, optional URL) into mono float32,
validate it, and resample to the 24 kHz the speaker encoder expects.

Every rejection is a `RequestError` (a ValueError) naming the argument (`argument=`) in its `field`, so HTTP layers can
map it to a 4xx naming the field.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Union

import numpy as np
import soundfile as sf

from .errors import RequestError

logger = logging.getLogger(__name__)

TARGET_SR = 24000
SILENCE_PEAK = 1e-4
"""Audio whose every |sample| is below this is rejected as silent."""
MAX_URL_BYTES = 64 * 1024 * 1024
MAX_CHANNELS = 32

AudioInput = Union[str, os.PathLike, bytes, bytearray, tuple]  # noqa: UP007 (a runtime alias on py3.10)

_BASE64_RE = re.compile(r"^[A-Za-z0-9+/_\-\s]+={0,2}\s*$")
_MIN_BASE64_CHARS = 64


def _is_url(s: str) -> bool:
    try:
        parsed = urllib.parse.urlparse(s)
    except ValueError:
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _decode_base64(s: str, argument: str) -> bytes:
    payload = s.strip()
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


def _read_bytes(data: bytes, argument: str, what: str) -> tuple[np.ndarray, int]:
    if not data:
        raise RequestError(argument, f"{what} is empty")
    try:
        with io.BytesIO(data) as f:
            audio, sr = sf.read(f, dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise RequestError(argument, f"could not decode {what} as audio ({exc})") from None
    return audio, int(sr)


def _read_path(path: Path, argument: str) -> tuple[np.ndarray, int]:
    if not path.is_file():
        raise RequestError(argument, f"no such audio file: {str(path)[:200]!r}")
    try:
        audio, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise RequestError(argument, f"could not decode audio file {path.name!r} ({exc})") from None
    return audio, int(sr)


def _fetch_url(url: str, argument: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (scheme checked by caller)
            data = resp.read(MAX_URL_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RequestError(argument, f"could not fetch audio URL ({exc})") from None
    if len(data) > MAX_URL_BYTES:
        raise RequestError(argument, f"audio at URL is larger than {MAX_URL_BYTES} bytes")
    return data


def _decode_string(x: str, argument: str, allow_urls: bool, url_timeout: float) -> tuple[np.ndarray, int]:
    s = x.strip()
    if not s:
        raise RequestError(argument, "empty string; expected a file path, base64 audio or (array, sr)")
    if s.startswith("data:"):
        return _read_bytes(_decode_base64(s, argument), argument, "base64 data URI")
    if _is_url(s):
        if not allow_urls:
            raise RequestError(argument, "URLs are not accepted here (allow_urls=False); send a file path, base64 audio "
                "or (array, sr)"
            )
        return _read_bytes(_fetch_url(s, argument, url_timeout), argument, "audio at URL")
    if "://" in s[:16]:
        raise RequestError(argument, "unsupported URL scheme; allowed: http, https (with allow_urls=True)")
    if len(s) < 4096:
        try:
            if Path(s).is_file():
                return _read_path(Path(s), argument)
        except OSError:
            pass
    if len(s) >= _MIN_BASE64_CHARS and _BASE64_RE.match(s):
        return _read_bytes(_decode_base64(s, argument), argument, "base64 audio")
    raise RequestError(argument, "string is neither an existing audio file, base64 audio, nor (with allow_urls=True) an "
        "http(s) URL"
    )


def _as_mono(audio: np.ndarray, argument: str) -> np.ndarray:
    """[N] or [N, channels] -> [N] float32 (channel mean, as the reference does over the last axis)."""
    if audio.ndim == 2:
        if audio.shape[1] > MAX_CHANNELS:
            raise RequestError(argument, f"2-D audio must be [samples, channels] with at most {MAX_CHANNELS} channels, got "
                f"shape {audio.shape} (transpose a [channels, samples] array)"
            )
        audio = audio.mean(axis=-1)
    if audio.ndim != 1:
        raise RequestError(argument, f"audio must be 1-D [samples] or 2-D [samples, channels], got shape "
                         f"{audio.shape}")
    return np.ascontiguousarray(audio, dtype=np.float32)


def validate_waveform(wav: np.ndarray, sr: int, *, argument: str = "ref_audio") -> None:
    """Reject empty, non-finite or silent mono audio and bad sample rates (ValueError naming `argument`)."""
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise RequestError(argument, f"sample rate must be a positive integer, got {sr!r}")
    if wav.size == 0:
        raise RequestError(argument, "audio is empty (0 samples)")
    if not np.isfinite(wav).all():
        raise RequestError(argument, "audio contains NaN or infinite samples")
    peak = float(np.abs(wav).max())
    if peak < SILENCE_PEAK:
        raise RequestError(argument, f"audio is silent (peak |x| = {peak:.2e} < {SILENCE_PEAK:g})")
    if peak > 1.0:
        logger.warning("%s: audio peak %.3f exceeds 1.0", argument, peak)


def load_audio(
    x: AudioInput,
    *,
    argument: str = "ref_audio",
    allow_urls: bool = False,
    url_timeout: float = 10.0,
) -> tuple[np.ndarray, int]:
    """Decode one reference audio into mono float32 at its own sample rate.

    Args:
        x: a local file path (str or PathLike; wav/flac/ogg/... via libsndfile), base64 audio (raw, or a
            `data:audio/...;base64,` URI), raw file bytes, a `(np.ndarray, sr)` tuple ([N] or [N, channels]),
            or an http(s) URL when `allow_urls=True`.
        argument: the caller-facing name used in error messages.
        allow_urls: fetch http(s) URLs (off by default: a server must not fetch arbitrary URLs for clients).
        url_timeout: seconds for a URL fetch.

    Returns:
        (wav [N] float32 mono, sample rate). Multi-channel audio is averaged to mono.

    Raises:
        ValueError: naming `argument`, for unsupported types, undecodable/corrupt data, URLs when not allowed,
            empty, silent (peak < 1e-4) or non-finite audio, and bad sample rates.
    """
    if isinstance(x, tuple):
        if len(x) != 2 or not isinstance(x[0], np.ndarray):
            raise RequestError(argument, "a tuple must be (np.ndarray waveform, sample_rate)")
        arr, sr = x
        if not np.issubdtype(arr.dtype, np.floating):
            raise RequestError(argument, f"waveform must be a float array in [-1, 1], got dtype {arr.dtype} "
                "(convert integer PCM first, e.g. x / 32768)"
            )
        if isinstance(sr, bool) or not isinstance(sr, (int, np.integer, float)) or int(sr) != sr:
            raise RequestError(argument, f"sample rate must be a positive integer, got {sr!r}")
        audio, sr = arr.astype(np.float32), int(sr)
    elif isinstance(x, np.ndarray):
        raise RequestError(argument, "a bare array has no sample rate; pass (waveform, sample_rate)")
    elif isinstance(x, (bytes, bytearray, memoryview)):
        audio, sr = _read_bytes(bytes(x), argument, "audio bytes")
    elif isinstance(x, os.PathLike):
        audio, sr = _read_path(Path(x), argument)
    elif isinstance(x, str):
        audio, sr = _decode_string(x, argument, allow_urls, url_timeout)
    else:
        raise RequestError(argument, f"unsupported type {type(x).__name__}; allowed: file path, base64 string, bytes, "
            "(np.ndarray, sample_rate), http(s) URL with allow_urls=True"
        )
    wav = _as_mono(audio, argument)
    validate_waveform(wav, sr, argument=argument)
    return wav, sr


def to_24k(wav: np.ndarray, sr: int, *, argument: str = "ref_audio") -> np.ndarray:
    """Resample mono audio to 24 kHz like the reference (librosa.resample default: soxr "HQ", then trim/zero-pad
    to ceil(N * 24000 / sr) samples).

    Args:
        wav: [N] mono waveform (cast to float32).
        sr: its sample rate.

    Returns:
        float32 [ceil(N * 24000 / sr)]; the input itself (as float32) when sr is already 24000.
    """
    import soxr

    wav = np.asarray(wav)
    if wav.ndim != 1:
        raise RequestError(argument, f"to_24k expects mono [N] audio, got shape {wav.shape}")
    if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)) or sr <= 0:
        raise RequestError(argument, f"sample rate must be a positive integer, got {sr!r}")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if not np.isfinite(wav).all():
        raise RequestError(argument, "audio contains NaN or infinite samples")
    if sr == TARGET_SR:
        return wav
    n_out = int(np.ceil(wav.shape[0] * (float(TARGET_SR) / sr)))
    out = soxr.resample(wav, sr, TARGET_SR, quality="soxr_hq")
    if out.shape[0] > n_out:
        out = out[:n_out]
    elif out.shape[0] < n_out:
        out = np.pad(out, (0, n_out - out.shape[0]))
    return np.ascontiguousarray(out, dtype=np.float32)


def load_audio_24k(
    x: AudioInput, *, argument: str = "ref_audio", allow_urls: bool = False, url_timeout: float = 10.0
) -> np.ndarray:
    """`load_audio` then `to_24k`: mono float32 [N'] at 24 kHz, ready for `speaker_embedding`."""
    wav, sr = load_audio(x, argument=argument, allow_urls=allow_urls, url_timeout=url_timeout)
    return to_24k(wav, sr, argument=argument)
