"""Mastering presets: a joined chapter or prompt (mono float32 at the engine's rate) -> a deliverable file, its
measured figures, and pass/fail for every rule of its preset.

    acx        MP3 44.1 kHz mono CBR 192 kbps; RMS -23..-18 dB (aim -20); peak <= -3 dB on the DECODED MP3; noise
               floor <= -60 dB; room tone (never digital silence) under the whole file, 0.5-1 s at the head and
               1-5 s at the tail; at most 120 minutes; chapters within 1 dB of the book's median RMS.
    podcast    -19 LUFS integrated (ITU-R BS.1770, +-1 LU), true peak <= -1 dBTP; MP3 128 kbps or Opus 64 kbps.
    telephony  G.711 u-law / A-law at 8 kHz (or 16-bit linear at 8 or 16 kHz); active speech level -19 dBm0 +-1 dB
               (ITU-T P.56 method B, active speech only); trailing silence as configured.

Every figure is measured on the file as delivered (decoded again after encoding); when encoding pushed a peak over
its limit the gain is lowered and the file encoded again (at most 3 passes). A file that still fails a rule is
delivered and flagged (`<preset>:<rule>`), never silently shipped. dBm0 follows ITU-T G.711 section 5: a full-scale
sine is +3.17 dBm0 for u-law and +3.14 dBm0 for A-law (linear PCM uses the A-law figure).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import codecs, levels
from .audio import resample

PRESETS = ("none", "acx", "podcast", "telephony")
PRESET_CODECS: dict[str, dict[str, str]] = {  # --codec value -> delivery codec (first: the preset's default)
    "none": {},
    "acx": {"mp3": "mp3-192"},
    "podcast": {"mp3": "mp3-128", "opus": "opus"},
    "telephony": {"ulaw": "wav-ulaw", "alaw": "wav-alaw", "sln": "wav-8k", "sln16": "wav-16k"},
}
ACX = {"rms": (-23.0, -18.0), "rms_target": -20.0, "peak_max": -3.0, "noise_floor_max": -60.0,
       "head": (0.5, 1.0), "tail": (1.0, 5.0), "max_minutes": 120.0, "room_tone_db": -70.0,
       "head_target": 0.75, "tail_target": 2.0, "consistency_db": 1.0, "ceiling": -4.0}
PODCAST = {"lufs_target": -19.0, "lufs_tolerance": 1.0, "true_peak_max": -1.0, "ceiling": -2.0}
TELEPHONY = {"level_target_dbm0": -19.0, "level_tolerance": 1.0, "tail_silence_s": 0.3, "ceiling": -1.0}
TMAX_DBM0 = {"ulaw": 3.17, "alaw": 3.14, "sln": 3.14, "sln16": 3.14}
EDGE_MARGIN_S = 0.03   # kept before the first / after the last sound when edges are trimmed
MAX_PASSES = 3
MAX_CORRECTION_DB = 3.0  # most the post-encoding check moves the level towards its target
LIMITER = {"attack_ms": 5, "release_ms": 100, "oversample": 4, "passes": 3}  # alimiter; true peak: x4, <= 3 runs


@dataclass(frozen=True)
class MasterConfig:
    """What `--master`, `--codec` and `--tail-silence` ask for (part of the content key when preset != none)."""

    preset: str = "none"
    codec: str | None = None            # a key of PRESET_CODECS[preset]; None: the preset's default
    tail_silence_s: float | None = None  # telephony only; None: 0.3 s

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"master must be one of {list(PRESETS)}, got {self.preset!r}")
        allowed = PRESET_CODECS[self.preset]
        if self.codec is not None and self.codec not in allowed:
            hint = f"one of {sorted(allowed)}" if allowed else "left unset (it needs a mastering preset)"
            raise ValueError(f"codec for master {self.preset!r} must be {hint}, got {self.codec!r}")
        if self.tail_silence_s is not None:
            if self.preset != "telephony":
                raise ValueError("tail_silence: only the telephony preset takes a trailing silence")
            if isinstance(self.tail_silence_s, bool) or not 0 <= float(self.tail_silence_s) <= 10:
                raise ValueError(f"tail_silence must be between 0 and 10 seconds, got {self.tail_silence_s!r}")
            object.__setattr__(self, "tail_silence_s", float(self.tail_silence_s))

    @property
    def active(self) -> bool:
        return self.preset != "none"

    @property
    def codec_name(self) -> str:
        """The --codec value in force ("mp3", "ulaw", ...)."""
        return self.codec or next(iter(PRESET_CODECS[self.preset]), "")

    @property
    def delivery(self) -> codecs.Codec:
        return codecs.get(PRESET_CODECS[self.preset][self.codec_name])

    @property
    def tail_silence(self) -> float:
        return TELEPHONY["tail_silence_s"] if self.tail_silence_s is None else self.tail_silence_s

    def key(self) -> dict[str, Any]:
        """What goes into the content key."""
        out: dict[str, Any] = {"preset": self.preset, "codec": self.codec_name}
        if self.preset == "telephony":
            out["tail_silence_s"] = self.tail_silence
        return out


@dataclass
class MasterResult:
    data: bytes
    codec: codecs.Codec
    measurements: levels.Measurements
    rules: dict[str, bool]
    offset_s: float            # where input time 0 lands in the output (head added minus edge trimmed)
    speech_level_dbm0: float | None = None
    gain_db: float = 0.0
    passes: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, ok in self.rules.items() if not ok]

    def figures(self) -> dict[str, Any]:
        d = self.measurements.to_dict()
        d["speech_level_dbm0"] = None if self.speech_level_dbm0 is None else round(self.speech_level_dbm0, 3)
        return d


def _db_gain(x: np.ndarray, db: float) -> np.ndarray:
    return (x * np.float32(10 ** (db / 20))).astype(np.float32)


def _trim_edges(x: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    """Cut near-silence at both ends (keeping EDGE_MARGIN_S); returns (audio, samples cut at the head)."""
    bounds = levels.sound_bounds(x, sr)
    if bounds is None:
        return x, 0
    margin = int(EDGE_MARGIN_S * sr)
    first, last = max(0, bounds[0] - margin), min(x.size, bounds[1] + margin)
    return x[first:last], first


def _limit(x: np.ndarray, sr: int, ceiling_db: float, true_peak: bool = False) -> np.ndarray:
    """Look-ahead brick-wall limiter: FFmpeg's `alimiter` (5 ms look-ahead, 100 ms release, no auto-level, delay
    compensated, so the output lines up with the input sample for sample); sample peaks end at the ceiling.

    `true_peak`: the limiter runs at LIMITER["oversample"] times the rate (soxr up and down around it) so the peaks
    between samples obey the ceiling too; band-limiting on the way down can lift a peak a little (dense full-band
    material), so the result is measured (levels.true_peak_dbtp) and, when over, limited again with the ceiling
    lowered by the excess (at most LIMITER["passes"] runs). Audio already under the ceiling is returned as it is."""
    if x.size == 0:
        return x
    if not true_peak:
        # nothing over the ceiling: the limiter would pass it through unchanged (tested), so skip its cost
        return x if levels.peak_db(x) <= ceiling_db else _alimiter(x, sr, ceiling_db)
    if levels.true_peak_dbtp(x, sr) <= ceiling_db:
        return x
    hi, target = sr * LIMITER["oversample"], ceiling_db
    for _ in range(LIMITER["passes"]):
        y = resample(_alimiter(resample(x, sr, hi), hi, target), hi, sr)[: x.size]
        over = levels.true_peak_dbtp(y, sr) - ceiling_db
        if over <= 0:
            break
        target -= 2 * over + 0.02  # the lift grows with the gain reduction: step past it
    return y


def _alimiter(x: np.ndarray, sr: int, ceiling_db: float) -> np.ndarray:
    from qwen_tts_core.audio_fx import FilterChain

    args = (f"limit={10 ** (ceiling_db / 20):.6f}:attack={LIMITER['attack_ms']}:release={LIMITER['release_ms']}"
            ":level=0:latency=1")
    return FilterChain(sr, [("alimiter", args)]).run(x)[: x.size]


def room_tone(n: int, sr: int, level_db: float) -> np.ndarray:
    """`n` samples of quiet pink noise (60 Hz - 8 kHz) at `level_db` RMS, deterministic; an 8 s period synthesized
    in the frequency domain, so tiling it has no seam."""
    period = min(n, 8 * sr) if n else 0
    if period == 0:
        return np.zeros(0, dtype=np.float32)
    rng = np.random.default_rng(20_240_612)
    spec = np.fft.rfft(rng.standard_normal(period))
    f = np.fft.rfftfreq(period, 1 / sr)
    shape = np.where((f >= 60) & (f <= 8000), 1 / np.sqrt(np.maximum(f, 1.0)), 0.0)
    loop = np.fft.irfft(spec * shape, period)
    loop *= 10 ** (level_db / 20) / max(float(np.sqrt(np.mean(loop**2))), 1e-12)
    return np.resize(loop.astype(np.float32), n)


def _encode_measure(x: np.ndarray, codec: codecs.Codec, speech: bool) -> tuple[bytes, levels.Measurements, np.ndarray]:
    data = codecs.encode(x, codec)
    y, sr = codecs.decode(data)
    return data, levels.measure(y, sr, speech_level=speech), y


def _deliver(y: np.ndarray, codec: codecs.Codec, level_of: Any, target: float, peak_of: Any, peak_max: float,
             speech: bool = False, margin: float = 0.05, tolerance: float = 0.25,
             ) -> tuple[bytes, levels.Measurements, int, float]:
    """Encode, decode, measure; while the decoded file's level is off its target by more than `tolerance` dB or
    its peak is within `margin` of `peak_max` (or over), move the gain (never past the peak limit) and encode
    again. Returns (data, figures, passes, gain applied in dB)."""
    trim = 0.0
    for passes in range(1, MAX_PASSES + 1):
        data, m, _ = _encode_measure(_db_gain(y, trim), codec, speech)
        level, room = level_of(m), (peak_max - margin) - peak_of(m)
        # only a small correction here (codec drift): never turn room tone or junk into "speech"
        want = 0.0 if level is None else float(np.clip(target - level, -MAX_CORRECTION_DB, MAX_CORRECTION_DB))
        if (room >= 0 and abs(want) <= tolerance) or passes == MAX_PASSES:
            break
        trim += min(want, room)
    return data, m, passes, trim


def _acx(x: np.ndarray, sr_in: int, cfg: MasterConfig) -> MasterResult:
    codec = cfg.delivery
    sr = codec.sample_rate
    x, cut = _trim_edges(resample(x, sr_in, sr), sr)
    head, tail = int(ACX["head_target"] * sr), int(ACX["tail_target"] * sr)
    n = head + x.size + tail
    bed = room_tone(n, sr, ACX["room_tone_db"])
    speech_ms = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    # gain so the WHOLE file (speech + room tone) sits at the target RMS
    gain = ACX["rms_target"] - levels.to_db(speech_ms * x.size / max(n, 1), power=True) if speech_ms else 0.0
    for i in range(3):  # the limiter takes some RMS away: correct
        y = bed.copy()
        y[head:head + x.size] += _limit(_db_gain(x, gain), sr, ACX["ceiling"])
        now = levels.rms_db(y)
        if abs(now - ACX["rms_target"]) < 0.2 or i == 2 or not speech_ms:
            break
        gain += ACX["rms_target"] - now
    data, m, passes, trim_db = _deliver(y, codec, lambda m: m.rms_db if speech_ms else None, ACX["rms_target"],
                                        lambda m: m.peak_db, ACX["peak_max"], tolerance=0.5)
    rules = check_rules(cfg, m, bit_rate=_bit_rate(data))
    return MasterResult(data, codec, m, rules, offset_s=(head - cut) / sr, gain_db=gain + trim_db, passes=passes)


def _podcast(x: np.ndarray, sr_in: int, cfg: MasterConfig) -> MasterResult:
    codec = cfg.delivery
    sr = codec.sample_rate
    x = resample(x, sr_in, sr)
    target = PODCAST["lufs_target"]
    loud = levels.integrated_lufs(x, sr)
    gain = target - loud if loud is not None else 0.0
    for i in range(3):  # the true-peak limiter takes some loudness away: correct
        y = _limit(_db_gain(x, gain), sr, PODCAST["ceiling"], true_peak=True)
        now = levels.integrated_lufs(y, sr)
        if now is None or abs(now - target) < 0.2 or i == 2:
            break
        gain += target - now
    # true peak is an estimate (oversampling filters differ between meters): keep 0.2 dB clear of the limit
    data, m, passes, trim_db = _deliver(y, codec, lambda m: m.lufs, target,
                                        lambda m: m.true_peak_dbtp, PODCAST["true_peak_max"], margin=0.2)
    rules = check_rules(cfg, m)
    return MasterResult(data, codec, m, rules, offset_s=0.0, gain_db=gain + trim_db, passes=passes)


def dbm0(level_db: float | None, codec_name: str) -> float | None:
    """Active speech level dB re full-scale amplitude -> dBm0 (G.711: a full-scale sine is +Tmax dBm0)."""
    if level_db is None:
        return None
    return level_db + 10 * math.log10(2) + TMAX_DBM0[codec_name]


def _telephony(x: np.ndarray, sr_in: int, cfg: MasterConfig) -> MasterResult:
    codec = cfg.delivery
    sr = codec.sample_rate
    x, cut = _trim_edges(resample(x, sr_in, sr), sr)
    target = TELEPHONY["level_target_dbm0"]
    level = dbm0(levels.active_speech_level(x, sr)[0], cfg.codec_name)
    gain = target - level if level is not None else 0.0
    silence = np.zeros(int(round(cfg.tail_silence * sr)), dtype=np.float32)
    y = np.concatenate([_limit(_db_gain(x, gain), sr, TELEPHONY["ceiling"]), silence])
    data, m, passes, trim_db = _deliver(y, codec, lambda m: dbm0(m.speech_level_db, cfg.codec_name), target,
                                        lambda m: m.peak_db, -0.1, speech=True)
    level = dbm0(m.speech_level_db, cfg.codec_name)
    rules = check_rules(cfg, m, level_dbm0=level)
    return MasterResult(data, codec, m, rules, offset_s=-cut / sr, speech_level_dbm0=level, gain_db=gain + trim_db,
                        passes=passes)


def check_rules(cfg: MasterConfig, m: levels.Measurements, bit_rate: int | None = None,
                level_dbm0: float | None = None) -> dict[str, bool]:
    """Pass/fail of every rule of the preset for a delivered file's figures (`bit_rate`: acx; dBm0: telephony)."""
    rate_ok = m.sample_rate == cfg.delivery.sample_rate
    if cfg.preset == "acx":
        return {
            "rms": ACX["rms"][0] <= m.rms_db <= ACX["rms"][1],
            "peak": m.peak_db <= ACX["peak_max"],
            "noise_floor": m.noise_floor_db <= ACX["noise_floor_max"],
            "head": ACX["head"][0] <= m.head_s <= ACX["head"][1],
            "tail": ACX["tail"][0] <= m.tail_s <= ACX["tail"][1],
            "room_tone": m.head_rms_db > levels.FLOOR_DB and m.tail_rms_db > levels.FLOOR_DB,
            "max_duration": m.duration_s <= ACX["max_minutes"] * 60,
            "format": rate_ok and bit_rate == cfg.delivery.bit_rate,
        }
    if cfg.preset == "podcast":
        return {
            "loudness": m.lufs is not None and abs(m.lufs - PODCAST["lufs_target"]) <= PODCAST["lufs_tolerance"],
            "true_peak": m.true_peak_dbtp <= PODCAST["true_peak_max"],
            "format": rate_ok,
        }
    if cfg.preset == "telephony":
        target, tol = TELEPHONY["level_target_dbm0"], TELEPHONY["level_tolerance"]
        return {
            "speech_level": level_dbm0 is not None and abs(level_dbm0 - target) <= tol,
            "tail": m.tail_s + 0.02 >= cfg.tail_silence,
            "format": rate_ok,
        }
    return {}


def master(pcm: np.ndarray, sample_rate: int, cfg: MasterConfig) -> MasterResult:
    """Mono float32 [N] at `sample_rate` -> the preset's deliverable, measured and checked."""
    x = np.asarray(pcm, dtype=np.float32).reshape(-1)
    if cfg.preset == "acx":
        return _acx(x, sample_rate, cfg)
    if cfg.preset == "podcast":
        return _podcast(x, sample_rate, cfg)
    if cfg.preset == "telephony":
        return _telephony(x, sample_rate, cfg)
    raise ValueError(f"master: preset {cfg.preset!r} does not master (use one of {list(PRESETS[1:])})")


def _bit_rate(data: bytes) -> int | None:
    import io

    import av

    with av.open(io.BytesIO(data)) as f:
        return f.streams.audio[0].codec_context.bit_rate or None


def check_consistency(rms_by_id: dict[str, float], max_db: float = ACX["consistency_db"]) -> dict[str, bool]:
    """ACX "levels consistent across chapters": each chapter's RMS within `max_db` of the book's median."""
    if not rms_by_id:
        return {}
    median = float(np.median(list(rms_by_id.values())))
    return {k: abs(v - median) <= max_db for k, v in rms_by_id.items()}


def flag_names(preset: str, rules: dict[str, bool]) -> list[str]:
    """Manifest flags for the failed rules: `acx:peak`, ..."""
    return [f"{preset}:{name}" for name, ok in rules.items() if not ok]


def describe() -> dict[str, Any]:
    """The presets' numbers (for --help texts and the review page)."""
    return {"acx": dict(ACX), "podcast": dict(PODCAST), "telephony": dict(TELEPHONY),
            "codecs": {k: sorted(v) for k, v in PRESET_CODECS.items() if v}, "config": asdict(MasterConfig())}
