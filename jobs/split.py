"""Long-form text -> chunks that keep sentences whole and stay under a character budget.

Works for Latin scripts (". ! ? ;" followed by space) and Chinese/Japanese full-width punctuation
("。！？；…"), which needs no following space. A sentence longer than the budget is cut at clause
punctuation (", ， 、 : ："), then at whitespace, and only as a last resort mid-word.
"""

from __future__ import annotations

import re

# A sentence ends at Western terminators (plus closing quotes/brackets) followed by whitespace or the end,
# or right after a CJK terminator (plus closing marks).
_CLOSERS = re.escape("\"'”’)）]」』】》")
_SENTENCE_END = re.compile(
    rf"(?:[.!?;…]+[{_CLOSERS}]*(?=\s|$))|(?:[。！？；…]+[{_CLOSERS}]*)"
)
_CLAUSE_END = re.compile(rf"(?:[,:]+[{_CLOSERS}]*(?=\s))|(?:[，、：]+)")
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


def _split_after(pattern: re.Pattern[str], text: str) -> list[str]:
    """Cut `text` right after every match of `pattern`; pieces are stripped and never empty."""
    out, start = [], 0
    for m in pattern.finditer(text):
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return [p.strip() for p in out if p.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of one paragraph-free text, punctuation kept with the sentence they end."""
    return _split_after(_SENTENCE_END, normalize_text(text))


def _hard_split(piece: str, max_chars: int) -> list[str]:
    """Split an over-long clause at whitespace, else every `max_chars` characters (CJK has no spaces)."""
    out: list[str] = []
    cur = ""
    for word in piece.split(" "):
        while len(word) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(word[:max_chars])
            word = word[max_chars:]
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
    return "" if (_is_cjk(left[-1]) or _is_cjk(right[0])) else " "


def _is_cjk(ch: str) -> bool:
    o = ord(ch)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0xFF00 <= o <= 0xFFEF or 0x3000 <= o <= 0x303F


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
