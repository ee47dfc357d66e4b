"""The building blocks' math, checked against the reference's formulas written out (not the code under test)."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.model.layers import RMSNorm


def reference_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference's order: normalise in fp32, cast to the input dtype, then multiply by the weight."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 7, 128), (1, 1, 2048), (2, 16, 1, 64)])
def test_rms_norm_is_the_reference_bit_for_bit(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    norm = RMSNorm(shape[-1], eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
    x = (torch.randn(*shape, generator=g) * 3).to(dtype)
    with torch.inference_mode():
        got = norm(x)
    want = reference_rms_norm(x, norm.weight.detach(), 1e-6)
    assert got.dtype == dtype and torch.equal(got, want)
    # the weight applied after the cast matters in half precision: applying it in fp32 gives other values
    if dtype != torch.float32:
        fused = torch.nn.functional.rms_norm(x.float(), (shape[-1],), norm.weight.detach().float(), 1e-6).to(dtype)
        assert not torch.equal(fused, want)
