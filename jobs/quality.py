"""Cheap per-output quality checks that flag suspicious audio (they never fail a row on their own)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scripts import SYLLABIC, in_blocks


@dataclass(frozen=True)
class QualityConfig:
    """Thresholds. Speech rates are characters per second of audio; a Han, kana or Hangul character (a syllable,
    scripts.SYLLABIC) counts as cjk_weight characters."""

    silence_rms: float = 1e-3          # whole-utterance RMS below this -> "silent"
    max_silent_fraction: float = 0.6   # share of 20 ms frames below silence_rms -> "mostly_silent"
    clip_level: float = 0.999
    max_clip_fraction: float = 1e-3    # share of samples at/over clip_level -> "clipping"
    min_chars_per_s: float = 2.0       # slower than this -> "too_long" (runaway, babbling)
    max_chars_per_s: float = 40.0      # faster than this -> "too_short" (truncated)
    cjk_weight: float = 3.0            # one Han, kana or Hangul character counts like this many Latin characters


def _spoken_chars(text: str, cjk_weight: float) -> float:
    n = 0.0
    for ch in text:
        if ch.isalnum():
            n += cjk_weight if in_blocks(ch, SYLLABIC) else 1.0
    return n


def check_audio(pcm: np.ndarray, sample_rate: int, text: str, cfg: QualityConfig = QualityConfig()) -> list[str]:
    """Flags for one utterance: subset of silent, mostly_silent, clipping, too_short, too_long, empty
    (non-finite samples never get here: render.py retries such a chunk, then fails the row).

    Args:
        pcm: mono float32 [N].
        sample_rate: Hz.
        text: the text it should say (duration vs text length).
    """
    pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if pcm.size == 0:
        return ["empty"]
    flags: list[str] = []
    if float(np.sqrt(np.mean(pcm**2))) < cfg.silence_rms:
        flags.append("silent")
    else:
        hop = max(1, sample_rate // 50)
        n = pcm.size // hop
        if n:
            frame_rms = np.sqrt(np.mean(pcm[: n * hop].reshape(n, hop) ** 2, axis=1))
            if float(np.mean(frame_rms < cfg.silence_rms)) > cfg.max_silent_fraction:
                flags.append("mostly_silent")
    if float(np.mean(np.abs(pcm) >= cfg.clip_level)) > cfg.max_clip_fraction:
        flags.append("clipping")
    chars = _spoken_chars(text, cfg.cjk_weight)
    duration = pcm.size / sample_rate
    if chars > 0:
        rate = chars / duration
        if rate > cfg.max_chars_per_s:
            flags.append("too_short")
        elif rate < cfg.min_chars_per_s:
            flags.append("too_long")
    return flags


def check_chunks(pcms: list[np.ndarray], sample_rate: int, texts: list[str] | None,
                 cfg: QualityConfig = QualityConfig()) -> list[str]:
    """Flags for a row of several chunks, each chunk on its own (a bad chunk hides in a long row's totals):
    chunk_empty (no samples, e.g. an immediate end of speech), chunk_too_short (far faster than speech: cut off)."""
    flags: list[str] = []
    if len(pcms) < 2:  # one chunk: check_audio on the row says the same
        return flags
    for i, pcm in enumerate(pcms):
        n = np.asarray(pcm).size
        if n == 0:
            flag = "chunk_empty"
        elif texts is not None and i < len(texts) and \
                _spoken_chars(texts[i], cfg.cjk_weight) / (n / sample_rate) > cfg.max_chars_per_s:
            flag = "chunk_too_short"
        else:
            continue
        if flag not in flags:
            flags.append(flag)
    return flags
