"""The core's request rules under any input (Hypothesis): `request_from_fields` then `validate` (what the service
and the jobs call), `SamplingParams` and `check_speed` either accept a value or raise RequestError naming the
argument with a short message, never another exception (a TypeError, an OverflowError, a ValueError from repr of
a 5000-digit integer) and never a message that repeats a huge input."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen_tts_core import SamplingParams
from qwen_tts_core.audio_fx import check_speed
from qwen_tts_core.errors import RequestError, shown
from qwen_tts_core.generate.requests import RequestPolicy, request_from_fields, validate
from qwen_tts_core.types import SAMPLING_FIELDS

FIELDS = {"text", "voice", "speaker", "instruct", "language", "seed", "non_streaming_mode", "priority", "kind",
          *SAMPLING_FIELDS}
HUGE = 10 ** 5000
_huge = st.sampled_from([1, -1]).map(lambda sign: sign * 10 ** 5000)   # (Hypothesis cannot repr HUGE itself)
_scalar = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | _huge
           | st.sampled_from([2 ** 63, 1e308, "x" * 10_000, "\ud800", "ryan", "english", "bulk"]))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=2),
                      max_leaves=4) | st.just(list(range(2000)))
_sampling = st.dictionaries(st.sampled_from([*SAMPLING_FIELDS, "beam_width"]), _value | st.integers(-5, 100), max_size=3)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True, database=None)


def _refused(e: RequestError) -> None:
    assert e.field in FIELDS, e.field
    assert len(e.message) < 300, e.message[:400]
    str(e).encode("utf-8")   # it reaches JSON, logs and manifests


@pytest.fixture(scope="module")
def cv(model_factory):
    return model_factory("custom_voice")


@SETTINGS
@given(fields=st.fixed_dictionaries({}, optional={
    "text": st.just("Hello there.") | _value, "voice": st.just("ryan") | _value, "instructions": _value,
    "language": st.just("english") | _value, "seed": st.integers(-1, 2 ** 64) | _value,
    "non_streaming_mode": _value, "priority": st.just("bulk") | _value, "sampling": _sampling}))
def test_any_request_fields_are_taken_or_refused_by_name(cv, fields):
    fields.setdefault("text", "Hello there.")
    policy = RequestPolicy(max_new_tokens=64, max_text_chars=500)
    try:
        req = request_from_fields(cv, policy=policy, **fields)
        validate(cv, req)
    except RequestError as e:
        _refused(e)
        return
    assert req.text is None or (req.text.strip() and len(req.text) <= 500)   # None: incremental text
    assert req.priority in ("interactive", "bulk") and isinstance(req.sampling, SamplingParams)
    assert req.seed is None or 0 <= req.seed < 2 ** 63
    assert 1 <= req.sampling.max_new_tokens <= 64


@SETTINGS
@given(values=st.dictionaries(st.sampled_from(SAMPLING_FIELDS), _value, max_size=4))
def test_any_sampling_values_are_taken_or_refused_by_name(values):
    try:
        params = SamplingParams(**values)
    except RequestError as e:
        _refused(e)
        return
    assert all(math.isfinite(float(getattr(params, f))) for f in SAMPLING_FIELDS)


@SETTINGS
@given(speed=_value)
def test_any_speed_is_taken_or_refused_by_name(speed):
    try:
        value = check_speed(speed)
    except RequestError as e:
        assert e.field == "speed" and len(e.message) < 300, e.message[:400]
        return
    assert 0.25 <= value <= 4.0


@pytest.mark.parametrize("value,text", [
    (HUGE, "<an integer of about 5001 digits>"), ([HUGE, 1], "[<an integer of about 5001 digits>, 1]"),
    (2 ** 63, repr(2 ** 63)), ("\ud800", "'\\ud800'"), (list(range(10 ** 6)), "[0, 1, 2, 3, ...]"),
    ("x" * 10 ** 6, "'" + "x" * 17 + "..." + "x" * 18 + "'")],
    ids=["5000-digits", "in-a-list", "2**63", "lone-surrogate", "long-list", "long-string"])
def test_shown_is_short_escaped_and_never_raises(value, text):
    assert shown(value) == text
