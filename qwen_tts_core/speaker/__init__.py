"""Speaker encoder (ECAPA-TDNN x-vector) of the Qwen3-TTS Base models and its log-mel front end."""

from .build import (
    PREFIX,
    full_config,
    probe_waveforms,
    random_speaker_encoder_state,
    speaker_encoder_from_state,
    tiny_config,
)
from .config import SpeakerEncoderConfig
from .ecapa import EcapaTdnn, min_speaker_samples, speaker_embedding
from .mel import SPEAKER_MEL, MelSpec, log_mel_spectrogram, slaney_mel_filterbank

__all__ = [
    "PREFIX",
    "SPEAKER_MEL",
    "EcapaTdnn",
    "MelSpec",
    "SpeakerEncoderConfig",
    "full_config",
    "log_mel_spectrogram",
    "min_speaker_samples",
    "probe_waveforms",
    "random_speaker_encoder_state",
    "slaney_mel_filterbank",
    "speaker_embedding",
    "speaker_encoder_from_state",
    "tiny_config",
]
