"""A codec decoder whose weights are inference tensors (built, copied or converted under `torch.inference_mode()`, as a
script that runs everything inside it does) keeps no version counter, yet inside inference mode its weights can be
written in place (`load_state_dict`, `copy_`). Nothing cached from such weights may outlive a change: the
oneDNN-packed copies of the codec's products (`packed_matrix`), the codec's converted decoders (`Codec.decoder_in`)
and the voice-reference states (`ContextCache`) each compute from the live weights. Each test here failed before
`weight_key` gave inference tensors a key equal to no other and `PackSlot.get` left their products to torch."""

from __future__ import annotations

import copy

import torch

from qwen_tts_core.codec import layers
from qwen_tts_core.codec.load import Codec

CODES = torch.randint(0, 2048, (2, 16, 6), generator=torch.Generator().manual_seed(11))


def _perturbed_state(decoder, scale: float = 1.5) -> dict[str, torch.Tensor]:
    """decoder's weights with two layers changed: a conv on the packed matrix path and a packed linear."""
    state = {k: v.clone() for k, v in decoder.state_dict().items()}
    state["decoder.0.conv.weight"] = state["decoder.0.conv.weight"] * scale
    state["upsample.0.1.pwconv1.weight"] = state["upsample.0.1.pwconv1.weight"] * scale
    return state


def _inference_copy(decoder):
    with torch.inference_mode():
        twin = copy.deepcopy(decoder)
    assert twin.decoder[0].conv.weight.is_inference()
    return twin


def test_packed_products_of_an_inference_decoder_follow_a_change_made_in_inference_mode(codec, monkeypatch):
    monkeypatch.setattr(layers, "MATMUL_ROWS", {"conv": 0.0, "trans": 0.0})  # every product on the matrix path
    twin = _inference_copy(codec.decoder)
    new_state = _perturbed_state(codec.decoder)
    reference = copy.deepcopy(codec.decoder)        # normal tensors: the packed copies follow them
    reference.load_state_dict(new_state)
    with torch.inference_mode():
        before = twin.decode(CODES)
        twin.load_state_dict(new_state)
        got = twin.decode(CODES)
        want = reference.decode(CODES)
    assert float((got - before).abs().max()) > 1e-3
    assert float((got - want).abs().max()) <= 1e-5
    held = [m for m in twin.modules() if getattr(m.__dict__.get("_pack_slot"), "held", None) is not None]
    assert not held   # torch's products on the live weights, not a copy packed again on every call


def test_a_converted_decoder_follows_an_inference_decoder_changed_in_inference_mode(codec):
    own = Codec(codec.cfg, _inference_copy(codec.decoder))
    with torch.inference_mode():                  # as an engine made inside inference mode asks
        first = own.decoder_in(torch.bfloat16)
    assert not first.decoder[0].conv.weight.is_inference()  # normal tensors: packed products can follow them
    with torch.inference_mode():
        own.decoder.load_state_dict(_perturbed_state(codec.decoder, 2.0))
    second = own.decoder_in(torch.bfloat16)
    assert second is not first
    assert torch.equal(second.decoder[0].conv.weight, own.decoder.decoder[0].conv.weight.to(torch.bfloat16))


def test_reference_states_of_an_inference_decoder_follow_a_change_made_in_inference_mode(codec):
    twin = _inference_copy(codec.decoder)
    ref = torch.randint(0, 2048, (7, 16), generator=torch.Generator().manual_seed(12))
    before = twin.context_state(ref)
    with torch.inference_mode():
        twin.load_state_dict(_perturbed_state(codec.decoder))
    after = twin.context_state(ref)
    fresh = copy.deepcopy(twin)                  # its own empty cache, the new weights
    want = fresh.context_state(ref)
    assert after is not before
    assert all(torch.equal(a, b) for a, b in zip(after._tensors(), want._tensors()))
    assert not all(torch.equal(a, b) for a, b in zip(after._tensors(), before._tensors()))
