"""A damaged or hostile checkpoint fails at load with a ValueError naming the file and the field or tensor: never code
from the checkpoint, never a silent partial load, never a model that fails every request later."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_core import Qwen3TTSModel, make_checkpoint
from qwen_tts_core.checkpoint.build import random_talker_state
from qwen_tts_core.checkpoint.digest import checkpoint_digest, checkpoint_file
from qwen_tts_core.checkpoint.weights import safetensors_files
from qwen_tts_core.codec.config import CodecConfig, tiny_config
from qwen_tts_core.config import (
    TTSConfig,
    check_codec_matches,
    make_config,
    sampling_defaults_from_generation_config,
)
from qwen_tts_core.speaker.build import full_config as speaker_full
from qwen_tts_core.speaker.build import tiny_config as speaker_tiny
from qwen_tts_core.speaker.config import SpeakerEncoderConfig
from qwen_tts_core.text.tokenizer import TextTokenizer


@pytest.fixture
def cv(checkpoint_factory, tmp_path) -> Path:
    """A private copy of the tiny CustomVoice checkpoint, to damage."""
    return Path(shutil.copytree(checkpoint_factory("custom_voice", "tiny"), tmp_path / "cv"))


@pytest.fixture
def base_ckpt(checkpoint_factory, tmp_path) -> Path:
    """A private copy of the tiny Base checkpoint, to damage."""
    return Path(shutil.copytree(checkpoint_factory("base", "tiny"), tmp_path / "base"))


def load(path: Path, **kw):
    return Qwen3TTSModel.from_pretrained(path, device_map="cpu", **kw)


def edit_json(path: Path, fn) -> None:
    raw = json.loads(path.read_text())
    fn(raw)
    path.write_text(json.dumps(raw))


def edit_weights(path: Path, fn) -> None:
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


@contextmanager
def address_space_headroom(extra: int = 3 << 29):
    """This process may map only `extra` bytes (1.5 GiB) more than it maps now, until the block ends: a loader that
    allocates what a hostile config asks for (GiBs) fails with the allocator's RuntimeError instead of a ValueError,
    quickly and without taking the machine's memory."""
    resource = pytest.importorskip("resource")
    statm = Path("/proc/self/statm")
    if not statm.is_file():
        pytest.skip("needs /proc/self/statm (Linux)")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = int(statm.read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE") + extra
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip("the hard address-space limit is already below the headroom")
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# --- 1. no code from the checkpoint ----------------------------------------------------------------------------------
def test_tokenizer_with_auto_map_is_refused_and_its_code_never_runs(cv, tmp_path):
    marker = tmp_path / "PWNED"
    edit_json(cv / "tokenizer_config.json", lambda r: r.update(
        tokenizer_class="EvilTokenizer",
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}))
    (cv / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    with pytest.raises(ValueError, match="tokenizer_config.json: tokenizer_class"):
        TextTokenizer(cv)
    assert not marker.exists()


def test_an_auto_map_beside_the_qwen2_class_is_never_followed(cv, tmp_path):
    """A checkpoint may carry an auto_map next to the Qwen2 class: it loads with transformers' own class, and the
    code the auto_map names never runs."""
    marker = tmp_path / "PWNED"
    want = TextTokenizer(cv).encode("Hello there.")
    edit_json(cv / "tokenizer_config.json", lambda r: r.update(
        auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}))
    (cv / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    assert TextTokenizer(cv).encode("Hello there.") == want
    assert not marker.exists()


def test_tokenizer_with_unknown_class_is_refused(cv):
    edit_json(cv / "tokenizer_config.json", lambda r: r.update(tokenizer_class="LlamaTokenizer"))
    with pytest.raises(ValueError, match="tokenizer_config.json: tokenizer_class"):
        TextTokenizer(cv)


# --- 2. non-finite weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel,name,value", [
    ("model.safetensors", "talker.model.norm.weight", float("nan")),
    ("model.safetensors", "talker.codec_head.weight", float("inf")),
    ("speech_tokenizer/model.safetensors", "decoder.pre_conv.conv.weight", float("nan")),
])
def test_non_finite_weights_are_refused(cv, rel, name, value):
    edit_weights(cv / rel, lambda t: t[name].view(-1).__setitem__(0, value))
    with pytest.raises(ValueError, match=rf"{name}.*{rel}.*non-finite"):
        load(cv)


@pytest.mark.parametrize("name,value", [
    ("encoder.downsample.conv.weight", float("nan")),
    ("encoder.quantizer.acoustic_residual_vector_quantizer.layers.3.codebook.embed_sum", float("inf")),
])
def test_non_finite_voice_clone_encoder_weights_are_refused_where_they_are_used(base_ckpt, cv, name, value):
    """The Mimi encoder (reference audio -> codes) of a Base model is checked at load; a CustomVoice model never
    encodes, so its load does not build transformers' MimiModel (the check runs at a first use instead)."""
    rel = "speech_tokenizer/model.safetensors"
    for folder in (base_ckpt, cv):
        edit_weights(folder / rel, lambda t: t[name].view(-1).__setitem__(0, value))
    with pytest.raises(ValueError, match=rf"{name}.*{rel}.*non-finite"):
        load(base_ckpt)
    model = load(cv)
    with pytest.raises(ValueError, match=rf"{name}.*non-finite"):
        model.codec.encode([np.full(24000, 0.1, np.float32)])


def test_non_finite_speaker_encoder_weights_are_refused(checkpoint_factory, tmp_path):
    base = Path(shutil.copytree(checkpoint_factory("base", "tiny"), tmp_path / "base"))
    edit_weights(base / "model.safetensors", lambda t: t["speaker_encoder.fc.bias"].fill_(float("nan")))
    with pytest.raises(ValueError, match="speaker_encoder.fc.bias.*non-finite"):
        load(base)


def test_weights_that_overflow_the_load_dtype_are_refused(cv):
    edit_weights(cv / "model.safetensors", lambda t: t["talker.codec_head.weight"].view(-1).__setitem__(0, 1e6))
    with pytest.raises(ValueError, match="talker.codec_head.weight.*overflows torch.float16"):
        load(cv, dtype="float16")


# --- 3. no silent partial load ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", ["talker", "code_predictor"])
def test_fewer_layers_in_config_than_weights_is_refused(cv, block):
    def fewer(r):
        (r["talker_config"] if block == "talker" else r["talker_config"]["code_predictor_config"])[
            "num_hidden_layers"] = 1
    edit_json(cv / "config.json", fewer)
    with pytest.raises(ValueError, match=r"talker: checkpoint has 11 tensor\(s\) that config.json does not describe"):
        load(cv)


def test_extra_talker_tensor_is_refused(cv):
    edit_weights(cv / "model.safetensors", lambda t: t.__setitem__("talker.model.layers.9.x.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="model.layers.9.x.weight"):
        load(cv)


def test_code_groups_must_match_the_codec(cv):
    edit_json(cv / "config.json", lambda r: r["talker_config"]["code_predictor_config"].update(num_code_groups=8))
    with pytest.raises(ValueError, match="config.json: .*code_predictor_config.num_code_groups"):
        load(cv)
    edit_json(cv / "config.json", lambda r: r["talker_config"]["code_predictor_config"].update(num_code_groups=16))
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["decoder_config"].update(num_quantizers=8))
    with pytest.raises(ValueError, match="speech_tokenizer/config.json: .*num_quantizers"):
        load(cv)


def test_codebook_sizes_must_match():
    cfg = make_config("custom_voice", "tiny")
    check_codec_matches(cfg, tiny_config(), "x")
    raw = cfg.to_json_dict()
    raw["talker_config"]["code_predictor_config"]["vocab_size"] = 1024
    with pytest.raises(ValueError, match="code_predictor_config.vocab_size"):
        TTSConfig.from_dict(raw)
    small = CodecConfig(**{**tiny_config().__dict__, "codebook_size": 1024,
                           "encoder": {**tiny_config().encoder, "codebook_size": 1024}})
    with pytest.raises(ValueError, match="codebook_size"):
        check_codec_matches(cfg, small, "x")


@pytest.mark.parametrize("model_type", ["custom_voice", "voice_design", "base"])
@pytest.mark.parametrize("size", ["tiny", "tiny-proj", "0.6b", "1.7b"])
def test_official_layout_configs_pass_every_check(model_type, size):
    cfg = make_config(model_type, size)
    raw = json.loads(json.dumps(cfg.to_json_dict()))
    if model_type == "base":
        enc = speaker_tiny if size.startswith("tiny") else speaker_full
        raw["speaker_encoder_config"] = enc(cfg.talker.hidden_size).to_json_dict()
    assert TTSConfig.from_dict(raw).talker == cfg.talker
    codec = CodecConfig.from_dict(json.loads(json.dumps(
        (tiny_config() if size.startswith("tiny") else CodecConfig(encoder={})).to_json_dict())))
    check_codec_matches(cfg, codec, "x")


# --- 4. digest -------------------------------------------------------------------------------------------------------
def test_digest_of_a_plain_checkpoint_is_unchanged(cv):
    """The formula jobs key their outputs on: sha256 over (relative path, sha256 of content) of these files."""
    files = ["config.json", "generation_config.json", "merges.txt", "model.safetensors", "speech_tokenizer/config.json",
             "speech_tokenizer/model.safetensors", "speech_tokenizer/preprocessor_config.json", "tokenizer.json",
             "tokenizer_config.json", "vocab.json"]
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256((cv / rel).read_bytes()).hexdigest().encode() + b"\n")
    assert checkpoint_digest(cv) == f"sha256:{h.hexdigest()[:16]}"


def test_digest_covers_shards_and_a_linked_codec_but_not_nested_text(cv, tmp_path):
    assert checkpoint_file("model-00001-of-00002.safetensors") and not checkpoint_file("eval/results.txt")
    a = checkpoint_digest(cv)
    (cv / "eval").mkdir()
    (cv / "eval" / "results.txt").write_text("wer=0.1")
    assert checkpoint_digest(cv) == a
    shard = cv / "model-00001-of-00001.safetensors"
    (cv / "model.safetensors").rename(shard)
    (cv / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: shard.name for k in load_file(str(shard))}}))
    b = checkpoint_digest(cv)
    edit_weights(shard, lambda t: t["talker.codec_head.weight"].add_(1.0))
    assert checkpoint_digest(cv) != b
    shutil.move(str(cv / "speech_tokenizer"), str(tmp_path / "shared_codec"))
    os.symlink(tmp_path / "shared_codec", cv / "speech_tokenizer")
    c = checkpoint_digest(cv)
    edit_weights(tmp_path / "shared_codec" / "model.safetensors",
                 lambda t: t["decoder.pre_conv.conv.weight"].mul_(2.0))
    assert checkpoint_digest(cv) != c


@pytest.mark.parametrize("name", ["added_tokens.json", "special_tokens_map.json"])
def test_digest_covers_the_tokenizer_files_transformers_reads(cv, name):
    """transformers' tokenizer reads these beside tokenizer.json: other tokens, other audio, so another digest."""
    a = checkpoint_digest(cv)
    (cv / name).write_text(json.dumps({"<extra>": 151700} if name.startswith("added") else {"pad_token": "<p>"}))
    assert checkpoint_file(name) and checkpoint_digest(cv) != a


# --- 5. shard index --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [
    {"weight_map": {"talker.codec_head.weight": "../outside/model-00001-of-00001.safetensors"}},
    {"weight_map": {"talker.codec_head.weight": "/tmp/model-00001-of-00001.safetensors"}},
    {"weight_map": {"talker.codec_head.weight": "evil.safetensors"}},
    {"metadata": {}},
    [1],
])
def test_shard_index_names_only_shards_in_the_folder(cv, tmp_path, index):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(cv / "model.safetensors"), str(outside / "model-00001-of-00001.safetensors"))
    (cv / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        safetensors_files(cv)


# --- 6. stale index --------------------------------------------------------------------------------------------------
def test_single_file_and_index_together_are_refused(cv):
    shutil.copy(cv / "model.safetensors", cv / "model-00001-of-00001.safetensors")
    (cv / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"talker.codec_head.weight": "model-00001-of-00001.safetensors"}}))
    with pytest.raises(ValueError, match="both model.safetensors and model.safetensors.index.json"):
        load(cv)


def test_make_checkpoint_removes_an_older_sharded_checkpoint(cv, tmp_path):
    out = tmp_path / "mk"
    out.mkdir()
    shutil.copy(cv / "model.safetensors", out / "model-00001-of-00001.safetensors")
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"talker.codec_head.weight": "model-00001-of-00001.safetensors"}}))
    make_checkpoint(out, seed=1)
    assert safetensors_files(out) == [out / "model.safetensors"]
    assert not (out / "model-00001-of-00001.safetensors").exists()


# --- 7. generation_config.json ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("top_k", "50"), ("do_sample", "false"), ("max_new_tokens", 10**9),
                                       ("top_p", -1), ("temperature", float("nan"))])
def test_bad_generation_config_values_are_refused(key, value):
    with pytest.raises(ValueError, match=f"generation_config.json: {key}"):
        sampling_defaults_from_generation_config({"top_k": 50, key: value})


def test_generation_config_null_falls_back_and_a_list_is_refused(cv):
    assert sampling_defaults_from_generation_config({"temperature": None, "top_k": 7}) == {"top_k": 7}
    with pytest.raises(ValueError, match="generation_config.json: must hold a JSON object"):
        sampling_defaults_from_generation_config([1, 2])
    edit_json(cv / "generation_config.json", lambda r: r.update(top_k="50"))
    with pytest.raises(ValueError, match="generation_config.json: top_k"):
        load(cv)


# --- 8. config values ------------------------------------------------------------------------------------------------
def _t(key, value):
    return lambda r: r["talker_config"].__setitem__(key, value)


def _cp(key, value):
    return lambda r: r["talker_config"]["code_predictor_config"].__setitem__(key, value)


@pytest.mark.parametrize("edit,field", [
    (_t("hidden_size", -64), "talker_config.hidden_size"),
    (_t("hidden_size", "64"), "talker_config.hidden_size"),
    (_t("hidden_size", 10**7), "talker_config.hidden_size"),
    (_t("num_hidden_layers", 10**6), "talker_config.num_hidden_layers"),
    (_t("num_key_value_heads", 0), "talker_config.num_key_value_heads"),
    (_t("head_dim", 15), "talker_config.head_dim"),
    (_t("max_position_embeddings", 10**9), "talker_config.max_position_embeddings"),
    (_t("rms_norm_eps", -1), "talker_config.rms_norm_eps"),
    (_t("rope_theta", "x"), "talker_config.rope_theta"),
    (_t("rope_theta", 1e-50), "talker_config.rope_theta must be >= 1"),  # positive and finite, but a table of NaN
    (_cp("rope_theta", 0.5), "code_predictor_config.rope_theta must be >= 1"),
    (lambda r: r["talker_config"].update(head_dim=1024, max_position_embeddings=1 << 20),
     r"talker_config.max_position_embeddings \* talker_config.head_dim"),
    (_t("rope_scaling", "x"), "talker_config.rope_scaling"),
    (_t("codec_bos_id", 10**6), "talker_config.codec_bos_id"),
    (_t("codec_eos_token_id", 5), "talker_config.codec_eos_token_id"),
    (lambda r: r["talker_config"].pop("hidden_size"), "talker_config.hidden_size is missing"),
    (lambda r: r["talker_config"]["spk_id"].__setitem__("ryan", 999999), r"spk_id\['ryan'\]"),
    (lambda r: r["talker_config"]["spk_id"].__setitem__("ryan", "abc"), r"spk_id\['ryan'\]"),
    (lambda r: r["talker_config"]["codec_language_id"].__setitem__("english", -1), r"codec_language_id\['english'\]"),
    (lambda r: r["talker_config"]["spk_is_dialect"].__setitem__("eric", "klingon"), r"spk_is_dialect\['eric'\]"),
    (_cp("max_position_embeddings", 10**9), "code_predictor_config.max_position_embeddings"),
    (_cp("num_hidden_layers", 0), "code_predictor_config.num_hidden_layers"),
    (lambda r: r.__setitem__("tts_pad_token_id", 10**7), "tts_pad_token_id"),
    (lambda r: r.__setitem__("talker_config", [1]), "talker_config must be a JSON object"),
    (lambda r: r.__setitem__("tts_model_type", None), "tts_model_type"),
    # honoured by the official package, not implemented here: refused, never ignored (other audio, silently)
    (_t("hidden_act", "gelu_pytorch_tanh"), "talker_config.hidden_act must be 'silu'"),
    (_cp("hidden_act", "gelu"), "code_predictor_config.hidden_act must be 'silu'"),
    (lambda r: r["talker_config"]["rope_scaling"].update(rope_type="linear", factor=4.0),
     "talker_config.rope_scaling.rope_type must be 'default'"),
    (_cp("rope_scaling", {"rope_type": "linear", "factor": 4.0}), "code_predictor_config.rope_scaling.rope_type"),
    (_cp("rope_scaling", {"type": "dynamic", "factor": 2.0}), "code_predictor_config.rope_scaling.type"),
    (_t("rope_parameters", {"rope_type": "yarn"}), "talker_config.rope_parameters.rope_type"),
    (lambda r: r["talker_config"].update(use_sliding_window=True, sliding_window=4),
     "talker_config.use_sliding_window must be false"),
    (_cp("layer_types", ["sliding_attention"]), "code_predictor_config.layer_types"),
])
def test_bad_config_values_are_refused(edit, field):
    raw = json.loads(json.dumps(make_config("custom_voice", "tiny").to_json_dict()))
    edit(raw)
    with pytest.raises(ValueError, match=f"config.json: .*{field}"):
        TTSConfig.from_dict(raw)


def test_config_file_errors_name_the_file(cv):
    (cv / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match=f"{cv / 'config.json'}: not a readable JSON file"):
        load(cv)
    (cv / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json: must hold a JSON object"):
        TTSConfig.from_json(cv / "config.json")


@pytest.mark.parametrize("key,value", [("hidden_size", 200000), ("num_hidden_layers", 100000),
                                       ("codebook_size", 10**8), ("hidden_size", -1), ("hidden_size", "32"),
                                       ("num_key_value_heads", 0), ("max_position_embeddings", 10**9),
                                       ("upsample_rates", []), ("rope_theta", 1e-50), ("rope_theta", 0.5),
                                       ("hidden_size", 8192), ("sliding_window", 1 << 16)])
def test_bad_codec_config_values_are_refused(cv, key, value):
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["decoder_config"].__setitem__(key, value))
    with pytest.raises(ValueError, match=f"speech_tokenizer/config.json: decoder_config.{key}"):
        CodecConfig.from_json(cv / "speech_tokenizer")


def test_what_the_official_package_implements_alike_still_loads():
    """The spellings of what this engine implements: 'swish' is SiLU, default RoPE in either key, no window."""
    raw = json.loads(json.dumps(make_config("custom_voice", "tiny").to_json_dict()))
    for block in (raw["talker_config"], raw["talker_config"]["code_predictor_config"]):
        block.update(hidden_act="swish", use_sliding_window=False, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 1e6})
    raw["talker_config"]["code_predictor_config"]["rope_scaling"] = {"type": "default"}
    cfg = TTSConfig.from_dict(raw)
    assert cfg.talker.mrope_section == tuple(raw["talker_config"]["rope_scaling"]["mrope_section"])


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 4.0}, {"type": "dynamic"}, "x"])
def test_a_scaled_rope_in_the_codec_decoder_is_refused(cv, rope):
    """The official decoder applies decoder_config.rope_scaling; it was dropped with the other unknown keys."""
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["decoder_config"].__setitem__("rope_scaling", rope))
    with pytest.raises(ValueError, match="speech_tokenizer/config.json: decoder_config.rope_scaling"):
        CodecConfig.from_json(cv / "speech_tokenizer")


@pytest.mark.parametrize("content,what", [
    ("[" * 100_000 + "]" * 100_000, "RecursionError"),       # nesting deeper than the parser goes
    ('{"a": ' + "9" * 5000 + "}", "ValueError"),            # an integer over Python's digit limit
])
@pytest.mark.parametrize("rel", ["config.json", "generation_config.json", "speech_tokenizer/config.json"])
def test_json_the_parser_cannot_take_is_a_value_error_naming_the_file(cv, rel, content, what):
    """Deep nesting escaped as a RecursionError naming no file (a job whose row named such a checkpoint failed
    whole, as only ValueError is a row's error)."""
    (cv / rel).write_text(content)
    with pytest.raises(ValueError, match=f"{cv / rel}: not a readable JSON file \\({what}"):
        load(cv)


def test_an_oversized_json_file_is_refused_unread(cv, monkeypatch):
    """A config.json of gigabytes (sparse: no disk) was read whole, then parsed, before any check."""
    import qwen_tts_core.checkpoint.weights as weights

    monkeypatch.setattr(weights, "MAX_JSON_BYTES", 1 << 20)
    with open(cv / "config.json", "r+b") as f:
        f.truncate(4 << 20)
    calls = []
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: calls.append(self) or "")
    with pytest.raises(ValueError, match="config.json: not a readable JSON file .*larger than 1048576 bytes"):
        TTSConfig.from_json(cv / "config.json")
    assert calls == []


def test_a_blank_checkpoint_name_is_refused_not_the_current_folder(cv, monkeypatch):
    """Path("") is the current folder: an unset variable loaded whatever checkpoint sat in the working directory."""
    monkeypatch.chdir(cv)
    for name in ("", "  "):
        with pytest.raises(ValueError, match="pretrained_model_name_or_path: empty"):
            Qwen3TTSModel.from_pretrained(name, device_map="cpu")


@pytest.mark.parametrize("update,field", [
    ({"enc_channels": [60000] * 4 + [180000]}, r"enc_channels\[0\]"), ({"mel_dim": "x"}, "mel_dim"),
    ({"sample_rate": 16000}, "sample_rate"), ({"enc_channels": 5}, "enc_channels"),
])
def test_bad_speaker_encoder_config_values_are_refused(update, field):
    with pytest.raises(ValueError, match=field):
        SpeakerEncoderConfig.from_dict({**speaker_tiny(64).to_json_dict(), **update})


def test_speaker_encoder_width_must_match_the_talker():
    cfg = make_config("base", "tiny")
    raw = cfg.to_json_dict()
    raw["speaker_encoder_config"] = speaker_tiny(32).to_json_dict()
    with pytest.raises(ValueError, match="speaker_encoder_config.enc_dim"):
        TTSConfig.from_dict(raw)


# --- 9. damaged tensors files ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["model.safetensors", "speech_tokenizer/model.safetensors"])
def test_truncated_weights_name_the_file(cv, rel):
    p = cv / rel
    os.truncate(p, p.stat().st_size // 2)
    with pytest.raises(ValueError, match=f"{p}: not a readable safetensors file"):
        load(cv)


@pytest.mark.parametrize("rel,name", [("model.safetensors", "talker.codec_head.weight"),
                                      ("speech_tokenizer/model.safetensors", "decoder.pre_conv.conv.weight")])
def test_integer_weights_are_refused(cv, rel, name):
    edit_weights(cv / rel, lambda t: t.__setitem__(name, (t[name] * 100).to(torch.int32)))
    with pytest.raises(ValueError, match=f"{name}.*dtype torch.int32, expected a floating-point tensor"):
        load(cv)


def test_a_tokenizer_of_another_model_is_refused(cv):
    """<|im_start|> / <|im_end|> must encode to the config's ids: otherwise every prompt has the wrong markers."""
    edit_json(cv / "config.json", lambda r: r.update(im_start_token_id=r["im_start_token_id"] + 7))
    with pytest.raises(ValueError, match=r"<\|im_start\|>.*config.json"):
        load(cv)


def test_without_a_speech_tokenizer_generate_fails_before_generating(cv, monkeypatch):
    shutil.rmtree(cv / "speech_tokenizer")
    model = load(cv)
    monkeypatch.setattr(model, "_engine_driver", lambda: pytest.fail("generated without a codec"))
    with pytest.raises(ValueError, match="speech_tokenizer"):
        model.generate_custom_voice("Hello.", speaker="ryan")


# --- 10. a small config must not force a big allocation ---------------------------------------------------------------
def test_a_big_rope_table_is_refused_before_it_is_built(cv):
    """head_dim 1024 and 2**20 positions were each inside their bounds and the talker's weights match them (6 MB),
    but the rotary table alone is 8 GiB: refused at config.json, nothing allocated."""
    cfg = make_config("custom_voice", "tiny")
    hostile = dataclasses.replace(cfg, talker=dataclasses.replace(cfg.talker, head_dim=1024,
                                                                  max_position_embeddings=1 << 20))
    edit_weights(cv / "model.safetensors", lambda t: t.update(random_talker_state(hostile, 0)))
    edit_json(cv / "config.json", lambda r: r["talker_config"].update(head_dim=1024, max_position_embeddings=1 << 20))
    with address_space_headroom(), pytest.raises(
            ValueError, match=r"config.json: talker_config.max_position_embeddings \* talker_config.head_dim"):
        load(cv)


def test_rope_tables_of_the_official_sizes_pass():
    for size in ("0.6b", "1.7b"):
        raw = json.loads(json.dumps(make_config("custom_voice", size).to_json_dict()))
        t = TTSConfig.from_dict(raw).talker
        assert (t.max_position_embeddings, t.head_dim, t.code_predictor.max_position_embeddings) == (32768, 128, 65536)


def test_a_codec_config_bigger_than_its_weights_allocates_nothing(cv):
    """A 1 KB edit of speech_tokenizer/config.json inside every bound (a ~30 GB decoder) beside the tiny weights: the
    decoder is built on the meta device and refused by name before anything is allocated."""
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["decoder_config"].update(
        hidden_size=4096, intermediate_size=8192, num_hidden_layers=64))
    with address_space_headroom(), pytest.raises(ValueError, match=r"speech tokenizer: checkpoint is missing "
                                                                   r"tensor\(s\) \['decoder.pre_transformer.layers"):
        load(cv)


def test_a_speaker_encoder_config_bigger_than_its_weights_allocates_nothing(checkpoint_factory, tmp_path):
    """speaker_encoder_config inside every bound asking for a 9 GiB ECAPA beside the tiny weights: refused by name
    (and file) before anything is allocated."""
    base = Path(shutil.copytree(checkpoint_factory("base", "tiny"), tmp_path / "base"))
    edit_json(base / "config.json", lambda r: r["speaker_encoder_config"].update(
        enc_channels=[8192, 8192, 8192], enc_kernel_sizes=[31, 31, 31], enc_dilations=[1, 1, 1],
        enc_attention_channels=4096, enc_res2net_scale=1, enc_se_channels=4096))
    with address_space_headroom(), pytest.raises(
            ValueError, match=rf"speaker encoder state in {base / 'model.safetensors'} does not match the config"):
        load(base)


# --- 11. the voice-clone (Mimi) encoder is checked at load ------------------------------------------------------------
@pytest.mark.parametrize("update,field", [
    ({"num_filters": "4"}, "encoder_config.num_filters must be an integer"),
    ({"hidden_size": 10**6}, "encoder_config.hidden_size"),
    ({"num_hidden_layers": 10**4}, "encoder_config.num_hidden_layers"),
    ({"upsampling_ratios": [8, "6", 5, 4]}, r"encoder_config.upsampling_ratios\[1\]"),
    ({"rope_theta": 1e-50}, "encoder_config.rope_theta"),
    ({"use_causal_conv": "yes"}, "encoder_config.use_causal_conv"),
    ({"hidden_act": "exec"}, "encoder_config.hidden_act"),
    ({"audio_channels": 2}, "encoder_config.audio_channels"),
    ({"codebook_size": 1024}, r"encoder_config.codebook_size \(1024\) must equal decoder_config.codebook_size"),
    ({"num_quantizers": 8}, r"encoder_valid_num_quantizers \(16\) exceeds encoder_config.num_quantizers"),
    ({"sampling_rate": 16000}, "encoder_config.sampling_rate"),
])
def test_bad_encoder_config_values_are_refused_at_load(cv, update, field):
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["encoder_config"].update(update))
    with pytest.raises(ValueError, match=f"speech_tokenizer/config.json: {field}"):
        load(cv)


def test_encoder_valid_num_quantizers_must_match_the_decoder(cv):
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r.update(encoder_valid_num_quantizers=8))
    with pytest.raises(ValueError, match=r"speech_tokenizer/config.json: encoder_valid_num_quantizers \(8\) must "
                                         r"equal decoder_config.num_quantizers \(16\)"):
        load(cv)


def test_an_encoder_config_that_does_not_match_its_weights_is_refused_at_load(base_ckpt):
    """A well-typed encoder_config the weights do not fit: refused at a Base model's load, naming a tensor, not at
    the first voice-clone prompt."""
    cv = base_ckpt
    edit_json(cv / "speech_tokenizer/config.json", lambda r: r["encoder_config"].update(num_filters=8))
    with pytest.raises(ValueError, match=r"speech tokenizer encoder: tensor 'encoder\.encoder\.layers\.0\.conv\.weight' "
                                         r"of .*speech_tokenizer/model.safetensors has shape"):
        load(cv)


# --- 12. token ids inside the text vocabulary -------------------------------------------------------------------------
def test_a_tokenizer_id_beyond_the_text_vocabulary_is_refused(cv):
    """An added token with id 160000 (text_vocab_size 151936) loaded and failed each request that used it
    (IndexError; on CUDA a device-side assert that kills the replica)."""
    token = {"id": 160000, "content": "<|evil|>", "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}

    def add(r):
        r["model"]["vocab"]["<|evil|>"] = 160000
        r["added_tokens"].append(token)

    edit_json(cv / "tokenizer.json", add)
    edit_json(cv / "tokenizer_config.json", lambda r: r["added_tokens_decoder"].__setitem__(
        "160000", {k: v for k, v in token.items() if k != "id"}))
    edit_json(cv / "vocab.json", lambda r: r.__setitem__("<|evil|>", 160000))
    with pytest.raises(ValueError, match=rf"{cv / 'tokenizer.json'}: token '<\|evil\|>' has id 160000, beyond the "
                                         r"talker's text vocabulary .*text_vocab_size = 151936"):
        load(cv)
