"""Long-form text -> chunks that keep sentences whole and stay under a character budget.

Works for Latin scripts (". ! ? ;" followed by space) and Chinese/Japanese full-width punctuation
("。！？；…"), which needs no following space. A sentence longer than the budget is cut at clause
punctuation (", ， 、 : ："), then at whitespace, and only as a last resort mid-word.
"""

from __future__ import annotations

import re

from .scripts import UNSPACED, in_blocks

# A sentence ends at Western terminators (plus closing quotes/brackets) followed by whitespace or the end,
# or right after a CJK terminator (plus closing marks): where `(?:[.!?;…]+[C]*(?=\s|$))|(?:[。！？；…]+[C]*)` (C: the
# closers) matches, as re.finditer finds it; `_sentence_ends` finds the same ends in linear time.
_CLOSERS = re.escape("\"'”’)）]」』】》")
_WESTERN_MARKS = re.compile(r"[.!?;…]+")
_CLOSING = re.compile(rf"[{_CLOSERS}]*")
_CJK_END = re.compile(rf"[。！？；…]+[{_CLOSERS}]*")
_ANY_END = re.compile(r"[.!?;…。！？；]")
# A clause ends at `(?:[,:]+[C]*(?=\s))|(?:[，、：]+)`. Its Western branch is tried only from the first mark of a run
# (the lookbehind): the same matches (a try from inside a run fails where the try from its first mark failed), and a
# failed try backtracks through its one run once, so a run costs linear time, not a try from each of its marks
# (no possessive quantifier: Python 3.10 has none).
_CLAUSE_END = re.compile(rf"(?:(?<![,:])[,:]+[{_CLOSERS}]*(?=\s))|(?:[，、：]+)")
_WS = re.compile(r"\s+")
_PARAGRAPH = re.compile(r"\n\s*\n")  # a blank line: paragraphs always start a new chunk
MIN_CHUNK_CHARS = 8


def normalize_text(text: str) -> str:
    """Collapse runs of whitespace into one space and strip the ends (what keys and hashes see)."""
    return _WS.sub(" ", text).strip()


def key_text(text: str) -> str:
    """What content keys see: each paragraph normalized, paragraphs joined by a blank line. Paragraphs change the
    chunking (and so the audio); a text without a paragraph break gives exactly `normalize_text(text)`."""
    return "\n\n".join(p for p in (normalize_text(x) for x in _PARAGRAPH.split(text)) if p)


def _cut_after(text: str, ends: list[int]) -> list[str]:
    """Cut `text` right after each of `ends` (increasing); pieces are stripped and never empty."""
    out, start = [], 0
    for end in ends:
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return [p.strip() for p in out if p.strip()]


def _split_after(pattern: re.Pattern[str], text: str) -> list[str]:
    """Cut `text` right after every match of `pattern`; pieces are stripped and never empty."""
    return _cut_after(text, [m.end() for m in pattern.finditer(text)])


def _sentence_ends(text: str) -> list[int]:
    """Where the sentence-end expression above matches end, in linear time. With the expression, a long run of
    Western marks that no whitespace follows ("....x", 200 KB of it in a row) was tried from every mark, each try
    reading to the run's end: quadratic. A try from any mark of a run reads the same marks and closers after it, so
    one run is measured once; only a CJK end ("…" is both) can start inside a run that was not tried."""
    ends: list[int] = []
    i, n = 0, len(text)
    run_end = run_stop = -1  # the last Western run measured: its marks end at run_end, its closers at run_stop
    while (m := _ANY_END.search(text, i)) is not None:
        i = m.start()
        if text[i] in ".!?;…":
            if i >= run_end:
                run_end = _WESTERN_MARKS.match(text, i).end()  # type: ignore[union-attr]
                run_stop = _CLOSING.match(text, run_end).end()  # type: ignore[union-attr]
            if run_stop == n or text[run_stop].isspace():
                ends.append(run_stop)
                i = run_stop
                continue
        if text[i] in "。！？；…":
            i = _CJK_END.match(text, i).end()  # type: ignore[union-attr]
            ends.append(i)
            continue
        i += 1
    return ends


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph-free text, punctuation kept with the sentence they end."""
    text = normalize_text(text)
    return _cut_after(text, _sentence_ends(text))


def _hard_split(piece: str, max_chars: int) -> list[str]:
    """Split an over-long clause at whitespace, else every `max_chars` characters (CJK has no spaces)."""
    out: list[str] = []
    cur = ""
    for word in piece.split(" "):
        cuts = (len(word) - 1) // max_chars  # whole pieces cut off the front; the rest (1..max_chars) goes on
        if cuts > 0:  # by index: cutting a piece at a time copied the rest each time (1 MB word, 8 chars: minutes)
            if cur:
                out.append(cur)
                cur = ""
            out.extend(word[j * max_chars:(j + 1) * max_chars] for j in range(cuts))
            word = word[cuts * max_chars:]
        if not word:
            continue
        cand = f"{cur} {word}" if cur else word
        if len(cand) <= max_chars:
            cur = cand
        else:
            out.append(cur)
            cur = word
    if cur:
        out.append(cur)
    return out


def _pack(pieces: list[str], max_chars: int, joiner: str) -> list[str]:
    """Greedily join consecutive pieces while the result stays within `max_chars`."""
    out: list[str] = []
    cur = ""
    for p in pieces:
        cand = f"{cur}{joiner(cur, p)}{p}" if cur else p
        if len(cand) <= max_chars:
            cur = cand
        else:
            if cur:
                out.append(cur)
            cur = p
    if cur:
        out.append(cur)
    return out


def _joiner(left: str, right: str) -> str:
    """No space between CJK pieces, one space otherwise."""
    return "" if (in_blocks(left[-1], UNSPACED) or in_blocks(right[0], UNSPACED)) else " "


def _fit(sentence: str, max_chars: int) -> list[str]:
    """One sentence -> pieces of at most `max_chars`, preferring clause boundaries."""
    if len(sentence) <= max_chars:
        return [sentence]
    out: list[str] = []
    for clause in _split_after(_CLAUSE_END, sentence):
        out.extend([clause] if len(clause) <= max_chars else _hard_split(clause, max_chars))
    return _pack(out, max_chars, _joiner)


def split_text(text: str, max_chars: int = 200) -> list[str]:
    """Split long-form text into chunks of at most `max_chars` characters.

    Paragraphs (blank-line separated) always start a new chunk; sentences inside a paragraph are packed
    greedily and are only cut when a single sentence exceeds the budget.

    Args:
        text: any amount of text (Markdown headings/emphasis markers are left to the caller).
        max_chars: the chunk budget, >= 8.

    Returns:
        Non-empty chunks in reading order; empty list for blank text.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < MIN_CHUNK_CHARS:
        raise ValueError(f"max_chars must be an integer >= {MIN_CHUNK_CHARS}, got {max_chars!r}")
    chunks: list[str] = []
    for para in _PARAGRAPH.split(text):
        pieces: list[str] = []
        for sentence in split_sentences(para):
            pieces.extend(_fit(sentence, max_chars))
        chunks.extend(_pack(pieces, max_chars, _joiner))
    return chunks
