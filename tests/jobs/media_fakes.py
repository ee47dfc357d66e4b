"""Synthesis stand-ins for the media tests (the `jobs.synth.Backend` interface; used as `--backend module:Class`).

NoiseBackend: speech-like noise (syllable envelope, 0.05 s per character), deterministic per text; "CLICK" adds
a full-scale click, "SILENT" gives digital silence, "NOTHING" no samples at all (the model ended at once), "LONGER"
makes the chunk 10x longer; voice "nobody" is unknown.
ToneBackend: a 300 Hz tone, 0.05 s per character (speed and caption timing tests).
"""

from __future__ import annotations

import zlib

import numpy as np

from jobs.synth import ChunkJob, ChunkResult

SR = 24000
SECONDS_PER_CHAR = 0.05
TONE_HZ = 300.0


def chunk_samples(text: str) -> int:
    return int(SR * SECONDS_PER_CHAR * len(text)) * (10 if "LONGER" in text else 1)


class NoiseBackend:
    calls: list[list[ChunkJob]] = []

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        NoiseBackend.calls.append(list(jobs))
        out = []
        for j in jobs:
            if j.voice == "nobody":
                out.append(ChunkResult(None, "error", "ValueError: voice: unknown speaker 'nobody'"))
                continue
            n = 0 if "NOTHING" in j.text else chunk_samples(j.text)
            rng = np.random.default_rng(zlib.crc32(f"{j.text}|{j.seed}".encode()))
            env = np.abs(np.sin(np.pi * 4 * np.arange(n) / SR)) ** 0.5
            x = 0.1 * rng.standard_normal(n) * env
            if "CLICK" in j.text:
                x[n // 2] = 0.99
            if "SILENT" in j.text:
                x[:] = 0
            out.append(ChunkResult(x.astype(np.float32), "eos"))
        return out


class ToneBackend:
    calls: list[list[ChunkJob]] = []

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        ToneBackend.calls.append(list(jobs))
        out = []
        for j in jobs:
            t = np.arange(chunk_samples(j.text)) / SR
            out.append(ChunkResult((0.3 * np.sin(2 * np.pi * TONE_HZ * t)).astype(np.float32), "eos"))
        return out


def speechlike(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Harmonics of a wandering pitch, 4 Hz syllables, 0.4 s pauses every 2.4 s: peaks ~20 dB above the level."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(120 + 25 * np.sin(2 * np.pi * 0.3 * t)) / sr
    x = sum(np.sin(k * phase) / k**1.2 for k in range(1, 20)) * np.abs(np.sin(2 * np.pi * 2 * t)) ** 1.5
    x = x + 0.02 * rng.standard_normal(t.size)
    x[(t % 2.4) > 2.0] = 0.0
    return (0.1 * x / np.max(np.abs(x))).astype(np.float32)
