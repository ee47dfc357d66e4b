"""Speech speed: pitch-preserving time-scale modification, for whole clips (jobs) and for streams (the service).

    y = time_stretch(pcm, 24000, speed=1.5)          # whole clip: Rubber Band's offline R3 engine (pedalboard)
    ts = StreamingTimeStretcher(24000, speed=1.5)    # per chunk, with state: Rubber Band's real-time R3 engine
    for pcm in chunks: send(ts.push(pcm))            # (pylibrb); output does not depend on how input is cut,
    send(ts.finish())                                # so seams are continuous by construction

`speed` > 1 is faster (shorter), < 1 slower; pitch is kept. Both give exactly round(N / speed) samples for N input
samples. The libraries are imported lazily: the core never needs them, only the callers that stretch.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import RequestError

SPEED_MIN, SPEED_MAX = 0.25, 4.0
_MAX_BLOCK = 1 << 15  # samples per process() call into the real-time stretcher


def check_speed(speed: object, field: str = "speed") -> float:
    """`speed` as a float in [0.25, 4.0]; RequestError naming `field` for anything else (bools, NaN, strings)."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise RequestError(field, f"must be a number between {SPEED_MIN} and {SPEED_MAX}, got {speed!r}")
    value = float(speed)
    if not math.isfinite(value) or not SPEED_MIN <= value <= SPEED_MAX:
        raise RequestError(field, f"must be between {SPEED_MIN} and {SPEED_MAX}, got {speed!r}")
    return value


def stretched_length(n: int, speed: float) -> int:
    """Samples out for `n` samples in."""
    return int(round(n / speed))


def _mono(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pcm must be mono [N], got shape {x.shape}")
    return x


def time_stretch(pcm: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """A whole mono float32 clip [N] at `speed` -> [round(N / speed)], same pitch (identity at speed 1)."""
    speed = check_speed(speed)
    x = _mono(pcm)
    if speed == 1.0 or x.size == 0:
        return x.copy()
    import pedalboard

    y = pedalboard.time_stretch(x[None, :], float(sample_rate), stretch_factor=speed, high_quality=True)[0]
    return _fit(np.asarray(y, dtype=np.float32), stretched_length(x.size, speed))


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad to exactly `n` samples (the engines' totals can be a few samples off)."""
    if y.size >= n:
        return y[:n]
    return np.concatenate([y, np.zeros(n - y.size, dtype=np.float32)])


class StreamingTimeStretcher:
    """Mono float32 chunks in, stretched chunks out as soon as the engine has them; `finish()` flushes the rest.

    The engine is primed with its preferred start pad and its start delay is dropped, so output sample 0 lines up
    with input sample 0; the total is exactly round(N_in / speed). Latency is the engine's window (about 30 ms at
    24 kHz). At speed 1 it passes chunks through untouched. Not thread-safe: one per stream.
    """

    def __init__(self, sample_rate: int, speed: float) -> None:
        self.sample_rate = int(sample_rate)
        self.speed = check_speed(speed)
        self.samples_in = 0
        self.samples_out = 0
        self._finished = False
        self._rb = None
        self._skip = 0
        if self.speed != 1.0:
            from pylibrb import Option, RubberBandStretcher

            self._rb = RubberBandStretcher(
                self.sample_rate, 1,
                Option.PROCESS_REALTIME | Option.ENGINE_FINER | Option.WINDOW_SHORT | Option.THREADING_NEVER,
                initial_time_ratio=1.0 / self.speed)
            self._rb.set_max_process_size(_MAX_BLOCK)
            self._skip = int(self._rb.get_start_delay())
            pad = int(self._rb.get_preferred_start_pad())
            if pad:
                self._rb.process(np.zeros((1, pad), dtype=np.float32))

    def _take(self, final: bool) -> np.ndarray:
        parts = []
        for _ in range(1 << 16):  # bounded: the engine runs in this thread, so "0 available" never lasts
            n = self._rb.available()
            if n > 0:
                parts.append(self._rb.retrieve(n)[0])
            elif n < 0 or not final or self._rb.is_done():
                break
        y = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
        if self._skip:
            cut = min(self._skip, y.size)
            y, self._skip = y[cut:], self._skip - cut
        return y

    def _emit(self, y: np.ndarray, final: bool) -> np.ndarray:
        total = stretched_length(self.samples_in, self.speed)
        if final:
            y = _fit(y, total - self.samples_out)
        else:
            y = y[: max(0, total - self.samples_out)]
        self.samples_out += y.size
        return np.asarray(y, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed a chunk; returns the stretched audio available now (possibly empty)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        x = _mono(pcm)
        self.samples_in += x.size
        if self._rb is None:
            self.samples_out += x.size
            return x.copy()
        for i in range(0, x.size, _MAX_BLOCK):
            self._rb.process(np.ascontiguousarray(x[None, i:i + _MAX_BLOCK]))
        return self._emit(self._take(final=False), final=False)

    def finish(self) -> np.ndarray:
        """Flush: the rest of the output, so the total is exactly round(N_in / speed)."""
        if self._finished:
            return np.zeros(0, dtype=np.float32)
        self._finished = True
        if self._rb is None:
            return np.zeros(0, dtype=np.float32)
        self._rb.process(np.zeros((1, 0), dtype=np.float32), final=True)
        return self._emit(self._take(final=True), final=True)


class StretchedEncoder:
    """Any streaming encoder (`push(pcm) -> bytes`, `finish() -> bytes`, `media_type`) with a stretcher in front:
    the service wraps its encoder in this when a request asks for another speed."""

    def __init__(self, encoder, sample_rate: int, speed: float) -> None:
        self.encoder = encoder
        self.media_type = getattr(encoder, "media_type", None)
        self.stretcher = StreamingTimeStretcher(sample_rate, speed)

    def push(self, pcm: np.ndarray) -> bytes:
        y = self.stretcher.push(pcm)
        return self.encoder.push(y) if y.size else b""

    def finish(self) -> bytes:
        y = self.stretcher.finish()
        return (self.encoder.push(y) if y.size else b"") + self.encoder.finish()


__all__ = ["SPEED_MAX", "SPEED_MIN", "StreamingTimeStretcher", "StretchedEncoder", "check_speed", "stretched_length",
           "time_stretch"]
