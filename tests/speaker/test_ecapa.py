"""Speaker encoder: config round trip, official names, parity with the official encoder, and random-weight quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch

from qwen_tts_core.speaker import (
    PREFIX,
    EcapaTdnn,
    SpeakerEncoderConfig,
    full_config,
    min_speaker_samples,
    random_speaker_encoder_state,
    speaker_embedding,
    speaker_encoder_from_state,
    tiny_config,
)
from qwen_tts_core.speaker.config import JSON_KEYS
from tests.conftest import init_devices
from tests.oracle.common import run_oracle

TOL = 1e-4


def _oracle_embeddings(d, cfg, state, wavs):
    (d / "cfg.json").write_text(json.dumps(cfg.to_json_dict()))
    save_torch(state, str(d / "w.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in wavs.items()}, str(d / "in.safetensors"))
    run_oracle("speaker_ref.py", "embed", d / "cfg.json", d / "w.safetensors", d / "in.safetensors",
               d / "out.safetensors")
    return {k.removeprefix("emb."): v for k, v in load_file(str(d / "out.safetensors")).items()}


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(enc_dim=48)
    state = random_speaker_encoder_state(cfg, seed=11)
    return cfg, state, speaker_encoder_from_state(cfg, state)


@pytest.fixture(scope="module")
def tiny_oracle(tmp_path_factory, tiny, signals):
    cfg, state, _ = tiny
    return _oracle_embeddings(tmp_path_factory.mktemp("spk_tiny"), cfg, state, signals)


# ---- config -------------------------------------------------------------------------------------------------------


def test_config_json_round_trip_and_keys():
    cfg = full_config(2048)
    d = cfg.to_json_dict()
    assert tuple(d) == JSON_KEYS
    assert d["enc_channels"] == [512, 512, 512, 512, 1536] and d["enc_dim"] == 2048
    assert SpeakerEncoderConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert SpeakerEncoderConfig.from_dict({"enc_dim": 1024, "sample_rate": 24000}) == full_config(1024)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        pytest.param({"enc_channels": (32, 32)}, "enc_channels", id="too-few-layers"),
        pytest.param({"enc_kernel_sizes": (5, 3, 3, 1)}, "enc_kernel_sizes", id="length-mismatch"),
        pytest.param({"enc_channels": (32, 32, 32, 32, 64)}, "enc_channels", id="mfa-width"),
        pytest.param({"enc_channels": (32, 16, 16, 16, 48)}, "enc_channels", id="non-residual"),
        pytest.param({"enc_res2net_scale": 7}, "enc_res2net_scale", id="scale-divides"),
        pytest.param({"enc_kernel_sizes": (4, 3, 3, 3, 1)}, "enc_kernel_sizes", id="even-kernel"),
        pytest.param({"enc_dim": 0}, "enc_dim", id="enc-dim"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    base = tiny_config().to_json_dict()
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        SpeakerEncoderConfig.from_dict(base)


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unsupported keys \['model_type'\]"):
        SpeakerEncoderConfig.from_dict({"enc_dim": 64, "model_type": "x"})


# ---- names and builder --------------------------------------------------------------------------------------------


def test_state_names_have_prefix_and_load_strict(tiny):
    cfg, state, _ = tiny
    assert all(k.startswith(PREFIX) for k in state)
    assert f"{PREFIX}blocks.0.conv.weight" in state
    assert f"{PREFIX}blocks.1.res2net_block.blocks.0.conv.weight" in state
    assert f"{PREFIX}blocks.3.se_block.conv2.bias" in state
    assert f"{PREFIX}asp.tdnn.conv.weight" in state and f"{PREFIX}fc.weight" in state
    stripped = {k.removeprefix(PREFIX): v for k, v in state.items()}
    EcapaTdnn(cfg).load_state_dict(stripped, strict=True)
    with pytest.raises(ValueError, match="missing"):
        speaker_encoder_from_state(cfg, {k: v for k, v in state.items() if "fc." not in k})
    with pytest.raises(ValueError, match="wrong shape"):
        speaker_encoder_from_state(tiny_config(enc_dim=32), state)


def test_encoder_is_built_from_the_state_alone(tiny, monkeypatch):
    """Built on the meta device and filled from the state: a config-sized encoder is never allocated and randomly
    initialised before the state is found to match (a 9 GiB config beside tiny weights failed in the allocator)."""
    cfg, state, enc = tiny
    calls = init_devices(monkeypatch)
    loaded = speaker_encoder_from_state(cfg, state)
    assert calls and set(calls) == {"meta"}
    with pytest.raises(ValueError, match="wrong shape"):
        speaker_encoder_from_state(tiny_config(enc_dim=32), state)
    assert set(calls) == {"meta"}
    monkeypatch.undo()
    assert not loaded.training and not any(t.is_meta for t in loaded.state_dict().values())
    for k, v in enc.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_builder_is_deterministic_and_seeded(tiny):
    cfg, state, _ = tiny
    again = random_speaker_encoder_state(cfg, seed=11)
    other = random_speaker_encoder_state(cfg, seed=12)
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert not torch.equal(state[f"{PREFIX}fc.weight"], other[f"{PREFIX}fc.weight"])
    half = random_speaker_encoder_state(cfg, seed=11, dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in half.values())


def test_activations_keep_their_scale(tiny, signals):
    """Unlike HF default init (std 0.02), every stage's output stays O(1) on audio the calibration never saw."""
    cfg, _, enc = tiny
    stds: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, name=name: stds.__setitem__(name, out.float().std().item()))
        for name, m in enc.named_modules() if name.count(".") <= 1 and name
    ]
    try:
        speaker_embedding(enc, signals["long_voice"])
    finally:
        for h in hooks:
            h.remove()
    assert {"blocks.0", "blocks.1", "blocks.2", "blocks.3", "mfa", "asp", "fc"} <= set(stds)
    for name, s in stds.items():
        assert 0.05 < s < 20.0, (name, s)


def test_embedding_depends_on_the_audio(tiny, signals):
    _, _, enc = tiny
    embs = {k: speaker_embedding(enc, v) for k, v in signals.items()}
    for e in embs.values():
        assert 0.2 < e.pow(2).mean().sqrt().item() < 5.0
    keys = list(embs)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            cos = torch.nn.functional.cosine_similarity(embs[a], embs[b], dim=0).item()
            assert cos < 0.9, (a, b, cos)
    same = speaker_embedding(enc, signals["low_voice"].copy())
    assert torch.equal(same, embs["low_voice"])


@pytest.mark.parametrize("enc_dim", [1024, 2048])
def test_full_size_random_weights_are_usable(signals, enc_dim):
    cfg = full_config(enc_dim)
    enc = speaker_encoder_from_state(cfg, random_speaker_encoder_state(cfg, seed=5))
    embs = [speaker_embedding(enc, signals[k]) for k in ("low_voice", "high_voice", "noise")]
    for e in embs:
        assert e.shape == (enc_dim,)
        assert 0.2 < e.pow(2).mean().sqrt().item() < 5.0
    cos = torch.nn.functional.cosine_similarity
    assert max(cos(embs[i], embs[j], dim=0).item() for i, j in ((0, 1), (0, 2), (1, 2))) < 0.9


# ---- parity with the official encoder -----------------------------------------------------------------------------


@pytest.mark.parity
@pytest.mark.parametrize("key", ["low_voice", "high_voice", "noise", "long_voice", "odd_len"])
def test_embedding_equals_reference_tiny(tiny, tiny_oracle, signals, key):
    _, _, enc = tiny
    ours = speaker_embedding(enc, signals[key]).numpy()
    ref = tiny_oracle[key]
    assert ours.shape == ref.shape == (48,)
    assert np.abs(ours - ref).max() <= TOL * max(1.0, np.abs(ref).max())


@pytest.mark.parity
@pytest.mark.parametrize(
    "name", ["blocks.0.conv.weight", "blocks.2.res2net_block.blocks.0.conv.weight", "blocks.1.se_block.conv2.bias",
             "mfa.conv.weight", "fc.weight", "fc.bias"],
)
def test_perturbing_one_weight_breaks_parity(tiny, tiny_oracle, signals, name):
    """+0.05 on the largest-magnitude entry of one tensor moves the x-vector far past the tolerance.

    (Not every scalar matters: `asp.conv.bias` shifts softmax logits by a per-channel constant, a no-op, and a
    ReLU unit that is off for these inputs ignores its weights.)"""
    cfg, state, _ = tiny
    bad = dict(state)
    w = bad[PREFIX + name].clone()
    w.view(-1)[w.abs().argmax()] += 0.05
    bad[PREFIX + name] = w
    enc = speaker_encoder_from_state(cfg, bad)
    worst = max(np.abs(speaker_embedding(enc, signals[k]).numpy() - tiny_oracle[k]).max()
                for k in ("low_voice", "noise"))
    assert worst > 10 * TOL, worst


@pytest.mark.parity
@pytest.mark.slow
def test_embedding_equals_reference_full_size(tmp_path, signals):
    cfg = full_config(1024)
    state = random_speaker_encoder_state(cfg, seed=3)
    wavs = {k: signals[k] for k in ("high_voice", "odd_len")}
    ref = _oracle_embeddings(tmp_path, cfg, state, wavs)
    enc = speaker_encoder_from_state(cfg, state)
    for k, wav in wavs.items():
        ours = speaker_embedding(enc, wav).numpy()
        assert ours.shape == (1024,)
        assert np.abs(ours - ref[k]).max() <= TOL * max(1.0, np.abs(ref[k]).max())


def test_bf16_encoder_is_close_to_fp32(tiny, signals):
    cfg, state, enc = tiny
    half = speaker_encoder_from_state(cfg, state, dtype=torch.bfloat16)
    for key in ("low_voice", "noise"):
        e16 = speaker_embedding(half, signals[key])
        assert e16.dtype == torch.bfloat16
        cos = torch.nn.functional.cosine_similarity(e16.float(), speaker_embedding(enc, signals[key]), dim=0)
        assert cos.item() > 0.98


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny, signals):
    cfg, state, enc = tiny
    gpu = speaker_encoder_from_state(cfg, state, device="cuda")
    for key in ("low_voice", "long_voice"):
        e = speaker_embedding(gpu, signals[key])
        assert e.device.type == "cuda"
        ref = speaker_embedding(enc, signals[key])
        # cuDNN may run the convs in TF32 (torch's default for convolutions), so compare loosely.
        assert torch.nn.functional.cosine_similarity(e.float().cpu(), ref, dim=0).item() > 0.999
        assert (e.cpu() - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item())


# ---- input checks -------------------------------------------------------------------------------------------------


def test_speaker_embedding_input_checks(tiny):
    cfg, _, enc = tiny
    need = min_speaker_samples(cfg)
    assert need == 1280  # 5 mel frames: reflect pad of the dilation-4 kernel-3 conv needs T > 4
    assert speaker_embedding(enc, np.full(need, 0.1, dtype=np.float32) + np.linspace(0, 0.1, need,
                             dtype=np.float32)).shape == (48,)
    with pytest.raises(ValueError, match="wav_24k has 1279 samples"):
        speaker_embedding(enc, np.ones(need - 1, dtype=np.float32) * 0.1)
    with pytest.raises(ValueError, match="wav_24k must be a 1-D"):
        speaker_embedding(enc, np.ones((2, 4000), dtype=np.float32))
    with pytest.raises(ValueError, match="wav_24k must be a float"):
        speaker_embedding(enc, np.ones(4000, dtype=np.int16))
    bad = np.ones(4000, dtype=np.float32) * 0.1
    bad[7] = np.nan
    with pytest.raises(ValueError, match="wav_24k contains NaN"):
        speaker_embedding(enc, bad)
    with pytest.raises(ValueError, match=r"mel must have shape \[B, T, 128\]"):
        enc(torch.zeros(1, 20, 80))
