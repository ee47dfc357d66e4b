"""Measurements written for the tests from the standards, independent of jobs/levels.py and jobs/mastering.py.

Decoding in tests goes through libsndfile (soundfile: mpg123 for MP3, libopus for Opus), not the FFmpeg that wrote
the files; resampling through scipy's polyphase filters, not soxr; loudness with the ITU-R BS.1770-4 filter
coefficients for 48 kHz written out here, not pyloudnorm; the active speech level as a plain per-sample loop of
ITU-T P.56 method B; MP3 bit rates from the frame headers; M4B chapters, tags and cover from the MP4 boxes
(ISO/IEC 14496-12 and -14, Nero `chpl`, iTunes `ilst`), walked here rather than by the FFmpeg that wrote them.
"""

from __future__ import annotations

import io
import math
import struct

import numpy as np


def read(data: bytes) -> tuple[np.ndarray, int, int]:
    """(mono float64 samples, sample rate, channels) through libsndfile."""
    import soundfile as sf

    x, sr = sf.read(io.BytesIO(data), dtype="float64", always_2d=True)
    return x[:, 0], sr, x.shape[1]


def db(power: float) -> float:
    return 10 * math.log10(power) if power > 0 else -math.inf


def rms_db(x: np.ndarray) -> float:
    return db(float(np.mean(x**2)))


def peak_db(x: np.ndarray) -> float:
    return 20 * math.log10(float(np.max(np.abs(x))))


def frame_db(x: np.ndarray, sr: int, frame_s: float = 0.01) -> np.ndarray:
    n = int(sr * frame_s)
    k = len(x) // n
    return 10 * np.log10(np.mean(x[: k * n].reshape(k, n) ** 2, axis=1) + 1e-20)


def true_peak_dbtp(x: np.ndarray, sr: int) -> float:
    from scipy.signal import resample_poly

    factor = max(4, math.ceil(176400 / sr))
    return 20 * math.log10(float(np.max(np.abs(resample_poly(x, factor, 1)))))


def lufs(x: np.ndarray, sr: int) -> float:
    """ITU-R BS.1770-4 integrated loudness of a mono signal (resampled to 48 kHz for the published filters)."""
    from scipy.signal import lfilter, resample_poly

    if sr != 48000:
        g = math.gcd(sr, 48000)
        x = resample_poly(x, 48000 // g, sr // g)
    x = lfilter([1.53512485958697, -2.69169618940638, 1.19839281085285],
                [1.0, -1.69065929318241, 0.73248077421585], x)
    x = lfilter([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621], x)
    block, step = 19200, 4800  # 400 ms, 75 % overlap
    z = np.array([np.mean(x[i:i + block] ** 2) for i in range(0, len(x) - block + 1, step)])
    loud = -0.691 + 10 * np.log10(z + 1e-20)
    z = z[loud > -70.0]
    rel = -0.691 + 10 * np.log10(np.mean(z)) - 10.0
    z = z[-0.691 + 10 * np.log10(z) > rel]
    return -0.691 + 10 * math.log10(float(np.mean(z)))


def p56_level_db(x: np.ndarray, sr: int) -> float:
    """ITU-T P.56 method B as written: thresholds c_j 2 dB apart from quiet to loud, per-sample envelope and
    hangover, M = 15.9 dB; the first j where A_j - C_j <= M, interpolated with j - 1."""
    g = math.exp(-1 / (0.03 * sr))
    hang = int(0.2 * sr)
    c = [10 ** (d / 20) for d in range(-100, 1, 2)]
    count = [0] * len(c)
    since = [hang + 1] * len(c)
    p = q = 0.0
    for v in np.abs(x).tolist():
        p = g * p + (1 - g) * v
        q = g * q + (1 - g) * p
        for j, cj in enumerate(c):
            since[j] = 0 if q >= cj else since[j] + 1
            if since[j] <= hang:
                count[j] += 1
    energy = float(np.sum(x**2))
    prev = None
    for j, cj in enumerate(c):
        if count[j] == 0:
            break
        a_db = 10 * math.log10(energy / count[j])
        delta = a_db - 20 * math.log10(cj)
        if delta <= 15.9:
            if prev is None:
                return a_db
            pa, pdelta = prev
            t = (pdelta - 15.9) / (pdelta - delta)
            return pa + t * (a_db - pa)
        prev = (a_db, delta)
    raise AssertionError("no active speech found")


def dbm0(level_db: float, law: str) -> float:
    """G.711 section 5: a full-scale sine (-3.01 dB re full scale) is +3.17 dBm0 (u-law) / +3.14 dBm0 (A-law)."""
    return level_db + 3.0103 + (3.17 if law == "ulaw" else 3.14)


_MP3_KBPS_V1_L3 = (None, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, None)
_MP3_RATES_V1 = (44100, 48000, 32000, None)


def mp3_frames(data: bytes) -> list[dict]:
    """Header fields of every MPEG-1 layer III frame (after an ID3v2 tag, if any)."""
    pos = 0
    if data[:3] == b"ID3":
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        pos = 10 + size
    frames = []
    while pos + 4 <= len(data):
        h = data[pos:pos + 4]
        if h[0] != 0xFF or (h[1] & 0xE0) != 0xE0:
            break
        version, layer = (h[1] >> 3) & 3, (h[1] >> 1) & 3
        kbps, rate = _MP3_KBPS_V1_L3[h[2] >> 4], _MP3_RATES_V1[(h[2] >> 2) & 3]
        if version != 3 or layer != 1 or kbps is None or rate is None:
            break
        pad = (h[2] >> 1) & 1
        frames.append({"kbps": kbps, "rate": rate, "mono": (h[3] >> 6) == 3})
        pos += 144 * kbps * 1000 // rate + pad
    return frames


def dominant_hz(x: np.ndarray, sr: int) -> float:
    """Peak of a zero-padded Hann spectrum, refined by parabolic interpolation."""
    n = 1 << int(np.ceil(np.log2(len(x) * 4)))
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * sr / n


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of each box in data[start:end] (ISO/IEC 14496-12 section 4.2)."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        head = 8
        if size == 1:
            size, head = struct.unpack(">Q", data[pos + 8:pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise ValueError(f"MP4: box {kind!r} at {pos} has a bad size {size}")
        yield kind, pos + head, pos + size
        pos += size


def _find(data: bytes, path: list[bytes], start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Payload spans of every box at `path` (e.g. [b"moov", b"trak"])."""
    out = []
    for kind, a, b in _boxes(data, start, end):
        if kind == path[0]:
            if len(path) == 1:
                out.append((a, b))
            else:
                out += _find(data, path[1:], a + (4 if kind == b"meta" else 0), b)  # meta is a full box
    return out


def _descriptor(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, payload start, payload end) of an MPEG-4 descriptor (ISO/IEC 14496-1: 7-bit length bytes)."""
    tag, pos, size = data[pos], pos + 1, 0
    for _ in range(4):
        b = data[pos]
        pos += 1
        size = (size << 7) | (b & 0x7F)
        if not b & 0x80:
            break
    return tag, pos, pos + size


def mp4_book(data: bytes) -> dict:
    """What an audiobook player reads from an M4B: {"brand", "chapters": [(start_s, title)], "tags": {atom name:
    [values]} (text, ints, cover bytes), "length_s", "channels", "sample_rate"} of its (first) sound track."""
    out: dict = {"brand": data[8:12], "chapters": [], "tags": {}}
    for a, _ in _find(data, [b"moov", b"udta", b"chpl"]):
        version, pos = data[a], a + 4
        pos += 4 if version == 1 else 0        # version 1 has 4 more reserved bytes
        count, pos = data[pos], pos + 1
        for _ in range(count):
            start = struct.unpack(">Q", data[pos:pos + 8])[0]  # 100 ns units
            n = data[pos + 8]
            out["chapters"].append((start / 1e7, data[pos + 9:pos + 9 + n].decode("utf-8")))
            pos += 9 + n
    for a, b in _find(data, [b"moov", b"udta", b"meta", b"ilst"]):
        for kind, ia, ib in _boxes(data, a, b):
            for _, da, db in (x for x in _boxes(data, ia, ib) if x[0] == b"data"):
                well_known = struct.unpack(">I", data[da:da + 4])[0] & 0xFFFFFF  # ISO/IEC 14496-12 type
                payload = data[da + 8:db]
                if well_known == 1:
                    value = payload.decode("utf-8")
                elif well_known in (0, 21) and 1 <= len(payload) <= 8:
                    value = int.from_bytes(payload, "big", signed=well_known == 21)
                else:
                    value = payload
                out["tags"].setdefault(kind.decode("latin-1"), []).append(value)
    for a, b in _find(data, [b"moov", b"trak"]):
        hdlr = _find(data, [b"mdia", b"hdlr"], a, b)
        if not hdlr or data[hdlr[0][0] + 8:hdlr[0][0] + 12] != b"soun":
            continue
        (ma, _), = _find(data, [b"mdia", b"mdhd"], a, b)
        if data[ma] == 1:
            scale, duration = struct.unpack(">IQ", data[ma + 20:ma + 32])
        else:
            scale, duration = struct.unpack(">II", data[ma + 12:ma + 20])
        out["length_s"] = duration / scale
        (sa, sb), = _find(data, [b"mdia", b"minf", b"stbl", b"stsd"], a, b)
        kind, ea, eb = next(_boxes(data, sa + 8, sb))  # first sample entry (after version, flags, count)
        out["codec"] = kind.decode("latin-1")
        out["channels"] = struct.unpack(">H", data[ea + 16:ea + 18])[0]
        out["sample_rate"] = struct.unpack(">I", data[ea + 24:ea + 28])[0] >> 16
        for _, xa, _ in (x for x in _boxes(data, ea + 28, eb) if x[0] == b"esds"):
            tag, pa, pb = _descriptor(data, xa + 4)                  # ES_Descriptor
            flags, pa = data[pa + 2], pa + 3
            pa += (2 if flags & 0x80 else 0) + (1 + data[pa] if flags & 0x40 else 0) + (2 if flags & 0x20 else 0)
            tag, pa, pb = _descriptor(data, pa)                      # DecoderConfigDescriptor
            tag, pa, pb = _descriptor(data, pa + 13)                 # DecoderSpecificInfo: AudioSpecificConfig
            if tag == 5:
                asc = int.from_bytes(data[pa:pa + 2], "big")
                rates = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
                if (asc >> 7) & 0xF < len(rates):
                    out["sample_rate"] = rates[(asc >> 7) & 0xF]
                out["channels"] = (asc >> 3) & 0xF  # channelConfiguration (the sample entry says 2 for any AAC)
        break
    return out
