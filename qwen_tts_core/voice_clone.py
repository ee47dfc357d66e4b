"""Reference audio -> reusable voice-clone prompt: ICL codes from the codec encoder and the speaker x-vector."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .audio_io import load_audio, to_24k
from .errors import RequestError
from .generate.requests import check_ref_text
from .speaker.ecapa import min_speaker_samples, speaker_embedding
from .voice_prompt import VoiceClonePromptItem


def create_voice_clone_prompt(model, ref_audio: Any, ref_text: Any = None, x_vector_only_mode: Any = False,
                              allow_urls: bool = True) -> list[VoiceClonePromptItem]:
    """One item per reference audio. ICL (x_vector_only_mode=False) needs `ref_text`. http(s) URLs are fetched like
    the reference does unless `allow_urls=False` (services pass False: uploads and base64 only)."""
    if model.tts_model_type != "base":
        raise ValueError(f"create_voice_clone_prompt needs a Base checkpoint; this one is {model.tts_model_type!r}")
    if model.speaker_encoder is None or model.codec is None:
        raise ValueError("this checkpoint lacks its speaker encoder or speech tokenizer")
    audios = ref_audio if isinstance(ref_audio, list) else [ref_audio]
    if not audios:
        raise RequestError("ref_audio", "must not be empty")
    n = len(audios)
    texts = ref_text if isinstance(ref_text, list) else [ref_text] * n
    modes = x_vector_only_mode if isinstance(x_vector_only_mode, list) else [x_vector_only_mode] * n
    if len(texts) != n or len(modes) != n:
        raise RequestError("ref_text" if len(texts) != n else "x_vector_only_mode",   # the one that does not fit
                           f"batch size mismatch: ref_audio={n}, ref_text={len(texts)}, "
                           f"x_vector_only_mode={len(modes)}")
    modes = [_mode(m, i if isinstance(x_vector_only_mode, list) else None) for i, m in enumerate(modes)]
    for i, (t, xvec) in enumerate(zip(texts, modes)):
        if not xvec and (t is None or isinstance(t, str) and not t.strip()):
            raise RequestError("ref_text", f"is required when x_vector_only_mode=False (ICL mode); missing at index {i}")
        if not xvec:  # spoken before every text in ICL; x-vector mode ignores it (kept on the item unchecked, as
            check_ref_text(t)  # the official does; save_voice_prompt stores only a valid one)
    wavs, rates = [], set()
    need = min_speaker_samples(model.speaker_encoder.config)
    for i, a in enumerate(audios):
        argument = "ref_audio" if n == 1 else f"ref_audio[{i}]"
        wav, sr = load_audio(a, argument=argument, allow_urls=allow_urls)
        rates.add(sr)
        wav = to_24k(wav, sr, argument=argument)
        _check_long_enough(wav, need, argument)
        wavs.append(wav)
    # the reference encodes a list in one padded batch when its sample rates agree, else each item alone (a batch
    # changes a few codes of the shorter items): the same, so a voice's codes do not depend on the API's path
    codes = model.codec.encode(wavs) if len(rates) == 1 else [model.codec.encode([w])[0] for w in wavs]
    items = []
    for wav, code, text, xvec in zip(wavs, codes, texts, modes):
        spk = speaker_embedding(model.speaker_encoder, wav)
        items.append(VoiceClonePromptItem(ref_code=None if xvec else code.cpu(), ref_spk_embedding=spk,
                                          x_vector_only_mode=bool(xvec), icl_mode=not xvec, ref_text=text))
    return items


def _mode(value: Any, index: int | None) -> bool:
    """x_vector_only_mode as a bool: True/False (NumPy's too), 0/1, or None (False, as the official reads it);
    anything else (an array, a tensor, a string: truthy or ambiguous) is refused naming the argument."""
    if value is None or isinstance(value, bool | np.bool_) or isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    where = "" if index is None else f"[{index}]"
    raise RequestError("x_vector_only_mode", f"x_vector_only_mode{where} must be True or False, got "
                                             f"{type(value).__name__}")


def _check_long_enough(wav_24k, need: int, argument: str) -> None:
    """RequestError naming `argument` when the audio is shorter than the speaker encoder's window (its x-vector
    needs `need` samples at 24 kHz)."""
    if len(wav_24k) < need:
        raise RequestError(argument, f"audio is {len(wav_24k) / 24:.3g} ms long; a voice reference needs at least "
                                     f"{need / 24:.3g} ms (a few seconds of speech work best)")
