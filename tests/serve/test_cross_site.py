"""A service without API keys refuses browser requests made by pages of other sites (auth.cross_site): a JSON POST
without a Content-Type, a form upload and a WebSocket need no CORS preflight, so before this any page a user opened
could synthesize on, and create or delete voices of, a local keyless service (review of the 415 rule: a Blob body
carries no Content-Type). Same-origin pages (the playground, /docs) and non-browser clients are served; with keys,
the key decides. Through the real app in-process (tests/serve/inproc.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.websockets import WebSocketDisconnect

from serve.auth import cross_site
from tests.serve.inproc import ingress_app

BODY = json.dumps({"input": "Hello.", "voice": "ryan", "response_format": "pcm"}).encode()
EVIL = {"origin": "https://evil.example", "sec-fetch-site": "cross-site"}
LOCAL = {"host": "127.0.0.1:8000"}


class Replica:
    def __init__(self) -> None:
        self.calls = 0

    def info(self) -> dict:
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}

    def renew(self, sessions):
        return []

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        self.calls += 1
        yield {"type": "start", "session": f"r1-{self.calls}"}
        yield {"type": "audio", "pcm": np.full(960, 0.1, np.float32)}
        yield {"type": "end", "status": None, "finish_reason": "eos", "num_frames": 1, "ttfa_s": 0.0,
               "text_tokens": 1}


def _app(monkeypatch, tmp_path, **cfg):
    rep = Replica()
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "voices_uri": str(tmp_path / "voices"), **cfg},
                            {"cv": rep})
    return client, rep


@pytest.mark.parametrize("headers", [
    {"sec-fetch-site": "cross-site"}, {"sec-fetch-site": "same-site"}, {"origin": "https://evil.example"},
    {"origin": "null"}, {**LOCAL, "origin": "http://127.0.0.1:3000"}, EVIL,
    # DNS rebinding: evil.example re-pointed at this machine; the browser calls it same-origin
    {"host": "evil.example:8000", "sec-fetch-site": "same-origin"},
    {"host": "evil.example:8000", "origin": "http://evil.example:8000"},
    # an Origin urlsplit cannot parse (an unclosed IPv6 bracket) was a 500, and an unhandled error on the WebSocket
    {**LOCAL, "origin": "http://["}, {**LOCAL, "origin": "http://[::1"}])
def test_a_keyless_service_refuses_other_sites_pages(monkeypatch, tmp_path, headers):
    client, rep = _app(monkeypatch, tmp_path)
    r = client.post("/v1/audio/speech", content=BODY, headers=headers)   # no Content-Type: a Blob body
    assert r.status_code == 403 and r.json()["error"]["param"] == "origin" and rep.calls == 0
    files = {"file": ("a.wav", b"RIFF0000WAVE", "audio/wav")}
    r = client.post("/v1/audio/voices", data={"name": "x"}, files=files, headers=headers)   # a plain <form>
    assert r.status_code == 403
    assert client.delete("/v1/audio/voices/voice_0123456789abcdef", headers=headers).status_code == 403
    for path in ("/v1/audio/voices", "/v1/models"):
        r = client.get(path, headers=headers)
        assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
    with client.websocket_connect("/v1/audio/speech/stream", headers=headers) as ws:
        msg = ws.receive_json()
        assert msg["type"] == "error" and msg["error"]["param"] == "origin"
        with pytest.raises(WebSocketDisconnect):
            ws.receive_json()


@pytest.mark.parametrize("headers", [
    {}, {**LOCAL, "sec-fetch-site": "same-origin"}, {**LOCAL, "sec-fetch-site": "none"},
    {**LOCAL, "origin": "http://127.0.0.1:8000"}, {"host": "localhost:8000", "origin": "http://localhost:8000"},
    {"host": "[::1]:8000", "sec-fetch-site": "same-origin"},
    # a proxy that rewrites Host: X-Forwarded-Host names what the browser used; default ports dropped
    {"host": "10.0.0.5:8000", "x-forwarded-host": "192.168.1.20", "origin": "http://192.168.1.20"},
    {"host": "192.168.1.20:80", "origin": "http://192.168.1.20"}])
def test_same_origin_pages_and_other_clients_are_served(monkeypatch, tmp_path, headers):
    client, rep = _app(monkeypatch, tmp_path)
    r = client.post("/v1/audio/speech", content=BODY, headers={"content-type": "application/json", **headers})
    assert r.status_code == 200 and len(r.content) == 1920 and rep.calls == 1


def test_with_keys_the_key_decides(monkeypatch, tmp_path):
    client, rep = _app(monkeypatch, tmp_path, api_keys=["k1"])
    ok = {"authorization": "Bearer k1", "content-type": "application/json", **EVIL}
    assert client.post("/v1/audio/speech", content=BODY, headers=ok).status_code == 200
    assert client.post("/v1/audio/speech", content=BODY, headers=EVIL).status_code == 401


def test_cross_site_rule():
    local = {"host": "127.0.0.1:8000"}
    assert cross_site({**local, "sec-fetch-site": " Cross-Site "})
    assert not cross_site({**local, "sec-fetch-site": "same-origin"})
    # Sec-Fetch-Site wins where present (a browser's own word); Origin only without it
    assert not cross_site({**local, "sec-fetch-site": "same-origin", "origin": "https://evil.example"})
    assert cross_site({"origin": "http://localhost:3000", "host": "localhost:8000"})
    assert not cross_site({"origin": "http://LOCALHOST:8000", "host": "localhost:8000"})
    assert not cross_site({"origin": "https://127.0.0.1", "host": "127.0.0.1:443"})
    assert not cross_site({}) and not cross_site({"host": "evil.example"})   # not a browser: no Origin, no Sec-Fetch
    assert cross_site({"host": "tts.lan:8000", "sec-fetch-site": "same-origin"})   # a DNS name: use keys or the IP
    assert cross_site({**local, "origin": "http://["}) and cross_site({**local, "origin": "http://[::1"})   # unparsable
