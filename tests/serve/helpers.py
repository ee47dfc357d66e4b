"""Small helpers shared by the service tests."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading

import numpy as np


def metric(text: str, name: str, **labels: str) -> float | None:
    """A value from Prometheus text: `metric(text, "qtts_active_sessions", model="cv")`, summed over the series
    that carry these labels (a counter has one per replica); None when none does."""
    from prometheus_client.parser import text_string_to_metric_families

    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == name and labels.items() <= s.labels.items()]
    return sum(values) if values else None


def decode_av(data: bytes) -> tuple[np.ndarray, int]:
    """Any container FFmpeg reads -> (float32 mono, sample rate), through PyAV; raises when FFmpeg cannot read it."""
    import av

    with av.open(io.BytesIO(data)) as f:
        stream = f.streams.audio[0]
        rate = stream.rate or stream.codec_context.sample_rate
        to_float = av.AudioResampler(format="flt", layout="mono", rate=rate)  # s16 -> float only: exact
        parts = [r.to_ndarray().reshape(-1) for frame in f.decode(stream) for r in to_float.resample(frame)]
        parts += [r.to_ndarray().reshape(-1) for r in to_float.resample(None)]
    return (np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)), int(rate)


def decode_audio(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    """Streamed bytes of `fmt` -> (float32 mono, sample rate). FLAC goes through PyAV: libsndfile cannot read a FLAC
    stream of unknown length (sf.read fails, block reads lose the last block); AAC too (libsndfile has no AAC)."""
    import soundfile as sf

    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    if fmt in ("flac", "aac"):  # libsndfile reads no AAC
        return decode_av(data)
    with sf.SoundFile(io.BytesIO(data)) as f:  # a streamed WAV says "unknown length": read block by block
        out = []
        while True:
            block = f.read(1024, dtype="float32")
            out.append(block)
            if len(block) < 1024:
                break
        return np.concatenate(out), f.samplerate


class FakeReplicaGen:
    """A replica's stream generator for ReplicaStream, without Ray: yields `items` in turn (an exception item is
    raised there) and records `cancel()`."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        x = self.items.pop(0)
        if isinstance(x, BaseException):
            raise x
        return x

    def cancel(self):
        self.cancelled = True


@contextlib.contextmanager
def loopback_http(handler: type[http.server.BaseHTTPRequestHandler]):
    """An HTTP server on 127.0.0.1 (a free port) answering with `handler` in threads; yields its base URL."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
