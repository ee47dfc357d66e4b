"""Reference audio libsndfile cannot read (m4a/mp4/aac from phones, webm/opus from browsers) decoded through PyAV
(qwen_tts_core/audio_decode_av.py) with the libsndfile path's limits. Fixtures are encoded here with PyAV."""

from __future__ import annotations

import base64
import io
import os
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest

from qwen_tts_core.audio_io import AudioLimits, load_audio
from qwen_tts_core.errors import RequestError

av = pytest.importorskip("av")


def _signal(sr: int, n: int) -> np.ndarray:
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)


def _encode(fmt: str, codec: str, sr: int, n: int, channels: int = 1, bit_rate: int | None = None,
            signal: np.ndarray | None = None) -> bytes:
    """`n` samples of `signal` (default `_signal`) per channel encoded with `codec` into container `fmt`."""
    x = _signal(sr, n) if signal is None else signal
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        layout = "mono" if channels == 1 else "stereo"
        s = out.add_stream(codec, rate=sr, layout=layout)
        if bit_rate:
            s.codec_context.bit_rate = bit_rate
        step = s.codec_context.frame_size or 1024
        for i in range(0, n, step):
            block = np.stack([x[i:i + step] * (1.0 - 0.5 * c) for c in range(channels)])
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=layout)
            frame.sample_rate, frame.pts = sr, i
            for p in s.encode(frame):
                out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    return buf.getvalue()


def _aligned(src: np.ndarray, got: np.ndarray, max_lag: int = 2600) -> tuple[float, float]:
    """(correlation, SNR in dB) of `got` against `src` at the best lag in [0, max_lag] (ADTS keeps the encoder's
    priming) and the best gain."""
    best = (-1.0, -np.inf)
    for lag in range(0, max_lag + 1):
        m = min(len(src), len(got) - lag) - 2048    # codecs fade the last frame
        a, b = src[1024:m].astype(np.float64), got[lag + 1024:lag + m].astype(np.float64)
        c = float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))
        if c > best[0]:
            gain = np.dot(a, b) / np.dot(b, b)
            best = (c, 10 * np.log10(np.dot(a, a) / np.dot(a - gain * b, a - gain * b)))
    return best


@pytest.mark.parametrize("fmt,codec,sr,frames,exact", [
    ("ipod", "aac", 16000, 1024 * 40, True),        # .m4a, as iOS voice memos
    ("mp4", "aac", 44100, 1024 * 100, True),         # .mp4 (phone video)
    ("webm", "libopus", 48000, 96000, True),         # browser MediaRecorder
    ("adts", "aac", 24000, 1024 * 50, False),        # raw .aac: no container to trim the encoder's priming
])
def test_phone_and_browser_formats_decode_like_the_source(fmt, codec, sr, frames, exact, tmp_path):
    data = _encode(fmt, codec, sr, frames)
    src = _signal(sr, frames)
    path = tmp_path / f"ref.{ {'ipod': 'm4a', 'adts': 'aac'}.get(fmt, fmt)}"
    path.write_bytes(data)
    uri = "data:audio/mp4;base64," + base64.b64encode(data).decode()
    for given in (data, path, str(path), uri):
        wav, got_sr = load_audio(given)
        assert got_sr == sr and wav.dtype == np.float32 and wav.ndim == 1 and wav.flags.c_contiguous
        if exact:   # whole codec frames: the container trims the priming, the length is the source's
            assert abs(len(wav) - frames) <= 0.005 * sr, (len(wav), frames)
        else:
            assert 0 <= len(wav) - frames <= 2048 + 0.005 * sr, (len(wav), frames)
        corr, snr = _aligned(src, wav, 0 if exact else 2600)
        assert corr > 0.99 and snr > 20, (corr, snr)


def test_stereo_is_averaged_to_mono_as_the_libsndfile_path_does():
    sr, n = 48000, 48000
    wav, got_sr = load_audio(_encode("webm", "libopus", sr, n, channels=2, bit_rate=128000))
    src = _signal(sr, n)
    corr, snr = _aligned(src, wav, 0)
    assert got_sr == sr and corr > 0.99 and snr > 20
    # channels are the signal and half of it: their mean is 0.75 of it
    assert np.sqrt(np.mean(wav[4800:-4800] ** 2)) / np.sqrt(np.mean(src[4800:-4800] ** 2)) == pytest.approx(0.75, rel=0.03)


def _set_mp4_durations(data: bytearray, seconds: float) -> None:
    """Rewrite the declared durations of mvhd, tkhd and mdhd (version 0 boxes) to `seconds`: the header lies."""
    for box, scale_at, dur_at in ((b"mvhd", 12, 16), (b"mdhd", 12, 16), (b"tkhd", None, 20)):
        pos = data.find(box) + 4
        assert pos > 3 and data[pos] == 0, box
        scale = struct.unpack_from(">I", data, pos + scale_at)[0] if scale_at else \
            struct.unpack_from(">I", data, data.find(b"mvhd") + 4 + 12)[0]
        struct.pack_into(">I", data, pos + dur_at, int(seconds * scale))


def test_a_container_that_declares_a_short_duration_is_refused_on_its_decoded_length():
    sr, n = 16000, 1024 * 160   # 10.24 s
    data = bytearray(_encode("ipod", "aac", sr, n))
    _set_mp4_durations(data, 1.0)
    with av.open(io.BytesIO(bytes(data))) as c:   # the lie is in place: FFmpeg reports 1 s
        assert c.duration == pytest.approx(1_000_000, rel=0.01)
    with pytest.raises(RequestError) as e:
        load_audio(bytes(data), limits=AudioLimits(max_seconds=3.0))
    assert e.value.field == "ref_audio" and "at most 3 s are accepted" in e.value.message, e.value
    assert "decoding stopped" in e.value.message
    wav, _ = load_audio(bytes(data))   # within the limits it is its real length, not the declared one
    assert abs(len(wav) - n) <= 0.005 * sr
    with pytest.raises(RequestError, match=r"more than .* samples .* at most 40000 are decoded"):
        load_audio(bytes(data), limits=AudioLimits(max_samples=40000))


@pytest.fixture(scope="module")
def long_opus() -> bytes:
    """130 s of low-rate Opus in WebM: ~100 KB that decode to 25 MB of float32."""
    sr, n = 48000, 48000 * 130
    return _encode("webm", "libopus", sr, n, bit_rate=6000)


def test_audio_decoding_past_the_limit_stops_there_without_allocating_it(long_opus):
    assert len(long_opus) < 200_000
    with pytest.raises(RequestError) as e:
        load_audio(long_opus)   # default limits: 120 s
    assert e.value.field == "ref_audio" and "at most 120 s are accepted" in e.value.message, e.value
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match="at most 2 s are accepted"):
            load_audio(long_opus, argument="ref_audio[0]", limits=AudioLimits(max_seconds=2.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3_000_000, peak   # 2 s and a frame decoded, not 130 s (25 MB)


def _patch_box(data: bytearray, box: bytes, at: int, value: int) -> None:
    """Write a 32-bit `value` at offset `at` of `box`'s payload (its version and flags are at 0)."""
    pos = data.find(box)
    assert pos > 0 and data.find(box, pos + 1) < 0, box
    struct.pack_into(">I", data, pos + 4 + at, value)


def test_mp4_sample_tables_that_declare_millions_of_samples_never_reach_ffmpeg(monkeypatch):
    """A 7 KiB m4a whose stsz/stts/stsc declare 50 M samples made FFmpeg allocate 1.8 GB of index when opened."""
    good = _encode("ipod", "aac", 16000, 1024 * 16)
    cases = {   # (box, payload offset, value): each alone declares what FFmpeg would allocate for
        "stsz sample count, constant size": ([(b"stsz", 4, 10), (b"stsz", 8, 50_000_000)], "declares 50000000 samples"),
        "stts run of 50 M samples": ([(b"stts", 8, 50_000_000)], "stts declares 50000000 samples"),
        "stsc 50 M samples per chunk": ([(b"stsc", 12, 50_000_000)], "stsc declares"),
        "stco with a million offsets": ([(b"stco", 4, 1_000_000)], "stco declares 1000000 entries that its bytes"),
        "stsz table larger than its box": ([(b"stsz", 8, 1_000_000)], "stsz declares 1000000 samples that its bytes"),
    }
    opened = []
    monkeypatch.setattr(av, "open", lambda *a, **k: opened.append(a) or pytest.fail("FFmpeg was reached"))
    for name, (patches, reason) in cases.items():
        data = bytearray(good)
        for box, at, value in patches:
            _patch_box(data, box, at, value)
        with pytest.raises(RequestError) as e:
            load_audio(bytes(data))
        assert e.value.field == "ref_audio" and "MP4/M4A" in e.value.message and reason in e.value.message, \
            (name, e.value)
    assert not opened


def test_truncated_and_corrupt_containers_are_request_errors_naming_the_argument(tmp_path):
    m4a = _encode("ipod", "aac", 16000, 1024 * 40)
    webm = _encode("webm", "libopus", 48000, 48000)
    rng = np.random.default_rng(0)
    cases = {
        "m4a cut before its moov": (m4a[: len(m4a) // 2], "MP4/M4A"),
        "m4a header then noise": (m4a[:32] + rng.bytes(4000), "MP4/M4A"),
        "webm header then noise": (webm[:4] + rng.bytes(4000), "WebM/Matroska"),
        "adts sync then noise": (b"\xff\xf1" + rng.bytes(4000), "AAC"),
    }
    for name, (data, kind) in cases.items():
        for given, argument in ((data, "ref_audio"), (tmp_path / "x.m4a", "ref_audio[2]")):
            (tmp_path / "x.m4a").write_bytes(data)
            with pytest.raises(RequestError) as e:
                load_audio(given, argument=argument)
            assert e.value.field == argument and kind in e.value.message, (name, e.value)
    # bytes flipped inside the audio: decoded or refused, never another exception
    for seed in range(8):
        data = bytearray(webm)
        at = np.random.default_rng(seed).integers(200, len(data) - 64, 8)
        for i in at:
            data[i] ^= 0xFF
        try:
            wav, _ = load_audio(bytes(data))
        except RequestError as e:
            assert e.field == "ref_audio"
        else:
            assert wav.dtype == np.float32 and np.isfinite(wav).all()


def test_a_codec_outside_the_allow_list_is_refused():
    with pytest.raises(RequestError) as e:
        load_audio(_encode("mp4", "ac3", 48000, 1536 * 20))
    assert e.value.field == "ref_audio" and "codec 'ac3' is not read" in e.value.message, e.value


def test_without_pyav_the_error_says_which_type_needs_it(monkeypatch):
    m4a, webm = _encode("ipod", "aac", 16000, 1024 * 20), _encode("webm", "libopus", 48000, 48000)
    monkeypatch.setitem(sys.modules, "av", None)   # `import av` raises ImportError
    for data, kind in ((m4a, "MP4/M4A"), (webm, "WebM/Matroska")):
        with pytest.raises(RequestError) as e:
            load_audio(data)
        assert e.value.field == "ref_audio" and kind in e.value.message and "pip install av" in e.value.message


def test_wav_flac_ogg_mp3_still_go_through_libsndfile_and_other_bytes_keep_its_error(monkeypatch, tmp_path):
    import soundfile as sf

    from qwen_tts_core import audio_decode_av

    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setattr(audio_decode_av, "decode", lambda *a, **k: pytest.fail("PyAV was used"))
    x = _signal(16000, 16000)
    for fmt, subtype in (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None)):
        buf = io.BytesIO()
        sf.write(buf, x, 16000, format=fmt, subtype=subtype)
        want, want_sr = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
        for given in (buf.getvalue(), tmp_path / f"a.{fmt.lower()}"):
            (tmp_path / f"a.{fmt.lower()}").write_bytes(buf.getvalue())
            wav, sr = load_audio(given)
            assert sr == want_sr and wav.shape == want.shape, fmt   # mpg123 rounds differently from read to read
            assert np.array_equal(wav, want) if fmt != "MP3" else np.allclose(wav, want, rtol=0, atol=1e-6), fmt
    # bytes no container sniffs as its own (a playlist, an image, text): libsndfile's refusal, FFmpeg never asked
    for data in (b"#EXTM3U\n#EXTINF:1,\nfile:///etc/passwd\n", b"\x89PNG\r\n\x1a\n" + bytes(64), b"hello" * 20):
        with pytest.raises(RequestError, match=r"^ref_audio: could not decode audio bytes as audio \("):
            load_audio(data)


# Hostile files found by review: each cost FFmpeg hundreds of MB or tens of seconds before the checks below.

def _box(kind: bytes, payload: bytes = b"", version_flags: int | None = None) -> bytes:
    body = (struct.pack(">I", version_flags) if version_flags is not None else b"") + payload
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _find(data: bytes, path: list[bytes]) -> tuple[int, int]:
    """(offset, size) of the first box at `path` (b"moov", b"trak", ...)."""
    start, end, found = 0, len(data), None
    for kind in path:
        pos = start
        while pos + 8 <= end:
            size, name = struct.unpack_from(">I4s", data, pos)
            if name == kind:
                found, start, end = (pos, size), pos + 8, pos + size
                break
            pos += size
        else:
            raise KeyError(kind)
    return found


def _put(data: bytes, path: list[bytes], new: bytes, replace: bytes | None = None) -> bytes:
    """`new` appended inside the box at `path` (or replacing its child `replace`), the parents' sizes grown. The
    encoder writes moov after mdat, so no chunk offset moves."""
    assert _find(data, [b"mdat"])[0] < _find(data, [b"moov"])[0]
    out = bytearray(data)
    at, old = _find(data, path)[0] + _find(data, path)[1], 0
    if replace is not None:
        at, old = _find(data, [*path, replace])
    for i in range(1, len(path) + 1):
        pos, size = _find(data, path[:i])
        struct.pack_into(">I", out, pos, size + len(new) - old)
    return bytes(out[:at] + new + out[at + old:])


def _refused(data: bytes, reason: str, monkeypatch, seconds: float = 1.0) -> None:
    """load_audio refuses `data` promptly, naming the argument, before a decoding child is started."""
    from qwen_tts_core import audio_decode_av

    monkeypatch.setattr(audio_decode_av, "_decode_in_child", lambda *a, **k: pytest.fail("FFmpeg was reached"),
                        raising=False)   # (raising: the code before the child had none)
    t = time.perf_counter()
    with pytest.raises(RequestError) as e:
        load_audio(data, argument="ref_audio[1]")
    assert time.perf_counter() - t < seconds
    assert e.value.field == "ref_audio[1]" and reason in e.value.message, e.value


@pytest.fixture(scope="module")
def m4a() -> bytes:
    return _encode("ipod", "aac", 16000, 1024 * 40)


def test_a_sample_table_hidden_in_a_box_ffmpeg_reads_is_refused(m4a, monkeypatch):
    """FFmpeg reads an stsz inside udta/tref/wave/meta into the last track (31 KB -> +975 MB); the check did not
    look there."""
    stsz = _box(b"stsz", struct.pack(">II", 10, 1_000_000), 0)
    for parent, path in ((b"udta", [b"moov", b"trak"]), (b"tref", [b"moov", b"trak"]),
                         (b"wave", [b"moov", b"trak", b"mdia", b"minf", b"stbl"])):
        _refused(_put(m4a, path, _box(parent, stsz)), "'stsz' box outside its place", monkeypatch)
    _refused(_put(m4a, [b"moov", b"trak"], _box(b"meta", stsz, 0)), "'stsz' box outside its place", monkeypatch)
    _refused(_put(m4a, [b"moov"], b"".join(_box(b"free") for _ in range(120_000))), "more than 100000 boxes",
             monkeypatch)


def test_an_edit_list_that_replays_the_track_is_refused(m4a, monkeypatch):
    """Each edit makes FFmpeg index the track again: 64 edits of a 2 M-sample track took +2.15 GB."""
    scale = struct.unpack_from(">I", m4a, _find(m4a, [b"moov", b"mvhd"])[0] + 20)[0]

    def elst(k: int) -> bytes:
        return _box(b"elst", struct.pack(">I", k) + struct.pack(">IiI", 3 * scale, 0, 0x10000) * k, 0)

    _refused(_put(m4a, [b"moov", b"trak", b"edts"], elst(64), replace=b"elst"), "an edit list of 64 entries",
             monkeypatch)
    data = bytearray(_put(m4a, [b"moov", b"trak", b"edts"], elst(4), replace=b"elst"))   # 4 x 600,000 samples
    _patch_box(data, b"stsz", 4, 10)
    _patch_box(data, b"stsz", 8, 600_000)
    _refused(bytes(data), "the tracks declare 2400000 samples (each times its edits)", monkeypatch)


def test_segment_indexes_are_refused_at_once(m4a, monkeypatch):
    """FFmpeg sorts sidx references by insertion (2 x 65,535 took seconds, 8 x 65,535 took 56 s)."""
    refs = 65535

    def sidx(first: int) -> bytes:
        return _box(b"sidx", struct.pack(">IIQQHH", 1, 16000, 0, first, 0, refs)
                    + struct.pack(">III", 16, 1024, 0x90000000) * refs, 1 << 24)

    flood = sidx((1 << 40) - refs * 64) + sidx((1 << 40) - 2 * refs * 64)
    _refused(m4a + flood, "'sidx'", monkeypatch)                 # at the top level
    _refused(_put(m4a, [b"moov"], flood), "'sidx'", monkeypatch)  # inside moov
    _refused(_put(m4a, [b"moov", b"udta"] if b"udta" in m4a else [b"moov"], _box(b"meta", flood[:4096], 0)),
             "'sidx'", monkeypatch)   # inside a box the check does not open


def test_a_webm_with_several_audio_tracks_is_refused():
    """FFmpeg opens every track's decoder while probing: 16 Vorbis tracks took +3 GB; one audio track is read."""
    buf, sr = io.BytesIO(), 48000
    with av.open(buf, "w", format="webm") as out:
        streams = [out.add_stream("libopus", rate=sr, layout="mono") for _ in range(3)]
        for i in range(0, sr, 960):
            for s in streams:
                frame = av.AudioFrame.from_ndarray(_signal(sr, sr)[None, i:i + 960].copy(), format="fltp",
                                                   layout="mono")
                frame.sample_rate, frame.pts = sr, i
                for p in s.encode(frame):
                    out.mux(p)
        for s in streams:
            for p in s.encode(None):
                out.mux(p)
    with pytest.raises(RequestError) as e:
        load_audio(buf.getvalue(), argument="ref_audio[3]")
    assert e.value.field == "ref_audio[3]" and "audio streams; one is read" in e.value.message, e.value


def _recorded_children(monkeypatch) -> list[subprocess.Popen]:
    from qwen_tts_core import audio_decode_av

    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            started.append(self)

    monkeypatch.setattr(audio_decode_av.subprocess, "Popen", Recorded)
    return started


def _gone(proc: subprocess.Popen) -> None:
    assert proc.returncode is not None   # waited for: no zombie left
    with pytest.raises(ChildProcessError):
        os.waitpid(proc.pid, os.WNOHANG)


def test_ffmpeg_runs_in_a_child_that_decodes_as_this_process_does(m4a, monkeypatch):
    from qwen_tts_core import audio_decode_av
    from qwen_tts_core.audio_io import DEFAULT_LIMITS

    started = _recorded_children(monkeypatch)
    wav, sr = load_audio(m4a)
    want, want_sr = audio_decode_av.decode_here(m4a, "mp4", "MP4/M4A", "ref_audio", "audio bytes", DEFAULT_LIMITS)
    assert sr == want_sr and wav.dtype == np.float32 and np.array_equal(wav, want) and wav.flags.writeable
    assert len(started) == 1 and started[0].returncode == 0
    assert set(started[0].args[:2]) == {sys.executable, "-c"}
    _gone(started[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")
def test_a_child_past_its_memory_limit_is_a_request_error(long_opus, monkeypatch):
    from qwen_tts_core import audio_decode_av

    started = _recorded_children(monkeypatch)
    monkeypatch.setattr(audio_decode_av, "_child_memory", lambda limits: 8 << 20)   # 130 s decode ~50 MB
    with pytest.raises(RequestError) as e:
        load_audio(long_opus, argument="ref_audio[0]", limits=AudioLimits(max_seconds=200.0))
    assert e.value.field == "ref_audio[0]" and "WebM/Matroska" in e.value.message, e.value
    assert "memory" in e.value.message or "decoder stopped" in e.value.message, e.value
    _gone(started[0])


def test_a_child_past_its_time_or_misbehaving_is_killed_and_a_request_error(m4a, monkeypatch):
    from qwen_tts_core import audio_decode_av

    started = _recorded_children(monkeypatch)
    monkeypatch.setattr(audio_decode_av, "CHILD_TIMEOUT_S", 0.02)   # less than the child's imports take
    t = time.perf_counter()
    with pytest.raises(RequestError, match=r"^ref_audio\[2\]: .* \(decoding took more than 0.02 s; stopped\)"):
        load_audio(m4a, argument="ref_audio[2]")
    assert time.perf_counter() - t < 5 and started[-1].returncode == -signal.SIGKILL
    _gone(started[-1])
    monkeypatch.undo()
    started = _recorded_children(monkeypatch)
    for code, reason in (("import os; os.kill(os.getpid(), 9)", "killed by SIGKILL"),
                         ("import sys; sys.stdout.write('not json')", "reply is malformed"),
                         ("import sys; sys.stdout.buffer.write(bytes(1 << 22))", "longer than the limits allow")):
        monkeypatch.setattr(audio_decode_av, "_CHILD_CODE", code)
        with pytest.raises(RequestError) as e:
            load_audio(m4a, argument="ref_audio[2]", limits=AudioLimits(max_samples=500_000))
        assert e.value.field == "ref_audio[2]" and reason in e.value.message, (code, e.value)
        _gone(started[-1])
