"""Zero samples (a row whose model stopped at once: max_new_tokens=1 gives 0 frames) still give files every decoder
reads, in every --format and every delivery codec, and mastering them flags the row instead of failing it with
"not decodable audio"."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from jobs import audio, codecs, mastering

EMPTY = np.zeros(0, np.float32)


@pytest.mark.parametrize("name", sorted(codecs.CODECS))
def test_every_codec_encodes_zero_samples_to_a_decodable_file(name):
    c = codecs.get(name)
    data = codecs.encode(EMPTY, c)
    y, sr = codecs.decode(data, name if name in codecs.RAW_CODECS else None)
    assert sr == c.sample_rate
    assert np.abs(y).max(initial=0.0) < 1e-3
    if name in codecs.RAW_CODECS:
        assert data == b"" and len(y) == 0   # headerless: no bytes are exactly no samples
    elif c.container == "wav":
        assert data[:4] == b"RIFF" and len(y) == 0
    else:
        assert c.container in codecs.NEEDS_A_SAMPLE and len(y) > 0  # one sample of silence, plus codec delay


@pytest.mark.parametrize("fmt", sorted(audio.ENCODINGS))
def test_every_format_encodes_zero_samples_to_a_decodable_file(fmt):
    data = audio.encode(EMPTY, 24000, fmt)
    y, sr = audio.decode(data)  # soundfile
    z, zsr = codecs.decode(data)  # FFmpeg
    expected = 1 if fmt == "flac" else 0  # FLAC cannot say "no samples": one silent sample
    assert (sr, len(y)) == (zsr, len(z)) == (24000, expected)
    assert np.abs(y).max(initial=0.0) == 0.0
    assert sf.info(io.BytesIO(data)).frames == expected


@pytest.mark.parametrize("preset,codec", [("acx", None), ("podcast", "mp3"), ("podcast", "opus"),
                                          ("telephony", "ulaw")])
def test_mastering_zero_samples_delivers_a_flagged_file(preset, codec):
    cfg = mastering.MasterConfig(preset, codec)
    res = mastering.master(EMPTY, 24000, cfg)
    y, sr = codecs.decode(res.data)
    assert sr == res.codec.sample_rate
    assert mastering.flag_names(preset, res.rules)  # delivered, and never as if it passed


@pytest.mark.parametrize("n", [1, 500, 4801, 24000, 47000, 48000, 100_000])
def test_opus_files_decode_to_exactly_their_samples(n):
    """Review: frames without a pts made Ogg's granules start one pre-skip late; a file of one Ogg page (under about
    a second) decoded 312 samples long in FFmpeg and libsndfile, and some could not be opened by libsndfile. Both
    decoders now give exactly the samples encoded (one sample for an empty master, as promised)."""
    c = codecs.get("opus")
    x = (0.3 * np.sin(np.arange(n) * 2 * np.pi * 440 / c.sample_rate)).astype(np.float32)
    data = codecs.encode(x, c)
    y, sr = codecs.decode(data)
    z, zsr = sf.read(io.BytesIO(data), dtype="float32")
    assert (sr, len(y)) == (zsr, len(z)) == (c.sample_rate, n)


def test_a_row_of_zero_samples_is_reused_on_a_rerun(tmp_path, capsys):
    """Review finding: a committed row of zero samples in plain WAV (44 bytes) was never counted as done (a leftover
    `bytes <= 44` rule), so every re-run synthesized it again and every catalog pass counted it as changed; a
    wav-ulaw one (58 bytes) was reused."""
    import json

    from jobs import narrate
    from tests.jobs.media_fakes import NoiseBackend

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in (
        {"id": "empty-wav", "text": "NOTHING here.", "voice": "ryan"},
        {"id": "empty-ulaw", "text": "NOTHING at all.", "voice": "ryan", "format": "wav-ulaw", "sample_rate": 8000},
        {"id": "normal", "text": "Hello there.", "voice": "ryan"})))
    args = [str(rows), "--model", "fake", "--out", str(tmp_path / "out"), "--backend",
            "tests.jobs.media_fakes:NoiseBackend", "--runner", "local", "--no-progress", "--quiet"]
    for run in (1, 2):
        NoiseBackend.calls.clear()
        assert narrate.main(args) == 0
        summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (summary["synthesized"], summary["reused"]) == ((3, 0) if run == 1 else (0, 3)), (run, summary)
    assert not NoiseBackend.calls
