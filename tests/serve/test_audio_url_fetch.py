"""`audio_url` fetching (serve/fetch.py) against a loopback server, without Ray: what the server sends back is
bounded by the bytes actually held, whatever its headers say."""

from __future__ import annotations

import asyncio
import http.server
import threading
import tracemalloc
import zlib

import pytest

from serve.fetch import AllowList, FetchRefused, fetch_allowed
from tests.serve.inproc import ingress_app
from tests.serve.test_voice_quota import Base

BOMB_BYTES = 64 << 20        # what the gzip bomb decodes to: 64 MiB of zeros
MAX_BYTES = 1 << 20          # the fetch's limit in these tests
PLAIN = bytes(range(256)) * 1024


def gzip_of(pieces) -> bytes:
    """gzip (RFC 1952) of the concatenated `pieces`, built piece by piece (the bomb is never held decoded)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return b"".join(z.compress(p) for p in pieces) + z.flush()


@pytest.fixture(scope="module")
def server():
    """Loopback server: /ok/plain.wav (no Content-Encoding), /ok/identity.wav (`identity`), /ok/bomb (gzip of
    64 MiB of zeros, ~64 KB sent), /ok/bomb-stacked (`gzip, gzip`: under 1 KB sent). Whatever the request asks,
    the bombs are sent compressed (as a hostile server would). Records each request's Accept-Encoding."""
    inner = gzip_of(bytes(1 << 20) for _ in range(BOMB_BYTES >> 20))
    bodies = {"/ok/plain.wav": (PLAIN, None), "/ok/identity.wav": (PLAIN, "identity"),
              "/ok/bomb": (inner, "gzip"), "/ok/bomb-stacked": (gzip_of([inner]), "gzip, gzip")}
    accept: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            accept.append(self.headers.get("Accept-Encoding"))
            body, coding = bodies[self.path]
            self.send_response(200)
            self.send_header("Content-Type", "audio/wav")
            if coding:
                self.send_header("Content-Encoding", coding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{srv.server_address[1]}", "accept": accept}
    srv.shutdown()
    srv.server_close()


def _fetch(server, path: str) -> bytes:
    allow = AllowList([f"{server['url']}/ok/"])
    return asyncio.run(fetch_allowed(f"{server['url']}{path}", allow, max_bytes=MAX_BYTES))


def _peak(fn) -> tuple[int, object]:
    """(peak bytes Python allocated while `fn()` ran, its result or the exception it raised)."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the caller
            out = e
        return tracemalloc.get_traced_memory()[1], out
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("path", ["/ok/bomb", "/ok/bomb-stacked"])
def test_a_compressed_answer_is_refused_before_it_is_decoded(server, path):
    """Review finding: httpx decoded Content-Encoding (stacked `gzip, gzip` too) before the size check ran, so
    825 bytes on the wire became 400 MiB in memory for a 1 MiB limit. The raw bytes are what is counted now, and a
    coded answer is a 400 (it was a 413 after decoding) while memory stays near the limit."""
    baseline, body = _peak(lambda: _fetch(server, "/ok/plain.wav"))   # a client costs ~3 MiB (its TLS context)
    assert body == PLAIN
    peak, err = _peak(lambda: _fetch(server, path))
    assert peak < baseline + MAX_BYTES, f"peak {peak / 2 ** 20:.1f} MiB while refusing, {baseline / 2 ** 20:.1f} " \
                                        "MiB for a plain fetch"
    assert isinstance(err, FetchRefused) and err.status == 400 and "Content-Encoding" in str(err), err
    assert server["accept"][-1] == "identity"


@pytest.mark.parametrize("path", ["/ok/plain.wav", "/ok/identity.wav"])
def test_an_uncompressed_answer_is_fetched_whole(server, path):
    assert _fetch(server, path) == PLAIN
    assert server["accept"][-1] == "identity"


def test_a_voice_upload_from_a_gzip_bomb_is_a_400_naming_audio_url(monkeypatch, tmp_path, server):
    uri = str(tmp_path / "voices")
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri,
                                          "allowed_audio_url_prefixes": [f"{server['url']}/ok/"]},
                            {"base": Base(uri)})
    with client:
        r = client.post("/v1/audio/voices", json={"name": "v", "x_vector_only": True,
                                                  "audio_url": f"{server['url']}/ok/bomb-stacked"})
        err = r.json()["error"]
        assert (r.status_code, err["param"]) == (400, "audio_url") and "Content-Encoding" in err["message"], err
        ok = client.post("/v1/audio/voices", json={"name": "v", "x_vector_only": True,
                                                   "audio_url": f"{server['url']}/ok/plain.wav"})
        assert ok.status_code == 201, ok.text
