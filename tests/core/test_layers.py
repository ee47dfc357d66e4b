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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_runs_where_onednn_cannot_pack(checkpoint_factory, monkeypatch, dtype):
    """A CPU without AVX512-BW (or AVX-NE-CONVERT) cannot pack bf16 linears: oneDNN raises. The engine must fall
    back to plain linears and give the same codes, not fail to start."""
    from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest
    from qwen_tts_core.model import layers

    def refuse(w):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert")

    ckpt = checkpoint_factory("custom_voice", "tiny")
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=dtype)
    req = SynthesisRequest(kind="custom_voice", text="Hello there.", speaker="vivian", language="english",
                           sampling=SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=8),
                           decode_audio=False)
    monkeypatch.setenv("QTTS_ONEDNN", "0")
    plain = Engine(model, max_sessions=1).run_all([req])[0].codes()
    monkeypatch.delenv("QTTS_ONEDNN")
    monkeypatch.setattr(layers, "_pack", refuse)
    monkeypatch.setattr(layers, "_PACKABLE", {})
    assert not layers.can_pack(torch.zeros(1, dtype=dtype))
    eng = Engine(model, max_sessions=1)
    assert not eng.runner.packed
    assert torch.equal(eng.run_all([req])[0].codes(), plain)
