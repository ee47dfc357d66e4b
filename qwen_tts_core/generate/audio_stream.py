"""Frames -> audio chunks: a small first chunk for latency, then steady chunks; the codec decoder's streaming state
carries the history, so chunks are exact slices of the offline decode.

`AudioStreamer` decodes one session alone. `BatchedAudio` holds many sessions ("rows") and decodes every row with a
chunk due in one call per engine step.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..codec.rows import StreamRows, plan_groups, split_calls

log = logging.getLogger(__name__)


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
    error: Exception | None = None   # this row's decode failed (alone): the row is dropped, nothing more comes


@dataclass
class _Row:
    row: int                 # index into the StreamRows buffers
    first: int
    every: int
    pending: int = 0         # frames gathered, not decoded yet
    emitted: int = 0         # frames emitted (ICL reference excluded)
    finished: bool = False
    held: list[np.ndarray] = field(default_factory=list)  # samples decoded ahead of a long chunk, not emitted yet
    held_frames: int = 0


class BatchedAudio:
    """Streaming audio decode of many sessions ("rows", named by an integer key) in ONE codec call per step.

        audio = BatchedAudio(codec, max_rows=64)
        audio.open(key, first_chunk_frames=1, chunk_frames=4, ref_codes=None)
        every engine step: audio.push(keys, codes)   # codes Long [N, 16] on the codec device, a frame per key
                           audio.finish(key) / audio.drop(key)
                           for out in audio.decode(): ...   # AudioOut per row with a chunk due

    Each row decodes its first chunk once `first_chunk_frames` frames have gathered, then every `chunk_frames`
    frames, and what is left once finished (an empty final AudioOut when nothing is). Rows sit at different
    positions with different amounts of pending frames; `decode` gathers every row that is due into one batched
    decoder call (right-padded, per-row lengths: see `CodecDecoder.decode_rows`), exact against each row's own
    offline decode. The only host sync is the one copy of the decoded samples per `decode`.

    Args:
        codec: a loaded `Codec`.
        max_rows: rows open at once (finished rows hold theirs until their final output).
        dtype: compute dtype (e.g. torch.bfloat16 on GPU; the codec's converted copy of the decoder, shared with
            other engines on this codec); default: the codec's (fp32 for parity).
        call_cost: the fixed cost of one decoder call in row-frames, for rows with different pending lengths:
            they are padded into one call unless splitting by length saves more than this. Default: one call
            always on CUDA (launch-bound); 4 on CPU (compute-bound).
        max_call_frames: at most this many row-frames (rows x padded frames) per decoder call; more due rows are
            split over several calls (still one host copy). Default: no limit on CUDA; 32 on CPU, where one call
            over many rows is slower than a few (activations leave the caches, large buffers fault in pages).
        row_buckets / frame_buckets: pad each call's rows / frames up to the next of these sizes (fixed shapes
            for CUDA graphs); None: exact sizes (with `capture`: powers of two up to max_rows, and FRAME_BUCKETS).
        capture: a `GraphCapture` (the engine's: its pool and lock): every (rows, frames) bucket is captured in a
            CUDA graph now, and each decode is one replay (one call per decode; a call with more frames than the
            largest frames bucket runs eagerly).
    """

    FRAME_BUCKETS = (1, 2, 4, 8)
    PIECE_FRAMES = 64
    """Without graphs, the most frames of one row a decoder call takes ahead of its chunk (with graphs: the largest
    frames bucket)."""

    def __init__(self, codec, max_rows: int, dtype: torch.dtype | None = None, call_cost: float | None = None,
                 max_call_frames: int | None = None, row_buckets: Sequence[int] | None = None,
                 frame_buckets: Sequence[int] | None = None, capture=None) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise ValueError(f"max_rows must be an integer >= 1, got {max_rows!r}")
        decoder = codec.decoder_in(dtype)
        self.codec, self.max_rows = codec, max_rows
        self.spf, self.q = codec.samples_per_frame, codec.cfg.num_quantizers
        if capture is not None:
            if row_buckets is None:
                row_buckets = [1 << i for i in range(max_rows.bit_length()) if 1 << i < max_rows] + [max_rows]
            frame_buckets = frame_buckets or self.FRAME_BUCKETS
            call_cost, max_call_frames = float("inf"), 0  # one call (one replay) per decode
        self.bank = StreamRows(decoder, max_rows, row_buckets=row_buckets, frame_buckets=frame_buckets,
                               capacity=max(frame_buckets or (8,)))
        cuda = self.bank.device.type == "cuda"
        if call_cost is None:
            call_cost = float("inf") if cuda else 4.0
        if max_call_frames is None:
            max_call_frames = 0 if cuda else 32
        self.call_cost, self.max_call_frames = call_cost, max_call_frames
        # a chunk longer than this is decoded as its frames gather, `piece` frames a call (emitted when due): one
        # call over a whole long chunk held activations that grow with it, and padded every row due with it
        self.piece = max(self.bank.frame_buckets) if self.bank.graphs else self.PIECE_FRAMES
        self.open_rows: dict[int, _Row] = {}
        self.free = list(range(max_rows))
        self.capture_s = self.bank.capture_graphs(capture) if capture is not None else 0.0
        self._warned = False  # an eager decode beside graphs was logged

    # --- caller side ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def open(self, key: int, first_chunk_frames: int, chunk_frames: int,
             ref_codes: torch.Tensor | None = None, ref_key: tuple | None = None) -> None:
        """Start a row for `key`; ref_codes Long [R, 16]: ICL reference frames, the row's left context (decoded once
        per reference and shared: `CodecDecoder.context_state`; ref_key: `codec.context.codes_key(ref_codes)`, taken
        where the codes were on the host, so opening reads no device memory)."""
        for name, v in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if key in self.open_rows:
            raise ValueError(f"key {key} is already open")
        if not self.free:
            raise ValueError(f"all {self.max_rows} rows are in use (max_rows)")
        if ref_codes is not None and (not isinstance(ref_codes, torch.Tensor) or ref_codes.dim() != 2
                                      or ref_codes.shape[1] != self.q or ref_codes.dtype.is_floating_point):
            shown = (tuple(ref_codes.shape), ref_codes.dtype) if isinstance(ref_codes, torch.Tensor) \
                else type(ref_codes).__name__
            raise ValueError(f"ref_codes must be an integer tensor [R, {self.q}], got {shown}")
        row = self.free.pop(0)
        try:
            self.bank.reset(row, ref_codes, ref_key)
        except BaseException:  # an interrupt too (an ICL reference's decode is long): the row stays free
            self.free.insert(0, row)
            raise
        self.open_rows[key] = _Row(row, first_chunk_frames, chunk_frames)

    @torch.inference_mode()
    def push(self, keys: list[int], codes: torch.Tensor) -> None:
        """One new frame per key: codes Long [len(keys), 16] (on the codec device; values not range-checked)."""
        if codes.dim() != 2 or codes.shape != (len(keys), self.q) or codes.dtype.is_floating_point:
            raise ValueError(f"codes must be an integer tensor [len(keys), {self.q}], got {tuple(codes.shape)} "
                             f"{codes.dtype} for {len(keys)} keys")
        if len(set(keys)) != len(keys):
            raise ValueError("keys must not repeat (one new frame per key)")
        rows = [self._row(k) for k in keys]
        for k, r in zip(keys, rows):
            if r.finished:
                raise ValueError(f"key {k} is finished")
        if not rows:
            return
        self.bank.write([r.row for r in rows], [r.pending for r in rows], codes)
        for r in rows:
            r.pending += 1

    def first_due_after(self, key: int, frames: int = 1) -> bool:
        """Whether `frames` more frames for `key` complete its first chunk (nothing of it decoded yet)."""
        r = self._row(key)
        gathered = r.held_frames + r.pending
        return r.emitted == 0 and gathered < r.first <= gathered + frames

    def finish(self, key: int) -> None:
        """No more frames for `key`: the next decode() emits what is left with final=True."""
        self._row(key).finished = True

    def drop(self, key: int) -> None:
        """Cancel `key`: its row is freed now and nothing more is emitted (unknown keys are ignored)."""
        r = self.open_rows.pop(key, None)
        if r is not None:
            self.free.append(r.row)
            self.free.sort()

    @torch.inference_mode()
    def decode(self) -> list[AudioOut]:
        """Decode every row with a chunk due in one batched call (more only when call_cost says splitting by
        length is cheaper); one host copy of the samples.

        A row is due once it has gathered first_chunk_frames (its first chunk) or chunk_frames (later chunks)
        frames, or when finished; a due row decodes all the frames it has gathered. A row gathering a chunk longer
        than `piece` frames is decoded `piece` frames at a time as they gather, its samples held until it is due
        (the same samples: the stream state carries the history). Finished rows get final=True
        (empty PCM when nothing was left) and are freed. When a call fails, its rows are decoded one by one: a row
        that fails alone gets final=True with `error` set and is freed, the others decode as if it were not there
        (eager only: a failed graph replay raises).
        """
        due, ahead = [], set()
        for k, r in self.open_rows.items():
            if r.finished or r.held_frames + r.pending >= (r.first if r.emitted == 0 else r.every):
                due.append((k, r))
            elif r.pending >= self.piece:  # a long chunk: decode what has gathered now, emit it when due
                due.append((k, r))
                ahead.add(k)
        work = [(k, r) for k, r in due if r.pending]
        pieces, where, failed = [], {}, {}
        offset = 0
        groups = plan_groups([r.pending for _, r in work], self.call_cost)
        calls = deque(split_calls(groups, [r.pending for _, r in work], self.max_call_frames))
        one_call = len(calls) <= 1  # with graphs always (a failed replay raises: no retries to count)
        while calls:
            group = calls.popleft()
            rows = [work[i][1] for i in group]
            if self.bank.graphs and not self._warned and max(r.pending for r in rows) > max(self.bank.frame_buckets):
                self._warned = True
                log.warning("an audio decode of %d frames runs eagerly: graphs hold at most %d (give the engine "
                            "the chunk sizes in use: audio_chunk_frames)", max(r.pending for r in rows),
                            max(self.bank.frame_buckets))
            try:
                wav = self.bank.decode([r.row for r in rows], [r.pending for r in rows])
            except Exception as e:  # noqa: BLE001 - a row's failure must not fail the rows sharing its call
                if self.bank.graphs:
                    raise  # a replay that fails leaves no row to trust (on CUDA, a sticky error)
                if len(group) > 1:  # the call advanced no state: the same rows again, one per call
                    log.warning("an audio decode of %d rows failed (%s: %s); decoding them one by one", len(group),
                                type(e).__name__, e)
                    calls.extendleft([i] for i in reversed(group))
                else:
                    failed[work[group[0]][0]] = e
                continue
            if self.bank.graphs and not one_call:
                wav = wav.clone()  # a graph's output is rewritten by its next replay
            width = wav.shape[1]
            for j, i in enumerate(group):
                where[work[i][0]] = offset + j * width
            offset += wav.numel()
            pieces.append(wav.reshape(-1))
        host = np.zeros(0, np.float32)
        if pieces:
            flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
            host = flat.float().cpu().numpy()   # the one device -> host copy
            if self.bank.graphs and not flat.is_cuda:
                host = host.copy()  # on CPU that is a view of the graph's output, which the next replay rewrites
        out = []
        for k, r in due:
            if k in failed:
                out.append(AudioOut(k, np.zeros(0, np.float32), r.emitted, 0, True, error=failed[k]))
                self.drop(k)
                continue
            start = where.get(k, 0)
            pcm = host[start: start + r.pending * self.spf]
            if pcm.size != host.size:  # a view would keep every row's samples alive as long as this chunk
                pcm = pcm.copy()
            if k in ahead:
                r.held.append(pcm)
                r.held_frames += r.pending
                r.pending = 0
                continue
            frames = r.held_frames + r.pending
            if r.held:
                pcm = np.concatenate([*r.held, pcm])
                r.held, r.held_frames = [], 0
            out.append(AudioOut(k, pcm, r.emitted, frames, r.finished))
            r.emitted += frames
            r.pending = 0
            if r.finished:
                self.drop(k)
        return out

    @property
    def num_open(self) -> int:
        """Rows in use (open, or finished with their final output still to come)."""
        return len(self.open_rows)

    def __contains__(self, key: int) -> bool:
        return key in self.open_rows

    def _row(self, key: int) -> _Row:
        r = self.open_rows.get(key)
        if r is None:
            raise KeyError(f"key {key} is not open")
        return r
