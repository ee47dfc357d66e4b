"""Speech speed: pitch-preserving time-scale modification, for whole clips (jobs) and for streams (the service),
and the one way this project runs audio through FFmpeg's filters (`FilterChain`).

    y = time_stretch(pcm, 24000, speed=1.5)          # whole clip
    ts = StreamingTimeStretcher(24000, speed=1.5)    # per chunk, with state
    for pcm in chunks: send(ts.push(pcm))            # output does not depend on how the input is cut,
    send(ts.finish())                                # so seams are continuous by construction

`speed` > 1 is faster (shorter), < 1 slower; pitch is kept. Both give exactly round(N / speed) samples for N input
samples, and the same samples: the whole-clip stretch is the streaming one fed in one piece. The engine is FFmpeg's
`atempo` filter (WSOLA: overlap-add of windows re-aligned by cross-correlation, about 43 ms at 24 kHz), run through
PyAV's filter graphs; FFmpeg's libavfilter is LGPL, so nothing here puts GPL terms on the project (as long as the
FFmpeg build PyAV loads has no GPL parts: jobs/README.md). PyAV is imported lazily: the core never needs it, only
the callers that stretch or filter.
"""

from __future__ import annotations

import fractions
import math

import numpy as np

from .errors import RequestError, shown

SPEED_MIN, SPEED_MAX = 0.25, 4.0
ATEMPO_MIN = 0.5       # one atempo instance takes 0.5-100; slower speeds chain two
FRAME = 256            # the stretcher feeds FFmpeg fixed frames of this many samples (see StreamingTimeStretcher)
_BLOCK = 1 << 16       # samples per frame for whole-clip filtering
_TAIL_PAD_S = 0.25     # silence fed after the last sample so the engine's last window reaches the end


def check_speed(speed: object, field: str = "speed") -> float:
    """`speed` as a float in [0.25, 4.0]; RequestError naming `field` for anything else (bools, NaN, strings)."""
    if isinstance(speed, bool) or not isinstance(speed, (int, float)):
        raise RequestError(field, f"must be a number between {SPEED_MIN} and {SPEED_MAX}, got {shown(speed)}")
    value = float(speed) if isinstance(speed, float) or abs(speed) < 2**53 else math.inf  # 10**400 fits no float
    if not math.isfinite(value) or not SPEED_MIN <= value <= SPEED_MAX:
        raise RequestError(field, f"must be between {SPEED_MIN} and {SPEED_MAX}, got {shown(speed)}")
    return value


def stretched_length(n: int, speed: float) -> int:
    """Samples out for `n` samples in."""
    return int(round(n / speed))


def _mono(pcm: np.ndarray) -> np.ndarray:
    x = np.asarray(pcm, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"pcm must be mono [N], got shape {x.shape}")
    return x


_EMPTY = np.zeros(0, dtype=np.float32)


class FilterChain:
    """Mono float32 audio through a chain of FFmpeg audio filters (libavfilter via PyAV), in pieces or whole.

        lim = FilterChain(44100, [("alimiter", "limit=0.63:level=0:latency=1")])
        y = lim.run(x)                                   # or: push(chunk) -> samples ready; finish() -> the rest

    Filters keep their state between pushes; what comes out of a push is what the chain has ready (possibly
    nothing). Not thread-safe: one per stream.
    """

    def __init__(self, sample_rate: int, filters: list[tuple[str, str]]) -> None:
        import av.filter

        self.sample_rate = int(sample_rate)
        self._tb = fractions.Fraction(1, self.sample_rate)
        self._pts = 0
        self._graph = av.filter.Graph()
        node = self._graph.add_abuffer(format="flt", sample_rate=self.sample_rate, layout="mono", time_base=self._tb)
        for name, args in filters:
            nxt = self._graph.add(name, args)
            node.link_to(nxt)
            node = nxt
        sink = self._graph.add("abuffersink")
        node.link_to(sink)
        self._graph.configure()
        self._done = False

    def _pull(self) -> list[np.ndarray]:
        import av

        out = []
        while True:
            try:
                frame = self._graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return out
            out.append(frame.to_ndarray().reshape(-1))

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed mono float32 samples; returns the filtered samples ready now."""
        import av

        if self._done:
            raise RuntimeError("push() after finish()")
        x = _mono(pcm)
        parts = []
        for i in range(0, x.size, _BLOCK):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, i:i + _BLOCK]), format="flt",
                                               layout="mono")
            frame.sample_rate, frame.time_base, frame.pts = self.sample_rate, self._tb, self._pts
            self._pts += frame.samples
            self._graph.push(frame)
            parts += self._pull()
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else _EMPTY.copy()

    def finish(self) -> np.ndarray:
        """End of input: whatever the filters still held."""
        if self._done:
            return _EMPTY.copy()
        self._done = True
        self._graph.push(None)
        parts = self._pull()
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else _EMPTY.copy()

    def run(self, pcm: np.ndarray) -> np.ndarray:
        """A whole clip through the chain (push + finish)."""
        head = self.push(pcm)
        return np.concatenate([head, self.finish()])


def atempo_filters(speed: float) -> list[tuple[str, str]]:
    """FFmpeg `atempo` stages for `speed` (two in series below 0.5, each within the filter's own range)."""
    if speed < ATEMPO_MIN:
        return [("atempo", f"tempo={ATEMPO_MIN!r}"), ("atempo", f"tempo={speed / ATEMPO_MIN!r}")]
    return [("atempo", f"tempo={speed!r}")]


def time_stretch(pcm: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """A whole mono float32 clip [N] at `speed` -> [round(N / speed)], same pitch (identity at speed 1)."""
    speed = check_speed(speed)
    x = _mono(pcm)
    if speed == 1.0 or x.size == 0:
        return x.copy()
    st = StreamingTimeStretcher(sample_rate, speed)
    return np.concatenate([st.push(x), st.finish()])


def _fit(y: np.ndarray, n: int) -> np.ndarray:
    """Trim or zero-pad to exactly `n` samples."""
    if y.size >= n:
        return y[:n]
    return np.concatenate([y, np.zeros(n - y.size, dtype=np.float32)])


class StreamingTimeStretcher:
    """Mono float32 chunks in, stretched chunks out as soon as the engine has them; `finish()` flushes the rest.

    Input is re-cut into fixed FRAME-sample frames before it reaches FFmpeg, so the engine sees the same frames
    whatever the caller's chunk sizes: output is identical for any chunking (and the whole-clip stretch is this
    fed in one piece). Output sample 0 lines up with input sample 0 (atempo's first window is centred on it; WSOLA
    then places events within a few ms of where they belong); output never runs ahead of round(N_in_so_far /
    speed) (extra is held for the next call); `finish()` feeds a little silence so the last window covers the end,
    then trims: the total is exactly round(N_in / speed).
    Latency: the engine's window plus at most one frame, about 40-110 ms of input by speed (Rubber Band's
    real-time engine measured 30-120 ms the same way). At speed 1 chunks pass through untouched. Not thread-safe:
    one per stream.
    """

    def __init__(self, sample_rate: int, speed: float) -> None:
        self.sample_rate = int(sample_rate)
        self.speed = check_speed(speed)
        self.samples_in = 0
        self.samples_out = 0
        self._finished = False
        self._chain: FilterChain | None = None
        self._carry = _EMPTY    # input not yet a whole frame
        self._held = _EMPTY     # output past what the input so far allows
        if self.speed != 1.0:
            self._chain = FilterChain(self.sample_rate, atempo_filters(self.speed))

    def _release(self, y: np.ndarray) -> np.ndarray:
        y = np.concatenate([self._held, y]) if self._held.size else y
        room = max(0, stretched_length(self.samples_in, self.speed) - self.samples_out)
        out, self._held = y[:room], y[room:]
        self.samples_out += out.size
        return np.array(out, dtype=np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        """Feed a chunk; returns the stretched audio available now (possibly empty)."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        x = _mono(pcm)
        self.samples_in += x.size
        if self._chain is None:
            self.samples_out += x.size
            return x.copy()
        buf = np.concatenate([self._carry, x]) if self._carry.size else x
        whole = buf.size - buf.size % FRAME
        self._carry = buf[whole:].copy()
        parts = [self._chain.push(buf[i:i + FRAME]) for i in range(0, whole, FRAME)]
        return self._release(np.concatenate(parts) if parts else _EMPTY)

    def finish(self) -> np.ndarray:
        """Flush: the rest of the output, so the total is exactly round(N_in / speed)."""
        if self._finished:
            return _EMPTY.copy()
        self._finished = True
        if self._chain is None:
            return _EMPTY.copy()
        pad = np.zeros(int(_TAIL_PAD_S * self.sample_rate * self.speed) + FRAME, dtype=np.float32)
        tail = np.concatenate([self._carry, pad])
        tail = tail[: tail.size - tail.size % FRAME]
        parts = [self._chain.push(tail[i:i + FRAME]) for i in range(0, tail.size, FRAME)]
        parts.append(self._chain.finish())
        y = np.concatenate([self._held, *parts])
        self._held = self._carry = _EMPTY
        y = _fit(y, stretched_length(self.samples_in, self.speed) - self.samples_out)
        self.samples_out += y.size
        return np.asarray(y, dtype=np.float32)


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


__all__ = ["SPEED_MAX", "SPEED_MIN", "FilterChain", "StreamingTimeStretcher", "StretchedEncoder", "atempo_filters",
           "check_speed", "stretched_length", "time_stretch"]
