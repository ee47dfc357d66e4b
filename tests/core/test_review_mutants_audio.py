"""Reference-audio parsers pinned by a mutation review (qwen_tts_core/audio_io.py, audio_decode_av.py, mp4_check.py):
each test here failed on a one-line change (a "mutant") that the rest of the suite let pass, named in its docstring.
Every limit at its exact boundary (at the limit accepted, one past refused, naming the argument), RIFF headers that
lie, the MP4 box walker's counts, the sniffer, and what the decoding child's reply must be. No model, no Ray; the
URL test serves from 127.0.0.1."""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest

from qwen_tts_core import audio_decode_av, audio_io, mp4_check
from qwen_tts_core.audio_io import AudioLimits, load_audio
from qwen_tts_core.errors import RequestError

LIMITS = AudioLimits(max_bytes=1000, max_seconds=2.0, min_sample_rate=8000, max_sample_rate=48000, max_channels=4,
                     max_samples=40000)


def _refused(fn, argument: str, reason: str) -> RequestError:
    with pytest.raises(RequestError) as e:
        fn()
    assert e.value.field == argument and reason in e.value.message, e.value
    return e.value


# ---- AudioLimits.check_header: each bound at its value is accepted, one past it refused -------------------------

@pytest.mark.parametrize("ok, over, reason", [
    (dict(sr=8000, channels=1, frames=0, size=1000), dict(size=1001), "larger than 1000 bytes"),
    (dict(sr=8000, channels=1, frames=0), dict(sr=7999), "sample rate 7999 Hz"),
    (dict(sr=48000, channels=1, frames=0), dict(sr=48001), "sample rate 48001 Hz"),
    (dict(sr=8000, channels=4, frames=0), dict(channels=5), "5 channels"),
    (dict(sr=8000, channels=1, frames=16000), dict(frames=16001), "at most 2 s"),
    (dict(sr=48000, channels=2, frames=20000), dict(frames=20001), "at most 40000 are decoded"),
], ids=["bytes", "min-rate", "max-rate", "channels", "seconds", "samples"])
def test_each_header_limit_takes_its_own_value_and_refuses_one_more(ok, over, reason):
    """(mutants: size >= max_bytes, min_sample_rate < sr, sr < max_sample_rate, channels >= max_channels,
    frames / sr >= max_seconds, frames * channels >= max_samples)"""
    LIMITS.check_header(argument="ref_audio[3]", **ok)
    _refused(lambda: LIMITS.check_header(argument="ref_audio[3]", **{**ok, **over}), "ref_audio[3]", reason)


def test_zero_channels_are_refused_by_the_channel_check():
    """A [N, 0] array (or a header saying 0 channels) is refused as such, not as the NaN its channel mean gives
    (mutant: `channels < 1` dropped from check_header)."""
    _refused(lambda: LIMITS.check_header(8000, 0, 10, "ref_audio"), "ref_audio", "0 channels")
    with warnings.catch_warnings():   # refused as it is, before a channel mean over nothing warns of NaN
        warnings.simplefilter("error")
        _refused(lambda: load_audio((np.zeros((100, 0), np.float32), 16000), limits=LIMITS), "ref_audio",
                 "got 0 channels")


def test_a_stereo_array_counts_both_channels_against_max_samples():
    """(mutant: the (array, sr) path checking its length as one channel)"""
    x = np.full((10000, 4), 0.1, np.float32)
    limits = AudioLimits(max_samples=39999)
    _refused(lambda: load_audio((x, 16000), limits=limits), "ref_audio", "at most 39999 are decoded")
    assert load_audio((x, 16000), limits=AudioLimits(max_samples=40000))[0].shape == (10000,)


def test_an_array_with_max_channels_channels_is_taken():
    """(mutant: _as_mono refusing shape[1] >= max_channels)"""
    x = np.full((100, 4), 0.2, np.float32)
    assert load_audio((x, 16000), limits=LIMITS)[0].shape == (100,)
    _refused(lambda: load_audio((np.full((100, 5), 0.2, np.float32), 16000), limits=LIMITS), "ref_audio",
             "with 1 to 4 channels, got 5 channels")


def test_a_peak_of_exactly_max_peak_is_taken_and_infinity_is_named_as_such():
    """(mutants: peak >= MAX_PEAK refused; isfinite narrowed to isnan, so inf was refused as a loud peak)"""
    x = np.full(100, 0.5, np.float32)
    x[3] = audio_io.MAX_PEAK
    assert load_audio((x, 16000))[0][3] == audio_io.MAX_PEAK
    x[3] = np.inf
    _refused(lambda: load_audio((x, 16000)), "ref_audio", "NaN or infinite")


# ---- encoded sizes: a file or bytes of exactly max_bytes are read ------------------------------------------------

def _wav(n: int, sr: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(np.arange(n) / 7)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_bytes_and_a_file_of_exactly_max_bytes_are_read(tmp_path):
    """(mutants: _read_bytes and _read_path refusing len == max_bytes)"""
    data = _wav(500)
    f = tmp_path / "a.wav"
    f.write_bytes(data)
    for given in (data, f):
        assert load_audio(given, limits=AudioLimits(max_bytes=len(data)))[0].shape == (500,)
        _refused(lambda g=given: load_audio(g, argument="voice", limits=AudioLimits(max_bytes=len(data) - 1)), "voice",
                 f"larger than {len(data) - 1} bytes")


# ---- RIFF headers that lie ---------------------------------------------------------------------------------------

def _riff(chunks: list[tuple[bytes, bytes, int | None]]) -> bytes:
    """RIFF/WAVE of (id, payload, declared size or None for the payload's) chunks, odd payloads padded."""
    body = b"".join(struct.pack("<4sI", cid, len(p) if size is None else size) + p + b"\0" * (len(p) & 1)
                    for cid, p, size in chunks)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


FMT = (b"fmt ", struct.pack("<HHIIHH", 1, 1, 16000, 32000, 2, 16), None)
PCM = (0.3 * 32767 * np.sin(np.arange(16000) / 7)).astype("<i2").tobytes()   # 1 s at 16 kHz


def test_a_data_chunk_that_declares_hours_after_an_odd_sized_chunk_is_refused():
    """The walker steps over a chunk's pad byte to reach `data` (mutant: no pad byte, so the declared hours after
    a 3-byte LIST chunk were never seen and libsndfile's trimmed 1 s was decoded)."""
    data = _riff([FMT, (b"LIST", b"abc", None), (b"data", PCM, 16000 * 2 * 3600)])
    _refused(lambda: load_audio(data, argument="ref_audio[0]"), "ref_audio[0]", "1.0 h long")


def test_a_streaming_wav_whose_data_size_is_the_placeholder_decodes():
    """0xFFFFFFFF is what a live recorder writes before it knows the length: not a claim of 74 hours (mutant: only
    0 taken as the placeholder, and such a wav was refused)."""
    wav, sr = load_audio(_riff([FMT, (b"data", PCM, 0xFFFFFFFF)]))
    assert sr == 16000 and wav.shape == (16000,)


# ---- the libsndfile fallback reads at most max_bytes + 1 ---------------------------------------------------------

def test_the_fallback_reads_a_file_no_further_than_the_limit(tmp_path, monkeypatch):
    """A path libsndfile refuses is read again for PyAV, at most max_bytes + 1 of it, and a file of exactly
    max_bytes is taken (mutants: `raw.read()`, the whole file whatever it holds by then; len(data) >= max_bytes)."""
    f = tmp_path / "x.m4a"
    f.write_bytes(b"\0\0\0\x20ftypM4A " + bytes(500))
    reads = []

    class Counting(io.FileIO):
        def read(self, n=-1):
            reads.append(n)
            return super().read(n)

    monkeypatch.setattr(audio_io, "open", lambda p, mode="r": Counting(p, mode.replace("b", "")), raising=False)
    monkeypatch.setattr(audio_decode_av, "decode", lambda *a, **k: (np.full(10, 0.1, np.float32), 16000))
    size = f.stat().st_size
    assert load_audio(f, limits=AudioLimits(max_bytes=size))[0].shape == (10,)
    assert reads == [65536, size + 1]   # the header, then the file for PyAV


# ---- base64 ------------------------------------------------------------------------------------------------------

def test_a_data_uri_must_say_base64_and_hold_only_base64():
    """(mutants: a data URI without ';base64' decoded anyway; b64decode(validate=False) skipping stray characters,
    so the error blamed the audio, not the encoding)"""
    import base64

    b64 = base64.b64encode(_wav(400)).decode()
    assert load_audio("data:audio/wav;base64," + b64)[0].shape == (400,)
    _refused(lambda: load_audio("data:audio/wav," + b64, argument="x"), "x", "must look like")
    _refused(lambda: load_audio("data:audio/wav;base64," + b64[:40] + "!*" + b64[40:], argument="x"), "x",
             "invalid base64")


def test_base64_past_the_limit_is_refused_before_it_is_decoded(monkeypatch):
    """(mutant: the length check on the base64 text dropped: the whole payload was decoded, then refused)"""
    import base64

    monkeypatch.setattr(base64, "b64decode", lambda *a, **k: pytest.fail("decoded"))
    b64 = "QUJD" * (1000 // 3 + 1024 + 1)   # 4 chars per 3 bytes: past max_bytes * 4 // 3 + 4096
    _refused(lambda: load_audio(b64, argument="voice", limits=AudioLimits(max_bytes=1000)), "voice",
             "base64 audio is larger than 1000 bytes once decoded")


# ---- URL bodies --------------------------------------------------------------------------------------------------

class _Body:
    """Serves each connection `head + body` on 127.0.0.1 then holds it open until closed."""

    def __init__(self, body: bytes, declared: int) -> None:
        self.body, self.declared = body, declared
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._loop, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/a.wav"

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(4096) or b"\r\n\r\n"
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.declared + self.body)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def test_a_url_body_of_max_bytes_is_read_and_one_past_it_is_refused_without_reading_on():
    """The fetch stops at max_bytes + 1 of a body that keeps coming (mutants: limits.max_bytes not passed to the
    fetch, or each read asking for 64 KiB: both waited for bytes the limit had no room for, until url_timeout); a
    body of exactly max_bytes is taken (mutant: `len(data) >= max_bytes` refused)."""
    wav = _wav(300)
    exact = _Body(wav, len(wav))
    more = _Body(wav + bytes(10), 1 << 20)   # declares a MiB, sends max_bytes + 10 bytes, then nothing
    try:
        assert load_audio(exact.url, allow_urls=True, limits=AudioLimits(max_bytes=len(wav)))[0].shape == (300,)
        with pytest.raises(RequestError) as e:
            load_audio(more.url, allow_urls=True, url_timeout=5.0, limits=AudioLimits(max_bytes=len(wav)))
        assert e.value.field == "ref_audio" and f"larger than {len(wav)} bytes" in e.value.message, e.value
    finally:
        exact.close()
        more.close()


# ---- the container sniffer ---------------------------------------------------------------------------------------

def test_adts_is_sniffed_and_mp3_is_not():
    """ADTS has layer bits 00; MPEG audio (0xFFFB) is libsndfile's (mutant: the mask 0xF0, so an MP3 libsndfile
    refused went to FFmpeg as AAC)."""
    assert audio_decode_av.sniff(b"\xff\xf1\x50\x80" + bytes(8)) == ("aac", "AAC (ADTS)")
    assert audio_decode_av.sniff(b"\xff\xf9\x50\x80" + bytes(8)) == ("aac", "AAC (ADTS)")
    for mp3 in (b"\xff\xfb\x90\x64", b"\xff\xf3\x90\x64", b"\xff\xe3\x90\x64"):
        assert audio_decode_av.sniff(mp3 + bytes(8)) is None, mp3


def test_an_id3_tag_with_a_footer_is_skipped_whole():
    """An ID3v2.4 tag with the footer flag ends 10 bytes later (mutant: the footer not skipped, so the ADTS frames
    after it were not found)."""
    tag = b"ID3\x04\x00\x10" + bytes([0, 0, 0, 5]) + b"TIT2x" + b"3DI\x04\x00\x10\x00\x00\x00\x05"
    assert audio_decode_av.sniff(tag + b"\xff\xf1\x50\x80" + bytes(8)) == ("aac", "AAC (ADTS)")


# ---- what PyAV decodes, in this process (decode_here) ------------------------------------------------------------

av = pytest.importorskip("av")


def _mkv(codec: str, fmt: str, arr: np.ndarray, sr: int = 16000, block: int = 0) -> bytes:
    """Matroska holding `arr` (mono) as `codec`, one packet per `block` samples (all in one when 0)."""
    buf = io.BytesIO()
    step = block or len(arr)
    with av.open(buf, "w", format="matroska") as out:
        s = out.add_stream(codec, rate=sr, layout="mono")
        for i in range(0, len(arr), step):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr[i:i + step]).reshape(1, -1), format=fmt,
                                               layout="mono")
            frame.sample_rate, frame.pts = sr, i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


def _here(data: bytes, limits: AudioLimits = audio_io.DEFAULT_LIMITS):
    return audio_decode_av.decode_here(data, "matroska", "WebM/Matroska", "ref_audio[1]", "audio bytes", limits)


PCM16 = (0.3 * 32767 * np.sin(np.arange(16000) / 7)).astype(np.int16)


def test_decoded_length_limits_take_their_own_value():
    """1 s of PCM at 16 kHz is 16000 samples: max_seconds=1 and max_samples=16000 take it, one sample less
    refuses it (mutants: frames / sr >= max_seconds, frames * channels >= max_samples)."""
    data = _mkv("pcm_s16le", "s16", PCM16, block=1000)
    wav, sr = _here(data, AudioLimits(max_seconds=1.0, max_samples=16000))
    assert sr == 16000 and np.array_equal(wav, PCM16.astype(np.float32) / 32768)
    _refused(lambda: _here(data, AudioLimits(max_seconds=15999 / 16000)), "ref_audio[1]", "s are accepted")
    _refused(lambda: _here(data, AudioLimits(max_samples=15999)), "ref_audio[1]", "at most 15999 are decoded")


def test_the_packet_cap_takes_its_own_value(monkeypatch):
    """(mutant: packets >= MAX_PACKETS refused a file of exactly that many)"""
    data = _mkv("pcm_s16le", "s16", PCM16, block=1000)
    with av.open(io.BytesIO(data)) as c:
        packets = sum(1 for _ in c.demux())
    monkeypatch.setattr(audio_decode_av, "MAX_PACKETS", packets)
    assert _here(data)[0].shape == (16000,)
    monkeypatch.setattr(audio_decode_av, "MAX_PACKETS", packets - 1)
    _refused(lambda: _here(data), "ref_audio[1]", f"more than {packets - 1} packets")


def test_unsigned_8_bit_pcm_is_scaled_as_libsndfile_scales_it():
    """u8 sample s is (s - 128) / 128, libsndfile's (mutant: / 127, so 255 read as 1.0)."""
    import soundfile as sf

    u8 = np.arange(256, dtype=np.uint8).repeat(8)
    wav, _ = _here(_mkv("pcm_u8", "u8", u8))
    buf = io.BytesIO()
    sf.write(buf, (u8.astype(np.float32) - 128) / 128, 16000, format="WAV", subtype="PCM_U8")
    want, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
    assert np.array_equal(wav, want) and wav[0] == -1.0 and wav[-1] == 127 / 128


def _adts(sr: int, n: int) -> bytes:
    buf = io.BytesIO()
    x = (0.3 * np.sin(np.arange(n) / 5)).astype(np.float32)
    with av.open(buf, "w", format="adts") as out:
        s = out.add_stream("aac", rate=sr, layout="mono")
        for i in range(0, n, 1024):
            frame = av.AudioFrame.from_ndarray(x[i:i + 1024].reshape(1, -1), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sr, i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


def test_a_sample_rate_that_changes_mid_stream_is_refused():
    """Each ADTS frame names its own rate: 16 kHz frames then 24 kHz ones would be joined as one 16 kHz waveform
    (mutant: the rate-change check dropped)."""
    data = _adts(16000, 8192) + _adts(24000, 8192)
    _refused(lambda: audio_decode_av.decode_here(data, "aac", "AAC (ADTS)", "ref_audio[1]", "audio bytes",
                                                 audio_io.DEFAULT_LIMITS),
             "ref_audio[1]", "the sample rate changes mid-stream (16000 -> 24000 Hz)")


class _Ctx:
    def __init__(self, name: str, extradata: bytes) -> None:
        self.codec = type("Codec", (), {"name": name})()
        self.extradata = extradata


@pytest.mark.parametrize("frame, ok", [(4096, True), (audio_decode_av.MAX_ALAC_FRAME, True),
                                       (audio_decode_av.MAX_ALAC_FRAME + 1, False), (0, False)])
def test_alacs_frame_length_is_checked_at_its_bounds(frame, ok):
    """(mutants: frame < MAX_ALAC_FRAME, and 0 <= frame taking a zero frame length)"""
    stream = type("Stream", (), {"codec_context": _Ctx("alac", bytes(12) + struct.pack(">I", frame) + bytes(20))})()
    if ok:
        audio_decode_av._check_stream(stream, "ref_audio", "MP4/M4A")
    else:
        _refused(lambda: audio_decode_av._check_stream(stream, "ref_audio", "MP4/M4A"), "ref_audio",
                 f"ALAC frame length {frame} is outside")


# ---- the decoding child's reply ----------------------------------------------------------------------------------

def _child_says(monkeypatch, code: str) -> None:
    monkeypatch.setattr(audio_decode_av, "_CHILD_CODE", "import sys, json; o = sys.stdout.buffer; " + code)


def _reply(sr: int, n: int, samples: int) -> str:
    return (f"o.write(json.dumps({{'sr': {sr}, 'n': {n}}}).encode().ljust({audio_decode_av._HEADER})); "
            f"o.write(bytes(4 * {samples})); o.flush()")


M4A_HEAD = b"\0\0\0\x10ftypM4A \0\0\0\0"


@pytest.mark.parametrize("code, reason", [
    (_reply(16000, 100, 101), "reply is malformed"),                     # more samples than it says
    (_reply(4000, 100, 100), "sample rate 4000 Hz"),                     # a rate outside the limits
    (_reply(16000, 100, 100) + "; import os; os.kill(os.getpid(), 9)", "killed by SIGKILL"),   # then died
], ids=["more-samples-than-it-says", "a-rate-outside-the-limits", "killed-after-replying"])
def test_a_child_reply_that_is_not_a_limit_sized_waveform_is_refused(monkeypatch, code, reason):
    """(mutants: the reply's length checked only for being short; its rate not checked; a child killed by a signal
    after writing a reply taken as a success)"""
    _child_says(monkeypatch, code)
    _refused(lambda: audio_decode_av.decode(M4A_HEAD, "mp4", "MP4/M4A", "ref_audio[5]", "audio bytes",
                                            AudioLimits(max_samples=500)), "ref_audio[5]", reason)


def test_a_child_writing_past_the_cap_is_stopped_there(monkeypatch):
    """The reply is read up to 4 bytes per max_samples past its header; one byte more and the child is killed
    then, not waited for (mutant: a cap twice that, so a child that wrote past it and hung held the call until
    CHILD_TIMEOUT_S)."""
    cap = audio_decode_av._HEADER + 4 * 500
    _child_says(monkeypatch, f"o.write(bytes({cap + 1})); o.flush(); import time; time.sleep(60)")
    monkeypatch.setattr(audio_decode_av, "CHILD_TIMEOUT_S", 10.0)
    _refused(lambda: audio_decode_av.decode(M4A_HEAD, "mp4", "MP4/M4A", "ref_audio[5]", "audio bytes",
                                            AudioLimits(max_samples=500)), "ref_audio[5]",
             "the decoder's output is longer than the limits allow")


def test_the_child_refuses_an_input_longer_than_announced():
    """The child reads size + 1 bytes and refuses anything but `size` (mutant: only a short input refused, so it
    decoded bytes the parent never sent as the file)."""
    job = {"fmt": "mp4", "kind": "MP4/M4A", "argument": "ref_audio", "what": "w", "size": 16, "limits": {},
           "memory": 1 << 30, "cpu": 30}
    out = subprocess.run([sys.executable, "-c", audio_decode_av._CHILD_CODE, os.path.dirname(audio_decode_av.__file__)],
                         input=json.dumps(job).encode() + b"\n" + M4A_HEAD + b"+", capture_output=True, timeout=60)
    assert json.loads(out.stdout[:audio_decode_av._HEADER]) == {"error": "the decoder got a different input"}


# ---- the MP4 box walker (check_mp4 on hand-made boxes) -----------------------------------------------------------

def _box(kind: bytes, payload: bytes = b"", version_flags: int | None = None) -> bytes:
    body = (struct.pack(">I", version_flags) if version_flags is not None else b"") + payload
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _nest(path: list[bytes], inner: bytes) -> bytes:
    for kind in reversed(path):
        inner = _box(kind, inner)
    return inner


STBL = [b"moov", b"trak", b"mdia", b"minf", b"stbl"]
FTYP = _box(b"ftyp", b"M4A \0\0\0\0")


def _check(data: bytes) -> None:
    mp4_check.check_mp4(data, "ref_audio[4]", "audio bytes", "MP4/M4A")


def _stsz(count: int, size: int = 1, table: bytes = b"") -> bytes:
    return _box(b"stsz", struct.pack(">II", size, count) + table, 0)


def test_a_track_of_exactly_max_mp4_samples_is_taken():
    """(mutants: n >= MAX_MP4_SAMPLES, total >= MAX_MP4_SAMPLES)"""
    n = mp4_check.MAX_MP4_SAMPLES
    _check(FTYP + _nest(STBL, _stsz(n)))
    _refused(lambda: _check(FTYP + _nest(STBL, _stsz(n + 1))), "ref_audio[4]", f"declares {n + 1} samples")


def test_stsz_and_stz2_tables_must_hold_what_they_declare():
    """A per-sample stsz needs 4 bytes each, an stz2 field_size / 8 (mutants: 2 bytes each; `// 8`, which let a
    4-bit stz2 declare any count)."""
    _check(FTYP + _nest(STBL, _stsz(100, 0, bytes(400))))
    _refused(lambda: _check(FTYP + _nest(STBL, _stsz(100, 0, bytes(399)))), "ref_audio[4]",
             "stsz declares 100 samples that its bytes do not hold")
    _check(FTYP + _nest(STBL, _box(b"stz2", struct.pack(">II", 4, 100) + bytes(50), 0)))
    _refused(lambda: _check(FTYP + _nest(STBL, _box(b"stz2", struct.pack(">II", 4, 1000) + bytes(50), 0))),
             "ref_audio[4]", "stz2 declares 1000 samples")


def test_stts_counts_its_samples_not_its_deltas():
    """(mutant: the run's delta summed instead of its count)"""
    n = mp4_check.MAX_MP4_SAMPLES + 1
    _refused(lambda: _check(FTYP + _nest(STBL, _box(b"stts", struct.pack(">III", 1, n, 1), 0))), "ref_audio[4]",
             f"stts declares {n} samples")
    _check(FTYP + _nest(STBL, _box(b"stts", struct.pack(">III", 1, 1, n), 0)))


def test_stsc_runs_out_of_order_cannot_cancel_samples():
    """A run whose first chunk is before its predecessor's spans no chunks (mutant: np.maximum dropped, so a
    negative span subtracted 1.2 M samples and 3 M passed)."""
    stsc = _box(b"stsc", struct.pack(">IIIIIII", 2, 5, 300_000, 1, 1, 300_000, 1), 0)
    stco = _box(b"stco", struct.pack(">I", 10) + bytes(40), 0)
    _refused(lambda: _check(FTYP + _nest(STBL, stsc + stco)), "ref_audio[4]", "stsc declares 3000000 samples")


def test_edit_lists_at_max_edits_are_taken_and_version_1_entries_are_20_bytes():
    """(mutants: count >= MAX_EDITS; a version-1 elst sized as 12-byte entries)"""
    k = mp4_check.MAX_EDITS
    trak = [b"moov", b"trak", b"edts"]
    _check(FTYP + _nest(trak, _box(b"elst", struct.pack(">I", k) + bytes(12 * k), 0)))
    _check(FTYP + _nest(trak, _box(b"elst", struct.pack(">I", k) + bytes(20 * k), 1 << 24)))
    _refused(lambda: _check(FTYP + _nest(trak, _box(b"elst", struct.pack(">I", k) + bytes(12 * k), 1 << 24))),
             "ref_audio[4]", f"elst declares {k} entries that its bytes do not hold")


def test_max_streams_tracks_are_taken():
    """(mutant: len(tracks) >= MAX_STREAMS refused a video's picture and sound)"""
    trak = _box(b"trak")
    _check(FTYP + _box(b"moov", trak * mp4_check.MAX_STREAMS))
    _refused(lambda: _check(FTYP + _box(b"moov", trak * (mp4_check.MAX_STREAMS + 1))), "ref_audio[4]",
             f"more than {mp4_check.MAX_STREAMS} tracks")


def test_exactly_max_mp4_boxes_are_taken():
    """(mutant: boxes >= MAX_MP4_BOXES)"""
    free = _box(b"free")
    _check(FTYP + free * (mp4_check.MAX_MP4_BOXES - 1))
    _refused(lambda: _check(FTYP + free * mp4_check.MAX_MP4_BOXES), "ref_audio[4]",
             f"more than {mp4_check.MAX_MP4_BOXES} boxes")


def test_boxes_nest_twelve_deep_and_no_deeper():
    """(mutant: the depth bound moved to 13)"""
    _check(FTYP + _nest([b"udta"] * 12, b""))
    _refused(lambda: _check(FTYP + _nest([b"udta"] * 13, b"")), "ref_audio[4]", "nested too deep")


def test_fragment_runs_count_against_the_sample_cap():
    """A trun with no per-sample fields declares samples for free (mutant: its count not added)."""
    n = mp4_check.MAX_MP4_SAMPLES + 1
    moof = _nest([b"moof", b"traf"], _box(b"trun", struct.pack(">I", n), 0))
    _refused(lambda: _check(FTYP + moof), "ref_audio[4]", f"the fragments: the tracks declare {n} samples")


def test_a_piff_encryption_box_is_refused():
    """(mutant: only the named encryption boxes refused, not PIFF's uuid one)"""
    piff = _box(b"uuid", bytes.fromhex("a2394f525a9b4f14a2446c427c648df4") + bytes(8))
    _refused(lambda: _check(FTYP + _box(b"moov", piff)), "ref_audio[4]", "encrypted or unsupported box 'uuid'")
    _check(FTYP + _box(b"moov", _box(b"uuid", bytes(24))))


def test_a_box_that_overruns_its_parent_is_refused_unless_it_is_the_files_last_media():
    """A cut file's last mdat (or a top-level free) may end with the file; a moov or a table may not (mutant: every
    overrunning box taken to the end)."""
    _check(FTYP + struct.pack(">I4s", 4096, b"mdat") + bytes(100))
    cut = FTYP + struct.pack(">I4s", 4096, b"moov") + _box(b"trak")
    _refused(lambda: _check(cut), "ref_audio[4]", "box b'moov' overruns its parent")


def test_a_second_table_in_one_sample_table_is_refused():
    """FFmpeg reads both (mutant: the once-per-parent rule dropped)."""
    _check(FTYP + _nest(STBL, _stsz(10)))
    _refused(lambda: _check(FTYP + _nest(STBL, _stsz(10) + _stsz(10))), "ref_audio[4]", "a second 'stsz' box")
