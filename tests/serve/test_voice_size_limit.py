"""A voice over the store's size limit (MAX_VOICE_BYTES) is a RequestError the service answers as a 413 naming the
audio field. Review finding: the store raised a plain ValueError, which the ingress (it maps RequestError only) let
escape as a 500."""

from __future__ import annotations

import pytest

from qwen_tts_core.errors import RequestError
from serve.voices import MAX_VOICE_BYTES, VoiceStore, VoiceTooLarge
from tests.serve.test_ref_text_limits import _app, _bodies


def test_the_store_refuses_an_oversized_voice_as_a_413_request_error(tmp_path):
    store = VoiceStore(tmp_path / "voices")
    with pytest.raises(RequestError) as e:
        store.put(bytes(MAX_VOICE_BYTES + 1))
    assert isinstance(e.value, VoiceTooLarge) and e.value.status == 413 and e.value.field == "ref_audio"


def test_an_oversized_voice_is_a_413_naming_the_audio_not_a_500(monkeypatch, tmp_path):
    """Review finding: the store's ValueError escaped the ingress (it maps RequestError only) as a 500."""
    frames = MAX_VOICE_BYTES // (16 * 8) + 1                     # int64 codes: just over the limit
    client, _ = _app(monkeypatch, tmp_path, frames)
    with client:
        r = client.post("/v1/audio/voices", **_bodies("A reference.")["json"])
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (413, "audio_base64"), r.text
        r = client.post("/v1/audio/voices", **_bodies("A reference.")["multipart"])
        assert (r.status_code, r.json()["error"]["param"]) == (413, "file"), r.text
