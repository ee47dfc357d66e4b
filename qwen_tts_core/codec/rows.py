"""Streaming decode state of many rows held in batched buffers, decoded together.

`StreamRows` keeps, for `rows` streams, one `CodecStreamState` of rows+1 rows (the last is a scratch row that
pads fixed-size batches) and a buffer of the frames each row has gathered but not decoded yet. A decode call takes
any subset of rows, each with its own number of pending frames: the rows' states are gathered, the chunk is
right-padded to the longest row and decoded with per-row lengths (`CodecDecoder.decode_rows`), and the states are
scattered back. Rows join (`reset`) and leave (nothing to do: a row's buffers are simply reused) at any time.

Nothing here reads device memory from the host: indices and lengths go host -> device (pinned, non-blocking on
CUDA); the caller copies the decoded samples to the host once.

CUDA graphs (`capture_graphs`): one graph per (rows bucket, frames bucket), captured before traffic. A graph reads
its rows, lengths and codes from static buffers the host fills before the replay (one host -> device copy and one
gather of the pending codes); its state updates land in the rows' own state tensors, in place. A call whose frames
exceed the largest frames bucket runs the same body eagerly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decoder import CodecDecoder
from .state import CodecStreamState


def to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Long tensor of host ints on `device`; on CUDA through pinned memory without blocking the host."""
    t = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def plan_groups(lengths: Sequence[int], call_cost: float) -> list[list[int]]:
    """Split rows into decode calls: each call pads its rows to its longest one.

    Minimises  sum over calls of (call_cost + rows * longest)  (cost in row-frames; call_cost is the fixed cost
    of one decoder call in the same unit) over groups that are contiguous in length order (which contain an
    optimum of this cost); rows of equal length share a call. O(distinct lengths ^ 2). Returns lists of indices
    into `lengths`, longest group first.
    """
    if not lengths:
        return []
    distinct = sorted(set(lengths))
    k = len(distinct)
    if k == 1 or call_cost == float("inf"):
        return [list(range(len(lengths)))]
    count = {n: 0 for n in distinct}
    for n in lengths:
        count[n] += 1
    rows_upto = [0]
    for n in distinct:
        rows_upto.append(rows_upto[-1] + count[n])
    best = [0.0] + [float("inf")] * k        # best[j]: cost of the rows of the j shortest lengths
    cut = [0] * (k + 1)
    for j in range(1, k + 1):
        for i in range(j):
            cost = best[i] + call_cost + (rows_upto[j] - rows_upto[i]) * distinct[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], k
    while j:
        members = set(distinct[cut[j]: j])
        groups.append([i for i, n in enumerate(lengths) if n in members])
        j = cut[j]
    return groups


def split_calls(groups: list[list[int]], lengths: Sequence[int], max_frames: int) -> list[list[int]]:
    """Cut each group into calls of at most `max_frames` row-frames (rows x the group's longest length; at least
    one row per call); max_frames <= 0: no limit."""
    if max_frames <= 0:
        return groups
    out = []
    for group in groups:
        per_call = max(1, max_frames // max(lengths[i] for i in group))
        out += [group[i: i + per_call] for i in range(0, len(group), per_call)]
    return out


def _bucket(n: int, buckets: Sequence[int] | None) -> int:
    if not buckets:
        return n
    return next((b for b in sorted(buckets) if b >= n), n)


class StreamRows:
    """`rows` decoder streams in batched buffers.

    Attributes:
        decoder: the CodecDecoder used (its dtype is the compute dtype).
        state: CodecStreamState of rows + 1 rows (row `rows` is scratch).
        pending: Long [rows + 1, capacity, num_quantizers], frames gathered per row (host tracks the counts).
    """

    @torch.inference_mode()
    def __init__(self, decoder: CodecDecoder, rows: int, capacity: int = 8,
                 row_buckets: Sequence[int] | None = None, frame_buckets: Sequence[int] | None = None) -> None:
        if rows < 1:
            raise ValueError(f"rows must be >= 1, got {rows}")
        self.decoder, self.rows = decoder, rows
        self.device = decoder.pre_conv.conv.weight.device
        self.row_buckets, self.frame_buckets = row_buckets, frame_buckets
        self.scratch = rows
        q = decoder.cfg.num_quantizers
        self.state: CodecStreamState = decoder.new_state(rows + 1)
        self.pending = torch.zeros(rows + 1, max(1, capacity), q, dtype=torch.long, device=self.device)
        self.graphs: dict[tuple[int, int], object] = {}        # (rows bucket, frames bucket) -> graph
        self._graph_out: dict[tuple[int, int], torch.Tensor] = {}
        self.replays = 0                                         # decode calls served by a graph

    @property
    def capacity(self) -> int:
        return self.pending.shape[1]

    @torch.inference_mode()
    def ensure_capacity(self, frames: int) -> None:
        """Room for `frames` pending frames per row (grows the buffer, keeping what is gathered)."""
        if frames <= self.capacity:
            return
        grown = torch.zeros(self.rows + 1, max(frames, 2 * self.capacity), self.pending.shape[2],
                            dtype=torch.long, device=self.device)
        grown[:, : self.capacity] = self.pending
        self.pending = grown

    @torch.inference_mode()
    def reset(self, row: int, ref_codes: torch.Tensor | None = None, ref_key: tuple | None = None) -> None:
        """Start `row` over; ref_codes Long [R, Q] (R >= 1) are its left context (samples dropped): the decoder's
        state after them, computed once per reference (`CodecDecoder.context_state`; ref_key: its cache key)."""
        idx = to_device([row], self.device)
        if ref_codes is None or ref_codes.shape[0] == 0:
            self.state.zero_rows_(idx)
            return
        self.state.scatter_(idx, self.decoder.context_state(ref_codes, ref_key))

    @torch.inference_mode()
    def write(self, rows: Sequence[int], cols: Sequence[int], codes: torch.Tensor) -> None:
        """Store codes [N, Q] (one frame each) at pending[rows[i], cols[i]]."""
        self.ensure_capacity(max(cols) + 1)
        flat = to_device([r * self.capacity + c for r, c in zip(rows, cols)], self.device)
        q = self.pending.shape[2]
        self.pending.view(-1, q).index_copy_(0, flat, codes.to(self.device, torch.long))

    @torch.inference_mode()
    def decode(self, rows: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
        """Decode pending[rows[i], :lengths[i]] of every row in ONE call and advance those rows (lengths >= 1).

        Returns float [len(rows) (+ bucket padding), T * samples_per_frame] on the device, T = the longest length
        (rounded up to a frame bucket); row i's samples are [i, :lengths[i] * samples_per_frame]. With graphs the
        result is the graph's static output: copy it before the next decode.
        """
        b, t = _bucket(len(rows), self.row_buckets), _bucket(max(lengths), self.frame_buckets)
        pad = b - len(rows)
        if (b, t) in self.graphs:
            return self._replay(b, t, list(rows) + [self.scratch] * pad, list(lengths) + [0] * pad)
        # with buckets, always the per-row-lengths body: one fixed body per (rows, frames) bucket
        ragged = bool(self.row_buckets or self.frame_buckets) or pad > 0 or any(n != t for n in lengths)
        self.ensure_capacity(t)
        idx = to_device(list(rows) + [self.scratch] * pad, self.device)
        lens = to_device(list(lengths) + [0] * pad, self.device) if ragged else None
        return self.run(idx, lens, t)

    @torch.inference_mode()
    def run(self, idx: torch.Tensor, lens: torch.Tensor | None, t: int) -> torch.Tensor:
        """The device body of `decode`: no host work, shapes fixed by (len(idx), t) (a CUDA-graph unit).

        Args:
            idx: Long [b] rows to decode (repeats only of the scratch row); lens: Long [b] frames per row, or None
            when all b rows decode t frames; t: frames per row (<= capacity).
        """
        return self._body(self.pending[:, :t].index_select(0, idx).transpose(1, 2), idx, lens)

    def _body(self, codes: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        """codes Long [b, Q, t] of the rows `idx` -> their samples; the rows' states advance in place."""
        sub = self.state.select(idx)
        wav = self.decoder.forward_unclamped(codes, sub, lens).clamp(min=-1.0, max=1.0)
        self.state.scatter_(idx, sub)
        return wav

    # --- CUDA graphs -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self, capture) -> float:
        """Capture one graph per (rows bucket, frames bucket) with `capture` (a `GraphCapture`: its pool and lock;
        the CPU stand-in in tests). Needs row_buckets and frame_buckets. Leaves every row's state as it was (the
        captures decode the scratch row only). Returns the seconds spent."""
        import time

        if not self.row_buckets or not self.frame_buckets:
            raise ValueError("capture_graphs needs row_buckets and frame_buckets")
        t0 = time.perf_counter()
        bmax, tmax, q = max(self.row_buckets), max(self.frame_buckets), self.pending.shape[2]
        pin = self.device.type == "cuda"
        self._in_host = torch.zeros(2, bmax, dtype=torch.long, pin_memory=pin)   # rows | lengths
        self._in_host_np = self._in_host.numpy()
        self._in = torch.zeros(2, bmax, dtype=torch.long, device=self.device)
        self._in[0] = self.scratch
        self._codes = torch.zeros(bmax * tmax * q, dtype=torch.long, device=self.device)
        for b in sorted(set(self.row_buckets)):
            for t in sorted(set(self.frame_buckets)):
                codes = self._codes_in(b, t)
                idx, lens = self._in[0, :b], self._in[1, :b]
                self.graphs[(b, t)], self._graph_out[(b, t)] = capture.capture_output(
                    lambda codes=codes, idx=idx, lens=lens: self._body(codes.transpose(1, 2), idx, lens))
        self._in[0] = self.scratch
        self._in[1] = 0
        return time.perf_counter() - t0

    def _codes_in(self, b: int, t: int) -> torch.Tensor:
        """The static codes input [b, t, Q] of the (b, t) graph (a contiguous view of one shared buffer)."""
        q = self.pending.shape[2]
        return self._codes[: b * t * q].view(b, t, q)

    def _replay(self, b: int, t: int, rows: list[int], lengths: list[int]) -> torch.Tensor:
        h = self._in_host_np
        h[0, :b] = rows
        h[1, :b] = lengths
        # the host buffer is reused by the next call: safe, the caller reads the samples back (a sync) in between
        self._in[:, :b].copy_(self._in_host[:, :b], non_blocking=True)
        self.ensure_capacity(t)
        torch.index_select(self.pending[:, :t], 0, self._in[0, :b], out=self._codes_in(b, t))
        self.graphs[(b, t)].replay()
        self.replays += 1
        return self._graph_out[(b, t)]
