"""The Unicode blocks of the scripts the text rules treat apart, named once; each rule says which it takes.

- Han and kana (CJK_SPAN, CJK_COMPAT) are written without spaces and spoken about a syllable per character.
- Hangul syllables are spoken a syllable per character, but Korean puts spaces between words.
- Fullwidth forms (Latin letters and punctuation in CJK text) are written without spaces around them.
"""

from __future__ import annotations

CJK_SPAN = (0x2E80, 0x9FFF)       # radicals, CJK punctuation (3000-303F), kana, bopomofo, extension A, ideographs
CJK_COMPAT = (0xF900, 0xFAFF)     # compatibility ideographs
HANGUL = (0xAC00, 0xD7AF)         # Hangul syllables
FULLWIDTH = (0xFF00, 0xFFEF)      # halfwidth and fullwidth forms

UNSPACED = (CJK_SPAN, CJK_COMPAT, FULLWIDTH)   # pieces joined with no space between them (split.py)
UNBOUNDED = (CJK_SPAN, CJK_COMPAT, HANGUL)     # a lexicon word matched inside longer runs of letters (lexicon.py)
SYLLABIC = (CJK_SPAN, CJK_COMPAT, HANGUL)      # a character is a syllable for speech-rate checks (quality.py)


def in_blocks(ch: str, blocks: tuple[tuple[int, int], ...]) -> bool:
    """Whether the one character `ch` lies in any of `blocks` (inclusive code point ranges)."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in blocks)
