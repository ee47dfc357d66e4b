"""Checkpoint configuration and the speaker front end, pinned by a mutation review.

Reviewed: qwen_tts_core/config.py (config.json -> TTSConfig), codec/config.py (speech_tokenizer/config.json),
speaker/config.py, speaker/mel.py, speaker/ecapa.py and speaker/build.py. Each test here failed on a code change
(a "mutant") that the rest of the fast suite let pass. The rules: a hostile or inconsistent config is refused with a
ValueError naming the field (never a crash deep in a model, never a silent default that changes the audio), a field
left out takes the official package's default, and the log-mels and x-vectors equal the official ones (the numbers
below were computed once with the official qwen-tts package and librosa; tests/speaker/test_mel.py and test_ecapa.py
compare against the live oracle in the slow parity lane).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from qwen_tts_core.checkpoint.weights import read_tensors
from qwen_tts_core.codec.config import CodecConfig, tiny_config
from qwen_tts_core.config import (
    TTSConfig,
    check_codec_matches,
    default_generation_config,
    generation_defaults,
    make_config,
    sampling_defaults_from_generation_config,
)
from qwen_tts_core.speaker import (
    EcapaTdnn,
    SpeakerEncoderConfig,
    speaker_embedding,
    speaker_encoder_from_state,
)
from qwen_tts_core.speaker import tiny_config as speaker_tiny
from qwen_tts_core.speaker.build import PREFIX, probe_waveforms, random_speaker_encoder_state
from qwen_tts_core.speaker.mel import (
    SPEAKER_MEL,
    MelSpec,
    log_mel_spectrogram,
    slaney_mel_filterbank,
)


def _raw(model_type: str = "custom_voice") -> dict:
    """The config.json of a tiny checkpoint, as parsed JSON (a private copy to edit)."""
    return json.loads(json.dumps(make_config(model_type, "tiny").to_json_dict()))


def _refused(raw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"^config.json: .*{match}"):
        TTSConfig.from_dict(raw)


def _codec_raw() -> dict:
    return json.loads(json.dumps(tiny_config().to_json_dict()))


def _codec_refused(edit, match: str) -> None:
    raw = _codec_raw()
    edit(raw)
    with pytest.raises(ValueError, match=match):
        CodecConfig.from_dict(raw)


# ---- config.json: numbers -------------------------------------------------------------------------------------------
def test_integer_and_float_fields_refuse_bools_and_keep_their_bounds():
    """C01/C06: `true` is an int (and a float) to Python: num_hidden_layers true built one layer, rms_norm_eps true
    an eps of 1. C02/C03: the bounds are inclusive (1 layer and MAX_LAYERS layers are allowed). C05: an eps of 0 is
    refused (division by zero in RMSNorm)."""
    for key, value in (("num_hidden_layers", True), ("rms_norm_eps", True), ("rms_norm_eps", 0)):
        raw = _raw()
        raw["talker_config"][key] = value
        _refused(raw, f"talker_config.{key}")
    raw = _raw()
    raw["talker_config"]["code_predictor_config"]["num_hidden_layers"] = 1
    raw["talker_config"]["num_hidden_layers"] = 256
    cfg = TTSConfig.from_dict(raw)
    assert (cfg.talker.num_hidden_layers, cfg.talker.code_predictor.num_hidden_layers) == (256, 1)


def test_an_infinite_rope_base_is_refused():
    """C04: Python's json reads `Infinity`; a RoPE base of inf passed "> 0" and made a rotary table of NaN."""
    raw = json.loads(json.dumps(_raw()).replace('"rope_theta": 1000000.0', '"rope_theta": Infinity', 1))
    assert math.isinf(raw["talker_config"]["rope_theta"])
    _refused(raw, "talker_config.rope_theta must be a finite number")


def test_a_rope_base_of_exactly_one_is_allowed():
    """C07: the bound is `>= 1` (the message says so); 1.0 itself was refused."""
    raw = _raw()
    raw["talker_config"]["rope_theta"] = 1.0
    assert TTSConfig.from_dict(raw).talker.rope_theta == 1.0


def test_a_rope_base_inside_rope_parameters_is_checked():
    """C09: rope_parameters may carry its own rope_theta (the newer transformers layout); a tiny one there was let
    through while the same value at the top level is refused."""
    raw = _raw()
    raw["talker_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e-50}
    _refused(raw, "talker_config.rope_parameters.rope_theta must be >= 1")


def test_the_rope_table_bound_is_inclusive():
    """C31: max_position_embeddings * head_dim may equal MAX_ROPE_TABLE (2**24: 131072 positions of 128)."""
    raw = _raw()
    raw["talker_config"].update(head_dim=128, max_position_embeddings=1 << 17)
    assert TTSConfig.from_dict(raw).talker.max_position_embeddings == 1 << 17
    raw["talker_config"]["max_position_embeddings"] = (1 << 17) + 1
    _refused(raw, r"talker_config.max_position_embeddings \* talker_config.head_dim")


def test_optional_stack_keys_take_the_official_defaults():
    """C16/C18: a talker / code predictor block without rms_norm_eps, max_position_embeddings or attention_bias
    gets the official Qwen3TTSTalkerConfig / CodePredictorConfig defaults (1e-6, 32768, false), as do the
    vocabulary sizes (3072, 2048) and text_hidden_size (2048)."""
    raw = _raw()
    t, cp = raw["talker_config"], raw["talker_config"]["code_predictor_config"]
    for block in (t, cp):
        for key in ("rms_norm_eps", "max_position_embeddings", "attention_bias", "vocab_size"):
            del block[key]
    del t["text_hidden_size"]
    cfg = TTSConfig.from_dict(raw).talker
    for c in (cfg, cfg.code_predictor):
        assert (c.rms_norm_eps, c.max_position_embeddings, c.attention_bias) == (1e-6, 32768, False)
    assert (cfg.vocab_size, cfg.code_predictor.vocab_size, cfg.text_hidden_size) == (3072, 2048, 2048)


# ---- config.json: what the official package honours and this engine does not implement -----------------------------
@pytest.mark.parametrize("value", ["true", 1])
def test_a_sliding_window_that_is_truthy_but_not_true_is_refused(value):
    """C13: the official config enables the window for any truthy use_sliding_window ("true", 1); only the literal
    `true` was refused, so these attended to every position here and to a window there."""
    raw = _raw()
    raw["talker_config"]["code_predictor_config"]["use_sliding_window"] = value
    _refused(raw, "code_predictor_config.use_sliding_window must be false")


def test_layer_types_with_one_sliding_layer_are_refused():
    """C14: one sliding layer among full ones is still a window (the check looked for lists of only sliding)."""
    raw = _raw()
    raw["talker_config"]["layer_types"] = ["full_attention", "sliding_attention"]
    _refused(raw, "talker_config.layer_types")


def test_attention_bias_must_be_a_boolean():
    """C19: "false" (a string, truthy) was taken as it was and built attention biases."""
    raw = _raw()
    raw["talker_config"]["attention_bias"] = "false"
    _refused(raw, "talker_config.attention_bias must be true or false")


def test_a_heads_mismatch_names_the_block():
    """C20: without the block's own check the dataclass refused it, naming neither talker nor code predictor."""
    raw = _raw()
    raw["talker_config"]["code_predictor_config"]["num_attention_heads"] = 3
    _refused(raw, r"talker_config.code_predictor_config.num_attention_heads \(3\) must be a multiple")


# ---- config.json: ids ------------------------------------------------------------------------------------------------
def test_ids_equal_to_the_vocabulary_size_are_refused():
    """C21/C24/C32: an id must be < its vocabulary (an id equal to vocab_size indexes past the embedding: IndexError
    in a request, a device-side assert on CUDA)."""
    raw = _raw()
    raw["talker_config"]["spk_id"]["ryan"] = 3072
    _refused(raw, r"talker_config.spk_id\['ryan'\] must be in \[0, 3071\]")
    raw = _raw()
    raw["talker_config"]["codec_bos_id"] = 3072
    _refused(raw, r"talker_config.codec_bos_id must be in \[2048, 3071\]")
    raw = _raw()
    raw["tts_pad_token_id"] = 151936
    _refused(raw, r"tts_pad_token_id must be in \[0, 151935\]")


def test_a_talker_vocabulary_without_room_for_specials_names_vocab_size():
    """C23: vocab_size must exceed the 1024 special ids; a smaller one was refused only through some special id."""
    raw = _raw()
    raw["talker_config"]["vocab_size"] = 1000
    _refused(raw, r"talker_config.vocab_size must be in \[1025, ")


def test_speaker_and_language_names_are_case_insensitive():
    """C22: names in spk_id / codec_language_id are stored lower-case (requests are looked up lower-cased): a
    checkpoint spelling "Ryan" had a speaker no request could name."""
    raw = _raw()
    raw["talker_config"]["spk_id"]["Aria"] = raw["talker_config"]["spk_id"].pop("ryan")
    raw["talker_config"]["codec_language_id"]["Klingon"] = 2100
    cfg = TTSConfig.from_dict(raw)
    assert "aria" in cfg.talker.spk_id and "Aria" not in cfg.talker.spk_id
    assert "klingon" in cfg.languages


def test_spk_is_dialect_must_be_an_object_and_null_means_no_dialect():
    """C26: a list was iterated with .items() (AttributeError, no field named). C27: null, as false, is "no
    dialect" (the official package tests truthiness)."""
    raw = _raw()
    raw["talker_config"]["spk_is_dialect"] = [1]
    _refused(raw, "talker_config.spk_is_dialect must be a JSON object")
    raw = _raw()
    raw["talker_config"]["spk_is_dialect"]["eric"] = None
    assert TTSConfig.from_dict(raw).talker.spk_is_dialect["eric"] is None


def test_mrope_section_must_be_a_list_of_integers():
    """C29/C30: mrope_section is written back to config.json for the official package; a bool or a string there
    was accepted."""
    for value in ([True, 20, 20], "abc"):
        raw = _raw()
        raw["talker_config"]["rope_scaling"]["mrope_section"] = value
        _refused(raw, "talker_config.rope_scaling.mrope_section must be a list")


def test_text_special_ids_are_read_and_written_and_null_means_default():
    """C40: the text ids of config.json were ignored (the defaults used instead). C41: to_json_dict dropped them.
    C53: null is the default, as for every other key."""
    raw = _raw()
    raw.update(im_start_token_id=151000, tts_eos_token_id=151001)
    cfg = TTSConfig.from_dict(raw)
    assert (cfg.im_start_token_id, cfg.tts_eos_token_id) == (151000, 151001)
    again = TTSConfig.from_dict(json.loads(json.dumps(cfg.to_json_dict())))
    assert (again.im_start_token_id, again.tts_eos_token_id) == (151000, 151001)
    raw["tts_pad_token_id"] = None
    assert TTSConfig.from_dict(raw).tts_pad_token_id == 151671


# ---- config.json: blocks, types, consistency -------------------------------------------------------------------------
def test_talker_code_groups_have_their_own_bound():
    """C33: num_code_groups 1 (no acoustic codebook) is refused by name, not only through the code predictor's."""
    raw = _raw()
    raw["talker_config"]["num_code_groups"] = 1
    _refused(raw, r"talker_config.num_code_groups must be in \[2, 64\]")


def test_code_predictor_groups_must_equal_the_talker_s():
    """C34: a code predictor of 8 groups beside a talker of 16 loaded (the codec check only compares the talker)."""
    raw = _raw()
    raw["talker_config"]["code_predictor_config"]["num_code_groups"] = 8
    _refused(raw, r"code_predictor_config.num_code_groups \(8\) must equal talker_config.num_code_groups \(16\)")


def test_model_type_is_checked_and_tts_model_type_defaults_to_custom_voice():
    """C37: another model's config.json with a talker_config block was read as Qwen3-TTS. C36: no tts_model_type
    is a CustomVoice model."""
    raw = _raw()
    raw["model_type"] = "llama"
    _refused(raw, "model_type must be 'qwen3_tts'")
    raw = _raw()
    del raw["tts_model_type"]
    assert TTSConfig.from_dict(raw).tts_model_type == "custom_voice"


def test_speaker_encoder_config_errors_name_the_block():
    """C38: a bad speaker_encoder_config field is named under its block. C15: a block that is not an object is
    refused, not read as empty (an empty list was taken for {} and the defaults used)."""
    raw = _raw("base")
    raw["speaker_encoder_config"]["mel_dim"] = 80
    _refused(raw, "speaker_encoder_config: mel_dim")
    raw = _raw()
    raw["speaker_encoder_config"] = []
    _refused(raw, "speaker_encoder_config must be a JSON object")


def test_model_size_and_tokenizer_type_must_be_scalars():
    """C39: an object for tts_model_size was stringified into the checkpoint's identity."""
    raw = _raw()
    raw["tts_model_size"] = {"a": 1}
    _refused(raw, "tts_model_size must be a string")


def test_talker_and_codec_quantizers_must_agree():
    """C42: a codec of 8 codebooks beside a talker of 16 (every frame would be cut or padded)."""
    small = CodecConfig(**{**tiny_config().__dict__, "num_quantizers": 8, "encoder_valid_num_quantizers": 8})
    with pytest.raises(ValueError, match=r"x: talker_config.num_code_groups \(16\) must equal .*num_quantizers \(8\)"):
        check_codec_matches(make_config("custom_voice", "tiny"), small, "x")


def test_from_json_checks_the_speech_tokenizer_beside_it(tmp_path):
    """C43: TTSConfig.from_json compares the talker with speech_tokenizer/config.json when it is there (a codec of
    1024 codes beside a talker of 2048 was found only when decoding)."""
    (tmp_path / "speech_tokenizer").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(_raw()))
    codec = _codec_raw()
    codec["decoder_config"]["codebook_size"] = 1024
    codec["encoder_config"]["codebook_size"] = 1024
    (tmp_path / "speech_tokenizer" / "config.json").write_text(json.dumps(codec))
    with pytest.raises(ValueError, match=r"config.json and .*speech_tokenizer/config.json: the talker's codebook"):
        TTSConfig.from_json(tmp_path / "config.json")


def test_languages_are_auto_and_the_codec_languages_without_dialects():
    """C45: a dialect comes with its speaker; it is not a language a request may name."""
    langs = make_config("custom_voice", "tiny").languages
    assert langs[0] == "auto" and "english" in langs and not any("dialect" in x for x in langs)


def test_make_config_takes_the_speaker_encoder_width():
    """C46: make_config(enc_dim=...) was ignored."""
    assert make_config("base", "tiny", enc_dim=32).speaker_encoder["enc_dim"] == 32


def test_to_json_dict_writes_what_the_official_package_needs():
    """C50: tie_word_embeddings true makes the official talker tie its codec head to the codec embedding (other
    audio from the same weights)."""
    t = make_config("custom_voice", "tiny").to_json_dict()["talker_config"]
    for block in (t, t["code_predictor_config"]):
        assert block["tie_word_embeddings"] is False and block["use_sliding_window"] is False
        assert block["hidden_act"] == "silu"


# ---- generation_config.json ------------------------------------------------------------------------------------------
def test_generation_config_keeps_false_and_zero_values(tmp_path):
    """C48: do_sample false (greedy) was dropped as falsy, so the checkpoint's greedy default sampled. C44: a
    checkpoint without generation_config.json has no defaults of its own."""
    assert sampling_defaults_from_generation_config({"do_sample": False, "top_k": 50}) == {"do_sample": False,
                                                                                           "top_k": 50}
    assert generation_defaults(tmp_path / "generation_config.json") == {}


def test_the_written_generation_config_is_the_published_one():
    """C49: the generation_config.json that make_checkpoint writes equals the published checkpoints'."""
    assert default_generation_config() == dict(
        do_sample=True, top_k=50, top_p=1.0, temperature=0.9, repetition_penalty=1.05, subtalker_dosample=True,
        subtalker_top_k=50, subtalker_top_p=1.0, subtalker_temperature=0.9, max_new_tokens=8192)


# ---- speech_tokenizer/config.json ------------------------------------------------------------------------------------
def test_a_decoder_config_without_optional_keys_takes_the_official_defaults():
    """K01-K10, K35-K38: the defaults of the official Qwen3TTSTokenizerV2DecoderConfig / Qwen3TTSTokenizerV2Config
    (the codec's own dataclass defaults are the published file's, which differ: hidden 512, intermediate 1024)."""
    cfg = CodecConfig.from_dict({"model_type": "qwen3_tts_tokenizer_12hz", "decoder_config": {"codebook_dim": 512}})
    official = dict(codebook_size=2048, hidden_size=1024, latent_dim=1024, max_position_embeddings=8000,
                    rope_theta=10000.0, num_attention_heads=16, num_key_value_heads=16, attention_bias=False,
                    sliding_window=72, intermediate_size=3072, hidden_act="silu", layer_scale_initial_scale=0.01,
                    rms_norm_eps=1e-5, num_hidden_layers=8, num_quantizers=16, upsample_rates=(8, 5, 4, 3),
                    upsampling_ratios=(2, 2), decoder_dim=1536, head_dim=64, sample_rate=24000,
                    decode_upsample_rate=1920, encode_downsample_rate=1920, encoder_valid_num_quantizers=16)
    assert {k: getattr(cfg, k) for k in official} == official
    assert cfg.frame_rate == 12.5  # K43


def test_head_dim_defaults_to_hidden_over_heads_and_codebook_dim_is_required():
    """K33: without head_dim the decoder's is hidden_size // num_attention_heads. K49: a bad hidden_size there is
    named, not a TypeError. K32: codebook_dim has no official default: refused, not taken from the dataclass."""
    def drop(key, **dec):
        def edit(raw):
            raw["decoder_config"].pop(key)
            raw["decoder_config"].update(dec)
        return edit

    raw = _codec_raw()
    drop("head_dim", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)(raw)
    assert CodecConfig.from_dict(raw).head_dim == 16
    _codec_refused(drop("head_dim", hidden_size="64"), "decoder_config.hidden_size must be an integer")
    _codec_refused(drop("codebook_dim"), "decoder_config.codebook_dim is missing")


@pytest.mark.parametrize("key,value,match", [
    ("latent_dim", 0, r"decoder_config.latent_dim must be in \[1, "),                                 # K12
    ("upsample_rates", [8, 5, 4, 3, 1, 1, 1, 1, 1], "decoder_config.upsample_rates must be a list"),  # K21
    ("hidden_act", "tanh", "hidden_act must be one of"),                                              # K22
    ("codebook_dim", 63, "codebook_dim must be even"),                                                # K23
    ("num_key_value_heads", 3, "num_attention_heads must be a multiple of num_key_value_heads"),       # K24
    ("decoder_dim", 1000, "decoder_dim must be divisible"),                                           # K26
    ("layer_scale_initial_scale", 0, "decoder_config.layer_scale_initial_scale"),                     # K46
    ("attention_bias", "no", "decoder_config.attention_bias must be true or false"),                  # K47
])
def test_bad_decoder_values_are_refused_by_name(key, value, match):
    """Each value builds a decoder that fails deep in the model or computes other audio."""
    _codec_refused(lambda r: r["decoder_config"].__setitem__(key, value), match)


def test_one_quantizer_is_refused_and_rates_must_agree():
    """K25: one codebook (no acoustic ones). K27: decode_upsample_rate must be the decoder's samples per frame.
    K34: the 12Hz codec reads and writes one sample rate."""
    _codec_refused(lambda r: (r["decoder_config"].__setitem__("num_quantizers", 1),
                              r.__setitem__("encoder_valid_num_quantizers", 1)), "num_quantizers must be >= 2")
    _codec_refused(lambda r: r.__setitem__("decode_upsample_rate", 960), r"decode_upsample_rate \(960\) must equal")
    _codec_refused(lambda r: r.__setitem__("input_sample_rate", 16000), "input_sample_rate and output_sample_rate")


def test_codec_blocks_of_the_wrong_kind_are_refused_by_name():
    """K30: the 25Hz tokenizer's config is another codec. K31/K39: a decoder_config or encoder_config that is not
    an object is named (a list was a TypeError from dict())."""
    _codec_refused(lambda r: r.__setitem__("model_type", "qwen3_tts_tokenizer_25hz"), "model_type must be")
    _codec_refused(lambda r: r.__setitem__("decoder_config", [1]), "decoder_config must be a JSON object")
    _codec_refused(lambda r: r.__setitem__("encoder_config", [1]), "encoder_config must be a JSON object")


@pytest.mark.parametrize("key,value,match", [
    ("norm_eps", 0, "encoder_config.norm_eps"),                                          # K14
    ("attention_dropout", 1.0, "encoder_config.attention_dropout"),                      # K15
    ("attention_dropout", True, "encoder_config.attention_dropout"),                     # K16
    ("frame_rate", -1, "encoder_config.frame_rate"),                                     # K17
    ("_frame_rate", "x", "encoder_config._frame_rate"),                                  # K45
    ("upsampling_ratios", [], "encoder_config.upsampling_ratios"),                       # K18
    ("rope_scaling", {"rope_type": "linear"}, "encoder_config.rope_scaling.rope_type"),  # K19
    ("decoder_config", {}, "encoder_config.decoder_config is not a MimiConfig field"),   # K20
])
def test_bad_encoder_values_are_refused_by_name(key, value, match):
    """The Mimi encoder (voice-clone prompts) is checked at load, each field by name."""
    _codec_refused(lambda r: r["encoder_config"].__setitem__(key, value), match)


def test_encoder_quantizer_bounds():
    """K13: MimiConfig's head_dim may be null (hidden_size // heads). K28: the encoder may have exactly as many
    quantizers as are kept. K29: without num_quantizers, MimiConfig's default is 32 (fewer than 40 kept)."""
    raw = _codec_raw()
    raw["encoder_config"].update(head_dim=None, num_quantizers=16)
    assert CodecConfig.from_dict(raw).encoder["num_quantizers"] == 16

    def forty(r):
        r["decoder_config"]["num_quantizers"] = 40
        r["encoder_valid_num_quantizers"] = 40
        r["encoder_config"].pop("num_quantizers")
    _codec_refused(forty, r"encoder_valid_num_quantizers \(40\) exceeds encoder_config.num_quantizers \(32\)")


# ---- speaker_encoder_config ------------------------------------------------------------------------------------------
def test_speaker_encoder_layer_lists_are_bounded_and_mel_dim_is_fixed():
    """P01: at most 32 layers (a consistent list of 33 was accepted). P02: the mel front end has 128 bins: a
    config of 80 loaded and failed every voice-clone request."""
    base = speaker_tiny(64).to_json_dict()
    long = {**base, "enc_channels": [32] * 32 + [31 * 32], "enc_kernel_sizes": [3] * 33, "enc_dilations": [1] * 33}
    with pytest.raises(ValueError, match="enc_channels must be a list of 3 to 32 integers"):
        SpeakerEncoderConfig.from_dict(long)
    with pytest.raises(ValueError, match=r"mel_dim must be in \[128, 128\]"):
        SpeakerEncoderConfig.from_dict({**base, "mel_dim": 80})


# ---- mel front end (numbers from librosa / the official mel_spectrogram) -------------------------------------------
def _signal() -> np.ndarray:
    """Tones, then silence, then a square wave: 6000 samples at 24 kHz."""
    n = 6000
    t = np.arange(n) / 24000
    wav = (0.4 * np.cos(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 1800 * t + 0.3)
           + 0.1 * np.sin(2 * np.pi * 7000 * t)).astype(np.float32)
    wav[n // 2:] = 0
    wav[n // 2 + 1000:] = 0.3 * np.sign(np.sin(2 * np.pi * 300 * t[n // 2 + 1000:]))
    return wav


def test_filterbank_equals_librosa_slaney():
    """M01-M03, M13-M15, M22, M24: entries of librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmax=12000)."""
    fb = slaney_mel_filterbank(24000, 1024, 128, 0.0, 12000.0)
    assert fb.shape == (128, 513) and fb.dtype == np.float32
    assert fb.astype(np.float64).sum() == pytest.approx(5.459415810865721, rel=1e-6)
    for (i, j), want in {(0, 0): 0.0, (0, 1): 0.03355042636394501, (0, 2): 0.00856908317655325,
                         (1, 3): 0.012853624299168587, (127, 500): 0.0027381405234336853,
                         (127, 511): 0.0002281783672515303, (127, 512): 0.0}.items():
        assert fb[i, j] == pytest.approx(want, rel=1e-6, abs=1e-12), (i, j)
    assert [int(fb[i].argmax()) for i in (0, 10, 20, 40, 60, 80, 100, 127)] == [1, 12, 24, 47, 80, 138, 239, 498]


def test_log_mels_equal_the_official_front_end():
    """M04-M07, M16-M19: the official mel_spectrogram (reflect pad 384, periodic Hann 1024, hop 256, magnitude with
    eps 1e-9, Slaney mels to 12 kHz, natural log of clamp(1e-5)) on a fixed signal; silence is exactly log(1e-5)."""
    mel = log_mel_spectrogram(torch.from_numpy(_signal()))[0].numpy()
    assert mel.shape == (128, 23)
    frame_mean = [-3.59071, -5.17, -8.91073, -8.91937, -9.03015, -9.0342, -8.95235, -8.93562, -8.94323, -8.89758,
                  -4.03204, -3.01229, -3.40821, -6.61751, -4.06588, -2.90758, -2.88068, -3.22839, -3.01005, -3.16268,
                  -3.07712, -3.12792, -2.69639]
    np.testing.assert_allclose(mel.mean(0), frame_mean, atol=2e-4)
    for b, want in {0: -4.29525, 5: -2.38171, 20: -4.93655, 40: -6.16084, 64: -4.50254, 90: -7.10538,
                    127: -6.87556}.items():
        assert mel[b].mean() == pytest.approx(want, abs=2e-4), b
    for (b, f), want in {(3, 0): -3.27816, (30, 5): -9.5378, (70, 12): -3.87475, (127, 22): -3.29778,
                         (10, 11): -0.64287}.items():
        assert mel[b, f] == pytest.approx(want, abs=2e-4), (b, f)
    silent = log_mel_spectrogram(torch.zeros(2000))
    assert torch.all(silent == math.log(1e-5))


def test_mel_input_checks_and_frame_count():
    """M12/M20/M21 (tests/speaker/test_mel.py is parity-marked as a whole, so the fast lanes had none of these): the
    shortest input gives one frame; a 3-D or integer waveform is refused by name."""
    assert (SPEAKER_MEL.num_frames(SPEAKER_MEL.min_samples), SPEAKER_MEL.num_frames(384)) == (1, 0)
    with pytest.raises(ValueError, match="wav must have shape"):
        log_mel_spectrogram(torch.zeros(1, 1, 4000))
    with pytest.raises(ValueError, match="wav must be a floating point tensor"):
        log_mel_spectrogram(torch.zeros(4000, dtype=torch.int16))


def test_mel_spec_bounds():
    """M10: a hop longer than the FFT skips samples between frames: refused."""
    with pytest.raises(ValueError, match="hop_length must be in"):
        MelSpec(hop_length=2048)
    assert MelSpec(24000, 1024, 256, 1024, 128, 0.0, 12000.0, 1e-5, 1e-9) == SPEAKER_MEL


# ---- ECAPA-TDNN (an x-vector from the official Qwen3TTSSpeakerEncoder) ----------------------------------------------
def _plain_weights(cfg: SpeakerEncoderConfig) -> dict[str, torch.Tensor]:
    """Seeded He-normal weights, 0.1 biases, by sorted name (no calibration: nothing here runs the encoder)."""
    shapes = {k: v.shape for k, v in EcapaTdnn(cfg).state_dict().items()}
    out = {}
    for i, name in enumerate(sorted(shapes)):
        shape = shapes[name]
        std = math.sqrt(2.0 / (shape[1] * shape[2])) if len(shape) == 3 else 0.1
        out[PREFIX + name] = torch.randn(shape, generator=torch.Generator().manual_seed(1000 + i)) * std
    return out


def _voice() -> np.ndarray:
    t = np.arange(9000) / 24000
    w = sum(np.sin(2 * np.pi * 150 * k * t + k) / k for k in range(1, 12)) * (0.6 + 0.4 * np.sin(2 * np.pi * 5 * t))
    w[6000:] = 0.2 * np.sin(2 * np.pi * 2500 * t[6000:])
    return (0.5 * w / np.abs(w).max()).astype(np.float32)


def test_x_vector_equals_the_official_encoder():
    """E01-E04, E06-E09, E11, E14-E16: reflect "same" padding, the Res2Net hierarchy, SE mean + ReLU + sigmoid, the
    residual, attentive pooling over time with [x, mean, std] context and tanh, [mean, std] output, MFA order. The
    expected vector is the official extract_speaker_embedding with the same weights."""
    cfg = speaker_tiny(enc_dim=6)
    enc = speaker_encoder_from_state(cfg, _plain_weights(cfg))
    got = speaker_embedding(enc, _voice()).numpy()
    want = [59.43359, 11.70513, -59.53644, -101.45433, 88.42879, -50.95232]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-3)


def test_encoder_input_checks():
    """E10: fewer mel frames than the reflect pads need is a ValueError, not a padding RuntimeError. E12/E13: an
    encoder whose config is not the 24 kHz / 128-mel front end is refused, not fed other features."""
    cfg = speaker_tiny(enc_dim=6)
    enc = speaker_encoder_from_state(cfg, _plain_weights(cfg))
    with pytest.raises(ValueError, match=f"needs at least {cfg.min_frames}"):
        enc(torch.zeros(1, cfg.min_frames - 1, 128))
    wav = _voice()
    for bad, match in ((dict(sample_rate=16000), "sample_rate must be 24000"), (dict(mel_dim=80), "mel_dim must be")):
        other = SpeakerEncoderConfig(**{**cfg.__dict__, **bad})
        with pytest.raises(ValueError, match=f"speaker encoder {match}"):
            speaker_embedding(speaker_encoder_from_state(other, _plain_weights(other)), wav)


def test_state_with_an_extra_tensor_is_refused():
    """B02: a tensor the encoder does not have is refused by name (not ignored)."""
    cfg = speaker_tiny(enc_dim=6)
    state = {**_plain_weights(cfg), PREFIX + "blocks.9.conv.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected \['blocks.9.conv.weight'\]"):
        speaker_encoder_from_state(cfg, state)


def test_a_non_finite_speaker_weight_names_its_file(tmp_path: Path):
    """B08: the file of each tensor travels with it: the error names model.safetensors."""
    cfg = speaker_tiny(enc_dim=6)
    state = _plain_weights(cfg)
    state[PREFIX + "fc.bias"][0] = float("nan")
    f = tmp_path / "model.safetensors"
    save_file(state, str(f))
    with pytest.raises(ValueError, match=rf"fc.bias.*{f}.*non-finite"):
        speaker_encoder_from_state(cfg, read_tensors([f], PREFIX))


def test_random_encoder_output_scale():
    """B04: output_rms must be positive. B05: the projection is calibrated to output_rms on the probe batch."""
    cfg = speaker_tiny(enc_dim=8)
    with pytest.raises(ValueError, match="output_rms must be > 0"):
        random_speaker_encoder_state(cfg, seed=1, output_rms=0.0)
    enc = speaker_encoder_from_state(cfg, random_speaker_encoder_state(cfg, seed=1, output_rms=4.0))
    vecs = torch.stack([speaker_embedding(enc, w) for w in probe_waveforms()])
    assert (vecs - vecs.mean(0)).std().item() == pytest.approx(4.0, rel=0.02)
