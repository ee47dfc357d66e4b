"""Reference-audio input (audio_io): resampled lengths, URL fetches, hostile sample rates and FLAC headers."""

from __future__ import annotations

import io
import socket
import threading
import time

import numpy as np
import pytest

from qwen_tts_core.audio_io import TARGET_SR, AudioLimits, load_audio, to_24k
from qwen_tts_core.errors import RequestError, RequestFetchError


@pytest.mark.parametrize("sr", [44100, 22050, 48000, 16000, 8000, 24000])
def test_120_s_at_any_rate_resamples_to_exactly_120_s_at_24k(sr):
    # 120 s is the duration limit; one sample more encodes to 1501 codec frames, which generation refuses.
    wav = np.zeros(120 * sr, dtype=np.float32)
    wav[::97] = 0.1
    out = to_24k(wav, sr)
    assert out.shape == (120 * TARGET_SR,) and out.dtype == np.float32


@pytest.mark.parametrize(("n", "sr"), [(1, 44100), (44099, 44100), (44100, 44100), (44101, 44100), (7, 22050),
                                       (3, 48000), (12345, 11025), (2 * 44100, 44100)])
def test_below_the_limit_the_resampled_length_stays_librosas(n, sr):
    # the reference's length (librosa: the ratio rounded first), one more than the exact ceiling for some N
    wav = np.full(n, 0.1, dtype=np.float32)
    got = to_24k(wav, sr).shape[0]
    assert got == int(np.ceil(n * (TARGET_SR / sr)))
    assert -(-n * TARGET_SR // sr) <= got <= -(-n * TARGET_SR // sr) + 1


def test_the_resampled_length_never_passes_the_duration_limit():
    limits = AudioLimits(max_seconds=2.0)
    out = to_24k(np.full(2 * 44100, 0.1, dtype=np.float32), 44100, limits=limits)
    assert out.shape == (2 * TARGET_SR,)


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
        self.ftp_hits: list[float] = []   # a pretend FTP server: who connects to it after an http redirect
        self.ftp = socket.socket()
        self.ftp.bind(("127.0.0.1", 0))
        self.ftp.listen(4)
        self.ftp_port = self.ftp.getsockname()[1]
        threading.Thread(target=self._ftp_loop, daemon=True).start()

    def _ftp_loop(self) -> None:
        while True:
            try:
                conn, _ = self.ftp.accept()
            except OSError:
                return
            self.ftp_hits.append(time.monotonic())
            with conn:
                conn.sendall(b"421 bye\r\n")

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

    def h_dripbody(self, c, path):   # valid headers, then a byte every 0.1 s (for 4 s, then it hangs up)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(WAV))
        self._drip(c, WAV)

    def h_dripheaders(self, c, path):   # the status line and headers a byte every 0.1 s
        self._drip(c, b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000 + b"\r\n\r\n")

    @staticmethod
    def _drip(c, data):
        end = time.monotonic() + 4
        for b in data:
            if time.monotonic() > end:
                return
            c.sendall(bytes([b]))
            time.sleep(0.1)

    def h_redirftp(self, c, path):
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: ftp://127.0.0.1:%d/secret.wav\r\nContent-Length: 0\r\n\r\n"
                  % self.ftp_port)

    def h_redirfile(self, c, path):
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: file:///etc/passwd\r\nContent-Length: 0\r\n\r\n")

    def h_redirok(self, c, path):
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: /ok/a.wav\r\nContent-Length: 0\r\n\r\n")

    def h_loop(self, c, path):   # /loop/<n> -> /loop/<n + 1>, forever
        n = int(path.split("/")[2]) + 1
        c.sendall(b"HTTP/1.1 302 Found\r\nLocation: /loop/%d\r\nContent-Length: 0\r\n\r\n" % n)


@pytest.fixture(scope="module")
def server():
    srv = RawServer()
    yield srv
    srv.closed.set()
    srv.sock.close()
    srv.ftp.close()


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


@pytest.mark.parametrize("path", ["/dripbody/a.wav", "/dripheaders/a.wav"])
def test_url_timeout_bounds_the_whole_fetch_not_each_read(server, path):
    # each byte comes within the timeout: a per-read bound let a dripping server hold the call as long as it liked
    t0 = time.monotonic()
    with pytest.raises(RequestFetchError, match=r"^ref_audio: could not fetch audio URL within url_timeout=1 s"):
        _fetch(server.url(path), url_timeout=1.0)
    assert time.monotonic() - t0 < 2.5


def test_a_redirect_to_ftp_is_refused_without_connecting(server):
    with pytest.raises(RequestFetchError, match=r"^ref_audio: could not fetch audio URL .*not followed"):
        _fetch(server.url("/redirftp/a.wav"))
    time.sleep(0.2)
    assert server.ftp_hits == []


def test_a_redirect_to_file_stays_refused_and_one_to_http_is_followed(server):
    with pytest.raises(RequestFetchError, match=r"^ref_audio: could not fetch audio URL"):
        _fetch(server.url("/redirfile/a.wav"))
    wav, sr = _fetch(server.url("/redirok/a.wav"))
    assert sr == 24000 and wav.shape == (2400,)


def test_redirects_are_bounded(server):
    with pytest.raises(RequestFetchError, match=r"^ref_audio: could not fetch audio URL"):
        _fetch(server.url("/loop/0"))
    followed = [p for p in server.hits if p.startswith("/loop/")]
    assert 2 <= len(followed) <= 6   # the first URL and at most 5 redirects (urllib alone followed 10)


def test_the_size_cap_still_holds_on_a_chunked_read(server):
    with pytest.raises(RequestError, match=r"^ref_audio: audio at URL is larger than 1000 bytes"):
        _fetch(server.url("/ok/a.wav"), limits=AudioLimits(max_bytes=1000))


@pytest.mark.parametrize("timeout", [0, -1.0, float("nan"), float("inf"), None, True])
def test_a_bad_url_timeout_is_refused_naming_it(server, timeout):
    with pytest.raises(RequestError, match=r"^url_timeout: must be a positive number of seconds"):
        _fetch(server.url("/ok/a.wav"), url_timeout=timeout)


# ---- hostile sample rates -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sr", [10**5000, 10**400, -(10**5000), 1e300, np.uint64(2**64 - 1)],
                         ids=["10**5000", "10**400", "-10**5000", "1e300", "uint64max"])
def test_a_huge_sample_rate_is_refused_with_a_short_message(sr):
    # 10**5000 raised "Exceeds the limit (4300 digits) for integer string conversion"; 10**400 echoed 400 digits
    wav = (0.3 * np.sin(np.arange(4800) / 5)).astype(np.float32)
    with pytest.raises(RequestError, match=r"^ref_audio: sample rate .* Hz is outside \[8000, 384000\] Hz") as err:
        load_audio((wav, sr))
    assert err.value.field == "ref_audio" and len(str(err.value)) < 150


@pytest.mark.parametrize("sr", [10**5000, 10**400], ids=["10**5000", "10**400"])
def test_to_24k_refuses_a_huge_sample_rate_with_a_short_message(sr):
    with pytest.raises(RequestError, match=r"^voice: sample rate") as err:
        to_24k(np.full(100, 0.1, dtype=np.float32), sr, argument="voice")
    assert len(str(err.value)) < 150


# ---- FLAC whose header gives no length ------------------------------------------------------------------------------


def _flac(seconds: float, sr: int = 8000, channels: int = 1, unknown: bool = True) -> tuple[bytes, np.ndarray]:
    """A FLAC of a tone; with `unknown`, its STREAMINFO total_samples set to 0 ("unknown", as streaming encoders
    write it; libsndfile then reports 2**63 - 1 frames)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    wav = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, wav.astype(np.float32), sr, format="FLAC")
    data = bytearray(buf.getvalue())
    assert data[:4] == b"fLaC"
    if unknown:
        si = 8   # STREAMINFO's body, after "fLaC" and its block header; total samples: 36 bits from byte 13
        data[si + 13] &= 0xF0
        data[si + 14:si + 18] = b"\0\0\0\0"
    return bytes(data), wav


@pytest.mark.parametrize("channels", [1, 2])
def test_a_flac_of_unknown_length_decodes_like_the_same_flac_with_its_length(channels, tmp_path):
    unknown, _ = _flac(2.5, channels=channels)
    known, _ = _flac(2.5, channels=channels, unknown=False)
    want, want_sr = load_audio(known)
    for source in (unknown, tmp_path / "a.flac"):
        (tmp_path / "a.flac").write_bytes(unknown)
        wav, sr = load_audio(source)
        assert sr == want_sr == 8000 and wav.shape == want.shape == (20000,)
        np.testing.assert_array_equal(wav, want)


def test_a_flac_of_unknown_length_is_refused_only_when_it_decodes_too_long():
    data, _ = _flac(121)   # the default limit is 120 s
    with pytest.raises(RequestError, match=r"^voice: audio is longer than 120 s") as err:
        load_audio(data, argument="voice")
    assert err.value.field == "voice"
    wav, _ = load_audio(_flac(119)[0])
    assert wav.shape == (119 * 8000,)
    short, _ = _flac(3)
    with pytest.raises(RequestError, match=r"^ref_audio: audio is longer than 2 s"):
        load_audio(short, limits=AudioLimits(max_seconds=2))
    with pytest.raises(RequestError, match=r"^ref_audio: audio is longer than .* or 10000 samples"):
        load_audio(short, limits=AudioLimits(max_samples=10000))
    assert load_audio(short, limits=AudioLimits(max_seconds=3, max_samples=24000))[0].shape == (24000,)
