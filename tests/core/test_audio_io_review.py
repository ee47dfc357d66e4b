"""Reference-audio input (audio_io): resampled lengths, URL fetches, hostile sample rates and FLAC headers."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_tts_core.audio_io import TARGET_SR, to_24k


@pytest.mark.parametrize("sr", [44100, 22050, 48000, 16000, 8000, 24000])
def test_120_s_at_any_rate_resamples_to_exactly_120_s_at_24k(sr):
    # 120 s is the duration limit; one sample more encodes to 1501 codec frames, which generation refuses.
    wav = np.zeros(120 * sr, dtype=np.float32)
    wav[::97] = 0.1
    out = to_24k(wav, sr)
    assert out.shape == (120 * TARGET_SR,) and out.dtype == np.float32


@pytest.mark.parametrize(("n", "sr"), [(1, 44100), (44099, 44100), (44101, 44100), (7, 22050), (3, 48000),
                                       (12345, 11025)])
def test_resampled_length_is_the_exact_ceiling(n, sr):
    wav = np.full(n, 0.1, dtype=np.float32)
    assert to_24k(wav, sr).shape == (-(-n * TARGET_SR // sr),)
