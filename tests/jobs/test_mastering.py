"""Mastering presets on real job output, every rule measured again here with independent code (tests/jobs/independent.py:
libsndfile decoding, scipy resampling, BS.1770-4 and P.56 written from the standards, MP3 frame headers)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from jobs import catalog, deliver, levels, mastering, narrate
from jobs.manifest import from_parquet
from tests.jobs import independent as ind

ENGINE = ["--backend", "engine", "--runner", "local", "--max-new-tokens", "16", "--retry-on", "guard",
          "--no-progress", "--quiet"]
NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet"]


def manifest(out, name="manifest.parquet"):
    return {r.id: r for r in from_parquet((out / name).read_bytes())}


def summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def acx_book(tiny_ckpt, tmp_path_factory):
    """Two chapters through the real engine (tiny random checkpoint), mastered for ACX, with captions."""
    root = tmp_path_factory.mktemp("acx")
    (root / "book").mkdir()
    (root / "book" / "01-one.txt").write_text("The first chapter starts. It goes on a little.")
    (root / "book" / "02-two.md").write_text("# Two\n\nShort second chapter here.")
    code = narrate.main([str(root / "book"), "--model", tiny_ckpt, "--voice", "vivian", "--out",
                         str(root / "out"), *ENGINE, "--master", "acx", "--captions"])
    return code, root / "out"


def test_acx_rules_hold_on_the_decoded_mp3(acx_book):
    code, out = acx_book
    assert code == 0
    rows = manifest(out)
    assert set(rows) == {"01-one", "02-two"}
    levels_seen = []
    for rec in rows.values():
        data = (out / rec.key).read_bytes()
        assert rec.key.endswith(".mp3") and rec.master == "acx" and rec.format == "mp3-192"
        frames = ind.mp3_frames(data)
        assert len(frames) > 10 and {f["kbps"] for f in frames} == {192}  # constant 192 kbit/s
        assert all(f["rate"] == 44100 and f["mono"] for f in frames)
        x, sr, channels = ind.read(data)
        assert (sr, channels) == (44100, 1)
        rms, peak = ind.rms_db(x), ind.peak_db(x)
        assert -23.0 <= rms <= -18.0 and abs(rms - (-20.0)) < 1.0
        assert peak <= -3.0  # on the decoded MP3
        fdb = ind.frame_db(x, sr)
        loud = np.flatnonzero(fdb > -40)
        head, tail = loud[0] * 0.01, len(x) / sr - (loud[-1] + 1) * 0.01
        assert 0.5 <= head <= 1.0 and 1.0 <= tail <= 5.0
        room = np.concatenate([x[: int(0.45 * sr)], x[-int(0.9 * sr):]])
        assert -90.0 < ind.rms_db(room) <= -60.0  # room tone: quiet, but not digital silence
        assert np.count_nonzero(room) > 0.9 * room.size
        # the manifest's figures are the file's
        assert rec.rms_db == pytest.approx(rms, abs=0.3) and rec.peak_db == pytest.approx(peak, abs=0.3)
        assert rec.head_s == pytest.approx(head, abs=0.05) and rec.tail_s == pytest.approx(tail, abs=0.05)
        assert rec.noise_floor_db <= -60 and rec.duration_s == pytest.approx(len(x) / sr, abs=0.01)
        rules = json.loads(rec.rules)
        assert set(rules) >= {"rms", "peak", "noise_floor", "head", "tail", "room_tone", "max_duration", "format",
                              "consistent_level"}
        assert all(rules.values()) and rec.status == "ok" and not rec.flags
        levels_seen.append(rms)
    assert max(levels_seen) - min(levels_seen) <= 1.0  # consistent across chapters


@pytest.mark.parametrize("codec,rate", [("mp3", 44100), ("opus", 48000)])
def test_podcast_loudness_and_true_peak(tiny_ckpt, tmp_path, codec, rate):
    rows = tmp_path / "ep.jsonl"
    rows.write_text(json.dumps({"id": "ep1", "text": "Welcome to the show. Today we talk.", "voice": "ryan"}))
    assert narrate.main([str(rows), "--model", tiny_ckpt, "--out", str(tmp_path / "out"), *ENGINE,
                         "--master", "podcast", "--codec", codec]) == 0
    rec = manifest(tmp_path / "out")["ep1"]
    x, sr, channels = ind.read((tmp_path / "out" / rec.key).read_bytes())
    assert (sr, channels) == (rate, 1) and rec.key.endswith(".mp3" if codec == "mp3" else ".opus")
    loud = ind.lufs(x, sr)
    assert abs(loud - (-19.0)) <= 1.0, loud
    assert ind.true_peak_dbtp(x, sr) <= -1.0
    assert rec.lufs == pytest.approx(loud, abs=0.3) and all(json.loads(rec.rules).values())


def test_telephony_ulaw_active_speech_level_and_tail(tiny_ckpt, tmp_path):
    cat = tmp_path / "ivr.csv"
    cat.write_text("id,text,voice\nwelcome,Welcome to our line.,ryan\nmenu,Press one for sales.,ryan\n")
    out = tmp_path / "out"
    assert catalog.main([str(cat), "--model", tiny_ckpt, "--out", str(out), *ENGINE, "--master", "telephony",
                         "--codec", "ulaw", "--tail-silence", "0.5"]) == 0
    for rec in manifest(out, "catalog-manifest.parquet").values():
        data = (out / rec.key).read_bytes()
        info = sf.info((out / rec.key).as_posix())
        assert (info.samplerate, info.channels, info.subtype) == (8000, 1, "ULAW")
        x, sr, _ = ind.read(data)
        level = ind.dbm0(ind.p56_level_db(x, sr), "ulaw")
        assert -20.0 <= level <= -18.0, level
        assert rec.speech_level_dbm0 == pytest.approx(level, abs=0.3)
        trailing = x[-int(0.5 * sr):]
        assert np.max(np.abs(trailing)) < 1e-3  # the configured trailing silence
        assert all(json.loads(rec.rules).values()) and rec.status == "ok"


@pytest.mark.parametrize("codec,law,rate,subtype", [("alaw", "alaw", 8000, "ALAW"), ("sln", "linear", 8000, "PCM_16"),
                                                    ("sln16", "linear", 16000, "PCM_16")])
def test_telephony_other_codecs(tmp_path, codec, law, rate, subtype):
    cat = tmp_path / "ivr.yaml"
    cat.write_text("prompts:\n  - {id: a, text: 'Thank you for calling our office today.', voice: ryan}\n")
    out = tmp_path / "out"
    assert catalog.main([str(cat), "--out", str(out), *NOISE, "--master", "telephony", "--codec", codec]) == 0
    rec = manifest(out, "catalog-manifest.parquet")["a"]
    info = sf.info((out / rec.key).as_posix())
    assert (info.samplerate, info.subtype) == (rate, subtype)
    x, sr, _ = ind.read((out / rec.key).read_bytes())
    assert -20.0 <= ind.dbm0(ind.p56_level_db(x, sr), law) <= -18.0


def test_peaks_encoding_raises_are_brought_back_under_the_acx_limit():
    """A click at full scale in otherwise quiet speech: the limiter and the decoded-MP3 check keep it <= -3 dB."""
    rng = np.random.default_rng(1)
    x = (0.02 * rng.standard_normal(24000 * 6)).astype(np.float32)
    x[30000:30010] = 0.99
    x[70000] = -1.0
    res = mastering.master(x, 24000, mastering.MasterConfig("acx"))
    y, _, _ = ind.read(res.data)
    assert ind.peak_db(y) <= -3.0 and -23 <= ind.rms_db(y) <= -18 and not res.failed


def test_rules_flag_what_breaks_them():
    """Each rule fails on figures that break it (synthetic audio; a 2-hour chapter is not synthesized)."""
    sr = 44100
    rng = np.random.default_rng(0)
    x = np.concatenate([1e-4 * rng.standard_normal(int(0.7 * sr)), 0.1 * rng.standard_normal(3 * sr),
                        1e-4 * rng.standard_normal(2 * sr)]).astype(np.float32)
    m = levels.measure(x, sr)
    acx = mastering.MasterConfig("acx")
    ok = mastering.check_rules(acx, m, bit_rate=192_000)
    assert all(ok.values()), ok
    broken = {
        "max_duration": replace(m, duration_s=121 * 60),
        "peak": replace(m, peak_db=-2.5),
        "rms": replace(m, rms_db=-24.0),
        "noise_floor": replace(m, noise_floor_db=-55.0),
        "head": replace(m, head_s=0.2),
        "tail": replace(m, tail_s=6.0),
        "room_tone": replace(m, head_rms_db=levels.FLOOR_DB),
    }
    for rule, figures in broken.items():
        verdict = mastering.check_rules(acx, figures, bit_rate=192_000)
        assert [k for k, v in verdict.items() if not v] == [rule]
    assert not mastering.check_rules(acx, m, bit_rate=128_000)["format"]
    pod = mastering.MasterConfig("podcast")
    assert not mastering.check_rules(pod, replace(m, lufs=-16.0))["loudness"]
    assert not mastering.check_rules(pod, replace(m, true_peak_dbtp=-0.5))["true_peak"]
    tel = mastering.MasterConfig("telephony")
    assert not mastering.check_rules(tel, m, level_dbm0=-21.0)["speech_level"]
    assert mastering.flag_names("acx", {"peak": False, "rms": True}) == ["acx:peak"]
    assert mastering.check_consistency({"a": -20.0, "b": -20.4, "c": -22.0}) == {"a": True, "b": True, "c": False}


def test_over_long_chapter_is_flagged_and_nothing_else_is_lost(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(mastering.ACX, "max_minutes", 8 / 60)  # 8 s stands in for ACX's 120 minutes
    rows = tmp_path / "book.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "short", "text": "A chapter of an ordinary length, well within the limit.", "voice": "ryan"},
        {"id": "long", "text": "A LONGER chapter that runs past the limit.", "voice": "ryan"},
        {"id": "silent", "text": "SILENT chapter.", "voice": "ryan"},
    ]))
    out = tmp_path / "out"
    assert narrate.main([str(rows), "--out", str(out), *NOISE, "--master", "acx"]) == 0
    s = summary(capsys)
    man = manifest(out)
    assert man["short"].status == "ok" and not man["short"].flags
    assert man["long"].status == "suspect" and "acx:max_duration" in man["long"].flags
    assert json.loads(man["long"].rules)["max_duration"] is False
    assert man["silent"].status == "suspect" and "silent" in man["silent"].flags  # flagged, never silently shipped
    assert all((out / r.key).is_file() for r in man.values())  # every file delivered, flagged ones too
    assert s["ok"] == 1 and s["suspect"] == 2 and s["failed"] == 0


def test_a_row_that_cannot_be_mastered_fails_alone(tmp_path, monkeypatch):
    real = mastering.master

    def fragile(pcm, sr, cfg):
        if pcm.size > 24000 * 1.8:
            raise RuntimeError("encoder exploded")
        return real(pcm, sr, cfg)

    monkeypatch.setattr(deliver.mastering, "master", fragile)
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"id": "a", "text": "A short line to say.", "voice": "ryan"}) + "\n" +
                    json.dumps({"id": "b", "text": "This one is long enough to break the encoder.", "voice": "ryan"}))
    out = tmp_path / "out"
    assert narrate.main([str(rows), "--out", str(out), *NOISE, "--master", "podcast"]) == 1
    man = manifest(out)
    assert man["a"].status == "ok" and (out / man["a"].key).is_file()
    assert man["b"].status == "failed" and "encoder exploded" in man["b"].error
    assert not (out / man["b"].key).exists()


def test_preset_is_in_the_content_key(tmp_path):
    ch = tmp_path / "ch.txt"
    ch.write_text("One sentence only.")
    out = tmp_path / "out"

    def run(*extra):
        assert narrate.main([str(ch), "--out", str(out), *NOISE, "--voice", "ryan", *extra]) == 0
        return manifest(out)["ch"]

    plain = run()
    acx = run("--master", "acx")
    again = run("--master", "acx")
    pod = run("--master", "podcast")
    tel = run("--master", "telephony", "--tail-silence", "1.0")
    tel2 = run("--master", "telephony", "--tail-silence", "0.5")
    assert len({plain.key, acx.key, pod.key, tel.key, tel2.key}) == 5
    assert again.key == acx.key and again.reused and not acx.reused
    assert plain.key.endswith(".wav") and plain.master == "none" and plain.rms_db is not None
    assert json.loads(acx.params)["master"] == {"preset": "acx", "codec": "mp3"}


@pytest.mark.parametrize("args,message", [
    (["--master", "loud"], "invalid choice: 'loud'"),
    (["--master", "acx", "--codec", "flac"], "codec for master 'acx' must be one of ['mp3']"),
    (["--master", "telephony", "--codec", "gsm"], "codec for master 'telephony' must be one of"),
    (["--codec", "ulaw"], "codec for master 'none' must be left unset"),
    (["--master", "acx", "--tail-silence", "1"], "tail_silence: only the telephony preset"),
    (["--master", "telephony", "--tail-silence", "-1"], "tail_silence must be between 0 and 10"),
    (["--speed", "5"], "speed: must be between 0.25 and 4.0"),
    (["--speed", "0"], "speed: must be between 0.25 and 4.0"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, args, message):
    ch = tmp_path / "ch.txt"
    ch.write_text("Hello.")
    try:
        code = narrate.main([str(ch), "--out", str(tmp_path / "out"), *NOISE, *args])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_unknown_preset_in_a_config_file(tmp_path, capsys):
    conf = tmp_path / "c.yaml"
    conf.write_text("master: broadcast\n")
    ch = tmp_path / "ch.txt"
    ch.write_text("Hello.")
    assert narrate.main([str(ch), "--config", str(conf), "--out", str(tmp_path / "o"), *NOISE]) == 2
    assert "master must be one of ['none', 'acx', 'podcast', 'telephony'], got 'broadcast'" in capsys.readouterr().err


def test_speed_scales_duration_keeps_pitch_and_changes_the_key(tmp_path):
    from tests.jobs.media_fakes import TONE_HZ

    ch = tmp_path / "ch.txt"
    ch.write_text("One sentence of some length for timing.")
    tone = ["--model", "fake", "--backend", "tests.jobs.media_fakes:ToneBackend", "--runner", "local",
            "--no-progress", "--quiet", "--voice", "ryan"]
    recs = {}
    for speed in ("1", "2", "0.5"):
        out = tmp_path / f"out{speed}"
        assert narrate.main([str(ch), "--out", str(out), *tone, "--speed", speed]) == 0
        rec = manifest(out)["ch"]
        x, sr, _ = ind.read((out / rec.key).read_bytes())
        recs[float(speed)] = (rec, len(x) / sr, ind.dominant_hz(x[len(x) // 8: -len(x) // 8], sr))
    base = recs[1.0][1]
    for speed, (rec, dur, hz) in recs.items():
        assert dur == pytest.approx(base / speed, rel=0.02)
        assert hz == pytest.approx(TONE_HZ, rel=0.02)
        assert rec.speed == speed
    assert len({r[0].key for r in recs.values()}) == 3


SR24 = 24000


def _finish(pcm: np.ndarray, text: str, cfg, rec=None) -> SimpleNamespace:
    """deliver.finish_audio on one chunk of 24 kHz audio saying `text`, written as WAV; returns the record."""
    rec = rec if rec is not None else SimpleNamespace(key="k.wav", flags=[])
    deliver.finish_audio(SimpleNamespace(text=text, sample_rate=SR24, format="wav"), rec, [pcm], SR24, cfg, [text])
    return rec


@pytest.mark.parametrize("speed,text_chars,flag", [
    (4.0, 30, None),             # 30 letters in 0.25 s: 120/s, under 160/s: plain fast speech
    (4.0, 45, "too_short"),      # 45 letters in 0.25 s: 180/s, over 160/s
    (0.25, 2, None),             # 2 letters in 4 s: 0.5/s, at 2 x 0.25 = 0.5/s: plain slow speech
    (0.25, 1, "too_long"),       # 1 letter in 4 s: 0.25/s, under 0.5/s
    (1.2, 38, None),             # 38 letters in 0.83 s: 45.6/s, under 48/s (over the unscaled 40/s)
])
def test_the_speech_rate_limits_follow_the_speed(speed, text_chars, flag):
    """Speed 4 says four times the characters a second, 0.25 a quarter: the too_short / too_long limits (2 and 40
    characters a second) scale with it, measured on the stretched audio."""
    from jobs.render import RenderConfig

    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(SR24) / SR24)).astype(np.float32)   # 1 s before the stretch
    rec = _finish(tone, "a" * text_chars, RenderConfig(model="fake", speed=speed))
    assert rec.duration_s == pytest.approx(1 / speed, rel=0.02)
    rate_flags = [f for f in rec.flags if f in ("too_short", "too_long")]
    assert rate_flags == ([flag] if flag else []), (speed, text_chars, rec.flags)


def test_dbm0_follows_g711():
    """A full-scale sine is +3.17 dBm0 in u-law, +3.14 dBm0 in A-law."""
    full_scale_sine_db = 20 * math.log10(1 / math.sqrt(2))
    assert mastering.dbm0(full_scale_sine_db, "ulaw") == pytest.approx(3.17, abs=1e-3)
    assert mastering.dbm0(full_scale_sine_db, "alaw") == pytest.approx(3.14, abs=1e-3)


def test_active_speech_level_on_speech_like_audio():
    """Speech-like audio (peaks far above the level, pauses): P.56 from levels.py agrees with the literal reference,
    and a telephony master lands at -19 dBm0 measured by the reference on the decoded file."""
    from tests.jobs.media_fakes import speechlike

    x = speechlike(8, 8000)
    level, activity = levels.active_speech_level(x, 8000)
    assert level == pytest.approx(ind.p56_level_db(x.astype(np.float64), 8000), abs=0.2)
    assert 0.6 < activity < 1.0 and level > ind.rms_db(x.astype(np.float64)) - 0.1  # pauses do not count
    res = mastering.master(speechlike(8), 24000, mastering.MasterConfig("telephony", "alaw"))
    y, sr, _ = ind.read(res.data)
    assert -20.0 <= ind.dbm0(ind.p56_level_db(y, sr), "alaw") <= -18.0 and not res.failed


class QuietBackend:
    """-140 dBFS noise: below every P.56 threshold, as a model that "says" nothing may return."""

    def synthesize(self, jobs):
        from jobs.synth import ChunkResult

        rng = np.random.default_rng(0)
        return [ChunkResult((1e-7 * rng.standard_normal(48000)).astype(np.float32), "eos") for _ in jobs]


def test_near_silent_audio_is_silence_for_p56_and_a_flagged_telephony_row(tmp_path):
    """An envelope below every P.56 threshold (near-silent audio, or a few samples) raised IndexError, so a quiet
    row failed under --master telephony while the other presets delivered it flagged `silent`."""
    from jobs.inputs import Utterance
    from jobs.render import RenderConfig, render_rows
    from jobs.storage import LocalSink

    quiet = (1e-7 * np.random.default_rng(0).standard_normal(48000)).astype(np.float32)
    assert levels.active_speech_level(quiet, 24000) == (None, 0.0)
    two = (0.1 * np.random.default_rng(0).standard_normal(2)).astype(np.float32)  # a 2-sample chunk
    res = mastering.master(two, 24000, mastering.MasterConfig("telephony", "ulaw"))
    assert res.rules["speech_level"] is False and res.speech_level_dbm0 is None
    sink = LocalSink(str(tmp_path))
    cfg = RenderConfig(model="fake", master=mastering.MasterConfig("telephony"))
    rec = render_rows([Utterance(id="p1", text="Please hold.", voice="ryan")], QuietBackend(), sink, cfg)[0]
    assert rec.status == "suspect" and rec.error is None, rec.error
    assert "silent" in rec.flags and "telephony:speech_level" in rec.flags and rec.speech_level_dbm0 is None
    assert (tmp_path / rec.key).is_file()


def test_render_config_survives_the_trip_to_ray_workers(tmp_path):
    """runner.RenderWorker rebuilds the config from asdict(): preset, lexicon and speed come back intact."""
    import pickle
    from dataclasses import asdict

    from jobs.inputs import Utterance
    from jobs.lexicon import load
    from jobs.quality import QualityConfig
    from jobs.render import RenderConfig, plan_key

    lx = tmp_path / "l.csv"
    lx.write_text("word,respelling,case\nSQL,sequel,\nnginx,engine x,ignore\n")
    cfg = RenderConfig(model="m", master=mastering.MasterConfig("telephony", "alaw", 0.7), speed=1.25,
                       lexicon=load(lx), captions=True)
    raw = pickle.loads(pickle.dumps(asdict(cfg)))
    back = RenderConfig(**dict(raw, quality=QualityConfig(**raw["quality"])))
    assert back == cfg
    row = Utterance(id="r", text="Use SQL with NGINX.")
    assert plan_key(row, back) == plan_key(row, cfg)
    assert back.lexicon.apply(row.text)[0] == "Use sequel with engine x."


def _hostile(sr: int = 44100, seconds: float = 1.0) -> dict[str, np.ndarray]:
    n = int(sr * seconds)
    t = np.arange(n) / sr
    rng = np.random.default_rng(3)
    return {k: v.astype(np.float32) for k, v in {
        "noise": (0.5 * rng.standard_normal(n)).clip(-1, 1),          # dense, full band, crest factor ~ 6 dB
        "square": np.sign(np.sin(2 * np.pi * 100 * t)),
        "sine_between_samples": np.sin(2 * np.pi * sr / 4 * t + np.pi / 4),  # samples at -3 dB, true peak 0 dBTP
        "near_nyquist": np.sin(2 * np.pi * 19000 * t),
        "impulses": np.where(np.arange(n) % 4410 == 0, 1.0, 0.0),
        "dc_offset": 0.6 + 0.4 * np.sin(2 * np.pi * 300 * t),
    }.items()}


@pytest.mark.parametrize("name", list(_hostile()))
def test_limiter_holds_its_ceiling_on_hostile_audio(name):
    """The limiter (FFmpeg's alimiter, oversampled x4 for true peak) against what breaks limiters: sample peaks never
    over the ceiling; in true-peak mode the independent BS.1770 meter (scipy, not soxr) sees none over it either;
    the output is as long as the input."""
    x = _hostile()[name]
    for ceiling in (-4.0, -1.0):
        y = mastering._limit(x, 44100, ceiling).astype(np.float64)
        assert y.size == x.size and ind.peak_db(y) <= ceiling + 1e-4
        y = mastering._limit(x, 44100, ceiling, true_peak=True).astype(np.float64)
        assert y.size == x.size and ind.true_peak_dbtp(y, 44100) <= ceiling + 0.02


def test_limiter_is_transparent_and_in_time_below_its_ceiling():
    """Audio under the ceiling comes out unchanged (alimiter itself passes it bit for bit, which is why `_limit`
    may skip it); a loud burst in quiet audio is limited where it is, not before or after, in both modes."""
    rng = np.random.default_rng(0)
    sr = 44100
    quiet = np.convolve(rng.standard_normal(sr), np.hanning(9) / 4.5, "same").astype(np.float32) * 0.1  # < 10 kHz
    np.testing.assert_array_equal(mastering._alimiter(quiet, sr, -1.0), quiet)
    np.testing.assert_array_equal(mastering._limit(quiet, sr, -1.0), quiet)
    np.testing.assert_array_equal(mastering._limit(quiet, sr, -1.0, true_peak=True), quiet)
    x = quiet.copy()
    x[20000:20441] *= 30  # 10 ms burst, ~ +30 dB
    for true_peak, noise in ((False, 1e-6), (True, 1e-3)):  # true peak: the x4 resampling's own error elsewhere
        y = mastering._limit(x, sr, -6.0, true_peak=true_peak)
        assert ind.peak_db(y.astype(np.float64)) <= -6.0 + 1e-4
        changed = np.flatnonzero(np.abs(y - x)[100:-100] > noise) + 100  # (the resampler's edges aside)
        # look-ahead 5 ms before the burst, release 100 ms after it (alimiter's settings), nothing elsewhere
        assert changed[0] >= 20000 - int(0.006 * sr) and changed[-1] <= 20441 + int(0.6 * sr), true_peak


def test_a_chapter_off_the_books_level_is_flagged_and_only_it():
    """ACX: a chapter more than 1 dB off the median RMS of the book's rendered chapters gets `acx:consistent_level`
    and turns suspect; one exactly 1 dB off does not; failed rows and rows without a level are left out of the
    median and untouched; another preset checks nothing."""
    def rec(id_, rms, status="ok"):
        return SimpleNamespace(id=id_, rms_db=rms, status=status, flags=[], rules=json.dumps({"rms": True}))

    book = [rec("a", -20.0), rec("b", -20.5), rec("c", -21.5), rec("d", -22.5), rec("e", -30.0, "failed"),
            rec("f", None, "suspect")]
    deliver.level_consistency(book, SimpleNamespace(master=SimpleNamespace(preset="acx")))   # median -21.0
    by = {r.id: r for r in book}
    assert by["d"].flags == ["acx:consistent_level"] and by["d"].status == "suspect"
    assert json.loads(by["d"].rules) == {"rms": True, "consistent_level": False}
    for i in "abc":   # 1.0, 0.5 and 0.5 dB off (d: 1.5)
        assert by[i].flags == [] and by[i].status == "ok" and json.loads(by[i].rules)["consistent_level"] is True
    for i in "ef":
        assert by[i].flags == [] and "consistent_level" not in json.loads(by[i].rules)
    deliver.level_consistency(book, SimpleNamespace(master=SimpleNamespace(preset="acx")))   # a second pass
    assert by["d"].flags == ["acx:consistent_level"]
    other = [rec("a", -20.0), rec("d", -40.0)]
    deliver.level_consistency(other, SimpleNamespace(master=SimpleNamespace(preset="podcast")))
    assert all(r.flags == [] and json.loads(r.rules) == {"rms": True} for r in other)


@pytest.mark.parametrize("master", ["none", "acx"])
def test_non_finite_audio_is_refused_before_any_encoder_sees_it(master):
    """NaN or inf samples (a diverged model) are an error for the row, mastered or not: a NaN would be written as a
    full-scale sample, and the loudness gain of a master would make it worse."""
    from jobs.render import RenderConfig

    cfg = RenderConfig(model="fake", master=mastering.MasterConfig(master))
    for bad in (np.nan, np.inf, -np.inf):
        pcm = np.full(SR24, 0.1, np.float32)
        pcm[SR24 // 2] = bad
        rec = SimpleNamespace(key="k.wav", flags=[])
        with pytest.raises(ValueError, match="non-finite samples"):
            _finish(pcm, "Hello.", cfg, rec)
        assert not hasattr(rec, "bytes")   # nothing was encoded for it


def test_captions_are_timed_from_the_chunks_as_joined():
    """--captions, unmastered WAV: an .srt and a .vtt are written next to the audio and named in the record; cue i
    spans chunk i in the joined audio (0.5 s chunk, the 0.4 s pause, 1.0 s chunk: 0-0.5 s and 0.9-1.9 s)."""
    from jobs.render import RenderConfig

    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(SR24) / SR24)).astype(np.float32)
    rec = SimpleNamespace(key="audio/r1.wav", flags=[])
    objects = deliver.finish_audio(SimpleNamespace(text="One. Two.", sample_rate=SR24, format="wav"), rec,
                                   [tone[:SR24 // 2], tone], SR24, RenderConfig(model="fake", captions=True),
                                   ["One.", "Two."])
    assert [(k, t) for k, _, t in objects] == [("audio/r1.wav", "audio/wav"), ("audio/r1.srt", "application/x-subrip"),
                                               ("audio/r1.vtt", "text/vtt")]
    assert rec.captions == ["audio/r1.srt", "audio/r1.vtt"] and rec.duration_s == pytest.approx(1.9)
    assert objects[1][1].decode() == ("1\n00:00:00,000 --> 00:00:00,500\nOne.\n\n"
                                      "2\n00:00:00,900 --> 00:00:01,900\nTwo.\n")
    assert "00:00:00.900 --> 00:00:01.900\nTwo." in objects[2][1].decode()


def test_chunk_texts_are_optional():
    """finish_audio's `texts` may be left out: a row of several chunks is still delivered, and only the per-chunk
    speech-rate check (which needs each chunk's text) is skipped; given the texts, a 10 ms chunk said to hold a whole
    sentence is `chunk_too_short`."""
    from jobs.render import RenderConfig

    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(SR24) / SR24)).astype(np.float32)
    pcms, text = [tone, tone[:SR24 // 100]], "A first sentence here. And a second one."
    row, cfg = SimpleNamespace(text=text, sample_rate=SR24, format="wav"), RenderConfig(model="fake")
    rec = SimpleNamespace(key="k.wav", flags=[])
    assert deliver.finish_audio(row, rec, pcms, SR24, cfg)[0][0] == "k.wav"
    assert rec.status == "ok" and rec.flags == []
    deliver.finish_audio(row, rec, pcms, SR24, cfg, ["A first sentence here.", "And a second one."])
    assert rec.flags == ["chunk_too_short"]


def test_the_records_figures_are_the_measured_ones_at_three_decimals():
    """The manifest's level figures are rounded as levels.Measurements.to_dict rounds them (3 decimals); a figure that
    does not exist stays None: LUFS of a 0.2 s clip (under one 400 ms gating block) is no figure, not 0 LUFS."""
    from jobs.render import RenderConfig

    n = SR24 // 5
    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(n) / SR24)).astype(np.float32)   # RMS 0.3 / sqrt(2)
    rec = _finish(tone, "Hi.", RenderConfig(model="fake"))
    assert rec.lufs is None
    assert rec.rms_db == round(rec.rms_db, 3) == pytest.approx(20 * math.log10(0.3 / math.sqrt(2)), abs=1e-3)
    for name in deliver.FIGURES:
        value = getattr(rec, name)
        assert value is None or value == round(value, 3), (name, value)
