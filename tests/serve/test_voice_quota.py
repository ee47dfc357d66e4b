"""Stored voices per API key (`max_voices_per_key`), through the real app in-process (tests/serve/inproc.py, no Ray,
the real voice store on a folder)."""

from __future__ import annotations

import asyncio
import base64

from serve.voices import VoiceStore
from tests.serve.inproc import ingress_app
from tests.serve.test_voices import _item


class Base:
    """A Base model's replica that stores a voice in the shared folder for every upload (slowly: 50 ms)."""

    def __init__(self, uri: str) -> None:
        self.store = VoiceStore.from_uri(uri)

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        await asyncio.sleep(0.05)
        return self.store.create(_item(), name=name, model="base", owner=owner)


def test_one_key_stores_at_most_max_voices_per_key(monkeypatch, tmp_path):
    """Review finding (tenancy 8): nothing limited how many voices one key created, and every key's listing reads
    every stored voice's header. A non-admin key now stores at most `max_voices_per_key` (429 naming `name`);
    other keys and admin keys are not affected, and deleting one makes room."""
    uri = str(tmp_path / "voices")
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          "api_keys": ["key-a", "key-b"], "admin_api_keys": ["key-admin"],
                                          "max_voices_per_key": 2}, {"base": Base(uri)})
    a, b, admin = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b", "key-admin"))
    body = {"name": "v", "x_vector_only": True, "audio_base64": base64.b64encode(b"RIFF").decode()}
    with client:
        made = [client.post("/v1/audio/voices", headers=a, json=body) for _ in range(2)]
        assert [r.status_code for r in made] == [201, 201]
        r = client.post("/v1/audio/voices", headers=a, json=body)
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (429, "name") and "at most 2" in err["message"], err
        assert client.post("/v1/audio/voices", headers=b, json=body).status_code == 201
        assert [client.post("/v1/audio/voices", headers=admin, json=body).status_code for _ in range(3)] == [201] * 3
        assert client.delete(f"/v1/audio/voices/{made[0].json()['id']}", headers=a).status_code == 200
        assert client.post("/v1/audio/voices", headers=a, json=body).status_code == 201
        assert len(client.get("/v1/audio/voices", headers=a).json()["data"]) == 2


def test_concurrent_uploads_of_one_key_do_not_pass_the_quota(monkeypatch, tmp_path):
    """Uploads of one key are created one at a time by the ingress, so a burst cannot pass the count together."""
    uri = str(tmp_path / "voices")
    _, app = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                       "api_keys": ["key-a"], "max_voices_per_key": 2}, {"base": Base(uri)})
    import httpx

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            body = {"name": "v", "x_vector_only": True, "audio_base64": base64.b64encode(b"RIFF").decode()}
            rs = await asyncio.gather(*[client.post("/v1/audio/voices", headers={"Authorization": "Bearer key-a"},
                                                    json=body) for _ in range(6)])
            return sorted(r.status_code for r in rs)
    assert asyncio.run(burst()) == [201, 201, 429, 429, 429, 429]
    assert len(VoiceStore.from_uri(uri).list("*")) == 2
