"""Log-mel front end: filterbank and spectrogram equal librosa / the official `mel_spectrogram`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from qwen_tts_core.speaker.mel import (
    SPEAKER_MEL,
    MelSpec,
    log_mel_spectrogram,
    slaney_mel_filterbank,
)
from tests.oracle.common import run_oracle

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def oracle_mels(tmp_path_factory, signals):
    d = tmp_path_factory.mktemp("speaker_mel")
    save_file({k: np.ascontiguousarray(v) for k, v in signals.items()}, str(d / "in.safetensors"))
    run_oracle("speaker_ref.py", "mel", d / "in.safetensors", d / "out.safetensors")
    return load_file(str(d / "out.safetensors"))


def test_filterbank_equals_librosa(oracle_mels):
    ours = slaney_mel_filterbank(24000, 1024, 128, 0.0, 12000.0)
    ref = oracle_mels["filterbank"]
    assert ours.shape == ref.shape == (128, 513)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("key", ["low_voice", "high_voice", "noise", "long_voice", "odd_len"])
def test_log_mel_equals_reference(oracle_mels, signals, key):
    ours = log_mel_spectrogram(torch.from_numpy(signals[key])).numpy()
    ref = oracle_mels[f"mel.{key}"]
    assert ours.shape == ref.shape
    assert ours.shape[1] == 128
    assert ours.shape[2] == SPEAKER_MEL.num_frames(signals[key].shape[0])
    diff = np.abs(ours - ref).max()
    assert diff <= 1e-5, diff


def test_mel_parity_detects_a_changed_filterbank(oracle_mels, signals):
    """The comparison above can fail: a slightly different fmax moves the log-mels past the tolerance."""
    spec = MelSpec(fmax=11990.0)
    ours = log_mel_spectrogram(torch.from_numpy(signals["low_voice"]), spec).numpy()
    assert np.abs(ours - oracle_mels["mel.low_voice"]).max() > 1e-3


def test_batch_equals_single(signals):
    wav = torch.from_numpy(signals["noise"])
    batch = log_mel_spectrogram(torch.stack([wav, wav.flip(0)]))
    np.testing.assert_array_equal(batch[0].numpy(), log_mel_spectrogram(wav)[0].numpy())


def test_frame_count_and_minimum_length():
    assert SPEAKER_MEL.min_samples == 385
    assert SPEAKER_MEL.num_frames(385) == 1 + (385 + 768 - 1024) // 256
    assert log_mel_spectrogram(torch.zeros(385) + 0.1).shape == (1, 128, SPEAKER_MEL.num_frames(385))
    with pytest.raises(ValueError, match="wav has 384 samples"):
        log_mel_spectrogram(torch.zeros(384))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"wav must have shape"):
        log_mel_spectrogram(torch.zeros(1, 1, 4000))
    with pytest.raises(ValueError, match="floating point"):
        log_mel_spectrogram(torch.zeros(4000, dtype=torch.int16))
    with pytest.raises(ValueError, match="fmax"):
        MelSpec(fmax=13000.0)
