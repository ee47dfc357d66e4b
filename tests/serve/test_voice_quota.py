"""Stored voices per API key (`max_voices_per_key`), through the real app in-process (tests/serve/inproc.py, no Ray,
the real voice store on a folder)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json

import pytest

from serve.voices import VoiceStore
from tests.serve.helpers import loopback_http
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


# ---- the cheap checks first; uploads in progress per key (`max_uploads_per_key`) ------------------------------------

class CustomVoice:
    """A model that cannot encode voices."""

    def info(self) -> dict:
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}


@pytest.fixture
def audio_server():
    """Loopback server for `audio_url`: /ok/slow.wav answers once `release` is set (each request's path recorded
    in `seen` as it arrives), /ok/missing.wav is a 404."""
    import http.server
    import threading

    seen: list[str] = []
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.path)
            if self.path != "/ok/slow.wav":
                self.send_error(404)
                return
            release.wait(10)
            with contextlib.suppress(OSError):   # the upload whose client left is gone
                self.send_response(200)
                self.send_header("Content-Length", "4")
                self.end_headers()
                self.wfile.write(b"RIFF")

    with loopback_http(Handler) as url:
        yield {"url": url, "seen": seen, "release": release}
        release.set()   # (before the server stops: a held answer must not keep its thread)


def _url_app(monkeypatch, tmp_path, audio_server, **config):
    """(ASGI app, the Ingress object) with a Base and a CustomVoice model, keys a and b, audio_url allowed."""
    from ray import serve

    uri = str(tmp_path / "voices")
    _, app = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}, {"name": "cv"}],
                                       "voices_uri": uri, "api_keys": ["key-a", "key-b"],
                                       "allowed_audio_url_prefixes": [f"{audio_server['url']}/ok/"], **config},
                         {"base": Base(uri), "cv": CustomVoice()})
    return app, serve.get_replica_context().servable_object


def _client(app):
    import httpx

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30)


A, B = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b"))
B64 = {"x_vector_only": True, "audio_base64": base64.b64encode(b"RIFF").decode()}


def test_refused_uploads_fetch_nothing(monkeypatch, tmp_path, audio_server):
    """Review finding: `audio_url` was fetched before the key's voice count, the model and the name were checked,
    so a key at its quota still made the ingress fetch (and hold) every URL it sent. Refused uploads fetch nothing."""
    app, _ = _url_app(monkeypatch, tmp_path, audio_server, max_voices_per_key=1, max_uploads_per_key=None)
    url = {"x_vector_only": True, "audio_url": f"{audio_server['url']}/ok/slow.wav"}
    audio_server["release"].set()

    async def go():
        async with _client(app) as c:
            cases = [(B, {**url, "name": "v", "model": "cv"}, 400, "model"),
                     (B, {**url, "name": "x\ud800"}, 400, "name"),
                     (B, {**url, "name": "v", "ref_text": "x\udfff"}, 400, "ref_text")]
            for headers, body, status, param in cases:   # json.dumps: escapes the lone surrogates
                r = await c.post("/v1/audio/voices", headers={**headers, "content-type": "application/json"},
                                 content=json.dumps(body))
                assert (r.status_code, r.json()["error"]["param"]) == (status, param), (body, r.text)
            assert (await c.post("/v1/audio/voices", headers=A, json={**B64, "name": "v"})).status_code == 201
            rs = await asyncio.gather(*[c.post("/v1/audio/voices", headers=A, json={**url, "name": "v"})
                                        for _ in range(5)])
            assert [(r.status_code, r.json()["error"]["param"]) for r in rs] == [(429, "name")] * 5
    asyncio.run(go())
    assert audio_server["seen"] == []


def test_uploads_in_progress_per_key_are_limited_and_always_given_back(monkeypatch, tmp_path, audio_server):
    """A key has at most `max_uploads_per_key` uploads in progress (429 with Retry-After beyond, before its body is
    read); other keys are not affected; the place is given back when the upload succeeds, fails, or its client
    leaves mid-fetch."""
    app, ing = _url_app(monkeypatch, tmp_path, audio_server, max_uploads_per_key=2)
    slow = {"name": "v", "x_vector_only": True, "audio_url": f"{audio_server['url']}/ok/slow.wav"}

    async def go():
        async with _client(app) as c:
            held = [asyncio.create_task(c.post("/v1/audio/voices", headers=A, json=slow)) for _ in range(2)]
            while len(audio_server["seen"]) < 2:             # both are fetching now
                await asyncio.sleep(0.01)
            r = await asyncio.wait_for(c.post("/v1/audio/voices", headers=A, json=slow), 5)
            err = r.json()["error"]
            assert (r.status_code, err["param"]) == (429, None) and "at most 2" in err["message"], r.text
            assert r.headers["Retry-After"] == "1"
            assert (await c.post("/v1/audio/voices", headers=B, json={**B64, "name": "b"})).status_code == 201
            held[0].cancel()                                 # the client leaves mid-fetch
            await asyncio.wait({held[0]})
            assert sum(ing.uploads.held.values()) == 1
            audio_server["release"].set()
            assert (await held[1]).status_code == 201
            assert not ing.uploads.held
            failed = [await c.post("/v1/audio/voices", headers=A, json=body) for body in (
                {**slow, "audio_url": f"{audio_server['url']}/ok/missing.wav"}, {**B64, "name": "v", "audio_base64": "!"})]
            assert [(r.status_code, r.json()["error"]["param"]) for r in failed] == [(400, "audio_url"),
                                                                                      (400, "audio_base64")]
            assert not ing.uploads.held
            rs = await asyncio.gather(*[c.post("/v1/audio/voices", headers=A, json={**B64, "name": "a"})
                                        for _ in range(2)])
            assert [r.status_code for r in rs] == [201, 201]
            assert not ing.uploads.held
    asyncio.run(go())
