"""Fixtures shared by the engine tests."""

from __future__ import annotations

import pytest

from qwen_tts_core.generate import runner as runner_mod


@pytest.fixture
def prefill_rows(monkeypatch) -> list[int]:
    """The rows of every talker prefill pass run from here on (one entry per pass)."""
    rows: list[int] = []
    real = runner_mod.prefill

    def counted(talker, cache, slots, embeds, last):
        rows.append(embeds.shape[0])
        return real(talker, cache, slots, embeds, last)

    monkeypatch.setattr(runner_mod, "prefill", counted)
    return rows


@pytest.fixture(scope="module")
def cv(model_factory):
    """The tiny random CustomVoice model (CPU fp32; loaded once per session by `model_factory`)."""
    return model_factory("custom_voice", "tiny")


@pytest.fixture(scope="module")
def base(model_factory):
    """The tiny random Base (voice clone) model (CPU fp32; loaded once per session by `model_factory`)."""
    return model_factory("base", "tiny")
