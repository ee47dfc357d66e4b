"""Fixtures for the speaker-encoder tests: deterministic test signals and a per-test-session scratch folder."""

from __future__ import annotations

import numpy as np
import pytest

SR = 24000


def speechlike(seconds: float, f0: float, seed: int) -> np.ndarray:
    """Harmonic tone with a wobbling pitch, syllable gating and a noise floor; float32, peak ~0.6."""
    rng = np.random.RandomState(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 1.3 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SR
    voiced = sum(np.sin(k * phase) / k**1.2 for k in range(1, 30) if f0 * k < 10000)
    gate = np.clip(np.sin(2 * np.pi * (2.0 + rng.rand()) * t + rng.rand()), 0.05, None)
    wav = voiced * gate + 0.02 * rng.randn(n)
    return (0.6 * wav / np.abs(wav).max()).astype(np.float32)


@pytest.fixture(scope="session")
def signals() -> dict[str, np.ndarray]:
    """24 kHz mono test signals of different lengths and content."""
    rng = np.random.RandomState(7)
    return {
        "low_voice": speechlike(1.3, 105.0, 1),
        "high_voice": speechlike(0.9, 230.0, 2),
        "noise": (0.25 * rng.randn(int(0.7 * SR))).astype(np.float32),
        "long_voice": speechlike(3.1, 160.0, 3),
        "odd_len": speechlike(0.1 + 1237 / SR, 140.0, 4),
    }
