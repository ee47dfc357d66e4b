"""Frames -> audio chunks for one session: a small first chunk for latency, then steady chunks; the codec decoder's
streaming state carries the history, so chunks are exact slices of the offline decode."""

from __future__ import annotations

import numpy as np
import torch


class AudioStreamer:
    def __init__(self, codec, first_chunk_frames: int, chunk_frames: int,
                 ref_codes: torch.Tensor | None = None) -> None:
        if first_chunk_frames < 1 or chunk_frames < 1:
            raise ValueError("first_chunk_frames and chunk_frames must be >= 1")
        self.codec = codec
        self.first, self.every = first_chunk_frames, chunk_frames
        self.state = codec.new_stream(1)
        self.pending: list[torch.Tensor] = []
        self.emitted_frames = 0
        self.frame_start = 0
        if ref_codes is not None and len(ref_codes):
            # ICL: the reference frames are left context of the decode; their audio is not emitted
            codec.decode_chunk(ref_codes.T[None].to(codec.device).long(), self.state)

    def push(self, codes: torch.Tensor) -> np.ndarray | None:
        """codes [16] of one new frame; returns a chunk when enough frames have gathered."""
        self.pending.append(codes)
        need = self.first if self.emitted_frames == 0 else self.every
        return self._decode() if len(self.pending) >= need else None

    def finish(self) -> np.ndarray:
        """Decode the frames still gathered (the decoder holds nothing back: a chunk's samples are final)."""
        return self._decode() if self.pending else np.zeros(0, np.float32)

    def _decode(self) -> np.ndarray:
        codes = torch.stack(self.pending, dim=1)[None].to(self.codec.device)  # [1, 16, t]
        self.frame_start = self.emitted_frames
        self.emitted_frames += len(self.pending)
        self.pending = []
        wav = self.codec.decode_chunk(codes, self.state)
        return wav[0].float().cpu().numpy()
