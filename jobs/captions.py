"""Captions (SubRip .srt and WebVTT .vtt) with one cue per rendered sentence, timed from the audio as rendered.

With captions on, a row is synthesized one sentence per chunk (`sentence_chunks`), so every chunk's place in the
joined audio is known to the sample: `segments` gives each chunk's [start, end) from the chunk lengths and the
pauses, and `cues` shifts them by what mastering added or trimmed at the head. Cues are exact by construction; no
alignment model is involved (word-level timing is not offered).
"""

from __future__ import annotations

import html
import re
import textwrap
from dataclasses import dataclass

from .split import split_sentences, split_text

LINE_CHARS = 42  # a common caption line length


@dataclass(frozen=True)
class Cue:
    start_s: float
    end_s: float
    text: str


def sentence_chunks(text: str, max_chars: int) -> list[str]:
    """One chunk per sentence (paragraphs respected); a sentence longer than `max_chars` is cut like split_text."""
    out: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        for sentence in split_sentences(para):
            out.extend(split_text(sentence, max_chars))
    return out


def segments(lengths: list[int], sample_rate: int, pause_s: float) -> list[tuple[int, int]]:
    """[start, end) sample of each chunk in audio joined with `pause_s` of silence between chunks."""
    gap = int(round(pause_s * sample_rate))
    out, pos = [], 0
    for i, n in enumerate(lengths):
        if i:
            pos += gap
        out.append((pos, pos + int(n)))
        pos += int(n)
    return out


def cues(texts: list[str], spans: list[tuple[int, int]], sample_rate: int, offset_s: float = 0.0,
         duration_s: float | None = None) -> list[Cue]:
    """Cues for chunk texts and their spans; `offset_s` is where input time 0 lands in the delivered file."""
    out = []
    for text, (a, b) in zip(texts, spans):
        start, end = a / sample_rate + offset_s, b / sample_rate + offset_s
        if duration_s is not None:
            start, end = min(max(start, 0.0), duration_s), min(max(end, 0.0), duration_s)
        else:
            start, end = max(start, 0.0), max(end, 0.0)
        clean = " ".join(text.split())
        if end > start and clean:
            out.append(Cue(start, end, clean))
    return out


def _ms(t: float) -> int:
    return int(round(t * 1000))


def _stamp(t: float, sep: str) -> str:
    ms = _ms(t)
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _lines(text: str) -> list[str]:
    return textwrap.wrap(text, LINE_CHARS, break_long_words=False, break_on_hyphens=False) or [text]


def _timed(cue_list: list[Cue]) -> list[tuple[int, int, Cue]]:
    """Millisecond times, each cue at least 1 ms long and never starting before the previous one ends."""
    out, last = [], 0
    for c in cue_list:
        a = max(_ms(c.start_s), last)
        b = max(_ms(c.end_s), a + 1)
        out.append((a, b, c))
        last = b
    return out


def to_srt(cue_list: list[Cue]) -> str:
    blocks = []
    for i, (a, b, c) in enumerate(_timed(cue_list), start=1):
        # SRT has no escaping; a blank line would end the cue, and wrapping never makes one
        blocks.append(f"{i}\n{_stamp(a / 1000, ',')} --> {_stamp(b / 1000, ',')}\n" + "\n".join(_lines(c.text)))
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def to_vtt(cue_list: list[Cue]) -> str:
    parts = ["WEBVTT", ""]
    for a, b, c in _timed(cue_list):
        body = "\n".join(html.escape(line, quote=False) for line in _lines(c.text))  # &, <, > (so no "-->")
        parts += [f"{_stamp(a / 1000, '.')} --> {_stamp(b / 1000, '.')}", body, ""]
    return "\n".join(parts)


def caption_keys(audio_key: str) -> tuple[str, str]:
    """Object keys of the .srt and .vtt next to an audio object."""
    stem = audio_key.rsplit(".", 1)[0]
    return f"{stem}.srt", f"{stem}.vtt"
