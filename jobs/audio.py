"""PCM helpers for jobs: join chunks with pauses, resample for telephony, encode WAV/FLAC/u-law/A-law."""

from __future__ import annotations

import io

import numpy as np

# longest pause between chunks, seconds: beyond this it is no pause but a gap of silence, and each one is
# allocated (--pause 1e5 would be gigabytes per gap; inf cannot be allocated at all)
MAX_PAUSE_S = 60


def check_pause(pause_s: float) -> float:
    """`pause_s` if it is a number of seconds in [0, MAX_PAUSE_S] (finite), else ValueError."""
    if not 0 <= pause_s <= MAX_PAUSE_S:  # NaN fails too
        raise ValueError(f"pause must be in [0, {MAX_PAUSE_S}] seconds, got {pause_s!r}")
    return pause_s


# format -> (soundfile container, subtype, file extension, content type)
ENCODINGS: dict[str, tuple[str, str, str, str]] = {
    "wav": ("WAV", "PCM_16", "wav", "audio/wav"),
    "flac": ("FLAC", "PCM_16", "flac", "audio/flac"),
    "wav-ulaw": ("WAV", "ULAW", "wav", "audio/wav"),
    "wav-alaw": ("WAV", "ALAW", "wav", "audio/wav"),
}


def join_chunks(chunks: list[np.ndarray], sample_rate: int, pause_s: float) -> np.ndarray:
    """Concatenate mono float32 chunks [N_i] with `pause_s` seconds of silence between them."""
    check_pause(pause_s)
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    gap = np.zeros(int(round(pause_s * sample_rate)), dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, c in enumerate(chunks):
        if i:
            parts.append(gap)
        parts.append(np.asarray(c, dtype=np.float32).reshape(-1))
    return np.concatenate(parts)


def resample(pcm: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited resampling of mono float32 [N] (soxr HQ); identity when the rates match."""
    if sr_in == sr_out:
        return np.asarray(pcm, dtype=np.float32)
    import soxr

    return soxr.resample(np.asarray(pcm, dtype=np.float32), sr_in, sr_out, quality="HQ").astype(np.float32)


def encode(pcm: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """Mono float32 [N] in [-1, 1] -> file bytes in `fmt` (one of ENCODINGS).

    Zero samples give a valid file: a WAV with an empty data chunk; a FLAC of one silent sample, since libsndfile
    writes no byte of FLAC without a sample and a FLAC header cannot say "zero samples" (0 means unknown length).
    """
    import soundfile as sf

    if fmt not in ENCODINGS:
        raise ValueError(f"format must be one of {list(ENCODINGS)}, got {fmt!r}")
    if not np.isfinite(pcm).all():  # clipping would turn NaN into full-scale samples
        raise ValueError("cannot encode non-finite samples (NaN/inf)")
    container, subtype, _, _ = ENCODINGS[fmt]
    if container == "FLAC" and not np.size(pcm):
        pcm = np.zeros(1, np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.clip(pcm, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """File bytes -> (mono float32 [N], sample rate); raises on anything soundfile cannot read."""
    import soundfile as sf

    pcm, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    return pcm, sr

