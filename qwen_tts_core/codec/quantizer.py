"""Split residual vector quantizer, decode side (names follow `decoder.quantizer.*`).

Codebook vectors are `embedding_sum / max(cluster_usage, 1e-5)`; the vectors of the codebooks of one split are
summed and projected by a 1x1 conv; the two splits (1 semantic codebook, the rest acoustic) are added.
`input_proj` is only used for encoding but is part of the checkpoint, so it is kept to load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Codebook(nn.Module):
    """One codebook of `size` vectors of `dim`."""

    def __init__(self, dim: int, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.cluster_usage = nn.Parameter(torch.ones(size))
        self.embedding_sum = nn.Parameter(torch.zeros(size, dim))

    def vectors(self) -> torch.Tensor:
        """[size, dim] codebook vectors."""
        return self.embedding_sum / self.cluster_usage.clamp(min=self.eps)[:, None]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """The vectors of `codes` (Long [...]) -> [..., dim]. On CPU, when fewer codes than vectors are asked for
        (every streaming chunk), only their rows are divided: the same quotients bit for bit, without dividing all
        2048 x dim of each codebook per call (~6 ms of a 1-frame chunk's ~60 ms). Elsewhere the whole codebook, as
        one division (fewer kernel launches on a GPU)."""
        if codes.device.type == "cpu" and codes.numel() < self.cluster_usage.shape[0]:
            return F.embedding(codes, self.embedding_sum) / \
                F.embedding(codes, self.cluster_usage[:, None]).clamp(min=self.eps)
        return F.embedding(codes, self.vectors())


class _CodebookHolder(nn.Module):
    def __init__(self, dim: int, size: int) -> None:
        super().__init__()
        self._codebook = Codebook(dim, size)


class _Layers(nn.Module):
    def __init__(self, n: int, dim: int, size: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_CodebookHolder(dim, size) for _ in range(n)])


class ResidualQuantizer(nn.Module):
    """n codebooks of `dim` (= codebook_dim // 2) with 1x1 projections to/from codebook_dim."""

    def __init__(self, n: int, dim: int, outer_dim: int, size: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(outer_dim, dim, 1, bias=False)
        self.output_proj = nn.Conv1d(dim, outer_dim, 1, bias=False)
        self.vq = _Layers(n, dim, size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes Long [B, n, t] -> [B, outer_dim, t]."""
        total = None
        for i, holder in enumerate(self.vq.layers):
            q = holder._codebook.lookup(codes[:, i])
            total = q if total is None else total + q
        return self.output_proj(total.transpose(1, 2))


class SplitResidualQuantizer(nn.Module):
    """First codebook (semantic) and the remaining codebooks (acoustic) with separate projections."""

    def __init__(self, num_quantizers: int, codebook_dim: int, codebook_size: int) -> None:
        super().__init__()
        dim = codebook_dim // 2
        self.rvq_first = ResidualQuantizer(1, dim, codebook_dim, codebook_size)
        self.rvq_rest = ResidualQuantizer(num_quantizers - 1, dim, codebook_dim, codebook_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes Long [B, num_quantizers, t] -> [B, codebook_dim, t]."""
        return self.rvq_first.decode(codes[:, :1]) + self.rvq_rest.decode(codes[:, 1:])
