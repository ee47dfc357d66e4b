"""Random builder, config round trip, loader errors and input validation."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_core.codec.build import write_random_speech_tokenizer
from qwen_tts_core.codec.config import CodecConfig, full_config, preset, tiny_config
from qwen_tts_core.codec.load import load_codec
from tests.conftest import init_devices


def test_tiny_geometry_is_the_real_one():
    cfg = tiny_config()
    assert (cfg.num_quantizers, cfg.codebook_size, cfg.samples_per_frame, cfg.sample_rate,
            cfg.sliding_window) == (16, 2048, 1920, 24000, 72)
    assert cfg.frame_rate == 12.5
    full = full_config()
    assert (full.hidden_size, full.latent_dim, full.decoder_dim, full.head_dim, full.num_hidden_layers) == (
        512, 1024, 1536, 64, 8)


def test_config_json_round_trip(tiny_dir):
    cfg = CodecConfig.from_json(tiny_dir)
    again = CodecConfig.from_dict(json.loads(json.dumps(cfg.to_json_dict())))
    assert again == cfg and again.encoder == cfg.encoder == tiny_config().encoder


def test_preset_rejects_unknown_size():
    with pytest.raises(ValueError, match="size"):
        preset("huge")


def test_tiny_builds_fast_and_deterministically(tmp_path):
    t0 = time.process_time()
    write_random_speech_tokenizer(tmp_path / "a", "tiny", seed=3)
    assert time.process_time() - t0 < 2.0 * torch.get_num_threads()  # CPU seconds over <= 2 threads: < 2 s wall
    write_random_speech_tokenizer(tmp_path / "b", "tiny", seed=3)
    a, b = load_file(str(tmp_path / "a/model.safetensors")), load_file(str(tmp_path / "b/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/preprocessor_config.json").is_file()


def test_bf16_build_loads(tmp_path):
    folder = write_random_speech_tokenizer(tmp_path / "st", "tiny", seed=1, dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    codec = load_codec(folder)
    wav = codec.decode([torch.randint(0, 2048, (3, 16))])[0]
    assert wav.shape == (3 * 1920,) and np.isfinite(wav).all()


def test_waveform_is_well_scaled_and_depends_on_codes(codec):
    g = torch.Generator().manual_seed(21)
    a = torch.randint(0, 2048, (2, 16, 25), generator=g)
    b = a.clone()
    b[:, 3:, 10:] = torch.randint(0, 2048, (2, 13, 15), generator=g)  # change acoustic codes from frame 10
    wa, wb = codec.decoder.decode(a), codec.decoder.decode(b)
    rms = float(wa.pow(2).mean().sqrt())
    assert 0.1 < rms < 0.4
    assert float((wa.abs() >= 1.0).float().mean()) < 0.01  # the clamp is not saturated
    assert torch.allclose(wa[:, : 10 * 1920], wb[:, : 10 * 1920], atol=1e-6)  # causal
    diff = float((wa[:, 10 * 1920:] - wb[:, 10 * 1920:]).pow(2).mean().sqrt())
    assert diff > 0.5 * rms
    only_first = a.clone()
    only_first[:, 0] = (a[:, 0] + 1) % 2048  # the semantic codebook alone changes the sound too
    assert float((codec.decoder.decode(only_first) - wa).pow(2).mean().sqrt()) > 0.1 * rms


@pytest.mark.parametrize("bad,match", [
    pytest.param(torch.zeros(1, 15, 4, dtype=torch.long), "16 codebooks", id="15-codebooks"),
    pytest.param(torch.zeros(16, 4, dtype=torch.long), r"\[B, 16, T\]", id="2-d"),
    pytest.param(torch.full((1, 16, 4), 2048), r"\[0, 2047\]", id="too-large"),
    pytest.param(torch.full((1, 16, 4), -1), r"\[0, 2047\]", id="negative"),
    pytest.param(torch.zeros(1, 16, 4), "integer", id="float"),
])
def test_bad_codes_raise_value_error_naming_codes(codec, bad, match):
    with pytest.raises(ValueError, match="codes") as err:
        codec.decode_chunk(bad, codec.new_stream(bad.shape[0] if bad.dim() == 3 else 1))
    assert err.match(match)
    with pytest.raises(ValueError, match="codes"):
        codec.decoder.decode(bad)


def test_bad_code_list_raises(codec):
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        codec.decode([torch.zeros(3, 16, dtype=torch.long), torch.zeros(16, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match="codes"):
        codec.decode([torch.full((3, 16), 5000)])


def test_bad_audio_raises(codec):
    with pytest.raises(ValueError, match=r"audios\[0\]"):
        codec.encode([np.zeros((2, 100), dtype=np.float32)])
    with pytest.raises(ValueError, match="audios"):
        codec.encode(np.zeros(100, dtype=np.float32))


def _rewrite(src, dst, edit) -> None:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    name = "decoder.pre_transformer.layers.1.mlp.up_proj.weight"
    _rewrite(tiny_dir, tmp_path / "st", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_codec(tmp_path / "st")


def test_misshaped_tensor_is_named(tiny_dir, tmp_path):
    name = "decoder.decoder.1.block.1.conv.weight"
    _rewrite(tiny_dir, tmp_path / "st", lambda t: t.__setitem__(name, t[name][:, :, :-1].contiguous()))
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*shape"):
        load_codec(tmp_path / "st")


def test_missing_encoder_tensor_is_named_at_load(tiny_dir, tmp_path):
    """The encoder is built at its first use, but its tensors are checked at load: a damaged encoder fails there,
    not at the first voice-clone prompt."""
    name = "encoder.downsample.conv.weight"
    _rewrite(tiny_dir, tmp_path / "st", lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"speech tokenizer encoder: checkpoint is missing tensor.*downsample"):
        load_codec(tmp_path / "st")


@pytest.mark.parametrize("edit,match", [
    pytest.param(lambda t: t["encoder.encoder.layers.0.conv.weight"].view(-1).__setitem__(3, float("nan")),
                 r"tensor 'encoder\.encoder\.layers\.0\.conv\.weight' of .*model\.safetensors has 1 non-finite",
                 id="nan"),
    pytest.param(lambda t: t.__setitem__("encoder.downsample.conv.weight", t["encoder.downsample.conv.weight"][:1]),
                 r"tensor 'encoder\.downsample\.conv\.weight' of .*model\.safetensors has shape", id="shape"),
    pytest.param(lambda t: t.__setitem__("encoder.extra.weight", torch.zeros(2)),
                 r"tensor 'encoder\.extra\.weight' of .*model\.safetensors has no counterpart", id="extra"),
])
def test_bad_encoder_tensors_are_refused_at_load_and_at_build(tiny_dir, tmp_path, edit, match):
    from qwen_tts_core.checkpoint.weights import read_tensors
    from qwen_tts_core.codec.encoder import MimiEncoder

    _rewrite(tiny_dir, tmp_path / "st", edit)
    with pytest.raises(ValueError, match=match):
        load_codec(tmp_path / "st")
    cfg = CodecConfig.from_json(tmp_path / "st")
    enc = MimiEncoder(cfg.encoder, cfg.encoder_valid_num_quantizers, cfg.encode_downsample_rate)
    with pytest.raises(ValueError, match=match):  # the lazy build checks the same way
        enc.load_official(read_tensors([tmp_path / "st/model.safetensors"], "encoder."))


def test_decoder_is_built_from_the_weights_alone(tiny_dir, monkeypatch):
    """The decoder is built on the meta device and filled from the checkpoint: no random initialisation of a
    config-sized decoder first, and its one derived buffer (RoPE inverse frequencies) is what a CPU build computes,
    bit for bit (codes decode the same as before)."""
    from qwen_tts_core.codec.decoder import CodecDecoder

    calls = init_devices(monkeypatch)
    codec = load_codec(tiny_dir)
    assert calls and set(calls) == {"meta"}  # Linear / Conv reset_parameters ran on nothing
    monkeypatch.undo()
    built = CodecDecoder(codec.cfg)
    got = dict(codec.decoder.named_buffers())
    assert got.keys() == dict(built.named_buffers()).keys() == {"pre_transformer.inv_freq"}
    for name, value in built.named_buffers():
        assert got[name].dtype == value.dtype and torch.equal(got[name], value), name
    assert not any(t.is_meta for t in [*codec.decoder.parameters(), *codec.decoder.buffers()])
    assert not codec.decoder.training
    bf16 = load_codec(tiny_dir, dtype=torch.bfloat16).decoder.pre_transformer.inv_freq
    assert torch.equal(bf16, built.to(torch.bfloat16).pre_transformer.inv_freq)


def test_loader_finds_the_folder(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path / "ckpt" / "speech_tokenizer")
    assert load_codec(tmp_path / "ckpt").cfg == load_codec(tiny_dir / "model.safetensors").cfg
    with pytest.raises(ValueError, match="dir_or_path"):
        load_codec(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_codebook_lookup_of_a_few_codes_is_the_whole_codebooks_rows_bit_for_bit(dtype):
    """A streaming chunk looks up a few codes: on CPU only their rows are divided (embedding_sum / usage). Those
    quotients must be the whole-codebook division's bit for bit, usages under the clamp included, at any count."""
    from qwen_tts_core.codec.quantizer import Codebook

    g = torch.Generator().manual_seed(4)
    cb = Codebook(dim=32, size=2048).to(dtype)
    with torch.no_grad():
        cb.embedding_sum.copy_(torch.randn(2048, 32, generator=g) * 3)
        cb.cluster_usage.copy_(torch.rand(2048, generator=g) * 50)
        cb.cluster_usage[:100] = 1e-7    # below the 1e-5 clamp
    whole = cb.vectors()
    for shape in [(1, 1), (8, 4), (3, 500), (2, 2048)]:   # the last one asks for as many as there are: whole path
        codes = torch.randint(0, 2048, shape, generator=g)
        codes[0, 0] = 5                                     # a clamped usage
        got = cb.lookup(codes)
        assert got.dtype == dtype and got.shape == (*shape, 32)
        assert torch.equal(got, torch.nn.functional.embedding(codes, whole)), shape
