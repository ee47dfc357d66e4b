"""Codec rows behaviour pinned by a mutation review (see tests/core/test_review_mutants.py): each test here failed
on a code change the rest of the suite let pass."""

from __future__ import annotations

import torch

from qwen_tts_core.codec.rows import StreamRows

SPF = 1920


def test_a_decode_of_exactly_a_bucket_size_is_not_padded_to_the_next(codec):
    """Mutant: `_bucket` took the first bucket strictly above n (`b > n`): a call of 2 rows x 4 frames, both
    bucket sizes, decoded 4 rows x 8 frames (four times the work, on every steady chunk of a graph engine)."""
    bank = StreamRows(codec.decoder, rows=4, row_buckets=(1, 2, 4), frame_buckets=(1, 2, 4, 8))
    codes = torch.randint(0, 2048, (4, 16), generator=torch.Generator().manual_seed(0))
    for col in range(4):
        bank.write([0, 1], [col, col], codes[col].expand(2, 16))
    assert tuple(bank.decode([0, 1], [4, 4]).shape) == (2, 4 * SPF)
    bank.write([2, 3, 0], [0, 0, 0], codes[:3])
    assert tuple(bank.decode([2, 3, 0], [1, 1, 1]).shape) == (4, 1 * SPF)   # 3 rows: the bucket above
