"""The codec's small-call matrix-product convs equal torch's conv kernels, and a whole decode does not depend on
which of the two each layer takes (`layers.MATMUL_ROWS`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qwen_tts_core.codec import layers
from qwen_tts_core.codec.layers import SnakeBeta, conv1d_mm, conv_transpose1d_mm

NEVER = {"conv": float("inf"), "trans": float("inf")}
ALWAYS = {"conv": 0.0, "trans": 0.0}


@pytest.mark.parametrize("b,c,o,k,dilation,length", [
    (1, 24, 36, 7, 1, 22), (3, 16, 16, 7, 9, 60), (2, 8, 5, 3, 1, 3), (1, 16, 16, 1, 1, 1), (4, 12, 7, 1, 1, 9),
])
@pytest.mark.parametrize("bias", [True, False])
def test_conv1d_mm_equals_conv1d(b, c, o, k, dilation, length, bias):
    g = torch.Generator().manual_seed(b * 100 + k)
    x, w = torch.randn(b, c, length, generator=g), torch.randn(o, c, k, generator=g)
    bb = torch.randn(o, generator=g) if bias else None
    want = F.conv1d(x, w, bb, dilation=dilation)
    got = conv1d_mm(x, w, bb, dilation)
    assert got.shape == want.shape and got.is_contiguous()
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    w[0, 0, k - 1] += 1.0  # the last tap is read: a changed weight changes the output
    assert float((conv1d_mm(x, w, bb, dilation) - got).abs().max()) > 1e-3


@pytest.mark.parametrize("b,c,o,k,stride,n", [
    (1, 32, 16, 16, 8, 4), (3, 12, 6, 10, 5, 7), (2, 8, 8, 2, 2, 1), (2, 8, 4, 5, 2, 6), (1, 6, 3, 3, 3, 1),
])
def test_conv_transpose1d_mm_equals_conv_transpose1d(b, c, o, k, stride, n):
    g = torch.Generator().manual_seed(n * 10 + k)
    x, w = torch.randn(b, c, n, generator=g), torch.randn(c, o, k, generator=g)
    want = F.conv_transpose1d(x, w, None, stride=stride)
    got = conv_transpose1d_mm(x, w, stride)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
    w[0, 0, k - 1] += 1.0  # the last tap (the overlap owed to the next frame) is read
    assert float((conv_transpose1d_mm(x, w, stride) - got).abs().max()) > 1e-3


def test_snake_beta_in_one_buffer_equals_the_spelled_out_ops_and_leaves_its_input():
    g = torch.Generator().manual_seed(3)
    act = SnakeBeta(6)
    with torch.no_grad():
        act.alpha.copy_(torch.randn(6, generator=g) * 0.5)
        act.beta.copy_(torch.randn(6, generator=g) * 0.5)
    x = torch.randn(2, 6, 50, generator=g)
    keep = x.clone()
    with torch.inference_mode():
        got = act(x)
        alpha, beta = torch.exp(act.alpha)[None, :, None], torch.exp(act.beta)[None, :, None]
        want = x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)
    assert torch.equal(got, want)
    assert torch.equal(x, keep)


def _stream(codec, codes: torch.Tensor, schedule: list[int]) -> torch.Tensor:
    state, pieces, start, i = codec.new_stream(codes.shape[0]), [], 0, 0
    while start < codes.shape[-1]:
        n = schedule[i % len(schedule)]
        pieces.append(codec.decode_chunk(codes[..., start: start + n], state))
        start, i = start + n, i + 1
    return torch.cat(pieces, dim=-1)


def test_a_decode_is_the_same_whichever_kernels_its_layers_take(codec, monkeypatch):
    g = torch.Generator().manual_seed(8)
    codes = torch.randint(0, 2048, (2, 16, 30), generator=g)
    out = {}
    for name, rows in (("conv", NEVER), ("matmul", ALWAYS)):
        monkeypatch.setattr(layers, "MATMUL_ROWS", rows)
        out[name] = (_stream(codec, codes, [1, 4, 3]), codec.decoder.decode(codes))
    monkeypatch.undo()
    auto = _stream(codec, codes, [1, 4, 3])
    ref = out["conv"][1]
    assert float(ref.abs().max()) > 0.05  # a real signal
    for wav in (out["conv"][0], out["matmul"][0], out["matmul"][1], auto):
        assert float((wav - ref).abs().max()) <= 1e-5


def test_ragged_rows_are_the_same_whichever_kernels_their_layers_take(codec, monkeypatch):
    """decode_rows (right-padded rows: the transposed conv's masked tail, per-row conv history) on the matmul path."""
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 2048, (3, 16, 6), generator=g)
    lengths = torch.tensor([6, 2, 0])
    out = {}
    for name, rows in (("conv", NEVER), ("matmul", ALWAYS)):
        monkeypatch.setattr(layers, "MATMUL_ROWS", rows)
        state = codec.new_stream(3)
        first = codec.decoder.decode_rows(codes, state, lengths)
        second = codec.decoder.decode_rows(codes.flip(-1), state, torch.tensor([3, 6, 1]))
        out[name] = (first, second)
    for a, b in zip(out["conv"], out["matmul"]):
        assert float((a - b).abs().max()) <= 1e-5
    # and the state carried per row: row 1's second call continues after its 2 real frames
    whole = codec.decoder.decode(torch.cat([codes[1:2, :, :2], codes.flip(-1)[1:2]], dim=-1))
    assert float((out["matmul"][1][1] - whole[0, 2 * 1920:]).abs().max()) <= 1e-4
