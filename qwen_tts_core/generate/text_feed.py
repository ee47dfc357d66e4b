"""Incremental text: which tokens of a growing text are final.

Text arrives in pieces (str, or bytes that may split a UTF-8 character). A token is committed only when text after
it can no longer change it: everything before the last pre-tokenizer piece (a word, a run of spaces, punctuation) is
final, because the Qwen2 BPE never merges across pre-tokenizer pieces. `end()` commits the rest.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable


class IncrementalText:
    def __init__(self, encode: Callable[[str], list[int]], split_offsets: Callable[[str], list[int]]) -> None:
        """encode: text -> ids of the bare text; split_offsets: text -> start offsets of its pre-tokenizer pieces."""
        self._encode, self._split = encode, split_offsets
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.committed: list[int] = []
        self.ended = False

    def append(self, piece: str | bytes) -> list[int]:
        """Add a piece; return the ids newly committed by it."""
        if self.ended:
            raise ValueError("text: append_text after end_text")
        if isinstance(piece, bytes | bytearray):
            piece = self._decoder.decode(bytes(piece))
        elif not isinstance(piece, str):
            raise ValueError(f"text: pieces must be str or bytes, got {type(piece).__name__}")
        self.text += piece
        offsets = self._split(self.text)
        stable = self.text[: offsets[-1]] if len(offsets) > 1 else ""
        return self._commit(self._encode(stable) if stable else [])

    def end(self) -> list[int]:
        if self.ended:
            raise ValueError("text: end_text called twice")
        self.text += self._decoder.decode(b"", final=True)
        self.ended = True
        return self._commit(self._encode(self.text) if self.text else [])

    def _commit(self, ids: list[int]) -> list[int]:
        if ids[: len(self.committed)] != self.committed:
            # cannot happen with a BPE that respects pre-tokenizer pieces; fail loudly rather than drift
            raise RuntimeError("incremental tokenization changed committed tokens")
        new = ids[len(self.committed):]
        self.committed = ids
        return new
