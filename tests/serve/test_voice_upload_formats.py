"""POST /v1/audio/voices with the reference formats phones and browsers record (m4a, webm/opus): the service has no
content-type allow-list for the audio, so they reach the core's PyAV fallback as any upload does; bytes no decoder
reads are still a 400 naming the field, and the size limit is unchanged."""

from __future__ import annotations

import base64

import pytest

from tests.core.test_audio_formats import _encode
from tests.serve.inproc import ingress_app

pytest.importorskip("av")
KIB = 1024


def test_m4a_and_webm_references_are_accepted_and_other_bytes_refused(monkeypatch, tmp_path, model_factory):
    from serve.config import ModelConfig
    from serve.replica import ReplicaCore
    from serve.voices import VoiceStore

    core = ReplicaCore(model_factory("base"),
                       ModelConfig(name="base", model_type="base", max_sessions=1, interactive_reserve=0),
                       VoiceStore.from_uri(str(tmp_path / "voices")))
    cfg = {"models": [{"name": "base", "model_type": "base"}], "voices_uri": str(tmp_path / "voices"),
           "max_upload_bytes": 256 * KIB}
    m4a, webm = _encode("ipod", "aac", 16000, 1024 * 24), _encode("webm", "libopus", 48000, 48000)
    client, _ = ingress_app(monkeypatch, cfg, {"base": core})
    with client:
        by_file = client.post("/v1/audio/voices", files={"file": ("memo.m4a", m4a, "audio/mp4")},
                              data={"name": "memo", "x_vector_only": "true"})
        by_b64 = client.post("/v1/audio/voices", json={"name": "browser", "x_vector_only": True,
                                                       "audio_base64": base64.b64encode(webm).decode()})
        garbage = client.post("/v1/audio/voices", files={"file": ("a.m4a", m4a[:64], "audio/x-m4a")},
                              data={"name": "cut", "x_vector_only": "true"})
        big = client.post("/v1/audio/voices", files={"file": ("a.m4a", m4a + bytes(256 * KIB), "audio/mp4")},
                          data={"name": "big", "x_vector_only": "true"})
    assert by_file.status_code == 201 and by_file.json()["name"] == "memo", by_file.text
    assert by_b64.status_code == 201 and by_b64.json()["name"] == "browser", by_b64.text
    err = garbage.json()["error"]
    assert garbage.status_code == 400 and err["param"] == "file" and "MP4/M4A" in err["message"], err
    assert big.status_code == 413 and big.json()["error"]["param"] == "file", big.text
