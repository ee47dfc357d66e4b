"""Measurements written for the tests from the standards, independent of jobs/levels.py and jobs/mastering.py.

Decoding in tests goes through libsndfile (soundfile: mpg123 for MP3, libopus for Opus), not the FFmpeg that wrote
the files; resampling through scipy's polyphase filters, not soxr; loudness with the ITU-R BS.1770-4 filter
coefficients for 48 kHz written out here, not pyloudnorm; the active speech level as a plain per-sample loop of
ITU-T P.56 method B; MP3 bit rates from the frame headers.
"""

from __future__ import annotations

import io
import math

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
