"""An allow-listed `audio_url` with a character httpx refuses (a control character or DEL in its query, a lone
surrogate) is a 400 naming audio_url: the allow-list refuses it, and httpx's own InvalidURL (not an httpx.HTTPError)
is mapped like every other fetch failure. Review finding: it escaped as a 500."""

from __future__ import annotations

import asyncio
import http.server

import pytest

from serve import fetch
from serve.fetch import AllowList, FetchRefused, Target, fetch_allowed
from tests.serve.helpers import loopback_http
from tests.serve.inproc import ingress_app
from tests.serve.test_voice_quota import Base


@pytest.fixture(scope="module")
def server():
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"RIFF")

    with loopback_http(Handler) as url:
        yield url


BAD = ["\x01", "\x1f", "\x7f", "\x0b", "\udc00"]


@pytest.mark.parametrize("char", BAD, ids=[hex(ord(c)) for c in BAD])
def test_the_allow_list_refuses_characters_httpx_cannot_send(server, char):
    allow = AllowList([f"{server}/ok/"])
    for url in (f"{server}/ok/x.wav?a={char}", f"{server}/ok/x{char}.wav"):
        with pytest.raises(FetchRefused):
            asyncio.run(fetch_allowed(url, allow, 1 << 20))


def test_non_ascii_is_still_fetched(server):
    allow = AllowList([f"{server}/ok/"])
    assert asyncio.run(fetch_allowed(f"{server}/ok/caf\u00e9.wav?q=\u00e9", allow, 1 << 20)) == b"RIFF"


def test_httpx_invalid_url_is_a_fetch_refusal(server, monkeypatch):
    """Whatever the parser lets through, httpx's InvalidURL is mapped (here a checked target that httpx refuses)."""
    port = int(server.rsplit(":", 1)[1])
    monkeypatch.setattr(fetch.AllowList, "check", lambda self, url: Target("http", "127.0.0.1", port, ("ok",),
                                                                           "a=\x01"))
    with pytest.raises(FetchRefused, match="InvalidURL"):
        asyncio.run(fetch_allowed(f"{server}/ok/x.wav", AllowList([f"{server}/ok/"]), 1 << 20))


@pytest.mark.parametrize("escape", ["\\u0001", "\\u007f"])
def test_a_voice_from_such_a_url_is_a_400_naming_audio_url(monkeypatch, tmp_path, server, escape):
    uri = str(tmp_path / "voices")
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          "allowed_audio_url_prefixes": [f"{server}/ok/"]}, {"base": Base(uri)})
    body = '{"name": "v", "x_vector_only": true, "audio_url": "' + server + '/ok/ref.wav?a=' + escape + '"}'
    with client:
        r = client.post("/v1/audio/voices", content=body, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["error"]["param"]) == (400, "audio_url"), r.text
        ok = client.post("/v1/audio/voices", json={"name": "v", "x_vector_only": True,
                                                   "audio_url": f"{server}/ok/ref.wav?a=ok"})
        assert ok.status_code == 201, ok.text
