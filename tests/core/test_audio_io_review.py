"""Reference-audio input (audio_io): resampled lengths, URL fetches, hostile sample rates and FLAC headers."""

from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest

from qwen_tts_core.audio_io import TARGET_SR, load_audio, to_24k
from qwen_tts_core.errors import RequestError, RequestFetchError


@pytest.mark.parametrize("sr", [44100, 22050, 48000, 16000, 8000, 24000])
def test_120_s_at_any_rate_resamples_to_exactly_120_s_at_24k(sr):
    # 120 s is the duration limit; one sample more encodes to 1501 codec frames, which generation refuses.
    wav = np.zeros(120 * sr, dtype=np.float32)
    wav[::97] = 0.1
    out = to_24k(wav, sr)
    assert out.shape == (120 * TARGET_SR,) and out.dtype == np.float32


@pytest.mark.parametrize(("n", "sr"), [(1, 44100), (44099, 44100), (44101, 44100), (7, 22050), (3, 48000),
                                       (12345, 11025)])
def test_resampled_length_is_the_exact_ceiling(n, sr):
    wav = np.full(n, 0.1, dtype=np.float32)
    assert to_24k(wav, sr).shape == (-(-n * TARGET_SR // sr),)


# ---- URL fetches (a raw socket server on 127.0.0.1 whose answer depends on the path) ----------------------------


def _wav() -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(2400) / 5)).astype(np.float32), 24000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


WAV = _wav()


class RawServer:
    """Answers each connection by the handler named by its request path's first segment (`/<name>/...`)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._loop, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _loop(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            conn.settimeout(10)
            try:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(4096)
                    if not data:
                        return
                    buf += data
                path = buf.split(b" ", 2)[1].decode()
                self.hits.append(path)
                getattr(self, "h_" + path.split("/")[1])(conn, path)
            except OSError:
                pass

    def h_ok(self, c, path):
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(WAV) + WAV)

    def h_badstatus(self, c, path):
        c.sendall(b"GARBAGE" + b"x" * 5000 + b"\r\n\r\n")

    def h_truncated(self, c, path):
        c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1000\r\n" + WAV[:100])

    def h_longheader(self, c, path):
        c.sendall(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n")

    def h_manyheaders(self, c, path):
        c.sendall(b"HTTP/1.1 200 OK\r\n" + b"X: a\r\n" * 200 + b"\r\n")


@pytest.fixture(scope="module")
def server():
    srv = RawServer()
    yield srv
    srv.closed.set()
    srv.sock.close()


def _fetch(url: str, **kw):
    return load_audio(url, allow_urls=True, **kw)


def test_a_good_url_still_decodes(server):
    wav, sr = _fetch(server.url("/ok/a.wav"))
    assert sr == 24000 and wav.shape == (2400,)


@pytest.mark.parametrize("path", ["/badstatus/a.wav", "/truncated/a.wav", "/longheader/a.wav", "/manyheaders/a.wav"])
def test_http_client_errors_are_fetch_errors_naming_the_argument(server, path):
    # BadStatusLine, IncompleteRead, LineTooLong, HTTPException(> 100 headers): no OSError, they escaped raw
    with pytest.raises(RequestFetchError, match=r"^voice: could not fetch audio URL") as err:
        _fetch(server.url(path), argument="voice")
    assert err.value.field == "voice" and len(str(err.value)) < 300


@pytest.mark.parametrize("url", ["http://127.0.0.1:{port}/ok/a b.wav", "http://127.0.0.1:{port}/ok/a\x01.wav",
                                 "http://127.0.0.1:{port}/ok/a\tb.wav", "http://127.0.0.1:{port}/ok/\x7f.wav"])
def test_urls_with_whitespace_or_control_characters_are_refused_before_opening(server, url):
    before = len(server.hits)
    with pytest.raises(RequestError, match=r"^ref_audio: the URL contains whitespace or control characters"):
        _fetch(url.format(port=server.port))
    assert len(server.hits) == before


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc/a.wav", "http://127.0.0.1:99999/a.wav"])
def test_a_bad_port_is_a_request_error_naming_the_argument(url):
    with pytest.raises(RequestError, match=r"^ref_audio: ") as err:
        _fetch(url)
    assert err.value.field == "ref_audio"
