"""The service config under any YAML an operator might write (Hypothesis): `ServiceConfig.from_dict` gives a config
or a ValueError naming the key, never a TypeError from deep inside; types are checked, so a string is never taken
for a list (a string `api_keys` made every one of its characters a valid API key)."""

from __future__ import annotations

from dataclasses import fields

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve.config import ModelConfig, ServiceConfig


def test_a_string_where_a_list_of_keys_goes_is_refused_not_split_into_characters():
    for key in ("api_keys", "admin_api_keys"):   # a key is never echoed (tests/serve/test_review_config.py)
        with pytest.raises(ValueError, match=rf"serve config\.{key} must be a list of key strings, got str") as e:
            ServiceConfig.from_dict({key: "secret"})
        assert "secret" not in str(e.value)
    with pytest.raises(ValueError, match=r"serve config\.allowed_audio_url_prefixes must be tuple\[str, \.\.\.\], "
                                         r"got 'secret'"):
        ServiceConfig.from_dict({"allowed_audio_url_prefixes": "secret"})
    assert ServiceConfig.from_dict({"api_keys": ["secret"]}).effective_api_keys() >= {"secret"}


@pytest.mark.parametrize("d,message", [
    ({"models": [{"name": "m", "max_sessions": "8"}]}, r"models\[0\]\.max_sessions must be int, got '8'"),
    ({"models": [{"name": "m", "num_gpus": [1]}]}, r"models\[0\]\.num_gpus must be float, got \[1\]"),
    ({"models": "cv"}, r"serve config\.models must be a list of model configs"),
    ({"models": ["cv"]}, r"models\[0\] must be a mapping"),
    ({"max_input_chars": True}, r"serve config\.max_input_chars must be int, got True"),
    ({"metrics_without_key": "yes"}, r"serve config\.metrics_without_key must be bool"),
    ([1, 2], r"serve config must be a mapping"),
])
def test_wrong_types_name_the_key(d, message):
    with pytest.raises(ValueError, match=message):
        ServiceConfig.from_dict(d)


_scalar = (st.none() | st.booleans() | st.integers(-5, 2 ** 40) | st.floats(allow_nan=False) | st.text(max_size=8)
           | st.sampled_from(["cpu", "float32", "custom_voice", "base", "auto"]))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=5)
_model = st.dictionaries(st.sampled_from([f.name for f in fields(ModelConfig)]), _value, max_size=4)
_service = st.dictionaries(st.sampled_from([f.name for f in fields(ServiceConfig) if f.name != "models"]), _value,
                           max_size=4)


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(d=_service, models=st.none() | st.lists(_model | _value, max_size=3) | _value)
def test_any_config_is_taken_or_refused_with_a_value_error(d, models):
    if models is not None:
        d = {**d, "models": models}
    try:
        cfg = ServiceConfig.from_dict(d)
    except ValueError as e:
        assert len(str(e)) < 1000, str(e)[:300]
        return
    assert ServiceConfig.from_dict(cfg.to_dict()) == cfg     # what the ingress receives is the same config
    assert all(isinstance(k, str) and len(k) > 0 for k in cfg.api_keys)


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_checkpoint_is_refused_not_a_random_model(blank):
    """`checkpoint: ${MODEL_PATH}` with the variable unset gave "": the replicas served a tiny random model."""
    with pytest.raises(ValueError, match=r"models\[cv\]\.checkpoint must name a folder or hub id"):
        ServiceConfig.from_dict({"models": [{"name": "cv", "checkpoint": blank}]})
