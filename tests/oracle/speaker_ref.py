"""Oracle for the speaker encoder, its mel front end and reference-audio loading (runs in .venv-oracle).

Usage:
  speaker_ref.py mel IN.safetensors OUT.safetensors
      IN: 1-D float32 waveforms at 24 kHz. OUT: `filterbank` (librosa slaney mel) and `mel.<key>` from the official
      mel_spectrogram with the speaker encoder's settings ([1, 128, T]).
  speaker_ref.py embed CFG.json WEIGHTS.safetensors IN.safetensors OUT.safetensors
      Builds the official Qwen3TTSSpeakerEncoder from CFG (the speaker_encoder_config dict), loads WEIGHTS
      (`speaker_encoder.*` names, prefix stripped, strict) and writes `emb.<key>` = extract_speaker_embedding(wav).
  speaker_ref.py audio MANIFEST.json IN.safetensors OUT.safetensors
      MANIFEST: {"load": [str, ...], "tuples": [[key, sr], ...], "resample": [[key, sr], ...]}.
      `load.<i>` / `load_sr.<i>`: the official wrapper's _normalize_audio_inputs on each string;
      `tuple.<key>`: the same on (IN[key], sr); `resample.<key>`: librosa.resample(IN[key], orig_sr=sr, 24000).
"""

from __future__ import annotations

import json
import sys
import types

import librosa
import numpy as np
import torch
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file as load_pt

torch.set_num_threads(2)


def mel_mode(src: str, dst: str) -> None:
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    out = {
        "filterbank": librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000),
    }
    for key, wav in load_np(src).items():
        mel = mel_spectrogram(torch.from_numpy(wav).unsqueeze(0), n_fft=1024, num_mels=128,
                              sampling_rate=24000, hop_size=256, win_size=1024, fmin=0, fmax=12000)
        out[f"mel.{key}"] = mel.numpy()
    save_np(out, dst)


def embed_mode(cfg_path: str, weights: str, src: str, dst: str) -> None:
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSSpeakerEncoderConfig
    from qwen_tts.core.models.modeling_qwen3_tts import (
        Qwen3TTSForConditionalGeneration,
        Qwen3TTSSpeakerEncoder,
    )

    with open(cfg_path) as f:
        cfg = Qwen3TTSSpeakerEncoderConfig(**json.load(f))
    encoder = Qwen3TTSSpeakerEncoder(cfg)
    state = {k[len("speaker_encoder."):]: v for k, v in load_pt(weights).items()}
    encoder.load_state_dict(state, strict=True)
    encoder.eval()
    # extract_speaker_embedding only touches .speaker_encoder, .device and .dtype of the model.
    fake = types.SimpleNamespace(speaker_encoder=encoder, device=torch.device("cpu"), dtype=torch.float32)
    out = {}
    for key, wav in load_np(src).items():
        emb = Qwen3TTSForConditionalGeneration.extract_speaker_embedding(fake, audio=wav, sr=24000)
        out[f"emb.{key}"] = emb.float().numpy()
    save_np(out, dst)


def audio_mode(manifest_path: str, src: str, dst: str) -> None:
    from qwen_tts.inference.qwen3_tts_model import Qwen3TTSModel

    with open(manifest_path) as f:
        manifest = json.load(f)
    wavs = load_np(src) if manifest.get("tuples") or manifest.get("resample") else {}
    wrapper = object.__new__(Qwen3TTSModel)  # the loading helpers use no model state
    out: dict[str, np.ndarray] = {}
    for i, item in enumerate(manifest.get("load", [])):
        (wav, sr), = wrapper._normalize_audio_inputs([item])
        out[f"load.{i}"] = np.ascontiguousarray(wav, dtype=np.float32)
        out[f"load_sr.{i}"] = np.array([sr], dtype=np.int64)
    for key, sr in manifest.get("tuples", []):
        (wav, _sr), = wrapper._normalize_audio_inputs([(wavs[key], sr)])
        out[f"tuple.{key}"] = np.ascontiguousarray(wav, dtype=np.float32)
    for key, sr in manifest.get("resample", []):
        out[f"resample.{key}"] = librosa.resample(y=wavs[key].astype(np.float32), orig_sr=int(sr),
                                                  target_sr=24000)
    save_np(out, dst)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"mel": mel_mode, "embed": embed_mode, "audio": audio_mode}[mode](*args)
