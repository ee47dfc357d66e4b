"""API keys and tenancy: keys from the environment enforced in the ingress worker, any byte string compared safely
(401, never a 500 or a dropped WebSocket), metrics and docs behind the key, voices owned by the key that made them
(other keys: 404 / "not a stored voice"; the admin key sees all), and no way for a request to claim another scope."""

from __future__ import annotations

import asyncio
import contextlib
import json
from urllib.parse import quote

import httpx
import pytest

from serve.auth import ANONYMOUS, KeyRing, bearer_token, key_digest
from serve.voices import ANYONE


def test_key_ring_compares_any_bytes():
    ring = KeyRing(["k1", "ключ"], admin_keys=["adm"])
    assert ring.check(b"k1").owner == key_digest("k1") and not ring.check("k1").admin
    assert ring.check("ключ".encode()).owner == key_digest("ключ")      # a non-ASCII key that is configured
    assert ring.check(b"adm").admin and ring.check(b"adm").scope == ANYONE
    for wrong in (None, b"", b"k2", b"K1", "clé".encode(), b"\xff\xfe\x00", "k1\ud800", b"k1 " * 5000):
        assert ring.check(wrong) is None, wrong
    assert KeyRing().check(None) is ANONYMOUS and ANONYMOUS.scope == ANYONE
    assert len(key_digest("k1")) == 32 and "k1" not in key_digest("k1")


def test_bearer_token_reads_raw_header_bytes():
    class H:
        raw = [(b"host", b"x"), (b"authorization", "Bearer clé".encode())]
    assert bearer_token(H()) == "clé".encode()
    H.raw = [(b"authorization", b"Basic abc")]
    assert bearer_token(H()) is None


def test_env_keys_are_resolved_into_the_config():
    from serve.config import ServiceConfig

    cfg = ServiceConfig.from_dict({"api_keys": ["c1"], "admin_api_keys": ["a1"]})
    env = {"QTTS_API_KEYS": " e1, c1 ,,e2", "QTTS_ADMIN_API_KEYS": "a2"}
    resolved = cfg.with_env_keys(env)
    assert resolved.api_keys == ("c1", "e1", "e2") and resolved.admin_api_keys == ("a1", "a2")
    assert resolved.with_env_keys(env) == resolved and resolved.with_env_keys({}) == resolved
    again = ServiceConfig.from_dict(resolved.to_dict())  # what the ingress receives carries the keys
    assert again.api_keys == resolved.api_keys and again.admin_api_keys == resolved.admin_api_keys
    with pytest.raises(ValueError, match="api_keys"):
        ServiceConfig.from_dict({"api_keys": [" padded "]})


def _h(key: str | bytes | None) -> dict:
    if key is None:
        return {}
    return {"Authorization": b"Bearer " + (key.encode() if isinstance(key, str) else key)}


@pytest.mark.ray
def test_env_keys_are_enforced_and_bad_keys_are_401(keys_app):
    url, keys = keys_app["url"], keys_app["keys"]
    for key in (None, "wrong", "ключ", b"\xff\xfe", "alice-key-0123 ".strip() + "x"):
        r = httpx.get(f"{url}/v1/models", headers=_h(key), timeout=30)
        assert r.status_code == 401, (key, r.text)
        assert r.json()["error"]["param"] == "authorization" and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(f"{url}/v1/audio/speech", headers=_h("ключ"), json={"input": "x"}, timeout=30)
    assert r.status_code == 401
    for name in ("alice", "bob", "admin"):  # alice and bob came only from the driver's QTTS_API_KEYS
        assert httpx.get(f"{url}/v1/models", headers=_h(keys[name]), timeout=60).status_code == 200


@pytest.mark.ray
def test_metrics_docs_and_openapi_need_a_key(keys_app, serve_app):
    url, key = keys_app["url"], keys_app["keys"]["bob"]
    for path in ("/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == 401, path
        assert httpx.get(f"{url}{path}", headers=_h("nope"), timeout=30).status_code == 401, path
        assert httpx.get(f"{url}{path}", headers=_h(key), timeout=60).status_code == 200, path
    assert "/v1/audio/speech" in httpx.get(f"{url}/openapi.json", headers=_h(key), timeout=30).json()["paths"]
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200          # probes stay open
    assert httpx.get(f"{serve_app['url']}/openapi.json", timeout=30).status_code == 200  # no keys: open


async def _ws_first_error(url: str, headers: dict | None = None, query: str = "") -> tuple[dict, int | None]:
    import websockets

    ws_url = url.replace("http", "ws", 1) + "/v1/audio/speech/stream" + query
    async with websockets.connect(ws_url, additional_headers=headers or {}, proxy=None) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):  # the server may refuse before the config arrives
            await ws.send(json.dumps({"type": "config", "model": "base"}))
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        return msg, ws.close_code


def _raw_ws_first_error(url: str, authorization: bytes) -> tuple[dict, int | None]:
    """A WebSocket handshake written by hand, so the Authorization header can carry any bytes (client libraries
    refuse non-ASCII header values); returns the first text frame and the close code."""
    import base64
    import os
    import socket
    import struct
    from urllib.parse import urlsplit

    u = urlsplit(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        sock.sendall(b"GET " + u.path.encode() + b"/v1/audio/speech/stream HTTP/1.1\r\nHost: " + u.netloc.encode() +
                     b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16)) + b"\r\nAuthorization: " +
                     authorization + b"\r\n\r\n")
        f = sock.makefile("rb")
        status = f.readline()
        assert b" 101 " in status, status
        while f.readline() not in (b"\r\n", b""):
            pass
        frames = []
        while True:
            head = f.read(2)
            if len(head) < 2:
                break
            n = head[1] & 0x7F
            n = struct.unpack(">H", f.read(2))[0] if n == 126 else struct.unpack(">Q", f.read(8))[0] if n == 127 \
                else n
            frames.append((head[0] & 0x0F, f.read(n)))
            if frames[-1][0] == 8:
                break
    text = [json.loads(p) for op, p in frames if op == 1]
    close = [struct.unpack(">H", p[:2])[0] for op, p in frames if op == 8 and len(p) >= 2]
    return text[0], close[0] if close else None


@pytest.mark.ray
@pytest.mark.parametrize("headers,query", [
    pytest.param(None, "", id="no-key"),
    pytest.param({"Authorization": "Bearer wrong"}, "", id="wrong-header"),
    pytest.param(b"Bearer \xd0\xba\xd0\xbb\xd1\x8e\xd1\x87", "", id="non-ascii-header"),
    pytest.param(b"Bearer \xff\xfe\x80", "", id="non-utf8-header"),
    pytest.param(None, "?api_key=" + quote("ключ"), id="non-ascii-query"),
    pytest.param(None, "?api_key=%FF%FE", id="non-utf8-query"),
])
def test_websocket_bad_keys_get_401_and_a_close(keys_app, headers, query):
    if isinstance(headers, bytes):
        msg, code = _raw_ws_first_error(keys_app["url"], headers)
    else:
        msg, code = asyncio.run(_ws_first_error(keys_app["url"], headers, query))
    assert msg["type"] == "error" and msg["error"]["code"] == "401" and msg["error"]["param"] == "authorization"
    assert code == 1008
    assert httpx.get(f"{keys_app['url']}/v1/models", headers=_h(keys_app["keys"]["alice"]),
                     timeout=30).status_code == 200


@pytest.mark.ray
def test_voices_belong_to_the_key_that_created_them(keys_app, ref_wav_path):
    url, keys = keys_app["url"], keys_app["keys"]
    alice, bob, admin = _h(keys["alice"]), _h(keys["bob"]), _h(keys["admin"])
    r = httpx.post(f"{url}/v1/audio/voices", headers=alice, timeout=120,
                   data={"name": "alice-voice", "x_vector_only": "true"},
                   files={"file": ("ref.wav", ref_wav_path.read_bytes(), "audio/wav")})
    assert r.status_code == 201, r.text
    vid = r.json()["id"]
    meta = (keys_app["voices_dir"] / f"{vid}.safetensors").read_bytes()[:4096]
    assert key_digest(keys["alice"]).encode() in meta and keys["alice"].encode() not in meta  # digest, never key

    def stored(headers) -> list[str]:
        data = httpx.get(f"{url}/v1/audio/voices", headers=headers, timeout=60).json()["data"]
        return [v["id"] for v in data if not v["builtin"]]

    def speak(headers, **extra) -> httpx.Response:
        return httpx.post(f"{url}/v1/audio/speech", headers=headers, timeout=120,
                          json={"input": "Mine.", "voice": vid, "response_format": "pcm", **extra})

    assert vid in stored(alice) and vid not in stored(bob) and vid in stored(admin)
    assert httpx.get(f"{url}/v1/audio/voices/{vid}", headers=bob, timeout=30).status_code == 404
    assert httpx.get(f"{url}/v1/audio/voices/{vid}", headers=alice, timeout=30).json()["name"] == "alice-voice"
    r = speak(bob)
    assert r.status_code == 400 and r.json()["error"]["param"] == "voice", r.text   # same as an unknown voice
    assert "not a stored voice" in r.json()["error"]["message"]
    r = speak(bob, caller="*")                                                       # no claiming another scope
    assert r.status_code == 400 and r.json()["error"]["param"] == "caller"
    assert speak(alice).status_code == 200 and speak(admin).status_code == 200
    assert httpx.delete(f"{url}/v1/audio/voices/{vid}", headers=bob, timeout=30).status_code == 404
    assert vid in stored(alice)
    assert httpx.delete(f"{url}/v1/audio/voices/{vid}", headers=alice, timeout=30).status_code == 200
    assert vid not in stored(admin) and speak(alice).status_code == 400
