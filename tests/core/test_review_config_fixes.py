"""Defects found by the mutation review of the checkpoint configuration (see test_review_mutants_config.py); each
test here failed before its fix."""

from __future__ import annotations

import json

import pytest

from qwen_tts_core.codec.config import CodecConfig, tiny_config
from qwen_tts_core.config import TTSConfig, make_config
from qwen_tts_core.text.prompt import resolve_language_id


def _raw() -> dict:
    return json.loads(json.dumps(make_config("custom_voice", "tiny").to_json_dict()))


def test_a_dialect_spelled_in_another_case_is_the_dialect():
    """spk_is_dialect "Sichuan_Dialect" passed the check (names compare lower-case) but was kept as written, and
    every Chinese or auto request for that speaker failed with KeyError 'Sichuan_Dialect' in the prompt builder."""
    raw = _raw()
    raw["talker_config"]["spk_is_dialect"]["eric"] = "Sichuan_Dialect"
    cfg = TTSConfig.from_dict(raw)
    assert resolve_language_id(cfg, "chinese", "Eric") == cfg.talker.codec_language_id["sichuan_dialect"] == 2062
    assert resolve_language_id(cfg, "english", "eric") == 2050


def test_a_missing_rope_theta_takes_the_official_default():
    """The official Qwen3TTSTalkerConfig and Qwen3TTSTalkerCodePredictorConfig default rope_theta to 10000; a
    config.json without it got 1e6 here (other rotations, other audio than the official package, silently)."""
    raw = _raw()
    del raw["talker_config"]["rope_theta"]
    del raw["talker_config"]["code_predictor_config"]["rope_theta"]
    t = TTSConfig.from_dict(raw).talker
    assert t.rope_theta == t.code_predictor.rope_theta == 10000.0


def test_a_bad_codec_sample_rate_names_the_config_field():
    """The error named "sample_rate", which speech_tokenizer/config.json does not have: output_sample_rate."""
    raw = json.loads(json.dumps(tiny_config().to_json_dict()))
    raw.update(input_sample_rate=10**6, output_sample_rate=10**6)
    with pytest.raises(ValueError, match=r"^output_sample_rate must be in \[1, 192000\]"):
        CodecConfig.from_dict(raw)


def test_a_rope_theta_written_only_in_rope_parameters_is_the_one_used_and_two_different_ones_are_refused():
    """transformers 5 saves a block's RoPE base inside `rope_parameters`: a config.json with only that one used to
    get the default. Both written and different: which the official package reads depends on the transformers
    version, so the config is refused, naming both fields."""
    raw = _raw()
    t = raw["talker_config"]
    del t["rope_theta"]
    t["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    assert TTSConfig.from_dict(raw).talker.rope_theta == 500000.0
    t["rope_theta"] = 500000
    assert TTSConfig.from_dict(raw).talker.rope_theta == 500000.0
    t["rope_theta"] = 1e6
    with pytest.raises(ValueError, match=r"^config.json: talker_config.rope_theta \(1e\+06\) and "
                                         r"talker_config.rope_parameters.rope_theta \(500000\) differ"):
        TTSConfig.from_dict(raw)


def test_names_differing_only_in_case_resolve_as_the_official_package_looks_them_up():
    """Names are looked up in lower case (the official package reads `spk_id[speaker.lower()]`): "RYAN" and "ryan"
    with different ids collapsed into whichever came last. Now the key written in lower case wins wherever it
    stands; two other spellings with different values, and none in lower case, are refused naming the field; the
    same value twice is taken. The same for codec_language_id and spk_is_dialect."""
    raw = _raw()
    t = raw["talker_config"]
    name, sid = next(iter(t["spk_id"].items()))
    assert name == name.lower()
    t["spk_id"] = {name.upper(): sid + 1, **t["spk_id"], name.title(): sid + 2}
    assert TTSConfig.from_dict(raw).talker.spk_id[name] == sid
    del t["spk_id"][name]
    with pytest.raises(ValueError, match=rf"^config.json: talker_config.spk_id names '{name}' in several cases with "
                                         rf"different values \({sid + 1}, {sid + 2}\) and none in lower case"):
        TTSConfig.from_dict(raw)
    t["spk_id"][name.title()] = sid + 1
    assert TTSConfig.from_dict(raw).talker.spk_id[name] == sid + 1
    raw = _raw()
    langs = raw["talker_config"]["codec_language_id"]
    raw["talker_config"]["codec_language_id"] = {"English": langs["english"] + 1, **langs}
    assert TTSConfig.from_dict(raw).talker.codec_language_id["english"] == langs["english"]
    raw = _raw()
    raw["talker_config"]["spk_is_dialect"] = {"ERIC": "sichuan_dialect", "Eric": False}
    with pytest.raises(ValueError, match=r"talker_config.spk_is_dialect names 'eric' in several cases"):
        TTSConfig.from_dict(raw)


@pytest.mark.parametrize("obj", [[], ["model_type"], 12, "qwen3_tts_tokenizer_12hz", None])
def test_a_codec_config_that_is_not_an_object_is_a_value_error(obj):
    """CodecConfig.from_dict read `model_type` before checking the type: a list (or a number, a string) raised
    AttributeError from `.get`, not the ValueError its type check was written to give."""
    with pytest.raises(ValueError, match=r"^must hold a JSON object, got "):
        CodecConfig.from_dict(obj)
