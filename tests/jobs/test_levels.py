"""jobs/levels.py figures on signals whose levels follow from first principles (a full-scale sine is -3.01 dB RMS
and reads -3.01 LUFS at 997 Hz; a 10 ms frame of a whole number of sine periods has mean square A^2 / 2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from jobs import levels
from tests.jobs import independent as ind

SR = 24000


def _sine(seconds, db_rms, sr=SR, hz=1000.0):
    """A sine whose RMS is db_rms dBFS (1 kHz: 24 samples a period at 24 kHz, every 10 ms frame the same)."""
    t = np.arange(int(round(seconds * sr))) / sr
    return (10 ** (db_rms / 20) * math.sqrt(2) * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def test_to_db_scales_amplitude_and_power_and_never_reads_below_the_floor():
    """20 log10 for amplitudes, 10 log10 for powers; zero, negative, NaN, inf and anything under -120 dB read -120."""
    assert levels.to_db(1.0) == 0.0
    assert levels.to_db(0.5) == pytest.approx(-6.0206, abs=1e-4)
    assert levels.to_db(0.5, power=True) == pytest.approx(-3.0103, abs=1e-4)
    assert levels.to_db(10.0) == pytest.approx(20.0)
    for v in (0.0, -1.0, math.nan, math.inf, 1e-7, 1e-13):
        assert levels.to_db(v) == -120.0 == levels.FLOOR_DB
    assert levels.to_db(1e-13, power=True) == -120.0 and levels.to_db(1e-11, power=True) == pytest.approx(-110.0)


def test_rms_and_peak_of_a_full_scale_sine():
    """A full-scale sine: RMS -3.01 dB, peak 0 dBFS; no samples or digital silence read the floor."""
    x = _sine(1.0, -3.0103)
    assert levels.rms_db(x) == pytest.approx(-3.0103, abs=1e-3)
    assert levels.peak_db(x) == pytest.approx(0.0, abs=1e-3)
    assert levels.peak_db(-x) == pytest.approx(0.0, abs=1e-3)   # |sample|: a negative peak counts
    for silent in (np.zeros(0, np.float32), np.zeros(1000, np.float32)):
        assert levels.rms_db(silent) == levels.peak_db(silent) == -120.0


def test_rms_is_over_the_whole_file_in_blocks():
    """The float64 sum of squares runs a block at a time; every block counts: half a file at 0.5 and half at zero
    (across the 2^20-sample block boundary) is 10 log10(0.125) = -9.03 dB."""
    n = 3 * (1 << 20) // 2
    x = np.zeros(n, np.float32)
    x[n // 2:] = 0.5
    assert levels.rms_db(x) == pytest.approx(10 * math.log10(0.125), abs=1e-3)
    x = np.zeros(n, np.float32)
    x[0] = x[1 << 20] = x[-1] = 1.0
    assert levels.rms_db(x) == pytest.approx(10 * math.log10(3 / n), abs=1e-6)


@pytest.mark.parametrize("sr", [8000, 24000, 48000])
def test_true_peak_finds_the_peak_between_samples(sr):
    """A sine at a quarter of the rate, 45 degrees off: every sample is at 0.707 (-3.01 dBFS), the wave itself
    peaks at 1.0 (0 dBTP) between them; empty audio reads the floor."""
    n = np.arange(sr)
    x = np.sin(2 * np.pi * n / 4 + np.pi / 4).astype(np.float32)
    assert levels.peak_db(x) == pytest.approx(-3.0103, abs=1e-3)
    assert levels.true_peak_dbtp(x, sr) == pytest.approx(0.0, abs=0.1)
    assert levels.true_peak_dbtp(x, sr, block_s=0.3) == pytest.approx(0.0, abs=0.1)   # peaks in every block
    assert levels.true_peak_dbtp(np.zeros(0, np.float32), sr) == -120.0


def test_integrated_loudness_of_a_997_hz_sine():
    """BS.1770: a 0 dBFS 997 Hz sine reads -3.01 LUFS, and -23 dB less reads -26.01; under 400 ms (one gating
    block) or all silence there is no figure."""
    sr = 48000
    assert levels.integrated_lufs(_sine(2.0, -3.0103, sr, 997.0), sr) == pytest.approx(-3.01, abs=0.05)
    assert levels.integrated_lufs(_sine(2.0, -26.0103, sr, 997.0), sr) == pytest.approx(-26.01, abs=0.05)
    assert levels.integrated_lufs(_sine(0.4, -3.0103, sr, 997.0), sr) == pytest.approx(-3.01, abs=0.1)
    assert levels.integrated_lufs(_sine(0.39, -3.0103, sr, 997.0), sr) is None
    assert levels.integrated_lufs(np.zeros(sr, np.float32), sr) is None


def test_frame_energies_are_whole_10_ms_frames():
    """Mean square per 10 ms frame (240 samples at 24 kHz); the trailing partial frame is dropped."""
    x = np.concatenate([np.full(240, 0.5), np.full(240, 0.1), np.full(200, 1.0)]).astype(np.float32)
    e, frame = levels.frame_energies(x, SR)
    assert frame == 240 and e.shape == (2,)
    np.testing.assert_allclose(e, [0.25, 0.01], rtol=1e-6)
    e, frame = levels.frame_energies(np.full(SR * 60, 0.5, np.float32), SR)   # several blocks of frames
    assert frame == 240 and e.shape == (6000,) and np.allclose(e, 0.25)


def test_noise_floor_is_the_quietest_half_second():
    """A 550 ms stretch at -80 dB between seconds at -20 dB: the floor is -80 (a 600 ms window would read about
    -32). Shorter than 500 ms: the whole file's RMS; shorter than one frame: the samples' RMS."""
    x = np.concatenate([_sine(1.0, -20.0), _sine(0.55, -80.0), _sine(1.0, -20.0)])
    assert levels.noise_floor_db(x, SR) == pytest.approx(-80.0, abs=0.05)
    assert levels.noise_floor_db(_sine(0.3, -30.0), SR) == pytest.approx(-30.0, abs=0.05)
    assert levels.noise_floor_db(np.full(100, 0.1, np.float32), SR) == pytest.approx(-20.0, abs=1e-3)


@pytest.mark.parametrize("room_db,speech_db,sound", [
    (-70.0, -53.0, True),    # threshold -70 + 15 = -55
    (-70.0, -57.0, False),
    (-120.0, -58.0, True),   # digital silence: threshold kept at -60
    (-120.0, -62.0, False),
])
def test_sound_is_15_db_over_the_floor_within_minus_60_dbfs(room_db, speech_db, sound):
    """head_s / tail_s: 1 s of room tone, 1 s of "speech", 1 s of room tone; the speech is sound when over the
    threshold (15 dB above the floor, at least -60 dBFS), and then head and tail are 1 s each."""
    room = _sine(1.0, room_db) if room_db > -120 else np.zeros(SR, np.float32)
    m = levels.measure(np.concatenate([room, _sine(1.0, speech_db), room]), SR)
    assert m.noise_floor_db == pytest.approx(room_db, abs=0.05)
    if sound:
        assert (m.head_s, m.tail_s) == (pytest.approx(1.0, abs=0.011), pytest.approx(1.0, abs=0.011))
        assert m.head_rms_db == pytest.approx(room_db, abs=0.1) and m.tail_rms_db == pytest.approx(room_db, abs=0.1)
    else:
        assert (m.head_s, m.tail_s) == (3.0, 0.0)


def test_a_loud_floor_keeps_the_threshold_at_minus_35_dbfs():
    """With no quiet stretch (floor -45 dB), sound is over -35 dBFS, not 15 dB over the floor: a second at -37 dB
    is not sound, the second at -33 dB after it is."""
    x = np.concatenate([_sine(1.0, -45.0), _sine(1.0, -37.0), _sine(1.0, -33.0), _sine(1.0, -45.0)])
    m = levels.measure(x, SR)
    assert m.head_s == pytest.approx(2.0, abs=0.011) and m.tail_s == pytest.approx(1.0, abs=0.011)
    assert levels.sound_bounds(x, SR) == (pytest.approx(2 * SR, abs=240), pytest.approx(3 * SR, abs=240))


def test_measure_of_digital_silence_and_of_nothing():
    """No sound at all: the head is the whole file, the tail zero, both at the floor; no samples: zero seconds."""
    m = levels.measure(np.zeros(SR, np.float32), SR)
    assert (m.duration_s, m.head_s, m.tail_s, m.head_rms_db, m.tail_rms_db) == (1.0, 1.0, 0.0, -120.0, -120.0)
    assert m.lufs is None and m.speech_level_db is None and m.activity is None
    m = levels.measure(np.zeros(0, np.float32), SR, speech_level=True)
    assert (m.duration_s, m.head_s, m.tail_s, m.rms_db, m.speech_level_db, m.activity) == (0.0, 0.0, 0.0, -120.0,
                                                                                           None, 0.0)
    assert levels.sound_bounds(np.zeros(100, np.float32), SR) is None


def test_measurements_round_to_three_decimals():
    """to_dict: floats to 3 decimals (manifest and JSON), other values as they are."""
    m = levels.measure(_sine(1.0, -20.0), SR, speech_level=True)
    d = m.to_dict()
    assert d["rms_db"] == round(m.rms_db, 3) == pytest.approx(-20.0, abs=1e-3) and d["sample_rate"] == SR
    assert d["head_s"] == 0.0 and isinstance(d["speech_level_db"], float)


def _bursts(sr=8000):
    """Ten 100 ms bursts of a 440 Hz sine at 0.3, each followed by 500 ms of digital silence."""
    t = np.arange(int(0.1 * sr)) / sr
    one = np.concatenate([0.3 * np.sin(2 * np.pi * 440 * t), np.zeros(int(0.5 * sr))])
    return np.tile(one, 10)


@pytest.mark.parametrize("sr", [8000, 16000])
def test_active_speech_level_of_bursts_matches_the_literal_p56(sr):
    """Bursts in silence, where the activity (envelope time constant 30 ms, hangover 200 ms) decides the level:
    levels.py agrees with the per-sample P.56 method B reference to 0.05 dB; the activity is the share of the
    energy's samples the level implies (level = energy / active samples)."""
    x = _bursts(sr)
    level, activity = levels.active_speech_level(x, sr)
    assert level == pytest.approx(ind.p56_level_db(x, sr), abs=0.05)
    implied = float(np.sum(x * x)) / (x.size * 10 ** (level / 10))
    assert activity == pytest.approx(implied, rel=0.01) and 0.3 < activity < 0.7


def test_active_speech_level_of_a_steady_sine_is_its_rms():
    """A steady sine is active throughout, bar the envelope's first rise (tens of ms of 10 s): its level is its RMS
    (-3.01 dB at full scale minus 10 dB)."""
    level, activity = levels.active_speech_level(_sine(10.0, -13.0103, 8000, 440.0), 8000)
    assert level == pytest.approx(-13.01, abs=0.02) and activity == pytest.approx(1.0, abs=0.005)


def test_a_sine_below_the_first_thresholds_margin_is_measured_at_that_threshold():
    """A steady sine at -110 dBFS RMS: at the quietest threshold (-120 dB) its active level is already within the
    15.9 dB margin, so the level is that threshold's: the sine's RMS, active nearly throughout."""
    level, activity = levels.active_speech_level(_sine(2.0, -110.0, 16000), 16000)
    assert level == pytest.approx(-110.0, abs=0.2) and activity > 0.95


def test_a_lone_click_is_active_for_its_hangover_and_measured_over_it():
    """One sample in 2 s of silence: the twice-smoothed envelope stays far under the click's energy per active
    sample, so no threshold meets the margin and the loudest one the envelope reaches gives the level: active for
    about the 200 ms hangover (0.1 of the file, a little more while the envelope is over it), and the click's energy
    over those samples; half the amplitude reads about 6 dB less."""
    x = np.zeros(32000)
    x[8000] = 1.0
    level, activity = levels.active_speech_level(x, 16000)
    assert 0.100 <= activity <= 0.115, activity
    assert level == pytest.approx(10 * math.log10(1.0 / (activity * x.size)), abs=0.01)
    half, half_activity = levels.active_speech_level(x * 0.5, 16000)   # a quarter of the energy, nearly as long
    assert half == pytest.approx(10 * math.log10(0.25 / (half_activity * x.size)), abs=0.01)
    assert half_activity == pytest.approx(activity, abs=1e-3) and half == pytest.approx(level - 6.02, abs=0.05)


def test_true_peak_at_8_khz_oversamples_past_x4():
    """At 8 kHz the oversampling reaches 176.4 kHz (x24, not the x4 enough at 44.1/48 kHz): a band-limited pulse of
    amplitude 0.5 peaking 1/8 sample after a sample reads 20 log10(0.5) = -6.02 dBTP; x4 would see only the samples'
    -6.16 dB (both neighbours on its grid are 1/8 sample from the peak)."""
    n = np.arange(-2000, 2001)
    x = (0.5 * np.sinc(0.8 * (n - 0.125)) * np.kaiser(n.size, 8)).astype(np.float32)   # up to 0.8 x Nyquist
    assert levels.peak_db(x) < -6.1
    assert levels.true_peak_dbtp(x, 8000) == pytest.approx(20 * math.log10(0.5), abs=0.02)


def test_true_peak_does_not_depend_on_the_block_size():
    """block_s only bounds memory: the figure is the whole file's, whether the peak is in the first block of several
    (0.3 s blocks: the file's last blocks are 40 dB quieter) or the blocks are so short (8 samples) that the resampler
    has no output yet for the first ones, or the file ends exactly at a block's end."""
    n = np.arange(16000)
    x = np.sin(2 * np.pi * n / 4 + np.pi / 4).astype(np.float32)   # true peak 0 dBTP, as above
    x[4000:] *= 0.01
    for block_s in (10.0, 0.3, 0.001):
        assert levels.true_peak_dbtp(x, 8000, block_s=block_s) == pytest.approx(0.0, abs=0.1), block_s
    end = np.zeros(16000, np.float32)   # four whole 0.5 s blocks, the loud part in the last 2 ms: the last block
    end[-16:] = x[:16]                  # must flush what the resampler still holds
    assert levels.true_peak_dbtp(end, 8000, block_s=0.5) == pytest.approx(levels.true_peak_dbtp(end, 8000), abs=0.01)
    # and the end counts as much as the start: the same file backwards reads the same (over the burst's -3 dB samples)
    assert levels.true_peak_dbtp(end, 8000) == pytest.approx(levels.true_peak_dbtp(end[::-1].copy(), 8000), abs=0.05)
    assert levels.true_peak_dbtp(end, 8000) > levels.peak_db(end) + 2


def test_sound_bounds_default_to_the_files_own_noise_floor():
    """sound_bounds without a floor (as mastering calls it) measures the file's floor, as measure does: speech at
    -53 dB over -70 dB room tone is sound (threshold -55), not held to the -35 dBFS cap."""
    room = _sine(1.0, -70.0)
    x = np.concatenate([room, _sine(1.0, -53.0), room])
    assert levels.sound_bounds(x, SR) == (pytest.approx(SR, abs=240), pytest.approx(2 * SR, abs=240))


def test_one_frame_of_sound_is_sound():
    """15 ms at -20 dB: one whole 10 ms frame (the 5 ms after it is a partial frame, dropped) and no quiet stretch, so
    the threshold is -35 dBFS and the frame is sound: no head, a 5 ms tail."""
    x = _sine(0.015, -20.0)
    assert levels.sound_bounds(x, SR) == (0, 240)
    m = levels.measure(x, SR)
    assert (m.head_s, m.tail_s) == (0.0, pytest.approx(0.005))


def test_active_speech_level_follows_the_gain_between_thresholds():
    """The level is interpolated between the two thresholds (0.25 dB apart) around the 15.9 dB margin, so it scales
    with the gain: a fading tone (amplitude ~ 1/t^0.8, so its active level depends on the threshold) raised in
    0.05 dB steps across one threshold step reads 0.05 dB more each step, not a staircase."""
    sr = 8000
    t = np.arange(10 * sr) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t) * ((t + 0.05) / 0.05) ** -0.8
    rel = []
    for k in range(6):
        y = x * 10 ** (k * 0.05 / 20)
        level, activity = levels.active_speech_level(y, sr)
        rel.append(level - k * 0.05)
        # and the activity is the share of samples that level implies (level = energy / active samples)
        assert activity == pytest.approx(float(np.sum(y * y)) / (y.size * 10 ** (level / 10)), rel=2e-3), k
    assert max(rel) - min(rel) < 0.01, rel


def test_one_full_scale_sample_is_not_silence_for_p56():
    """A single full-scale sample at 8 kHz: its twice-smoothed envelope, (1 - e^(-1/240))^2 = -95 dB, is over the
    -120 dB threshold, so it is active speech (not the (None, 0.0) of silence): one active sample out of one, at
    that sample's power, 0 dB."""
    level, activity = levels.active_speech_level(np.ones(1), 8000)
    assert activity == 1.0 and level == pytest.approx(0.0, abs=1e-9)


def test_a_quiet_stretch_under_500_ms_is_not_the_floor():
    """The floor is the quietest 500 ms: 450 ms at -80 dB between seconds at -20 dB has no quiet 500 ms window; the
    quietest one holds the 450 ms and 50 ms of the -20 dB tone: 10 log10((0.45e-8 + 0.05e-2) / 0.5) = -30.0 dB."""
    x = np.concatenate([_sine(1.0, -20.0), _sine(0.45, -80.0), _sine(1.0, -20.0)])
    expected = 10 * math.log10((0.45 * 1e-8 + 0.05 * 1e-2) / 0.5)
    assert levels.noise_floor_db(x, SR) == pytest.approx(expected, abs=0.05)


def test_activity_is_a_share_of_the_samples():
    """activity is 0..1 on every path: a sine within the margin at the first threshold (as above), active nearly
    throughout, reads just under 1, not more."""
    level, activity = levels.active_speech_level(_sine(2.0, -110.0, 16000), 16000)
    assert 0.95 < activity <= 1.0


def test_the_hangover_follows_the_envelope_never_precedes_it():
    """P.56 counts a sample active when the envelope reached the threshold within the last 200 ms: a click on the
    file's last sample has no samples after it, so it alone is active (1 of 32000) at its own power, 0 dB."""
    x = np.zeros(32000)
    x[-1] = 1.0
    level, activity = levels.active_speech_level(x, 16000)
    assert activity == 1 / 32000 and level == pytest.approx(0.0, abs=1e-9)


def test_to_dict_rounds_every_float_to_three_decimals():
    """to_dict is what the manifest and the JSON report carry: 3 decimals (a -12.34567 dB sine reads -12.346)."""
    m = levels.measure(_sine(1.0, -12.34567), SR, speech_level=True)
    d = m.to_dict()
    assert d["rms_db"] == pytest.approx(-12.346, abs=1e-9)
    for k, v in d.items():
        assert not isinstance(v, float) or v == round(getattr(m, k), 3), k


def test_head_rms_covers_exactly_the_head():
    """Digital silence then a tone from its first sample on (a cosine: full amplitude at once): the head is the
    silence, to the frame, and reads -120, none of the tone in it; likewise the silent tail after it. A tick of
    0.001 (not sound: its frame is at -84 dB) on the head's last or the tail's first sample is in the head's or the
    tail's RMS: 10 log10(1e-6 / 24000) = -103.8 dB."""
    t = np.arange(SR) / SR
    tone = (0.1 * np.cos(2 * np.pi * 1000 * t)).astype(np.float32)
    x = np.concatenate([np.zeros(SR, np.float32), tone, np.zeros(SR, np.float32)])
    m = levels.measure(x, SR)
    assert (m.head_s, m.tail_s) == (1.0, 1.0)
    assert m.head_rms_db == m.tail_rms_db == -120.0
    x[SR - 1] = x[2 * SR] = 0.001
    m = levels.measure(x, SR)
    assert (m.head_s, m.tail_s) == (1.0, 1.0)
    assert m.head_rms_db == m.tail_rms_db == pytest.approx(10 * math.log10(1e-6 / SR), abs=1e-3)


def test_the_last_sample_of_a_block_counts():
    """The sums of squares run 2^20 samples a block: the last sample of the first block counts like any other."""
    x = np.zeros(3 * (1 << 20) // 2, np.float32)
    x[(1 << 20) - 1] = 1.0
    assert levels.rms_db(x) == pytest.approx(10 * math.log10(1 / x.size), abs=1e-6)


def test_at_the_first_threshold_every_sample_over_it_is_active():
    """Within the margin already at the quietest threshold (-120 dB), the level is that threshold's: a second at
    -110 dB RMS, then a second whose envelope (mean |x|) is -119.8 dB, over the threshold: both seconds are active
    (bar the envelope's edges), and the level is the power over the active samples."""
    sr = 16000
    t = np.arange(sr) / sr
    quiet = 10 ** (-119.8 / 20) * (math.pi / 2) * np.sin(2 * np.pi * 1000 * t)   # mean |x| = amplitude * 2 / pi
    x = np.concatenate([10 ** (-110 / 20) * math.sqrt(2) * np.sin(2 * np.pi * 1000 * t), quiet])
    level, activity = levels.active_speech_level(x, sr)
    assert activity > 0.95
    assert level == pytest.approx(levels.rms_db(x) - 10 * math.log10(activity), abs=0.01)
