"""Level measurements of a mono float32 signal (full scale = 1.0): what mastering aims at and what its rules check.

- rms_db: RMS of the whole file, dB re full scale (a full-scale sine is -3.01 dB), as audiobook checkers report it.
- peak_db: highest |sample|, dBFS. true_peak_dbtp: ITU-R BS.1770-4 Annex 2 true peak (oversampled to >= 176.4 kHz).
- lufs: ITU-R BS.1770 integrated loudness (pyloudnorm: K-weighting, 400 ms blocks, absolute and relative gates).
- noise_floor_db: RMS of the quietest 500 ms window (the room tone, for ACX).
- head_s / tail_s: time before the first / after the last 10 ms frame that is sound (15 dB above the noise floor,
  that threshold kept within -60..-35 dBFS); head_rms_db / tail_rms_db: RMS of those stretches (digital silence
  reads -120).
- speech_level_db / activity: active speech level (ITU-T P.56 method B: envelope with a 30 ms time constant, 200 ms
  hangover, 15.9 dB margin), dB re full scale, and the share of samples counted as active.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

FLOOR_DB = -120.0          # what "no signal at all" reads (keeps JSON and Parquet free of -inf)
NOISE_WINDOW_S = 0.5
SOUND_OVER_FLOOR_DB = 15.0  # a frame is sound when this much above the noise floor,
SOUND_RANGE_DB = (-60.0, -35.0)  # that threshold clipped to this range (a file with no quiet stretch: -35 dBFS)
P56_TIME_CONSTANT_S = 0.03
P56_HANGOVER_S = 0.2
P56_MARGIN_DB = 15.9


def to_db(value: float, power: bool = False) -> float:
    """Amplitude (or power) ratio -> dB, never below FLOOR_DB."""
    if value <= 0 or not math.isfinite(value):
        return FLOOR_DB
    return max(FLOOR_DB, (10.0 if power else 20.0) * math.log10(value))


@dataclass
class Measurements:
    duration_s: float
    sample_rate: int
    rms_db: float
    peak_db: float
    true_peak_dbtp: float
    lufs: float | None          # None: shorter than one 400 ms block, or everything gated away
    noise_floor_db: float
    head_s: float
    tail_s: float
    head_rms_db: float
    tail_rms_db: float
    speech_level_db: float | None = None
    activity: float | None = None

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


_BLOCK = 1 << 20  # samples per block when summing squares (float64 sums, no full-length float64 copy)


def _energy(x: np.ndarray) -> float:
    """Sum of squares in float64, a block at a time."""
    return float(sum(np.dot(b, b) for b in (np.asarray(x[i:i + _BLOCK], dtype=np.float64)
                                            for i in range(0, np.size(x), _BLOCK))))


def rms_db(x: np.ndarray) -> float:
    return to_db(_energy(x) / np.size(x), power=True) if np.size(x) else FLOOR_DB


def peak_db(x: np.ndarray) -> float:
    return to_db(float(np.max(np.abs(x)))) if np.size(x) else FLOOR_DB


def true_peak_dbtp(x: np.ndarray, sample_rate: int, block_s: float = 10.0) -> float:
    """Max |sample| after band-limited oversampling to >= 176.4 kHz (x4 at 44.1/48 kHz, x24 at 8 kHz)."""
    import soxr

    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return FLOOR_DB
    factor = max(4, math.ceil(176400 / sample_rate))
    stream = soxr.ResampleStream(sample_rate, sample_rate * factor, 1, dtype="float32", quality="HQ")
    step = max(1, int(block_s * sample_rate))
    peak = float(np.max(np.abs(x)))
    for i in range(0, x.size, step):
        y = stream.resample_chunk(x[i:i + step], last=i + step >= x.size)
        if y.size:
            peak = max(peak, float(np.max(np.abs(y))))
    return to_db(peak)


def integrated_lufs(x: np.ndarray, sample_rate: int) -> float | None:
    import pyloudnorm

    x = np.asarray(x, dtype=np.float64)
    if x.size < int(0.4 * sample_rate):
        return None
    value = pyloudnorm.Meter(sample_rate).integrated_loudness(x)
    return float(value) if math.isfinite(value) else None


def frame_energies(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """(mean square of each whole 10 ms frame, frame length in samples); a trailing partial frame is dropped."""
    frame = max(1, int(0.01 * sample_rate))
    n = np.size(x) // frame
    out = np.empty(n)
    step = max(1, _BLOCK // frame)
    for i in range(0, n, step):
        b = np.asarray(x[i * frame:min(n, i + step) * frame], dtype=np.float64).reshape(-1, frame)
        out[i:i + b.shape[0]] = np.einsum("ij,ij->i", b, b) / frame
    return out, frame


def noise_floor_db(x: np.ndarray, sample_rate: int, energies: np.ndarray | None = None) -> float:
    """RMS of the quietest 500 ms (windows of 50 frames of 10 ms, one frame apart)."""
    e = frame_energies(x, sample_rate)[0] if energies is None else energies
    w = int(round(NOISE_WINDOW_S / 0.01))
    if e.size == 0:
        return rms_db(x)
    if e.size <= w:
        return to_db(float(np.mean(e)), power=True)
    c = np.concatenate([[0.0], np.cumsum(e)])
    return to_db(max(float(np.min(c[w:] - c[:-w])) / w, 0.0), power=True)


def sound_bounds(x: np.ndarray, sample_rate: int, floor_db: float | None = None,
                 energies: np.ndarray | None = None) -> tuple[int, int] | None:
    """[first, last) sample of the 10 ms frames that are sound; None when nothing is."""
    e, frame = frame_energies(x, sample_rate) if energies is None else (energies, max(1, int(0.01 * sample_rate)))
    if e.size == 0:
        return None
    floor_db = noise_floor_db(x, sample_rate, e) if floor_db is None else floor_db
    threshold = min(max(floor_db + SOUND_OVER_FLOOR_DB, SOUND_RANGE_DB[0]), SOUND_RANGE_DB[1])
    loud = np.flatnonzero(e > 10 ** (threshold / 10))
    if loud.size == 0:
        return None
    return int(loud[0] * frame), int((loud[-1] + 1) * frame)


def active_speech_level(x: np.ndarray, sample_rate: int) -> tuple[float | None, float]:
    """(active speech level dB re full scale, activity 0..1), ITU-T P.56 method B; (None, 0.0) for silence: no
    samples, all zero, or an envelope below every threshold (e.g. -140 dBFS noise, or a few samples whose smoothed
    envelope never rises to -120 dB). Callers treat None as "no speech": no gain, the level rule fails.

    The envelope q is |x| smoothed twice by a one-pole filter (time constant 30 ms). For a threshold c a sample is
    active when q reached c within the last 200 ms (hangover). The active level A(c) is the mean power over active
    samples; scanning thresholds upwards (0.25 dB apart), the measured level is A where A(c) - 20 log10(c) first
    falls to the 15.9 dB margin (interpolated between the two thresholds around it).
    """
    from scipy.ndimage import maximum_filter1d
    from scipy.signal import lfilter

    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or not np.any(x):
        return None, 0.0
    g = math.exp(-1.0 / (P56_TIME_CONSTANT_S * sample_rate))
    q = lfilter([1 - g], [1, -g], lfilter([1 - g], [1, -g], np.abs(x)))
    hang = int(P56_HANGOVER_S * sample_rate)
    # trailing window [n - hang, n]: centre a (hang + 1)-wide filter hang/2 samples back
    qmax = maximum_filter1d(q, size=hang + 1, origin=hang // 2, mode="constant", cval=0.0)
    qs = np.sort(qmax)
    energy = float(np.sum(x * x))
    grid_db = np.arange(-120.0, 0.001, 0.25)  # thresholds, quiet to loud
    counts = x.size - np.searchsorted(qs, 10 ** (grid_db / 20), side="left")
    live = counts > 0
    if not np.any(live):  # the envelope never reaches the lowest threshold (-120 dB): silence for P.56 too
        return None, 0.0
    level = np.full(grid_db.shape, np.nan)
    level[live] = 10 * np.log10(energy / counts[live])
    # A(c) - C falls as the threshold rises: the level is where it first reaches the margin
    below = live & (level - grid_db <= P56_MARGIN_DB)
    if not np.any(below):
        j = int(np.flatnonzero(live)[-1])
        return float(level[j]), float(counts[j] / x.size)
    j = int(np.argmax(below))
    if j == 0:
        return float(level[0]), float(counts[0] / x.size)
    d0, d1 = level[j - 1] - grid_db[j - 1], level[j] - grid_db[j]
    t = 0.0 if d1 == d0 else (d0 - P56_MARGIN_DB) / (d0 - d1)
    lvl = float(level[j - 1] + t * (level[j] - level[j - 1]))
    act = float((counts[j - 1] + t * (counts[j] - counts[j - 1])) / x.size)
    return lvl, act


def measure(x: np.ndarray, sample_rate: int, speech_level: bool = False) -> Measurements:
    """Every figure above for one file's decoded audio."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    energies = frame_energies(x, sample_rate)[0]
    floor = noise_floor_db(x, sample_rate, energies)
    bounds = sound_bounds(x, sample_rate, floor, energies)
    first, last = bounds if bounds else (x.size, x.size)
    m = Measurements(duration_s=x.size / sample_rate, sample_rate=sample_rate, rms_db=rms_db(x), peak_db=peak_db(x),
                     true_peak_dbtp=true_peak_dbtp(x, sample_rate), lufs=integrated_lufs(x, sample_rate),
                     noise_floor_db=floor, head_s=first / sample_rate, tail_s=(x.size - last) / sample_rate,
                     head_rms_db=rms_db(x[:first]), tail_rms_db=rms_db(x[last:]))
    if speech_level:
        m.speech_level_db, m.activity = active_speech_level(x, sample_rate)
    return m
