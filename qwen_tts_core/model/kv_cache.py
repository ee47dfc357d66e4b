"""Preallocated key/value caches, passed into the model (never stored inside it).

`KVCache` holds one buffer pair per layer, indexed by slot: a slot is one session. Rows of a batch name their slots,
so sessions at different positions share one batched forward. Writes are positional. On CPU the time axis grows by
doubling when needed; with `static=True` (GPU, CUDA graphs) it never reallocates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """A view of one layer's buffers for one forward: which slots the batch rows use and how far keys are read."""

    k: torch.Tensor            # [S, Hkv, Tmax, D]
    v: torch.Tensor
    slots: torch.Tensor | None  # [B] slot of each row; None: rows are slots 0..B-1
    read_len: int              # keys 0 .. read_len-1 are read back
    start: int | None = None   # every row writes positions start..start+T-1 (rows 0..B-1): a plain slice copy
    shared: dict | None = None  # one per forward, shared by its layers: the write rows, built by the first layer

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """k, v: [B, Hkv, T, D] written at `positions` [B, T]; returns keys/values [B, Hkv, read_len, D]."""
        B, _, T, _ = k.shape
        if self.start is not None and self.slots is None:
            self.k[:B, :, self.start:self.start + T] = k
            self.v[:B, :, self.start:self.start + T] = v
            return self.k[:B, :, : self.read_len], self.v[:B, :, : self.read_len]
        shared = {} if self.shared is None else self.shared
        if "rows" not in shared:  # one arange for the whole stack (one B and T), not one per layer
            slots = self.slots if self.slots is not None else torch.arange(B, device=k.device)
            shared["rows"] = slots[:, None].expand(B, T)
        rows = shared["rows"]
        # advanced indices around a slice: the indexed view is [B, T, Hkv, D]
        self.k[rows, :, positions] = k.transpose(1, 2)
        self.v[rows, :, positions] = v.transpose(1, 2)
        if self.slots is None:
            return self.k[:B, :, : self.read_len], self.v[:B, :, : self.read_len]
        return self.k[self.slots, :, : self.read_len], self.v[self.slots, :, : self.read_len]


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 static: bool = False) -> None:
        self.num_layers, self.num_slots = num_layers, num_slots
        self.shape_tail = (num_kv_heads, head_dim)
        self.device, self.dtype, self.static = torch.device(device), dtype, static
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._allocate(max_len)

    def _allocate(self, n: int) -> None:
        hkv, d = self.shape_tail
        new_k = [torch.zeros(self.num_slots, hkv, n, d, device=self.device, dtype=self.dtype)
                 for _ in range(self.num_layers)]
        new_v = [torch.zeros_like(t) for t in new_k]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, :, : self.capacity].copy_(old)
        self.k, self.v, self.capacity = new_k, new_v, n

    def ensure(self, n: int, limit: int | None = None) -> None:
        """Make room for positions 0..n-1 (doubling on CPU, but to at most `limit` positions (never fewer than n): a
        session's max_len; a static cache raises instead)."""
        if n <= self.capacity:
            return
        if self.static:
            raise ValueError(f"static KV cache holds {self.capacity} positions, {n} needed")
        grown = max(n, 2 * self.capacity, 64)
        self._allocate(grown if limit is None else max(n, min(grown, limit)))

    def layers(self, slots: torch.Tensor | None, read_len: int, start: int | None = None) -> list[LayerCache]:
        """Per-layer views for one forward; `start`: all rows write the same positions (from start), rows 0..B-1."""
        self.ensure(read_len)
        shared: dict = {}
        return [LayerCache(k, v, slots, read_len, start, shared) for k, v in zip(self.k, self.v)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)
