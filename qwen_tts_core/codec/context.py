"""The decoder's state after a voice-clone reference, computed once per reference and shared.

An ICL (voice clone with reference text) session's audio continues its reference: its stream starts from the state
the decoder holds after decoding every reference frame (their samples are dropped). That state depends only on the
reference codes and the decoder's weights, but computing it costs a decode as long as the reference: 125 frames
for a 10 s reference, seconds of CPU before a session's first audio, paid again by every request with that voice.
`ContextCache` keeps it per reference, so a later session with the voice starts at the cost of a copy, with the
very same state (the same audio, bit for bit).

    state = decoder.context_state(ref_codes)     # a 1-row CodecStreamState: copy it in, never write to it
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from ..model.layers import weight_key
from .state import CodecStreamState

DEFAULT_MAX_BYTES = 256 << 20
"""Bytes of cached states per decoder: ~50 references for the full-size decoder in fp32 (~5 MB each, mostly its
sliding-window KV cache), twice as many in bf16; least recently used ones go first."""

CONTEXT_PIECE = 64
"""Reference frames per decoder call while computing a state (bounds the call's activations, as offline decode)."""


def codes_key(codes: torch.Tensor) -> tuple:
    """The cache key of reference codes: their shape and a digest of their values. Reads them on the host: take it
    where they are there (a voice prompt before it moves to the device), as the engine does when a request arrives."""
    host = codes.detach().to("cpu", torch.long).contiguous()
    return tuple(host.shape), hashlib.blake2b(host.numpy().tobytes(), digest_size=16).digest()


def _nbytes(state: CodecStreamState) -> int:
    return sum(t.numel() * t.element_size() for t in (state.positions, *state._tensors()))


class ContextCache:
    """Least-recently-used map (reference codes, decoder weights) -> the decoder's state after those codes.

    Thread-safe (engines on one decoder share it). Keys are the codes' content, so any copy of a voice (a file, the
    voice store, a new tensor per request) finds its state; a change of the decoder's weights (load_state_dict, an
    in-place edit, a dtype or device move) drops every entry. A deep copy of the decoder gets an empty cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, CodecStreamState] = OrderedDict()
        self._bytes = 0
        self._weights: tuple | None = None
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __deepcopy__(self, memo) -> ContextCache:
        return ContextCache(self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def state(self, decoder, codes: torch.Tensor, key: tuple | None = None) -> CodecStreamState:
        """The 1-row state of `decoder` after decoding `codes` (Long [R, Q], R >= 1) from a fresh start. Shared:
        callers copy it (`CodecStreamState.scatter_`) and never write to it. key: `codes_key(codes)` when the caller
        has it (no read of device memory here); None: computed now."""
        key = codes_key(codes) if key is None else key
        weights = tuple(weight_key(p) for p in decoder.parameters())
        with self._lock:
            if weights != self._weights:
                self._entries.clear()
                self._bytes, self._weights = 0, weights
            held = self._entries.get(key)
            if held is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return held
            self.misses += 1
        state = self._compute(decoder, codes)  # outside the lock: other engines' lookups go on meanwhile
        size = _nbytes(state)
        with self._lock:
            if weights == self._weights and size <= self.max_bytes and key not in self._entries:
                self._entries[key] = state
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, old = self._entries.popitem(last=False)
                    self._bytes -= _nbytes(old)
        return state

    @staticmethod
    @torch.inference_mode()
    def _compute(decoder, codes: torch.Tensor) -> CodecStreamState:
        state = decoder.new_state(1)
        frames = codes.to(state.device, torch.long).T[None]                      # [1, Q, R]
        for start in range(0, frames.shape[-1], CONTEXT_PIECE):
            decoder.forward_unclamped(frames[..., start: start + CONTEXT_PIECE], state)
        return state
