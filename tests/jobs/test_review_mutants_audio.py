"""Audio outputs of the batch jobs pinned by a mutation review of jobs/render.py, jobs/codecs.py, jobs/mastering.py and
qwen_tts_core/audio_fx.py: each test here failed on a one-line change (a "mutant") that the rest of the suite let
pass, named in its docstring. Every encoding says in its header, media type and bit rate what it holds; no sample
is lost or repeated where audio is cut into blocks; each mastering rule holds at its exact boundary; a delivered
file plays at the speed and pitch it was synthesized at; bad parameters are errors naming the argument; and the
rendering of rows keeps its promises (what the content key depends on, what a stopped or lost-lease batch leaves).
Synthetic audio and fake backends only: no model, no Ray, files under tmp_path."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import av
import numpy as np
import pytest
import soundfile as sf

from jobs import codecs, levels, mastering
from jobs.mastering import MasterConfig
from qwen_tts_core import audio_fx
from qwen_tts_core.errors import RequestError
from tests.jobs import independent as ind


def _tone(hz: float, seconds: float, sr: int, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


# ---- codecs: what each file says it is ------------------------------------------------------------------------

# Asterisk-style sounds folders find a prompt by these extensions; a media type says the rate of headerless PCM
ASTERISK = {"ulaw": ("ulaw", "audio/basic"), "alaw": ("alaw", "audio/x-alaw-basic"),
            "sln": ("sln", "audio/L16;rate=8000"), "sln16": ("sln16", "audio/L16;rate=16000"),
            "g722": ("g722", "audio/G722")}
RATES = {"mp3-192": 44100, "mp3-128": 44100, "opus": 48000, "aac": 44100, "wav-ulaw": 8000, "wav-alaw": 8000,
         "wav-8k": 8000, "wav-16k": 16000, "ulaw": 8000, "alaw": 8000, "sln": 8000, "sln16": 16000, "g722": 16000}
WAV_SUBTYPE = {"wav-ulaw": "ULAW", "wav-alaw": "ALAW", "wav-8k": "PCM_16", "wav-16k": "PCM_16"}


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_each_codec_file_holds_what_its_table_row_says(name):
    """Two seconds of noise in every codec: decoded at the codec's sample rate to the same duration; WAV headers say
    the codec's rate and G.711 law (libsndfile reads them); MP3 frames carry the CBR bit rate, Opus and AAC average
    theirs; headerless files are bytes at the codec's rate with the extension and media type a PBX expects
    (mutants: mp3-192 / mp3-128 / opus / aac bit rates swapped or halved, wav-ulaw writing A-law, wav-16k or g722
    at 8 kHz, ulaw's media type audio/wav, sln16's rate=8000, alaw's extension `al`)."""
    c = codecs.get(name)
    n = 2 * c.sample_rate
    x = (0.2 * np.random.default_rng(0).standard_normal(n)).astype(np.float32)
    data = codecs.encode(x, c)
    y, sr = codecs.decode(data, name if name in codecs.RAW_CODECS else None)
    assert sr == c.sample_rate
    assert abs(y.size - n) <= 0.05 * n   # (lossy codecs: their priming and padding)
    if name in codecs.RAW_CODECS:
        assert (c.ext, c.media_type) == ASTERISK[name]
        bytes_per_sample = {"pcm_s16le": 2, "pcm_mulaw": 1, "pcm_alaw": 1, "g722": 0.5}[c.encoder]
        assert len(data) == n * bytes_per_sample and y.size == n
    elif c.container == "wav":
        info = sf.info(io.BytesIO(data))
        assert (info.samplerate, info.channels, info.subtype, info.frames) == (c.sample_rate, 1, WAV_SUBTYPE[name], n)
        assert (c.ext, c.media_type) == ("wav", "audio/wav")
    elif c.container == "mp3":
        frames = ind.mp3_frames(data)
        assert {f["kbps"] * 1000 for f in frames} == {c.bit_rate} and all(f["rate"] == c.sample_rate for f in frames)
        assert (c.ext, c.media_type) == ("mp3", "audio/mpeg")
    else:   # Opus (Ogg) and AAC (M4B): average bit rate over the file, headers included
        assert abs(len(data) * 8 / 2 - c.bit_rate) < 0.15 * c.bit_rate, len(data)
        assert (c.ext, c.media_type) == {"ogg": ("opus", "audio/ogg"), "ipod": ("m4b", "audio/mp4")}[c.container]
    assert {"mp3-192": 192_000, "mp3-128": 128_000, "opus": 64_000, "aac": 64_000}.get(name) == c.bit_rate
    assert c.sample_rate == RATES[name]   # what the name (and the PBX reading the folder) promises


def test_an_unknown_codec_is_a_value_error_naming_the_choices():
    """(mutant: the membership check dropped from codecs.get, so a typo was a bare KeyError)"""
    with pytest.raises(ValueError, match=r"codec must be one of \['aac', .*got 'flac'"):
        codecs.get("flac")


@pytest.mark.parametrize("name", ["wav-16k", "sln16", "wav-ulaw"])
def test_long_audio_keeps_every_sample_across_encoder_blocks(name):
    """The encoder feeds FFmpeg blocks of 65,536 samples: 200,001 samples come back as 200,001, each where it was
    (mutant: each block one sample short, so a sample was lost at every join)."""
    c = codecs.get(name)
    x = (0.5 * np.sin(np.arange(200_001) * 0.0123) * np.linspace(0.2, 1.0, 200_001)).astype(np.float32)
    y, sr = codecs.decode(codecs.encode(x, c), name if name in codecs.RAW_CODECS else None)
    assert (sr, y.size) == (c.sample_rate, x.size)
    tol = 1e-4 if c.encoder == "pcm_s16le" else 0.02
    np.testing.assert_allclose(y, x, atol=tol)


def test_encode_writes_the_metadata_it_is_given():
    """(mutant: `metadata` ignored)"""
    data = codecs.encode(_tone(440, 0.5, 44100), "mp3-128", metadata={"title": "Chapter One", "artist": "Narrator"})
    with av.open(io.BytesIO(data)) as f:
        assert f.metadata.get("title") == "Chapter One" and f.metadata.get("artist") == "Narrator"


def test_bytes_with_no_audio_stream_are_not_decodable_audio():
    """A file FFmpeg opens that has no audio stream (a subtitle file) is the documented ValueError, not an
    IndexError from the stream list (mutant: IndexError left out of the caught errors); junk is too (mutant: the
    FFmpeg error re-raised as it is)."""
    srt = b"1\n00:00:00,000 --> 00:00:01,000\nHello.\n\n2\n00:00:01,500 --> 00:00:02,000\nAgain.\n"
    with pytest.raises(ValueError, match="not decodable audio"):
        codecs.decode(srt)
    with pytest.raises(ValueError, match="not decodable audio"):
        codecs.decode(b"\x00\x01 certainly not audio" * 50)


def test_ffmpeg_report_matches_whole_flags_and_checks_every_muxer_and_decoder(monkeypatch):
    """`--enable-libxavs2` is not `--enable-libxavs` (mutant: a plain substring test named both); the M4B book's
    muxer (mp4) and the cover decoders (png, mjpeg) are checked too (mutants: EXTRA_MUXERS / EXTRA_DECODERS left out
    of the report)."""
    meta = av._core.library_meta
    monkeypatch.setattr(av._core, "library_meta",
                        {k: dict(v, configuration="--enable-libxavs2 --enable-libmp3lame") for k, v in meta.items()})
    assert codecs.ffmpeg_report()["gpl"] == ["--enable-libxavs2"]
    monkeypatch.setattr(av, "formats_available", set(av.formats_available) - {"mp4"})
    real_codec = av.Codec

    def codec(name, mode="r"):
        if (name, mode) == ("png", "r"):
            raise ValueError("no png decoder in this build")
        return real_codec(name, mode)

    monkeypatch.setattr(av, "Codec", codec)
    assert codecs.ffmpeg_report()["missing"] == ["decoder png", "muxer mp4"]


# ---- mastering: every rule at its boundary ----------------------------------------------------------------------

def _figures(**kw) -> levels.Measurements:
    """Figures that pass every ACX rule, with `kw` changed."""
    base = levels.Measurements(duration_s=60.0, sample_rate=44100, rms_db=-20.0, peak_db=-6.0, true_peak_dbtp=-5.5,
                               lufs=-19.0, noise_floor_db=-70.0, head_s=0.75, tail_s=2.0, head_rms_db=-70.0,
                               tail_rms_db=-70.0, speech_level_db=-25.0, activity=0.8)
    return replace(base, **kw)


def _failed(cfg: MasterConfig, m: levels.Measurements, **kw) -> list[str]:
    return [k for k, ok in mastering.check_rules(cfg, m, **kw).items() if not ok]


def test_acx_rules_hold_at_their_exact_limits():
    """RMS -23 and -18 dB, peak -3 dB, noise floor -60 dB, head 0.5 and 1 s, tail 1 and 5 s, 120 minutes: each
    passes at its limit and fails just past it (mutants: each bound made strict); room tone is needed at the tail as
    well as the head (mutant: tail_rms_db not checked); the format rule needs 44.1 kHz as well as 192 kbit/s (mutant:
    the sample rate not checked)."""
    acx = MasterConfig("acx")
    ok = {"rms_db": (-23.0, -18.0), "peak_db": (-3.0,), "noise_floor_db": (-60.0,), "head_s": (0.5, 1.0),
          "tail_s": (1.0, 5.0), "duration_s": (120 * 60.0,)}
    past = {"rms_db": (-23.01, -17.99), "peak_db": (-2.99,), "noise_floor_db": (-59.99,), "head_s": (0.49, 1.01),
            "tail_s": (0.99, 5.01), "duration_s": (120 * 60.0 + 0.01,)}
    rule = {"rms_db": "rms", "peak_db": "peak", "noise_floor_db": "noise_floor", "head_s": "head", "tail_s": "tail",
            "duration_s": "max_duration"}
    for name, values in ok.items():
        for v in values:
            assert _failed(acx, _figures(**{name: v}), bit_rate=192_000) == [], (name, v)
        for v in past[name]:
            assert _failed(acx, _figures(**{name: v}), bit_rate=192_000) == [rule[name]], (name, v)
    assert _failed(acx, _figures(tail_rms_db=levels.FLOOR_DB), bit_rate=192_000) == ["room_tone"]
    assert _failed(acx, _figures(sample_rate=48000), bit_rate=192_000) == ["format"]


def test_podcast_and_telephony_rules_hold_at_their_exact_limits():
    """Podcast: -20 and -18 LUFS and -1 dBTP pass, just past fails (mutants: strict bounds); Opus at 44.1 kHz fails
    `format` (mutant: rate not checked). Telephony: -20 and -18 dBm0 pass (mutant: strict); a tail 20 ms short of
    the configured silence passes, 30 ms short fails (mutants: the 20 ms slack dropped; the tail rule always true);
    u-law at 16 kHz fails `format` (mutant: rate not checked)."""
    pod = MasterConfig("podcast", "opus")
    m = _figures(sample_rate=48000)
    for lufs in (-20.0, -18.0):
        assert _failed(pod, replace(m, lufs=lufs)) == []
    for lufs in (-20.01, -17.99):
        assert _failed(pod, replace(m, lufs=lufs)) == ["loudness"]
    assert _failed(pod, replace(m, true_peak_dbtp=-1.0)) == []
    assert _failed(pod, replace(m, true_peak_dbtp=-0.99)) == ["true_peak"]
    assert _failed(pod, replace(m, sample_rate=44100)) == ["format"]
    tel = MasterConfig("telephony", "ulaw", 0.3)
    m = _figures(sample_rate=8000, tail_s=0.3)
    for level in (-20.0, -18.0):
        assert _failed(tel, m, level_dbm0=level) == []
    for level in (-20.01, -17.99):
        assert _failed(tel, m, level_dbm0=level) == ["speech_level"]
    assert _failed(tel, replace(m, tail_s=0.28), level_dbm0=-19.0) == []
    assert _failed(tel, replace(m, tail_s=0.27), level_dbm0=-19.0) == ["tail"]
    assert _failed(tel, replace(m, sample_rate=16000), level_dbm0=-19.0) == ["format"]


def test_tail_silence_takes_0_and_10_seconds_exactly_and_nothing_else():
    """0 s is a real choice (no trailing silence), not "the default 0.3 s" (mutants: 0 refused; `or` picking the
    default for 0); 10 s is accepted, just past either end and booleans are refused naming tail_silence (mutants:
    strict upper bound; bool accepted as 1 s); an int is kept as a float, so `1` and `1.0` give one content key
    (mutant: the float() conversion dropped)."""
    zero = MasterConfig("telephony", "ulaw", 0)
    assert zero.tail_silence == 0.0 and zero.key()["tail_silence_s"] == 0.0
    assert MasterConfig("telephony", "ulaw", 10).tail_silence == 10.0
    for bad in (-0.01, 10.01, True):
        with pytest.raises(ValueError, match="tail_silence must be between 0 and 10 seconds"):
            MasterConfig("telephony", "ulaw", bad)
    one = MasterConfig("telephony", "ulaw", 1)
    assert json.dumps(one.key()) == json.dumps(MasterConfig("telephony", "ulaw", 1.0).key())
    # the delivered file ends with the speech (plus the trimming margin), not with 0.3 s of silence
    speech = np.concatenate([_tone(400, 1.0, 24000), np.zeros(12000, np.float32)])
    y, sr = codecs.decode(mastering.master(speech, 24000, zero).data)
    assert 0.02 <= levels.measure(y, sr).tail_s <= 0.06


def test_an_unknown_preset_is_a_value_error_naming_the_presets():
    """(mutant: the preset check dropped, so MasterConfig("loud") failed later with a bare KeyError)"""
    with pytest.raises(ValueError, match=r"master must be one of \['none', 'acx', 'podcast', 'telephony'\], "
                                         r"got 'loud'"):
        MasterConfig("loud")


def test_telephony_codecs_have_their_own_content_keys():
    """u-law and A-law prompts are both `.wav`: only the codec in the key tells them apart (mutant: codec left out
    of MasterConfig.key, so an A-law catalog pass reused the u-law files)."""
    from jobs.inputs import Utterance
    from jobs.render import RenderConfig, plan_key

    row = Utterance(id="menu", text="Press one.", voice="ryan")
    keys = {plan_key(row, RenderConfig(model="m", master=MasterConfig("telephony", c)))[0]
            for c in ("ulaw", "alaw", "sln", "sln16")}
    assert len(keys) == 4


@pytest.mark.parametrize("preset,codec", [("acx", None), ("podcast", "mp3"), ("podcast", "opus"),
                                          ("telephony", "ulaw"), ("telephony", "sln16")])
def test_a_master_plays_at_the_speed_and_pitch_it_was_synthesized_at(preset, codec):
    """24 kHz synthesis delivered at the codec's rate: the file says 44.1/48/8/16 kHz and holds that, so a 300 Hz
    tone of 2 s is still 300 Hz and about 2 s long (mutants: acx / podcast / telephony skipping the resampling, so
    the header claimed a rate the samples were not at)."""
    cfg = MasterConfig(preset, codec)
    x = _tone(300, 2.0, 24000)
    res = mastering.master(x, 24000, cfg)
    y, sr = codecs.decode(res.data)
    assert sr == cfg.delivery.sample_rate
    assert ind.dominant_hz(y.astype(np.float64), sr) == pytest.approx(300.0, rel=0.01)
    m = levels.measure(y, sr)
    assert m.duration_s - m.head_s - m.tail_s == pytest.approx(2.0, abs=0.1)


def test_trimmed_edges_keep_their_margin_and_the_offset_says_where_input_time_0_went():
    """A second of silence, a 1 s tone, a second of silence: telephony trims the edges to 30 ms of margin and says
    input time 0 is now at -0.97 s; ACX puts 0.75 s of room tone before the kept audio, so +0.75 - 0.97 (mutants:
    no margin kept; the cut not reported; either preset's offset ignoring the cut). Captions are timed with it."""
    sr = 24000
    x = np.concatenate([np.zeros(sr, np.float32), _tone(400, 1.0, sr), np.zeros(sr, np.float32)])
    tel = mastering.master(x, sr, MasterConfig("telephony", "sln16", 0.5))
    assert tel.offset_s == pytest.approx(-0.97, abs=0.011)
    y, ysr = codecs.decode(tel.data)
    m = levels.measure(y, ysr)
    assert m.head_s == pytest.approx(0.03, abs=0.011) and m.duration_s == pytest.approx(0.03 + 1.0 + 0.03 + 0.5,
                                                                                        abs=0.02)
    acx = mastering.master(x, sr, MasterConfig("acx"))
    assert acx.offset_s == pytest.approx(0.75 - 0.97, abs=0.011)


def test_room_tone_is_deterministic_and_as_long_as_asked():
    """The same audio masters to the same bytes (content keys promise it) and room tone longer than its 8 s loop is
    tiled to the length asked (mutants: an unseeded generator; the loop cut instead of tiled)."""
    sr = 44100
    a, b = mastering.room_tone(10 * sr + 7, sr, -70.0), mastering.room_tone(10 * sr + 7, sr, -70.0)
    assert a.size == 10 * sr + 7
    np.testing.assert_array_equal(a, b)
    assert levels.rms_db(a) == pytest.approx(-70.0, abs=0.5)


def test_silence_mastered_for_acx_keeps_its_room_tone_where_it_was():
    """Nothing to say (all zeros, or no samples): no gain, and the room tone stays at -70 dB rather than being
    pushed towards the -20 dB speech target (mutants: the level check applied to a file with no speech; an empty
    input treated as speech)."""
    for x in (np.zeros(24000, np.float32), np.zeros(0, np.float32)):
        res = mastering.master(x, 24000, MasterConfig("acx"))
        y, sr = codecs.decode(res.data)
        assert levels.rms_db(y) == pytest.approx(-70.0, abs=1.0) and res.gain_db == 0.0
        assert "rms" in res.failed


def test_a_preset_that_does_not_master_is_an_error():
    """(mutant: master() returning None for preset none)"""
    with pytest.raises(ValueError, match="preset 'none' does not master"):
        mastering.master(_tone(300, 0.5, 24000), 24000, MasterConfig())


def test_the_figures_speech_level_is_rounded_like_the_others():
    """(mutant: speech_level_dbm0 left unrounded in MasterResult.figures, so the manifest carried 15 decimals)"""
    res = mastering.master(_tone(300, 1.0, 24000, 0.05), 24000, MasterConfig("telephony", "alaw"))
    fig = res.figures()
    assert fig["speech_level_dbm0"] == round(res.speech_level_dbm0, 3) and fig["speech_level_dbm0"] is not None


# ---- audio_fx: speed, arguments and buffers ---------------------------------------------------------------------

@pytest.mark.parametrize("bad", [10**400, -(10**400), 2**53 + 1])
def test_a_huge_integer_speed_is_a_request_error_naming_speed(bad):
    """(mutant: float(speed) on an int past 2**53, an OverflowError for 10**400 instead of a 400 naming speed)"""
    with pytest.raises(RequestError) as e:
        audio_fx.check_speed(bad)
    assert e.value.field == "speed" and "between 0.25 and 4.0" in e.value.message


@pytest.mark.parametrize("bad", [9.0, "fast", None])
def test_check_speed_names_the_field_it_is_given(bad):
    """A caller validating another field (`rate`) gets that name in the error (mutants: "speed" hard-coded in the
    range error and in the type error)."""
    with pytest.raises(RequestError) as e:
        audio_fx.check_speed(bad, field="rate")
    assert e.value.field == "rate"


def test_the_slowest_speeds_stretch_the_content_not_only_the_length():
    """Below 0.5 two atempo stages run in series, each within its range: at 0.25 the second half of the input (a
    higher tone) is the second half of the output (mutant: the second stage at `speed` rather than speed / 0.5, so
    the audio ran at 0.125 and was cut to length, ending in the middle of the first tone)."""
    sr = 24000
    x = np.concatenate([_tone(200, 0.5, sr), _tone(600, 0.5, sr)])
    for speed in (0.25, 0.4):
        y = audio_fx.time_stretch(x, sr, speed)
        assert y.size == round(x.size / speed)
        q = y.size // 8
        assert ind.dominant_hz(y[q:3 * q].astype(np.float64), sr) == pytest.approx(200, rel=0.02)
        assert ind.dominant_hz(y[5 * q:7 * q].astype(np.float64), sr) == pytest.approx(600, rel=0.02)


def test_the_stretcher_never_hands_back_or_keeps_the_callers_buffer():
    """A caller that reuses its buffer (overwrites it after each push) gets the stretch of what it pushed: the
    stretcher copies what it holds between pushes (mutant: the carried partial frame a view of the caller's array),
    and at speed 1 the audio handed back is a copy too (mutants: the input itself returned by push / time_stretch)."""
    sr = 24000
    x = _tone(220, 0.5, sr)
    whole = audio_fx.time_stretch(x, sr, 1.5)
    st, buf, parts = audio_fx.StreamingTimeStretcher(sr, 1.5), np.empty(1000, np.float32), []
    for i in range(0, x.size, 1000):
        n = min(1000, x.size - i)
        buf[:n] = x[i:i + n]
        parts.append(st.push(buf[:n]))
        buf[:] = 9.0   # the caller reuses its buffer
    parts.append(st.finish())
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    for out in (audio_fx.time_stretch(x, sr, 1.0), audio_fx.StreamingTimeStretcher(sr, 1.0).push(x)):
        assert not np.shares_memory(out, x)
        np.testing.assert_array_equal(out, x)


# ---- render: content keys, retries, stops and what each record says ---------------------------------------------

class _Backend:
    """0.06 s of tone per character of a chunk; records every call. `fail_batches`: a call holding more than one
    row raises; chunks whose text starts with `ERR` come back with an error, with `NAN` as NaN samples; `on_call(n)`
    runs at call n."""

    def __init__(self, fail_batches=False, on_call=None):
        self.calls, self.fail_batches, self.on_call = [], fail_batches, on_call

    def synthesize(self, jobs):
        from jobs.synth import ChunkResult

        self.calls.append(list(jobs))
        if self.on_call:
            self.on_call(len(self.calls))
        if self.fail_batches and len({(j.voice, j.seed, j.text[:3]) for j in jobs}) > 1:
            raise RuntimeError("batch refused")
        out = []
        for j in jobs:
            if j.text.startswith("ERR"):
                out.append(ChunkResult(None, "error", f"boom {j.text.split()[0]}"))
            elif j.text.startswith("NAN"):
                out.append(ChunkResult(np.full(4800, np.nan, np.float32), "eos"))
            else:
                out.append(ChunkResult(_tone(300, 0.06 * len(j.text), 24000), "eos"))
        return out


def _cfg(**kw):
    from jobs.render import RenderConfig

    return RenderConfig(**{"model": "m", "max_chars": 20, "pause_s": 0.1, "max_attempts": 2, **kw})


def test_the_content_key_follows_every_input_of_the_audio():
    """Each of these changes the audio, so each gets another key: sample rate, format (two `.wav` formats), pause,
    sampling, retry policy, instruct, seed, voice file content, the model's audio settings, speed (mutants: each
    left out of key_fields; key_extra dropped); the language's case does not (mutant: not lower-cased); the record's
    params never hold the text (mutant: text in params)."""
    from jobs.inputs import Utterance
    from jobs.render import plan_key

    row = Utterance(id="r", text="Hello there.", voice="v.wav", language="English", instruct="calm", seed=3)
    spec = {"m": {"digest": "d1", "audio": {"codec_rate": 12}}}
    base = plan_key(row, _cfg(models=spec, voice_files={"v.wav": "h1"}))[0]
    variants = {
        "sample_rate": (replace(row, sample_rate=16000), {}),
        "format": (replace(row, format="wav-ulaw"), {}),
        "instruct": (replace(row, instruct="angry"), {}),
        "seed": (replace(row, seed=4), {}),
        "pause": (row, {"pause_s": 0.2}),
        "sampling": (row, {"sampling": {"temperature": 0.5}}),
        "retry_on": (row, {"retry_on": ("guard",)}),
        "voice_file": (row, {"voice_files": {"v.wav": "h2"}}),
        "model_audio": (row, {"models": {"m": {"digest": "d1", "audio": {"codec_rate": 24}}}}),
        "digest": (row, {"models": {"m": {"digest": "d2", "audio": {"codec_rate": 12}}}}),
        "speed": (row, {"speed": 1.5}),
    }
    for name, (r, kw) in variants.items():
        kw = {"models": spec, "voice_files": {"v.wav": "h1"}, **kw}
        assert plan_key(r, _cfg(**kw))[0] != base, name
    assert plan_key(replace(row, language="english"), _cfg(models=spec, voice_files={"v.wav": "h1"}))[0] == base
    params = json.loads(plan_key(row, _cfg(models=spec))[1])
    assert "text" not in params and "Hello" not in json.dumps(params)


def test_workers_open_the_resolved_model_and_voice_paths_the_key_keeps_the_names(tmp_path):
    """The backend is handed the absolute paths the driver resolved (a worker's working directory is its node's);
    the record keeps the names as rows gave them (mutants: the model's `path` ignored; `voice_paths` ignored)."""
    from jobs.inputs import Utterance
    from jobs.render import render_rows
    from jobs.storage import LocalSink

    be = _Backend()
    cfg = _cfg(models={"m": {"digest": "d", "path": "/abs/models/m"}}, voice_files={"v.wav": "h"},
               voice_paths={"v.wav": "/abs/voices/v.wav"})
    rec = render_rows([Utterance(id="a", text="Hi there.", voice="v.wav")], be, LocalSink(str(tmp_path)), cfg)[0]
    assert rec.status == "ok", rec.error
    assert {(j.model, j.voice) for j in be.calls[0]} == {("/abs/models/m", "/abs/voices/v.wav")}
    assert (rec.model, rec.voice, rec.revision) == ("m", "v.wav", "d")


def test_a_record_names_its_first_failed_chunk_counting_from_one(tmp_path):
    """Several chunks failing: the record gives the first one's error (mutant: the last one's); a chunk of NaN after
    every attempt is named by its place, `chunk 2 of 3` (mutant: counted from 0)."""
    from jobs.inputs import Utterance
    from jobs.render import render_rows
    from jobs.storage import LocalSink

    rows = [Utterance(id="e", text="Fine words. ERR1 words. ERR2 words.", voice="v"),
            Utterance(id="n", text="Fine words. NAN words. More words.", voice="v")]
    e, n = render_rows(rows, _Backend(), LocalSink(str(tmp_path)), _cfg())
    assert e.num_chunks == 3 and e.error == "boom ERR1"
    assert n.error == "chunk 2 of 3: non-finite samples (NaN/inf) after 2 attempt(s)" and n.attempts == 2
    assert not list(tmp_path.rglob("*.wav"))


def test_a_rendered_record_carries_its_url_and_chunk_count(tmp_path):
    """(mutants: rec.url not set after the write; num_chunks not recorded)"""
    from jobs.inputs import Utterance
    from jobs.render import render_rows
    from jobs.storage import LocalSink

    sink = LocalSink(str(tmp_path))
    rec = render_rows([Utterance(id="a", text="One sentence. And two.", voice="v")], _Backend(), sink, _cfg())[0]
    assert rec.status == "ok" and rec.url == sink.url(rec.key) and rec.num_chunks == 2
    assert (tmp_path / rec.key).is_file()


def test_a_stop_during_the_batch_call_sends_no_row_again_and_reports_each_row_as_not_rendered(tmp_path):
    """The batch call raises and SIGTERM came meanwhile: no row is sent again alone, nothing is written, and each
    row's record says NOT_RENDERED with its attempts and chunk count, and is not shown to on_row (mutants: rows sent
    again after the stop; a stopped row keeping the batch's error; the left record without attempts / chunks;
    on_row called for it)."""
    import threading

    from jobs.inputs import Utterance
    from jobs.render import NOT_RENDERED, render_rows
    from jobs.storage import LocalSink

    stop = threading.Event()
    be = _Backend(fail_batches=True, on_call=lambda n: stop.set())
    rows = [Utterance(id="a", text="First row here.", voice="v"),
            Utterance(id="b", text="Second row here. And two more.", voice="v", seed=9)]
    seen = []
    recs = render_rows(rows, be, LocalSink(str(tmp_path)), _cfg(), on_row=seen.append, stop=stop)
    assert len(be.calls) == 1 and not list(tmp_path.rglob("*.wav")) and seen == []
    assert [(r.error, r.attempts, r.num_chunks) for r in recs] == [(NOT_RENDERED, 1, 1), (NOT_RENDERED, 1, 2)]


def test_on_row_sees_every_row_once_rendered_reused_or_refused(tmp_path):
    """Rows that are not rendered in this batch (an invalid row, a reused one) are shown to on_row too (mutant:
    only rendered rows shown)."""
    from jobs.inputs import Utterance
    from jobs.render import render_rows
    from jobs.storage import LocalSink

    sink, cfg = LocalSink(str(tmp_path)), _cfg()
    done = Utterance(id="done", text="Already here.", voice="v")
    render_rows([done], _Backend(), sink, cfg)
    rows = [done, Utterance(id="bad", text="x", error="field 'voice' is missing"),
            Utterance(id="new", text="Something new.", voice="v")]
    seen = []
    render_rows(rows, _Backend(), sink, cfg, on_row=lambda r: seen.append((r.id, r.reused, r.status)))
    assert sorted(seen) == [("bad", False, "failed"), ("done", True, "ok"), ("new", False, "ok")]


def test_a_lease_that_cannot_be_read_before_a_batch_does_not_stop_it(tmp_path, monkeypatch):
    """A lease read failing for a moment (StorageError, not LeaseLost) is logged and the batch goes on: each write
    checks the lease again (mutant: the StorageError not caught, so one flaky read failed the whole batch)."""
    from jobs import render
    from jobs.inputs import Utterance
    from jobs.storage import LocalSink, StorageError

    def flaky(sink):
        raise StorageError("lease read timed out")

    monkeypatch.setattr(render, "check_writes", flaky)
    rec = render.render_rows([Utterance(id="a", text="Hello.", voice="v")], _Backend(), LocalSink(str(tmp_path)),
                             _cfg())[0]
    assert rec.status == "ok" and (tmp_path / rec.key).is_file()


def test_the_first_lost_lease_is_the_reason_every_row_left_gives(tmp_path):
    """Halt keeps the first loss's reason (later writes that are refused too must not replace it), and that reason,
    not the SIGTERM text, is what rows left say (mutants: the last loss kept; Halt.error always NOT_RENDERED)."""
    from jobs.lease import LeaseLost
    from jobs.render import NOT_RENDERED, Halt

    h = Halt(None)
    assert not h.is_set() and h.error == NOT_RENDERED
    h.lose(LeaseLost("lease taken over by pass B"))
    h.lose(LeaseLost("fence refused write of audio/x.wav"))
    assert h.is_set() and h.error == "not rendered: lease taken over by pass B"


def test_a_row_with_nothing_to_say_fails_with_its_reason_and_calls_no_backend(tmp_path):
    """(mutant: the `nothing to say` error dropped, so the manifest had a failed row with no error)"""
    from jobs.inputs import Utterance
    from jobs.render import render_rows
    from jobs.storage import LocalSink

    be = _Backend()
    rec = render_rows([Utterance(id="blank", text="   ", voice="v")], be, LocalSink(str(tmp_path)), _cfg())[0]
    assert (rec.status, rec.error, rec.num_chunks) == ("failed", "text: nothing to say after cleaning", 0)
    assert be.calls == []
