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
