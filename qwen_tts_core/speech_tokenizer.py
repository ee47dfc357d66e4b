"""`Qwen3TTSTokenizer`: a drop-in for the official 12Hz speech tokenizer wrapper, on our codec (`codec/`).

    tok = Qwen3TTSTokenizer.from_pretrained("Qwen/Qwen3-TTS-Tokenizer-12Hz")   # or a folder, or a model folder
    enc = tok.encode("speech.wav")                  # or [np.ndarray, ...] with sr=..., base64, URL, (array, sr)
    enc.audio_codes                                 # list of Long [frames, 16]
    wavs, sr = tok.decode(enc)                      # float32 numpy waveforms, 24000

Audio in: a path, base64 (raw or `data:` URI), an http(s) URL, raw bytes or `(array, sr)` (decoded by
`audio_io.load_audio`; silence is encoded, as the official does), or float numpy arrays with `sr` (mono [N] or [N, channels],
resampled by `audio_io.to_24k`); one item or a list. Codes out as the official: Long [ceil(n / 1920), 16] each, on
the tokenizer's device. Decode takes the encode output, a dict or a list of dicts with `audio_codes`, or code tensors /
arrays ([T, 16] each, or one [B, T, 16] batch right-padded with -1). Beyond 300 frames it decodes as the official does
(300-frame pieces re-decoded with 25 frames of left context). Refused input raises `RequestError` (a ValueError) naming
`audios`, `sr` or `encoded`. Only the 12Hz tokenizer exists here: a 25Hz checkpoint is a ValueError.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import HUB_ARGUMENTS, REFERENCE_DECODE_CHUNK, _resolve_device
from .audio_io import MAX_CHANNELS, AudioLimits, load_audio, resample, to_24k, validate_waveform
from .checkpoint.weights import checkpoint_dtype, read_json, resolve_checkpoint, resolve_dtype
from .codec.config import MODEL_TYPE
from .codec.load import Codec, load_codec
from .errors import RequestError, shown

log = logging.getLogger(__name__)

LIMITS = AudioLimits(max_bytes=512 * 1024 * 1024, max_seconds=1800.0, max_samples=1 << 27)
"""Audio to encode may be a whole recording (not a seconds-long voice reference): up to 30 minutes."""


class Qwen3TTSTokenizerEncodeOutput(dict):
    """What `encode` returns: `audio_codes`, one Long [frames, 16] per input. A dict, as the official's output (a
    transformers ModelOutput) is: `out["audio_codes"]`, `"audio_codes" in out`, `list(out)`, `out.items()`, and
    also `out.audio_codes`, `out[0]` and `to_tuple()`."""

    def __init__(self, audio_codes: list[torch.Tensor]) -> None:
        super().__init__(audio_codes=audio_codes)

    @property
    def audio_codes(self) -> list[torch.Tensor]:
        return dict.__getitem__(self, "audio_codes")

    def __getitem__(self, key: str | int) -> list[torch.Tensor]:
        if isinstance(key, (int, slice)) and not isinstance(key, bool):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[list[torch.Tensor]]:
        return tuple(self.values())


def _speech_tokenizer_dir(path: Path) -> Path:
    """The folder itself or its `speech_tokenizer/`; a 25Hz or non-tokenizer config is a ValueError."""
    folder = path / "speech_tokenizer" if (path / "speech_tokenizer" / "config.json").is_file() else path
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type == "qwen3_tts_tokenizer_25hz":
        raise ValueError(f"pretrained_model_name_or_path: {str(folder)!r} is a 25Hz speech tokenizer "
                         f"(qwen3_tts_tokenizer_25hz); only the 12Hz one ({MODEL_TYPE}) is supported")
    if model_type != MODEL_TYPE:
        raise ValueError(f"pretrained_model_name_or_path: {str(folder)!r} is not a 12Hz speech tokenizer folder "
                         f"(config.json model_type {shown(model_type)}, expected {MODEL_TYPE!r})")
    return folder


def _sample_rate(sr: Any) -> int:
    whole = isinstance(sr, (int, np.integer)) or (isinstance(sr, float) and math.isfinite(sr) and sr.is_integer())
    if isinstance(sr, bool) or not whole or int(sr) <= 0:
        raise RequestError("sr", f"must be a positive integer sample rate, got {shown(sr)}")
    return int(sr)


def _array_24k(a: np.ndarray, sr: Any, name: str) -> np.ndarray:
    """A float numpy waveform ([N] or [N, channels], averaged) at `sr` -> float32 mono at 24 kHz."""
    if not (np.issubdtype(a.dtype, np.floating)):
        raise RequestError(name, f"must be a float waveform in [-1, 1], got dtype {a.dtype} "
                                 "(convert integer PCM first, e.g. x / 32768)")
    if a.ndim == 2:
        if a.shape[1] > MAX_CHANNELS:
            raise RequestError(name, f"2-D audio must be [samples, channels] with at most {MAX_CHANNELS} channels, "
                                     f"got shape {a.shape} (transpose a [channels, samples] array)")
        a = a.mean(axis=-1)
    if a.ndim != 1:
        raise RequestError(name, f"must be a 1-D [samples] or 2-D [samples, channels] waveform, got shape {a.shape}")
    if sr is None:
        raise RequestError("sr", "numpy waveform input needs `sr` (its sample rate)")
    if a.size == 0:
        return np.zeros(0, dtype=np.float32)
    rate = _sample_rate(sr)
    validate_waveform(a, rate, argument=name, silent_ok=True)   # finite, and no integer PCM stored as floats
    return to_24k(a, rate, argument=name, limits=LIMITS)


def _is_pair(x: Any) -> bool:
    """`(np.ndarray, sample_rate)`: one waveform with its rate."""
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], np.ndarray) and not isinstance(x[1], np.ndarray)


def _codes_tensor(x: Any, name: str) -> torch.Tensor:
    """An integer tensor (CPU, long) from a tensor, a numpy array or nested lists."""
    if isinstance(x, torch.Tensor) and x.dtype in (torch.uint16, torch.uint32, torch.uint64):
        x = x.detach().cpu().numpy()   # (torch has no max for these on CPU) checked below
    if not isinstance(x, torch.Tensor):
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError):
            raise RequestError("encoded", f"{name} must be a tensor or array of code ids, got "
                                          f"{type(x).__name__}") from None
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise RequestError("encoded", f"{name} must hold integer code ids, got dtype {arr.dtype}")
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            # as int64 they turn negative: 2**64 - 1 would pass for -1, right padding, and be dropped
            raise RequestError("encoded", f"{name} holds code ids up to {shown(int(arr.max()))}, past any "
                                          "codebook")
        x = torch.from_numpy(arr.astype(np.int64))
    elif x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise RequestError("encoded", f"{name} must hold integer code ids, got {x.dtype}")
    return x.detach().to("cpu", torch.long)


class Qwen3TTSTokenizer:
    """The 12Hz speech tokenizer with the official wrapper's API: `from_pretrained`, `encode`, `decode` and the
    model type / sample rate / frame size getters. `codec` is our `Codec` (decoder and lazily built Mimi encoder)."""

    def __init__(self, codec: Codec, path: Path | None = None) -> None:
        self.codec = codec
        self.path = path
        self.config = codec.cfg

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, device_map: Any = None,
                        dtype: Any = None, torch_dtype: Any = None, attn_implementation: str | None = None,
                        revision: str | None = None, cache_dir: str | None = None,
                        **kwargs: Any) -> Qwen3TTSTokenizer:
        """Load a 12Hz speech tokenizer: its folder, a model folder holding `speech_tokenizer/`, or a hub id
        ("Qwen/Qwen3-TTS-Tokenizer-12Hz"; a model's id with `subfolder="speech_tokenizer"` fetches only that).
        device_map: None -> CPU (as transformers), "auto", "cuda:N", {"": device}. dtype (or torch_dtype): None ->
        float32, "auto" -> the checkpoint's. `attn_implementation` is accepted and ignored; `token`,
        `local_files_only`, `force_download` and `subfolder` reach the hub download."""
        hub = {k: kwargs.pop(k) for k in HUB_ARGUMENTS if k in kwargs}
        subfolder = kwargs.pop("subfolder", None)
        if kwargs:
            log.warning("Qwen3TTSTokenizer.from_pretrained: ignoring unsupported argument(s) %s", sorted(kwargs))
        path = resolve_checkpoint(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                  subfolder=subfolder, hub=hub)
        folder = _speech_tokenizer_dir(path)
        wanted = dtype if dtype is not None else torch_dtype
        dt = checkpoint_dtype(folder) if wanted == "auto" else resolve_dtype(wanted)
        return cls(load_codec(folder, device=_resolve_device(device_map), dtype=dt), folder)

    # --- the official getters ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.codec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.codec.dtype

    def get_model_type(self) -> str:
        return MODEL_TYPE

    def get_input_sample_rate(self) -> int:
        return int(self.config.sample_rate)

    def get_output_sample_rate(self) -> int:
        return int(self.config.sample_rate)

    def get_encode_downsample_rate(self) -> int:
        return int(self.config.encode_downsample_rate)

    def get_decode_upsample_rate(self) -> int:
        return int(self.config.decode_upsample_rate)

    # --- encode -----------------------------------------------------------------------------------------------
    def load_audio(self, x: Any, target_sr: int = 24000) -> np.ndarray:
        """One path / base64 / URL / bytes / (array, sr) -> float32 mono at `target_sr` (soxr HQ, librosa's length;
        8 kHz .. 384 kHz)."""
        wav, sr = load_audio(x, argument="audios", allow_urls=True, limits=LIMITS, silent_ok=True)
        return resample(wav, sr, target_sr, argument="audios", limits=LIMITS)

    def _waveforms(self, audios: Any, sr: Any) -> list[np.ndarray]:
        single = isinstance(audios, (str, bytes, bytearray, os.PathLike, np.ndarray)) or _is_pair(audios)
        items = [audios] if single else list(audios) if isinstance(audios, tuple) else audios
        if not isinstance(items, list):
            raise RequestError("audios", f"must be audio (a path, base64, URL, numpy array with sr, (array, sr)) "
                                         f"or a list of them, got {type(audios).__name__}")
        out = []
        for i, x in enumerate(items):
            name = "audios" if single else f"audios[{i}]"
            if isinstance(x, np.ndarray):
                out.append(_array_24k(x, sr, name))
            elif _is_pair(x):
                out.append(_array_24k(x[0], x[1], name))
            elif isinstance(x, torch.Tensor):
                raise RequestError(name, "a torch tensor is not accepted; pass a numpy array with sr")
            else:
                wav, rate = load_audio(x, argument=name, allow_urls=True, limits=LIMITS, silent_ok=True)
                out.append(to_24k(wav, rate, argument=name, limits=LIMITS))
        return out

    def encode(self, audios: Any, sr: int | None = None, return_dict: bool = True,
               ) -> Qwen3TTSTokenizerEncodeOutput | tuple[list[torch.Tensor]]:
        """Audio (one item or a list; see the module docstring) -> `.audio_codes`: Long [ceil(n / 1920), 16] per
        item (a zero-length waveform gives [0, 16]). `sr`: the sample rate of numpy inputs (required for them).
        return_dict=False returns the tuple `(audio_codes,)`."""
        wavs = self._waveforms(audios, sr)
        q = self.config.encoder_valid_num_quantizers
        codes = [torch.zeros(0, q, dtype=torch.long) for _ in wavs]
        filled = [i for i, w in enumerate(wavs) if w.size]
        if filled:
            with torch.inference_mode():
                for i, c in zip(filled, self.codec.encode([wavs[i] for i in filled])):
                    codes[i] = c
        codes = [c.to(self.device) for c in codes]
        return Qwen3TTSTokenizerEncodeOutput(codes) if return_dict else (codes,)

    # --- decode -----------------------------------------------------------------------------------------------
    def _code_items(self, encoded: Any) -> list[torch.Tensor]:
        if isinstance(encoded, dict):
            if "audio_codes" not in encoded:
                raise RequestError("encoded", "a dict must hold 'audio_codes'")
            value = encoded["audio_codes"]
        elif hasattr(encoded, "audio_codes"):
            value = encoded.audio_codes
        elif isinstance(encoded, (list, tuple)):
            value = []
            for i, e in enumerate(encoded):
                if isinstance(e, dict) or hasattr(e, "audio_codes"):
                    inner = e.get("audio_codes") if isinstance(e, dict) else e.audio_codes
                    if inner is None:
                        raise RequestError("encoded", f"encoded[{i}] must hold 'audio_codes'")
                    value.append(inner)
                else:
                    value.append(e)
        elif isinstance(encoded, (torch.Tensor, np.ndarray)):
            value = encoded
        else:
            raise RequestError("encoded", "must be encode()'s output, a dict or list of dicts with 'audio_codes', "
                                          f"or code tensors/arrays, got {type(encoded).__name__}")
        q = self.config.num_quantizers
        if isinstance(value, (torch.Tensor, np.ndarray)):
            t = _codes_tensor(value, "audio_codes")
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if t.dim() != 3:
                raise RequestError("encoded", f"audio_codes must be [frames, {q}] or a [batch, frames, {q}] batch, "
                                              f"got shape {tuple(t.shape)}")
            items, names = list(t), [f"audio_codes[{i}]" for i in range(t.shape[0])]
        elif isinstance(value, (list, tuple)):
            items = [_codes_tensor(c, f"audio_codes[{i}]") for i, c in enumerate(value)]
            names = [f"audio_codes[{i}]" for i in range(len(items))]
        else:
            raise RequestError("encoded", f"audio_codes must be a tensor, an array or a list of them, got "
                                          f"{type(value).__name__}")
        size = self.config.codebook_size
        out = []
        for t, name in zip(items, names):
            if t.dim() != 2 or t.shape[1] != q:
                raise RequestError("encoded", f"{name} must have shape [frames, {q}], got {tuple(t.shape)}")
            n = t.shape[0]
            while n and int(t[n - 1, 0]) == -1:  # right padding, counted on codebook 0 as the official does
                n -= 1
            t = t[:n]
            if n and (int(t.min()) < 0 or int(t.max()) >= size):
                raise RequestError("encoded", f"{name} holds code ids in [{int(t.min())}, {int(t.max())}]; "
                                              f"they must lie in [0, {size - 1}] (-1 only as right padding)")
            out.append(t)
        return out

    def decode(self, encoded: Any) -> tuple[list[np.ndarray], int]:
        """Codes -> (float32 waveforms [frames * 1920] in [-1, 1], 24000). See the module docstring for `encoded`."""
        items = self._code_items(encoded)
        sr = self.get_output_sample_rate()
        wavs = [np.zeros(0, dtype=np.float32) for _ in items]
        filled = [i for i, c in enumerate(items) if c.shape[0]]
        if not filled:
            return wavs, sr
        if max(items[i].shape[0] for i in filled) <= REFERENCE_DECODE_CHUNK:
            for i, w in zip(filled, self.codec.decode([items[i] for i in filled])):
                wavs[i] = w
        else:  # as the official: 300-frame pieces, each re-decoded with 25 frames of left context
            with torch.inference_mode():
                for i in filled:
                    codes = items[i].T[None].to(self.device)
                    wavs[i] = self.codec.decoder.decode_like_reference(codes)[0].float().cpu().numpy()
        return [np.ascontiguousarray(w, dtype=np.float32) for w in wavs], sr


__all__ = ["Qwen3TTSTokenizer", "Qwen3TTSTokenizerEncodeOutput"]
