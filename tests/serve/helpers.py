"""Small helpers shared by the service tests."""

from __future__ import annotations

import io

import numpy as np


def metric(text: str, name: str, **labels: str) -> float | None:
    """A value from Prometheus text: `metric(text, "qtts_active_sessions", model="cv")`."""
    lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{lab}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


def decode_audio(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Streamed bytes of `fmt` -> (float32 mono, sample rate); reads streams of unknown length block by block."""
    import soundfile as sf

    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    f = sf.SoundFile(io.BytesIO(data))
    out = []
    try:
        while True:
            block = f.read(1024, dtype="float32")
            out.append(block)
            if len(block) < 1024:
                break
    except sf.LibsndfileError:
        pass  # libsndfile cannot seek past the end of a FLAC stream of unknown length; the data read is whole
    return (np.concatenate(out) if out else np.zeros(0, np.float32)), f.samplerate
