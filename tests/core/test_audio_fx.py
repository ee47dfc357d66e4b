"""Speed (pitch-preserving time-scale modification): whole clips and streams, measured independently here."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_tts_core.audio_fx import (
    SPEED_MAX,
    SPEED_MIN,
    StreamingTimeStretcher,
    check_speed,
    time_stretch,
)
from qwen_tts_core.errors import RequestError

SR = 24000
SPEEDS = (0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 4.0)


def tone(freq: float = 220.0, seconds: float = 2.0, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_hz(x: np.ndarray) -> float:
    """Peak of a zero-padded Hann spectrum, refined by parabolic interpolation."""
    n = 1 << int(np.ceil(np.log2(len(x) * 4)))
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    k = int(np.argmax(spec[1:-1])) + 1
    a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
    return (k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / n


def stream(x: np.ndarray, speed: float, chunk: int) -> tuple[np.ndarray, list[int]]:
    st = StreamingTimeStretcher(SR, speed)
    parts = [st.push(x[i:i + chunk]) for i in range(0, len(x), chunk)] + [st.finish()]
    return np.concatenate(parts), [p.size for p in parts]


@pytest.mark.parametrize("speed", SPEEDS)
def test_duration_scales_and_pitch_is_kept(speed):
    x = tone()
    for y in (time_stretch(x, SR, speed), stream(x, speed, 1920)[0]):
        assert abs(len(y) - len(x) / speed) <= 0.02 * len(x) / speed
        mid = y[len(y) // 8: len(y) - len(y) // 8]  # away from the engine's ramp-in/out
        assert dominant_hz(mid) == pytest.approx(220.0, rel=0.02)
        assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.25)  # not silent, not blown up


def test_stream_does_not_depend_on_chunking_and_has_no_clicks():
    """Same output whatever the chunk sizes (so seams are invisible by construction); no sample-to-sample jump
    larger than the tone's own steepest slope allows."""
    x = tone(180.0, 3.0) * (1 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(3 * SR) / SR)).astype(np.float32) / 1.5
    a, sizes = stream(x, 1.3, 1920)
    b, _ = stream(x, 1.3, 317)
    c, _ = stream(x, 1.3, len(x))
    assert len(a) == len(b) == len(c) == round(len(x) / 1.3)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(a, c, atol=1e-5)
    assert sum(s > 0 for s in sizes[:-1]) >= len(sizes) // 2  # audio leaves while input still arrives
    steepest = 2 * np.pi * 180 / SR * np.abs(x).max()
    assert np.abs(np.diff(a)).max() <= 1.5 * steepest


def test_unit_speed_is_identity_and_empty_streams_are_fine():
    x = tone(seconds=0.1)
    np.testing.assert_array_equal(time_stretch(x, SR, 1.0), x)
    y, _ = stream(x, 1.0, 333)
    np.testing.assert_array_equal(y, x)
    st = StreamingTimeStretcher(SR, 2.0)
    assert st.finish().size == 0 and st.finish().size == 0
    with pytest.raises(RuntimeError):
        st.push(x)
    assert time_stretch(np.zeros(0, np.float32), SR, 3.0).size == 0


@pytest.mark.parametrize("bad", [0.0, 0.2, 4.01, -1, float("nan"), float("inf"), True, "2", None])
def test_out_of_range_speed_names_the_field(bad):
    with pytest.raises(RequestError) as e:
        check_speed(bad)
    assert e.value.field == "speed"
    with pytest.raises(RequestError):
        StreamingTimeStretcher(SR, bad)
    assert check_speed(SPEED_MIN) == 0.25 and check_speed(SPEED_MAX) == 4.0 and check_speed(2) == 2.0


def test_stereo_is_refused():
    with pytest.raises(ValueError, match="mono"):
        time_stretch(np.zeros((2, 100), np.float32), SR, 2.0)


def test_stretched_encoder_wraps_a_streaming_encoder():
    from qwen_tts_core.audio_fx import StretchedEncoder

    class Collect:
        media_type = "audio/pcm"

        def __init__(self):
            self.got, self.finished = [], False

        def push(self, pcm):
            self.got.append(np.asarray(pcm))
            return b"x" * pcm.size

        def finish(self):
            self.finished = True
            return b"end"

    x = tone(seconds=1.0)
    enc = StretchedEncoder(Collect(), SR, 2.0)
    out = b"".join(enc.push(x[i:i + 1920]) for i in range(0, x.size, 1920)) + enc.finish()
    assert enc.media_type == "audio/pcm" and enc.encoder.finished and out.endswith(b"end")
    assert len(out) - 3 == SR // 2 == sum(g.size for g in enc.encoder.got)
