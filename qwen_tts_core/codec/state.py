"""Streaming state of the codec decoder: everything a chunk needs from the frames before it.

Latency: none. Every conv in the decoder is left-padded (causal) and every transposed conv has kernel >= stride with
its surplus trimmed on the right, so the samples of frame n depend only on frames <= n. `decode_chunk` therefore
emits exactly `t * samples_per_frame` samples for `t` frames, the moment they arrive; the overlap tails the
transposed convs carry over belong to the NEXT frame's samples and are added when it arrives (offline decode trims
the last tail the same way, so no flush is needed at the end of a stream).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def window_at(x: torch.Tensor, start: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Per-row slices: out[b] = x[b] narrowed to [start[b], start[b] + n) along `dim` (one gather, no host sync).

    Args:
        x: [B, ...]; start: Long [B] on x's device; n: slice length; dim: the dimension to slice (> 0).
    """
    idx = start[:, None] + torch.arange(n, device=x.device)[None, :]          # [B, n]
    view = [x.shape[0] if d == 0 else n if d == dim else 1 for d in range(x.dim())]
    size = [n if d == dim else s for d, s in enumerate(x.shape)]
    return torch.gather(x, dim, idx.view(view).expand(size))


@dataclass
class RowLengths:
    """Real frames per row of a right-padded chunk: row b's frames are the first `frames[b]` of the chunk's `total`;
    the rest is padding whose samples are discarded and which must not enter the row's state."""

    frames: torch.Tensor  # Long [B]
    total: int

    def at(self, width: int) -> torch.Tensor:
        """Long [B]: real samples per row at a layer where the whole chunk spans `width` samples."""
        return self.frames * (width // self.total)


@dataclass
class CodecStreamState:
    """Per-row decoder history for B streams decoded together (rows may sit at different positions).

    Attributes:
        positions: Long [B], frames already decoded by each row (the RoPE position of its next frame).
        conv_history: causal-conv name -> [B, C_in, (kernel-1)*dilation], the last inputs of that conv.
        trans_tail: transposed-conv name -> [B, C_out, kernel-stride], overlap samples owed to the next frame.
        keys / values: one per transformer layer, [B, kv_heads, window-1, head_dim] rolling buffers of the last
            window-1 positions (keys after RoPE). Entries older than a row's first frame are masked via positions.
        valid: set by the decoder only during a call on a right-padded chunk (see `RowLengths`); None otherwise.
    """

    positions: torch.Tensor
    conv_history: dict[str, torch.Tensor] = field(default_factory=dict)
    trans_tail: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    valid: RowLengths | None = None

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.positions.device

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.conv_history.values(), *self.trans_tail.values(), *self.keys, *self.values]

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Start rows over (fresh stream); the state object is updated (its tensors are replaced).

        Args:
            mask: Bool [B], rows to reset; None resets all rows.
        """
        if mask is None:
            mask = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        mask = torch.as_tensor(mask, device=self.device)
        if mask.dtype != torch.bool or mask.shape != (self.batch_size,):
            raise ValueError(f"mask must be a bool tensor of shape ({self.batch_size},), "
                             f"got {tuple(mask.shape)} {mask.dtype}")
        # out of place, so tensors made under torch.inference_mode() can be reset outside it
        self.positions = self.positions.masked_fill(mask, 0)
        for table in (self.conv_history, self.trans_tail):
            for key, t in table.items():
                table[key] = t.masked_fill(mask.view(-1, 1, 1), 0)
        for cache in (self.keys, self.values):
            for i, t in enumerate(cache):
                cache[i] = t.masked_fill(mask.view(-1, 1, 1, 1), 0)

    def select(self, index: torch.Tensor | list[int]) -> CodecStreamState:
        """A new state holding the given rows (in that order), e.g. to drop finished sessions from a batch."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return CodecStreamState(
            positions=self.positions.index_select(0, idx),
            conv_history={k: v.index_select(0, idx) for k, v in self.conv_history.items()},
            trans_tail={k: v.index_select(0, idx) for k, v in self.trans_tail.items()},
            keys=[k.index_select(0, idx) for k in self.keys],
            values=[v.index_select(0, idx) for v in self.values],
        )

    def scatter_(self, index: torch.Tensor, rows: CodecStreamState) -> None:
        """Write the rows of `rows` (a state of len(index) rows, e.g. from `select(index)`) back at `index`, in place.

        An index that repeats gets one of its rows (use repeats only for scratch rows whose state is never read).
        """
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.positions.index_copy_(0, idx, rows.positions)
        for table, other in ((self.conv_history, rows.conv_history), (self.trans_tail, rows.trans_tail)):
            for key, t in table.items():
                t.index_copy_(0, idx, other[key])
        for mine, theirs in ((self.keys, rows.keys), (self.values, rows.values)):
            for t, o in zip(mine, theirs):
                t.index_copy_(0, idx, o)

    def zero_rows_(self, index: torch.Tensor | list[int]) -> None:
        """Start the given rows over (fresh stream), in place; the other rows are untouched."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.device)
        self.positions.index_fill_(0, idx, 0)
        for t in self._tensors():
            t.index_fill_(0, idx, 0)

    @staticmethod
    def concat(states: list[CodecStreamState]) -> CodecStreamState:
        """Stack the rows of several states (same decoder) into one batch."""
        if not states:
            raise ValueError("states must be a non-empty list")
        first = states[0]
        return CodecStreamState(
            positions=torch.cat([s.positions for s in states]),
            conv_history={k: torch.cat([s.conv_history[k] for s in states]) for k in first.conv_history},
            trans_tail={k: torch.cat([s.trans_tail[k] for s in states]) for k in first.trans_tail},
            keys=[torch.cat([s.keys[i] for s in states]) for i in range(len(first.keys))],
            values=[torch.cat([s.values[i] for s in states]) for i in range(len(first.values))],
        )
