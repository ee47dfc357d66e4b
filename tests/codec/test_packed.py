"""The codec's CPU matrix products on oneDNN-packed weights (`model.layers.packed_matrix`): same numbers as torch's
products, always computed with the live weight (in-place changes, loads, dtype changes, deep copies repack), and
QTTS_ONEDNN=0 turns them off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from qwen_tts_core.codec import layers
from qwen_tts_core.codec.layers import (
    CausalConv,
    CausalTransConv,
    PackedLinear,
    conv1d_mm,
    conv_transpose1d_mm,
)
from qwen_tts_core.model.layers import can_pack

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1)), reason="oneDNN cannot pack fp32 linears here")

ALWAYS = {"conv": 0.0, "trans": 0.0}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max()) / float(b.abs().max())


def _packed_modules(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if _held(m) is not None]


def _held(m: torch.nn.Module) -> torch.Tensor | None:
    """The packed copy m's PackSlot holds (None: nothing packed)."""
    slot = m.__dict__.get("_pack_slot")
    return None if slot is None or slot.held is None else slot.held[1]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_packed_products_equal_torch(dtype, tol):
    if not can_pack(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"oneDNN cannot pack {dtype} here")
    g = torch.Generator().manual_seed(1)
    lin = PackedLinear(24, 40).to(dtype)
    x = torch.randn(3, 5, 24, generator=g).to(dtype)
    with torch.inference_mode():
        got = lin(x)
    assert got.dtype == dtype and _packed_modules(lin) == [lin]
    assert _rel(got, F.linear(x, lin.weight, lin.bias)) <= tol

    conv = CausalConv(16, 12, kernel_size=7, dilation=3).to(dtype)
    x = torch.randn(2, 16, 30, generator=g).to(dtype)
    packed = layers.packed_matrix(conv, conv.conv.weight, layers._conv_matrix, x)
    assert packed is not None
    assert layers.packed_matrix(conv, conv.conv.weight, layers._conv_matrix, x.double()) is None  # other dtype
    assert _rel(conv1d_mm(x, conv.conv.weight, conv.conv.bias, 3, packed),
                F.conv1d(x, conv.conv.weight, conv.conv.bias, dilation=3)) <= tol

    trans = CausalTransConv(16, 8, kernel_size=10, stride=4).to(dtype)  # 10 = 3 frames of 4, padded
    x = torch.randn(2, 16, 6, generator=g).to(dtype)
    packed = layers.packed_matrix(trans, trans.conv.weight, lambda w: layers._trans_matrix(w, 4), x)
    assert _rel(conv_transpose1d_mm(x, trans.conv.weight, 4, packed),
                F.conv_transpose1d(x, trans.conv.weight, None, stride=4)) <= tol


def test_a_packed_layer_computes_with_its_live_weight():
    """Weights change after the first call (in place, by load_state_dict): the next call must use the new values."""
    g = torch.Generator().manual_seed(2)
    lin = PackedLinear(32, 16)
    x = torch.randn(4, 32, generator=g)
    with torch.inference_mode():
        before = lin(x)
    with torch.no_grad():
        lin.weight[3, 5] += 1.0
    with torch.inference_mode():
        after = lin(x)
    assert float((after - before).abs().max()) > 0.5
    assert _rel(after, F.linear(x, lin.weight, lin.bias)) <= 1e-5
    lin.load_state_dict({"weight": torch.randn(16, 32, generator=g), "bias": torch.zeros(16)})
    with torch.inference_mode():
        assert _rel(lin(x), x @ lin.weight.t()) <= 1e-5


def test_a_perturbed_copy_of_a_decoder_differs_and_leaves_the_original(codec, monkeypatch):
    """A deep copy of a decoder whose layers hold packed copies (opaque tensors: not copyable) packs its own, from its
    own weights: perturbing the copy changes its output, not the original's."""
    monkeypatch.setattr(layers, "MATMUL_ROWS", ALWAYS)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2048, (2, 16, 6), generator=g)
    original = codec.decoder
    with torch.inference_mode():
        want = original.decode(codes)
    assert _packed_modules(original)
    twin = copy.deepcopy(original)
    assert not _packed_modules(twin)
    with torch.inference_mode():
        assert _rel(twin.decode(codes), want) <= 1e-6
    with torch.no_grad():
        twin.decoder[0].conv.weight[0, 0, -1] += 0.5    # a conv on the packed matrix path
        twin.upsample[0][1].pwconv1.weight[1, 2] += 0.5  # a packed linear
    with torch.inference_mode():
        assert float((twin.decode(codes) - want).abs().max()) > 1e-3
        assert torch.equal(original.decode(codes), want)


def test_a_decoder_converted_after_packing_repacks_in_its_dtype(codec, monkeypatch):
    if not can_pack(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("oneDNN cannot pack bf16 here")
    monkeypatch.setattr(layers, "MATMUL_ROWS", ALWAYS)
    codes = torch.randint(0, 2048, (1, 16, 5), generator=torch.Generator().manual_seed(4))
    dec, twin = copy.deepcopy(codec.decoder), copy.deepcopy(codec.decoder).to(torch.bfloat16)
    with torch.inference_mode():
        dec.decode(codes)                         # packed in fp32
    dec.to(torch.bfloat16)                        # (under inference mode: inference tensors, left unpacked)
    with torch.inference_mode():
        got = dec.decode(codes)
        want = twin.decode(codes)
    assert got.dtype == torch.bfloat16
    assert all(_held(m).dtype == torch.bfloat16 for m in _packed_modules(dec))
    assert torch.equal(got, want)


def test_onednn_off_leaves_the_decoder_unpacked_with_the_same_audio(codec, monkeypatch):
    monkeypatch.setattr(layers, "MATMUL_ROWS", ALWAYS)
    codes = torch.randint(0, 2048, (2, 16, 7), generator=torch.Generator().manual_seed(5))
    packed_dec, plain_dec = copy.deepcopy(codec.decoder), copy.deepcopy(codec.decoder)
    with torch.inference_mode():
        packed = packed_dec.decode(codes)
        monkeypatch.setenv("QTTS_ONEDNN", "0")
        plain = plain_dec.decode(codes)
    assert _packed_modules(packed_dec) and not _packed_modules(plain_dec)
    assert float(packed.abs().max()) > 0.05
    assert float((packed - plain).abs().max()) <= 1e-5


def test_threads_that_first_use_one_decoder_together_get_its_audio(codec, monkeypatch):
    """Engines on several threads share one decoder: their first calls pack the same layers at the same time. Every
    thread's audio must equal a serial decode (no thread reads another's half-made packed copy)."""
    import threading

    monkeypatch.setattr(layers, "MATMUL_ROWS", ALWAYS)
    codes = torch.randint(0, 2048, (1, 16, 6), generator=torch.Generator().manual_seed(6))
    serial, shared = copy.deepcopy(codec.decoder), copy.deepcopy(codec.decoder)
    with torch.inference_mode():
        want = serial.decode(codes)
    assert not _packed_modules(shared)
    start, out, errors = threading.Barrier(4), [None] * 4, []

    def run(i: int) -> None:
        try:
            start.wait()
            with torch.inference_mode():
                out[i] = shared.decode(codes)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _packed_modules(shared) and all(torch.equal(o, want) for o in out)
