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


@pytest.mark.parametrize("speed", (0.25, 0.4, 0.7, 1.3, 2.5, 4.0))
def test_any_chunking_gives_the_same_samples_as_the_whole_clip(speed):
    """Random chunk sizes (1-sample pushes and empty pushes included), 1920, 317 and the whole clip in one push all
    give exactly the whole-clip stretch, also where two atempo stages run in series (speed < 0.5)."""
    x = tone(150.0, 1.0) + tone(1234.0, 1.0, 0.1)
    whole = time_stretch(x, SR, speed)
    rng = np.random.default_rng(int(speed * 100))
    st, parts, i = StreamingTimeStretcher(SR, speed), [], 0
    while i < x.size:
        n = int(rng.choice([0, 1, 1, 2, 7, 255, 256, 257, 1000, 4096]))
        parts.append(st.push(x[i:i + n]))
        i += n
    parts.append(st.finish())
    for y in (np.concatenate(parts), stream(x, speed, 1920)[0], stream(x, speed, 317)[0], stream(x, speed, x.size)[0]):
        assert y.size == whole.size == round(x.size / speed)
        np.testing.assert_array_equal(y, whole)


@pytest.mark.parametrize("speed", (0.25, 0.5, 1.7, 4.0))
@pytest.mark.parametrize("n", (1, 2, 255, 256, 257, 1000))
def test_tiny_inputs_give_exactly_round_n_over_speed(speed, n):
    x = tone(seconds=n / SR)[:n]
    assert time_stretch(x, SR, speed).size == round(n / speed)
    y, sizes = stream(x, speed, 1)
    assert y.size == round(n / speed) and np.isfinite(y).all()


@pytest.mark.parametrize("speed", (0.25, 0.5, 1.5, 4.0))
def test_stream_keeps_up_and_never_runs_ahead(speed):
    """After each 80 ms push, the output so far lags what the input so far allows by at most 125 ms of input time
    (the engine's window and one frame), and never runs past it; the end has no drop-out: the tone lasts until
    10 ms of input time before the end (WSOLA places content a few ms early; the last window is flushed)."""
    x = tone(300.0, 2.0)
    st, parts, behind = StreamingTimeStretcher(SR, speed), [], []
    for i in range(0, x.size, 1920):
        parts.append(st.push(x[i:i + 1920]))
        allowed, got = round(min(i + 1920, x.size) / speed), sum(p.size for p in parts)
        assert got <= allowed
        behind.append(allowed - got)
    assert max(behind) * speed <= 0.125 * SR
    parts.append(st.finish())
    y = np.concatenate(parts)
    assert y.size == round(x.size / speed)
    end = y.size - int(0.01 * SR / speed)
    last = y[end - int(0.02 * SR):end]
    assert np.sqrt(np.mean(last**2)) > 0.8 * 0.3 / np.sqrt(2)  # full level up to there


def test_no_clicks_at_seams_at_any_speed():
    x = tone(180.0, 2.0) * (1 + 0.5 * np.sin(2 * np.pi * 3 * np.arange(2 * SR) / SR)).astype(np.float32) / 1.5
    steepest = 2 * np.pi * 180 / SR * np.abs(x).max()
    for speed in (0.25, 0.6, 1.25, 2.0, 4.0):
        a, _ = stream(x, speed, 1920)
        assert np.abs(np.diff(a)).max() <= 1.5 * steepest, speed


def test_filter_chain_refuses_pushes_after_finish_and_bad_filters():
    from qwen_tts_core.audio_fx import FilterChain

    ch = FilterChain(SR, [("volume", "volume=0.5")])
    y = ch.run(tone(seconds=0.1))
    np.testing.assert_allclose(y, tone(seconds=0.1) * 0.5, atol=1e-7)
    assert ch.finish().size == 0
    with pytest.raises(RuntimeError):
        ch.push(tone(seconds=0.1))
    with pytest.raises(Exception):  # noqa: B017 - FFmpeg's own error for an unknown filter
        FilterChain(SR, [("no_such_filter", "")])
