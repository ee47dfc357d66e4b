"""Per-request state of the engine (a dataclass; the engine is the policy that advances it)."""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from ..text.prompt import Prompt
from ..types import FinishReason, SynthesisRequest
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
    # generation state (owned by the engine thread)
    phase: str = "queued"            # queued -> talker <-> frame -> done
    prompt: Prompt | None = None
    slot: int = -1
    pos: int = 0                      # next talker position (= tokens in its KV cache)
    hidden: torch.Tensor | None = None  # [C] last talker hidden (after the final norm)
    code0: int = -1                   # codebook-0 id waiting for its code-predictor pass
    last_codes: torch.Tensor | None = None  # [16] codes of the last frame
    history: list[int] = field(default_factory=list)  # sampled codebook-0 ids (repetition penalty)
    text_step: int = 0                # trailing text embeddings consumed
    frames: list[torch.Tensor] = field(default_factory=list)
    max_frames: int | None = None     # runaway guard
    generator: torch.Generator | None = None
    audio: Any = None                 # AudioStreamer when decoding audio
    finish_reason: FinishReason | None = None
    error: str | None = None
    cancelled: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- caller side ------------------------------------------------------------------------------------------
    def append_text(self, piece: str | bytes) -> None:
        """Add text to an incremental session (one opened with `text=None`)."""
        if self.incremental is None:
            raise ValueError("append_text: this session was opened with its full text (text=...)")
        if not isinstance(piece, str | bytes | bytearray):
            raise ValueError(f"append_text: piece must be str or bytes, got {type(piece).__name__}")
        with self._lock:
            if self.pending_text and self.pending_text[-1] is None or self.incremental.ended:
                raise ValueError("append_text after end_text")
            self.pending_text.append(bytes(piece) if isinstance(piece, bytearray) else piece)

    def end_text(self) -> None:
        if self.incremental is None:
            raise ValueError("end_text: this session was opened with its full text (text=...)")
        with self._lock:
            if self.pending_text and self.pending_text[-1] is None or self.incremental.ended:
                raise ValueError("end_text called twice")
            self.pending_text.append(None)

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
        return torch.stack(self.frames).cpu()
