"""Frames -> audio chunks: a small first chunk for latency, then steady chunks; the codec decoder's streaming state
carries the history, so chunks are exact slices of the offline decode.

`AudioStreamer` decodes one session alone. `BatchedAudio` holds many sessions ("rows") and decodes every row with a
chunk due in one call per engine step.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        return self._decode() if self.due() else None

    def due(self) -> bool:
        """Enough frames have gathered for the next chunk."""
        need = self.first if self.emitted_frames == 0 else self.every
        return len(self.pending) >= need

    def finish(self) -> np.ndarray:
        """Decode the frames still gathered (the decoder holds nothing back: a chunk's samples are final)."""
        return self._decode() if self.pending else np.zeros(0, np.float32)

    def _decode(self) -> np.ndarray:
        codes = torch.stack(self.pending, dim=1)[None].to(self.codec.device)  # [1, 16, t]
        self.frame_start = self.emitted_frames
        self.emitted_frames += len(self.pending)
        self.pending = []
        wav = self.codec.decode_chunk(codes, self.state, check=False)
        return wav[0].float().cpu().numpy()


@dataclass
class AudioOut:
    """One decoded chunk of one row: float32 PCM [num_frames * 1920] at 24 kHz; `final` marks the row's last."""

    key: int
    pcm: np.ndarray
    frame_start: int
    num_frames: int
    final: bool


class BatchedAudio:
    """Streaming audio decode of many sessions ("rows", named by an integer key).

    open(key) -> push(keys, codes) every step -> decode() every step -> finish(key) or drop(key).
    """

    def __init__(self, codec, max_rows: int) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        self.codec, self.max_rows = codec, max_rows
        self.rows: dict[int, AudioStreamer] = {}
        self.finished: set[int] = set()

    def open(self, key: int, first_chunk_frames: int, chunk_frames: int,
             ref_codes: torch.Tensor | None = None) -> None:
        if key in self.rows:
            raise ValueError(f"key {key} is already open")
        if len(self.rows) >= self.max_rows:
            raise ValueError(f"all {self.max_rows} rows are in use (max_rows)")
        self.rows[key] = AudioStreamer(self.codec, first_chunk_frames, chunk_frames, ref_codes)

    def push(self, keys: list[int], codes: torch.Tensor) -> None:
        q = self.codec.cfg.num_quantizers
        if codes.dim() != 2 or codes.shape != (len(keys), q):
            raise ValueError(f"codes must be [len(keys), {q}], got {tuple(codes.shape)} for {len(keys)} keys")
        if len(set(keys)) != len(keys):
            raise ValueError("keys must not repeat (one new frame per key)")
        for i, key in enumerate(keys):
            if key in self.finished:
                raise ValueError(f"key {key} is finished")
            self._row(key).pending.append(codes[i].clone())

    def finish(self, key: int) -> None:
        self._row(key)
        self.finished.add(key)

    def drop(self, key: int) -> None:
        self.rows.pop(key, None)
        self.finished.discard(key)

    def decode(self) -> list[AudioOut]:
        out = []
        for key, row in list(self.rows.items()):
            final = key in self.finished
            if not (final or row.due()):
                continue
            start = row.emitted_frames
            pcm = row.finish()
            out.append(AudioOut(key, pcm, start, len(pcm) // self.codec.samples_per_frame, final))
            if final:
                self.drop(key)
        return out

    def _row(self, key: int) -> AudioStreamer:
        if key not in self.rows:
            raise KeyError(f"key {key} is not open")
        return self.rows[key]
