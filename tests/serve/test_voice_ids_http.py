"""Voice ids under attack through the real app in-process (tests/serve/inproc.py, the real store on a folder):
traversal and case tricks, and another key's voice, are all the 404 of a voice that was never stored (JSON naming
`voice_id`, or the API's 404 naming `path` where the id has a slash), and touch no file."""

from __future__ import annotations

import pytest

from serve.auth import key_digest
from serve.voices import ANYONE, VoiceStore
from tests.serve.inproc import ingress_app
from tests.serve.test_voice_quota import Base
from tests.serve.test_voices import _item

A, B = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
NEVER = "voice_" + "0" * 16


@pytest.fixture
def app(monkeypatch, tmp_path):
    """(client, key a's voice id, the voices folder); a file outside the store that traversal would reach."""
    uri = tmp_path / "voices"
    vid = VoiceStore.from_uri(str(uri)).create(_item(), name="mine", model="base", owner=key_digest("key-a"))["id"]
    (tmp_path / "secret.safetensors").write_bytes((uri / f"{vid}.safetensors").read_bytes())
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": str(uri),
                                          "api_keys": ["key-a", "key-b"]}, {"base": Base(str(uri))})
    with client:
        yield client, vid, uri


def _tricks(vid: str) -> list[str]:
    return [vid.upper(), vid.replace("voice_", "VOICE_"), f"{vid}.safetensors", f"{vid}%0a", f"{vid}%00",
            f"%20{vid}", f"{vid}%20", "..%2Fsecret", "%2e%2e%2fsecret", f"{vid}%2F..%2F..%2Fsecret", "..",
            "voice_" + "\uff10" * 16, "voice_" + "\u0660" * 16]   # (fullwidth and Arabic-Indic digits)


def test_tricked_ids_and_another_keys_voice_are_a_plain_404(app):
    client, vid, uri = app
    files = sorted(p.name for p in uri.parent.rglob("*"))
    for headers, voice_id in [(B, vid)] + [(A, t) for t in _tricks(vid)]:
        for method in ("GET", "DELETE"):
            r = client.request(method, f"/v1/audio/voices/{voice_id}", headers=headers)
            assert r.status_code == 404, (method, voice_id, r.text)
            err = r.json()["error"]
            if err["param"] == "voice_id":   # the id reached the handler: the answer of an id never stored
                absent = client.request(method, f"/v1/audio/voices/{NEVER}", headers=headers).json()["error"]
                assert err == {**absent, "message": err["message"]}, (err, absent)
                assert err["message"].startswith("voice_id: no stored voice "), err
            else:
                assert err["param"] == "path", err
    assert sorted(p.name for p in uri.parent.rglob("*")) == files   # nothing deleted, nothing written
    assert client.get(f"/v1/audio/voices/{vid}", headers=A).status_code == 200
    assert vid not in client.get("/v1/audio/voices", headers=B).text
    assert [v["id"] for v in VoiceStore.from_uri(str(uri)).list(ANYONE)] == [vid]
