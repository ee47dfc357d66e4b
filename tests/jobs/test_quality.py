import numpy as np

from jobs.audio import decode, encode, join_chunks
from jobs.quality import check_audio

SR = 24000


def _tone(seconds, amp=0.3):
    t = np.arange(int(SR * seconds)) / SR
    return (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_normal_speech_length_passes():
    assert check_audio(_tone(2.0), SR, "A sentence of about thirty chars.") == []


def test_flags():
    text = "A sentence of about thirty chars."
    assert check_audio(np.zeros(SR * 2, np.float32), SR, text) == ["silent"]
    assert "clipping" in check_audio(_tone(2.0, amp=2.0), SR, text)
    assert check_audio(_tone(0.1), SR, text) == ["too_short"]
    assert check_audio(_tone(60.0), SR, text) == ["too_long"]
    mostly = np.concatenate([_tone(0.5), np.zeros(SR * 2, np.float32)])
    assert "mostly_silent" in check_audio(mostly, SR, "Hi there.")
    assert check_audio(np.zeros(0, np.float32), SR, text) == ["empty"]


def test_cjk_counts_more_per_character():
    # 10 CJK characters in 2 s is normal speech; 10 Latin letters in 2 s is not "too long" either
    assert check_audio(_tone(2.0), SR, "今天天气很好我们去吧") == []
    assert check_audio(_tone(0.3), SR, "今天天气很好我们去吧") == ["too_short"]


def test_join_and_codec_roundtrip():
    pcm = join_chunks([_tone(0.1), _tone(0.2)], SR, 0.5)
    assert len(pcm) == int(0.3 * SR) + SR // 2
    for fmt in ("wav", "flac"):
        back, sr = decode(encode(pcm, SR, fmt))
        assert sr == SR and np.abs(back - pcm).max() < 1e-3
