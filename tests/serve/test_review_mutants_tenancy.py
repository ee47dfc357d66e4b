"""Tenancy behaviour the suite did not pin, found by security-focused mutation testing of serve/auth.py,
serve/voices.py, serve/quotas.py, the key handling of serve/config.py and their use in serve/ingress.py (each test here
was seen failing on the mutant named in its docstring and passing on the real code). No Ray: the real app in-process
(tests/serve/inproc.py) over the real voice store on a folder."""

from __future__ import annotations

import asyncio
import base64
import os

import httpx
import pytest
from starlette.websockets import WebSocketDisconnect

from serve.auth import key_digest
from serve.requests import CALLER
from serve.voices import ANYONE, VoiceStore
from tests.serve.inproc import ingress_app
from tests.serve.test_key_fairness import Replica
from tests.serve.test_voices import _item

A, B, ADMIN = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b", "key-admin"))
KEYS = {"api_keys": ["key-a", "key-b"], "admin_api_keys": ["key-admin"]}


class VoiceReplica(Replica):
    """A Base model's replica that speaks with a stored voice as the real one does (serve/requests.py
    `build_request`): loaded from the shared store with the scope the ingress put in the payload (`caller`, ANYONE
    when absent), an unknown or invisible voice being a 400 naming `voice`; then as test_key_fairness's replica."""

    def __init__(self, uri: str) -> None:
        super().__init__()
        self.store = VoiceStore.from_uri(uri)

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        try:
            self.store.load(payload.get("voice"), payload.get(CALLER, ANYONE))
        except KeyError:
            yield {"type": "error", "status": 400, "message": "voice: not a stored voice", "param": "voice"}
            return
        async for message in super().stream(payload, incremental, lease, consumer):
            yield message


def _voice_app(monkeypatch, tmp_path, **cfg):
    """(client, key-a's stored voice id, the store) of an app with keys a, b and an admin key."""
    uri = str(tmp_path / "voices")
    store = VoiceStore.from_uri(uri)
    vid = store.create(_item(), name="alice", model="base", owner=key_digest("key-a"))["id"]
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          **KEYS, **cfg}, {"base": VoiceReplica(uri)})
    return client, vid, store


def test_speech_with_another_keys_voice_is_refused_over_http_and_websocket(monkeypatch, tmp_path):
    """Key b naming key a's stored voice in a speech request (HTTP or WebSocket) gets what an unknown voice gets
    (400 naming `voice`); key a and an admin key speak with it (mutants: the ingress sends no `caller` scope to the
    replica, so every key speaks with every voice; it sends the key's owner digest instead of its scope, so an admin
    key cannot use other keys' voices)."""
    client, vid, _ = _voice_app(monkeypatch, tmp_path)
    body = {"input": "Hello.", "voice": vid, "response_format": "pcm"}
    with client:
        r = client.post("/v1/audio/speech", headers=B, json=body)
        assert (r.status_code, r.json()["error"]["param"]) == (400, "voice"), r.text
        assert [client.post("/v1/audio/speech", headers=h, json=body).status_code for h in (A, ADMIN)] == [200, 200]
        for headers, ok in ((B, False), (A, True), (ADMIN, True)):
            with client.websocket_connect("/v1/audio/speech/stream", headers=headers) as ws:
                ws.send_json({"type": "config", "voice": vid})
                msg = ws.receive_json()
                if ok:
                    assert msg["type"] == "start", msg
                else:
                    assert msg["type"] == "error" and msg["error"]["param"] == "voice", msg
                    with pytest.raises(WebSocketDisconnect):
                        ws.receive_json()


def test_a_non_utf8_key_from_the_environment_is_its_bytes_and_not_matched_by_question_marks(monkeypatch, tmp_path):
    """A key set in the environment with a byte that is not UTF-8 reaches Python as a lone surrogate (os.environ's
    surrogateescape: b"\\xff" -> "\\udcff"). A client that sends those bytes in its header is that key; "?" in place
    of the byte is not (mutant: `key_digest` encodes with errors="replace", so "Bearer ?secret" was accepted), nor
    the surrogate's own UTF-8 encoding (before, the key was hashed as b"\\xed\\xb3\\xbf...": no client could use it)."""
    monkeypatch.setenv("QTTS_API_KEYS", os.fsdecode(b"\xffsecret"))
    client, _, _ = _voice_app(monkeypatch, tmp_path, api_keys=["key-a"], admin_api_keys=[])

    async def status(token: bytes) -> tuple[int, str | None]:
        # httpx's ASGI transport hands the header's bytes on as they are (the TestClient re-encodes them as UTF-8)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=client.app), base_url="http://t") as c:
            r = await c.get("/v1/audio/voices", headers=[(b"authorization", b"Bearer " + token)])
        return r.status_code, None if r.status_code == 200 else r.json()["error"]["param"]
    assert asyncio.run(status(b"\xffsecret")) == (200, None)
    for sent in (b"?secret", "\udcffsecret".encode("utf-8", "surrogatepass")):
        assert asyncio.run(status(sent)) == (401, "authorization"), sent
    assert key_digest("\udcffsecret") == key_digest(b"\xffsecret") != key_digest("?secret")
    assert key_digest("\ud800x") != key_digest("?x")   # a surrogate no environment gives: hashed as it is


def test_of_two_authorization_headers_the_first_decides(monkeypatch, tmp_path):
    """Two `Authorization` headers: the first one is the key (as Starlette's `headers.get` and the non-raw branch of
    `bearer_token` read it), so a header appended after the client's (by a proxy, or by the client itself) does not
    replace the key the request was sent with (mutant: the last header read)."""
    client, vid, _ = _voice_app(monkeypatch, tmp_path)
    with client:
        r = client.get(f"/v1/audio/voices/{vid}", headers=[("Authorization", "Bearer key-a"),
                                                            ("Authorization", "Bearer key-b")])
        assert r.status_code == 200 and r.json()["id"] == vid, r.text
        r = client.get(f"/v1/audio/voices/{vid}", headers=[("Authorization", "Bearer key-b"),
                                                            ("Authorization", "Bearer key-a")])
        assert (r.status_code, r.json()["error"]["param"]) == (404, "voice_id"), r.text


def test_an_admin_using_a_voice_first_does_not_take_it_from_its_owner(monkeypatch, tmp_path):
    """The replica's cache of decoded voices remembers each voice's OWNER, whoever loaded it: after an admin key
    spoke with key a's voice, key a still speaks with it and key b still cannot (mutant: the cache records the scope
    of the first load, ANYONE, and then refused the voice to its own key on that replica)."""
    client, vid, _ = _voice_app(monkeypatch, tmp_path)
    body = {"input": "Hello.", "voice": vid, "response_format": "pcm"}
    with client:
        assert [client.post("/v1/audio/speech", headers=h, json=body).status_code for h in (ADMIN, A, B)] == \
            [200, 200, 400]


def test_the_websocket_query_key_is_used_only_without_an_authorization_header(monkeypatch, tmp_path):
    """`?api_key=` is for WebSocket clients that cannot send headers: with an `Authorization` header the header is
    the key, whatever the query says (mutant: a query key replaced the header's, so a valid header key next to a
    stale `?api_key=` was refused with 401)."""
    client, vid, _ = _voice_app(monkeypatch, tmp_path)
    with client:
        with client.websocket_connect("/v1/audio/speech/stream?api_key=stale", headers=A) as ws:
            ws.send_json({"type": "config", "voice": vid})
            assert ws.receive_json()["type"] == "start"
        with client.websocket_connect("/v1/audio/speech/stream?api_key=key-a", headers=B) as ws:
            ws.send_json({"type": "config", "voice": vid})    # key b (the header's) may not use key a's voice
            msg = ws.receive_json()
            assert msg["type"] == "error" and msg["error"]["param"] == "voice", msg


class SlowBase:
    """A Base model's replica whose voice encoding waits for `release` when the upload is named "slow"."""

    def __init__(self, uri: str) -> None:
        self.store = VoiceStore.from_uri(uri)
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    def info(self) -> dict:
        return {"id": "base", "type": "base", "speakers": []}

    async def create_voice(self, audio, ref_text, x_vector_only, name, owner=""):
        if name == "slow":
            self.waiting.set()
            await self.release.wait()
        return self.store.create(_item(), name=name, model="base", owner=owner)


def test_one_keys_slow_upload_does_not_hold_up_another_keys(monkeypatch, tmp_path):
    """Creates are serialised per key in an ingress (so one key's burst cannot pass its voice count), never across
    keys: while key a's upload is being encoded, key b's upload is answered (mutant: one lock for every key, so any
    key's slow upload stalled every other key's)."""
    uri = str(tmp_path / "voices")
    replica = SlowBase(uri)
    _, app = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                       **KEYS, "max_voices_per_key": 5}, {"base": replica})
    body = {"x_vector_only": True, "audio_base64": base64.b64encode(b"RIFF").decode()}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c:
            slow = asyncio.ensure_future(c.post("/v1/audio/voices", headers=A, json={**body, "name": "slow"}))
            await asyncio.wait_for(replica.waiting.wait(), 10)
            try:
                r = await asyncio.wait_for(c.post("/v1/audio/voices", headers=B, json={**body, "name": "quick"}), 5)
            finally:
                replica.release.set()
            return r, await slow
    quick, slow = asyncio.run(main())
    assert (quick.status_code, slow.status_code) == (201, 201), (quick.text, slow.text)
    assert sorted(v["name"] for v in VoiceStore.from_uri(uri).list(ANYONE)) == ["quick", "slow"]
