"""Incremental text: which tokens of a growing text are final.

Text arrives in pieces (str, or bytes that may split a UTF-8 character). A token is committed only when text after
it can no longer change it: everything before the last pre-tokenizer piece (a word, a run of spaces, punctuation) is
final, because the Qwen2 BPE never merges across pre-tokenizer pieces (nor across an added token such as "<|im_end|>",
which is found in the text first), unless the NFC normalization that precedes
the pre-tokenizer would join the two sides (a decomposed accent), or the end of the text may still become an added
token ("<|im_e"): such a boundary waits. `end()` commits the rest.

Only the uncommitted tail is ever re-split or re-encoded: the tail starts at a pre-tokenizer boundary, and the
pre-tokenizer resumes at a boundary exactly as it would in the whole text, so the cost of a piece does not grow with
the text already committed (10,000 one-character pieces stay fast). The tail itself is bounded: a piece checks at
most CANDIDATES boundaries (the last ones), and a tail of MAX_OPEN_CHARS characters with no boundary it could commit
at (one word of that length, a combining mark after every letter) is refused: each piece re-splits the tail, so an
unbounded one made a session's pieces cost the square of its text on the engine's step thread.
"""

from __future__ import annotations

import codecs
import unicodedata
from collections.abc import Callable

from ..errors import RequestError
from .requests import is_blank

MAX_OPEN_CHARS = 1024   # characters waiting for a boundary (far beyond a word; CJK commits at its punctuation)
CANDIDATES = 8          # boundaries a piece checks, from the last: committing later is always safe


def _stable(text: str, n: int) -> bool:
    """Whether text[:n] is final under the tokenizer's NFC normalization, which runs before its pre-tokenizer: a
    combining mark starting text[n:] ("e" + U+0301) would compose with what precedes it, and any mark appended later
    composes with the last starter, which must lie at or after n."""
    return (not unicodedata.combining(text[n])
            and unicodedata.normalize("NFC", text[:n]) + unicodedata.normalize("NFC", text[n:])
            == unicodedata.normalize("NFC", text))


class IncrementalText:
    def __init__(self, encode: Callable[[str], list[int]], split_offsets: Callable[[str], list[int]],
                 encode_more: Callable[[str], list[int]] | None = None,
                 open_from: Callable[[str], int] | None = None,
                 role_of: Callable[[str], list[int]] | None = None,
                 normalize: Callable[[str], str] | None = None) -> None:
        """encode: text -> ids of the bare text as it starts the utterance (the first committed segment);
        split_offsets: text -> start offsets of its tokenizer pieces; encode_more: ids of a later segment, one
        that starts at a piece boundary inside the text (default: `encode`); open_from: text -> the offset from which
        its end may still become an added token ("<|im_e" + "nd|>"), never committed before more text comes
        (default: none can); role_of: the role ids that go before a text starting with the first committed
        segment (`role` once one is committed); normalize: the tokenizer's own normalization (NFC), which runs before
        its pre-tokenizer: the tail is kept normalized, so it is split where the tokenizer splits (a letter that NFC
        decomposes into letter + mark put the mark in one piece with the punctuation after it)."""
        self._encode_first, self._encode_more = encode, encode_more or encode
        self._split = split_offsets
        self._open_from = open_from or len
        self._role_of = role_of
        self._normalize = normalize or (lambda t: t)
        self.role: list[int] | None = None
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._done: list[str] = []   # committed text, in segments
        self.tail = ""               # text not committed yet (starts at a pre-tokenizer boundary)
        self.committed: list[int] = []
        self.ended = False
        self._done_visible = False   # a committed segment shows something (committed text never changes)

    @classmethod
    def of(cls, tok) -> IncrementalText:
        """The feed of a `text.tokenizer.TextTokenizer`: its pieces and added tokens, the first segment encoded as
        it starts an utterance."""
        return cls(tok.text_only, tok.split_offsets, tok.encode, tok.open_added_token, lambda s: tok.target(s).role,
                   tok.normalize)

    @property
    def text(self) -> str:
        return "".join(self._done) + self.tail

    @property
    def blank(self) -> bool:
        """`is_blank(self.text)`, at the cost of the uncommitted tail only: the engine asks it of every queued
        incremental session on each pass."""
        return not self._done_visible and is_blank(self.tail)

    def append(self, piece: str | bytes) -> list[int]:
        """Add a piece; return the ids newly committed by it. Empty pieces change nothing."""
        if self.ended:
            raise ValueError("text: append_text after end_text")
        if isinstance(piece, bytes | bytearray):
            piece = self._decoder.decode(bytes(piece))
        elif not isinstance(piece, str):
            raise ValueError(f"text: pieces must be str or bytes, got {type(piece).__name__}")
        if not piece:
            return []
        self.tail = self._normalize(self.tail + piece)
        offsets = self._split(self.tail)
        limit = self._open_from(self.tail)
        for n in reversed(offsets[1:][-CANDIDATES:]):  # the last boundary normalization cannot move (almost always
            if 0 < n <= limit and _stable(self.tail, n):    # the last)
                return self._commit(n)
        if len(self.tail) > MAX_OPEN_CHARS:
            raise RequestError("text", f"more than {MAX_OPEN_CHARS} characters without a point the text can be "
                                       "split at (a space or punctuation)")
        return []

    def end(self) -> list[int]:
        if self.ended:
            raise ValueError("text: end_text called twice")
        self.tail = self._normalize(self.tail + self._decoder.decode(b"", final=True))
        self.ended = True
        return self._commit(len(self.tail)) if self.tail else []

    def _commit(self, n: int) -> list[int]:
        stable, self.tail = self.tail[:n], self.tail[n:]
        if not self._done and self._role_of is not None:
            self.role = self._role_of(stable)
        ids = (self._encode_more if self._done else self._encode_first)(stable)
        self._done.append(stable)
        self._done_visible = self._done_visible or not is_blank(stable)
        self.committed += ids
        return ids
