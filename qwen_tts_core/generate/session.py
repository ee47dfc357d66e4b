"""Per-request state of the engine (a dataclass; the engine is the policy that advances it)."""

from __future__ import annotations

import codecs
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import RequestError, SessionEnded
from ..text.prompt import Prompt
from ..text.tokenizer import TargetIds
from ..types import FinishReason, SynthesisRequest
from .requests import PieceJoiner
from .text_feed import IncrementalText

_ids = itertools.count(1)


@dataclass(eq=False)
class Session:
    """One utterance in the engine. Thread-safe for callers: append_text / end_text / cancel only enqueue."""

    request: SynthesisRequest
    id: int = field(default_factory=lambda: next(_ids))
    # text
    incremental: IncrementalText | None = None
    pending_text: list[str | bytes | None] = field(default_factory=list)  # None = end of text
    committed_ids: list[int] = field(default_factory=list)
    target: TargetIds | None = None  # a whole text's token ids, tokenized by `Engine.add` on the caller's thread
    # generation state (owned by the engine thread; the per-step tensors live on the device, runner.py)
    phase: str = "queued"            # queued -> frame (an id awaits its code-predictor pass) <-> talker -> done
    prompt: Prompt | None = None
    slot: int = -1                    # cache slot = batch row (may move down when slots free up)
    pos: int = 0                      # next talker position (= tokens in its KV cache)
    text_step: int = 0                # trailing text embeddings consumed
    num_ids: int = 0                  # codebook-0 ids drawn so far (the prefill's included)
    first_id_unread: bool = False     # the prefill's id is read back with the first frame
    history: list[int] = field(default_factory=list)  # codebook-0 ids read back so far
    frames: list[np.ndarray] = field(default_factory=list)  # [16] int64 codes per frame (host copies)
    max_frames: int | None = None     # runaway guard
    seed: int = 0                     # the device sampler's seed (drawn from torch's generator when not given)
    generator: torch.Generator | None = None  # sampler="torch" with a seed
    ref_key: tuple | None = None      # ICL: the reference codes' cache key (codec.context.codes_key), taken on add
    audio_frames: int = 0             # frames whose audio has been emitted
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_field: str | None = None
    cancelled: bool = False
    _end_requested: bool = False   # end_text was called (set under _lock; the engine takes pending text unlocked)
    _notify: Callable[[], None] | None = field(default=None, repr=False)  # wakes the engine's wait_for_work
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _utf8: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(),
                                             repr=False)
    _pieces: PieceJoiner = field(default_factory=PieceJoiner, repr=False)  # surrogate halves across str pieces

    # --- caller side ------------------------------------------------------------------------------------------
    def append_text(self, piece: str | bytes) -> None:
        """Add text to an incremental session (one opened with `text=None`). An empty piece changes nothing. A
        character outside the BMP cut between its UTF-16 surrogates (as JavaScript's slice cuts strings) may come in
        two str pieces: a piece's last high surrogate waits for the next piece's low one; any other lone surrogate is
        refused naming `text`."""
        if self.incremental is None:
            raise RequestError("text", "append_text: this session was opened with its full text (text=...)")
        if not isinstance(piece, str | bytes | bytearray):
            raise RequestError("text", f"append_text: piece must be str or bytes, got {type(piece).__name__}")
        with self._lock:
            self._check_open()
            if self._end_requested:
                raise RequestError("text", "append_text after end_text")
            if isinstance(piece, str):
                piece = self._pieces.push(piece)
            elif self._pieces.high:
                raise RequestError("text", "a bytes piece after half of a surrogate pair: send its other half first")
            if isinstance(piece, bytes | bytearray):
                piece = bytes(piece)
                try:  # invalid UTF-8 is refused here, where the caller can be told, not in the engine's thread
                    self._utf8.decode(piece)
                except UnicodeDecodeError as e:
                    raise RequestError("text", f"invalid UTF-8 ({e.reason})") from None
            elif piece and self._utf8.getstate()[0]:  # it would land before the character's last bytes
                raise RequestError("text", "a str piece inside a UTF-8 character begun by bytes: send its "
                                           "remaining bytes first")
            if not piece:
                return
            self.pending_text.append(piece)
        self._wake()

    def end_text(self) -> None:
        if self.incremental is None:
            raise RequestError("text", "end_text: this session was opened with its full text (text=...)")
        with self._lock:
            self._check_open()
            if self._end_requested:
                raise RequestError("text", "end_text called twice")
            try:
                self._utf8.decode(b"", final=True)
            except UnicodeDecodeError:
                raise RequestError("text", "ends inside a UTF-8 character") from None
            self._pieces.finish()
            self.pending_text.append(None)
            self._end_requested = True
        self._wake()

    def _check_open(self) -> None:
        """Text for a session that has ended would be dropped unread: say so (caller holds the lock)."""
        if self.phase == "done" or self.cancelled:
            why = "cancelled" if self.cancelled and self.finish_reason is None else self.finish_reason
            raise SessionEnded("text", f"the session has already ended ({why})")

    def _wake(self) -> None:
        if self._notify is not None:
            self._notify()

    def has_pending_text(self) -> bool:
        with self._lock:
            return bool(self.pending_text)

    def take_pending(self) -> list[str | bytes | None]:
        with self._lock:
            out, self.pending_text = self.pending_text, []
        return out

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @property
    def num_frames(self) -> int:
        return len(self.frames)

    def codes(self) -> torch.Tensor:
        """Generated codes [T, 16] (EOS excluded)."""
        if not self.frames:
            return torch.zeros(0, 16, dtype=torch.long)
        return torch.from_numpy(np.stack(self.frames).astype(np.int64))
