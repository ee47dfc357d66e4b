import numpy as np

from jobs.audio import decode, encode, join_chunks
from jobs.quality import QualityConfig, check_audio, check_chunks

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


def test_text_with_nothing_to_say_is_never_too_long():
    """No spoken characters (empty text, only punctuation) says nothing about the duration: no rate flag."""
    assert check_audio(_tone(2.0), SR, "") == []
    assert check_audio(_tone(2.0), SR, "... -- !?") == []


def test_punctuation_and_spaces_are_not_spoken_characters():
    """Only letters and digits count towards the speech rate: two letters in 0.5 s (4/s) are plain speech, however
    much punctuation and space surrounds them (counted, the 100 extra characters would read as a truncation)."""
    assert check_audio(_tone(0.5), SR, "Hi" + " !" * 50) == []


def test_speech_rate_limits_are_inclusive_at_2_and_40_characters_per_second():
    """The rate flags fire only past the limits: 80 letters in 2 s (40/s) and 4 letters in 2 s (2/s) are fine,
    81 letters (40.5/s) is too_short and 3 letters (1.5/s) too_long; 88 letters (44/s) is too_short as well."""
    tone = _tone(2.0)
    assert check_audio(tone, SR, "a" * 80) == []
    assert check_audio(tone, SR, "a" * 81) == ["too_short"]
    assert check_audio(tone, SR, "a" * 88) == ["too_short"]
    assert check_audio(tone, SR, "abcd") == []
    assert check_audio(tone, SR, "abc") == ["too_long"]
    assert check_audio(_tone(10.0), SR, "a" * 22) == []   # 2.2 chars/s: still fine
    assert check_audio(_tone(10.0), SR, "a" * 19) == ["too_long"]


def test_a_cjk_character_weighs_three_latin_letters():
    """10 CJK characters are 30 Latin letters for the rate: 0.8 s is plain speech for both (37.5/s), 0.7 s is too
    fast for both (42.9/s)."""
    cjk, latin = "今天天气很好我们去吧", "a" * 30
    assert check_audio(_tone(0.8), SR, cjk) == check_audio(_tone(0.8), SR, latin) == []
    assert check_audio(_tone(0.7), SR, cjk) == check_audio(_tone(0.7), SR, latin) == ["too_short"]
    assert check_audio(_tone(1.0), SR, "カタカナ") == []  # kana count as CJK too: 12 units/s either way
    for edge in ("\u30ff", "\u9fff"):   # the last katakana and the last CJK ideograph: 3 units in 70 ms is 43/s
        assert check_audio(_tone(0.07), SR, edge) == ["too_short"]


def test_a_hangul_syllable_weighs_like_a_cjk_character():
    """Korean is spoken a syllable per Hangul block, like Han and kana (jobs/scripts.py SYLLABIC): counted one each,
    a Korean output cut to a third of its length read 14 characters/s and passed; counted three, it is too_short."""
    korean = "안녕하세요반갑습니다"   # 10 syllables
    assert check_audio(_tone(0.8), SR, korean) == []
    assert check_audio(_tone(0.7), SR, korean) == ["too_short"]
    for edge in ("\uac00", "\ud7a3", "\uf900"):   # first and last Hangul syllable, first compatibility ideograph
        assert check_audio(_tone(0.07), SR, edge) == ["too_short"], hex(ord(edge))


def test_silence_threshold_is_an_rms_of_one_thousandth():
    """RMS below 1e-3 is silent, above is not: sines of RMS 0.9e-3 and 1.1e-3 (amplitude RMS * sqrt 2) fall either
    side; with a threshold that float32 represents exactly, an RMS equal to it is not below it."""
    text = "a" * 20
    assert check_audio(_tone(2.0, amp=0.9e-3 * np.sqrt(2)), SR, text) == ["silent"]
    assert "silent" not in check_audio(_tone(2.0, amp=1.1e-3 * np.sqrt(2)), SR, text)
    assert "silent" not in check_audio(np.full(SR, 0.25, np.float32), SR, "", QualityConfig(silence_rms=0.25))


def test_mostly_silent_is_over_sixty_percent_of_silent_frames():
    """2 s of silence after 1 s of tone (2/3 of the 20 ms frames silent) is mostly silent; after 2 s of tone (1/2)
    it is not, nor is 3 s of silence after 2 s of tone (exactly 60 %: not over it)."""
    z = np.zeros(SR * 2, np.float32)
    assert check_audio(np.concatenate([_tone(1.0), z]), SR, "a" * 20) == ["mostly_silent"]
    assert check_audio(np.concatenate([_tone(2.0), z]), SR, "a" * 20) == []
    assert check_audio(np.concatenate([_tone(2.0), np.zeros(SR * 3, np.float32)]), SR, "a" * 20) == []


def test_silent_frames_are_20_ms_frames_not_samples():
    """A 100 Hz click train (one 0.1 sample every 10 ms, each 20 ms frame RMS 0.1/sqrt(240) = 6.5e-3) is sound in
    every frame, though 99.6 % of its samples are zero; a click every 30 ms leaves 1/3 of the 20 ms frames silent
    (2/3 of 10 ms frames would be)."""
    x = np.zeros(SR * 2, np.float32)
    x[:: SR // 100] = 0.1
    assert check_audio(x, SR, "a" * 20) == []
    x = np.zeros(SR * 3, np.float32)
    x[:: SR * 3 // 100] = 0.1
    assert check_audio(x, SR, "a" * 20) == []


def test_clipping_is_samples_at_full_scale_over_a_thousandth_of_the_file():
    """Samples at full scale (|x| = 1.0 counts, as does 0.9995) clip; 0.11 % of them is clipping, exactly 0.1 %
    (24 of 24000) or 0.05 % is not."""
    def with_peaks(k, level=1.0):
        x = _tone(1.0, amp=0.5)
        x[np.arange(k) * 500] = level
        return x

    text = "a" * 10
    assert check_audio(with_peaks(27), SR, text) == ["clipping"]
    assert check_audio(with_peaks(27, -0.9995), SR, text) == ["clipping"]
    assert check_audio(with_peaks(24), SR, text) == []
    assert check_audio(with_peaks(12), SR, text) == []
    assert check_audio(np.sign(_tone(1.0)) + np.float32(0), SR, text) == ["clipping"]   # a full-scale square
    at_level = QualityConfig(clip_level=0.5)   # exactly representable: a sample at the level clips
    assert check_audio(np.sign(_tone(1.0)) * np.float32(0.5), SR, text, at_level) == ["clipping"]


def test_chunks_are_checked_only_in_a_row_of_several():
    """One chunk is the whole row (check_audio says it all): no chunk flags, even for an empty one."""
    assert check_chunks([np.zeros(0, np.float32)], SR, ["Hello."]) == []
    assert check_chunks([_tone(0.01)], SR, ["a" * 40]) == []


def test_an_empty_chunk_is_flagged_once_per_row():
    """Any chunk with no samples flags the row chunk_empty, once however many there are; healthy chunks flag
    nothing, with or without texts."""
    ok = _tone(1.0)
    assert check_chunks([ok, ok], SR, ["a" * 10, "b" * 10]) == []
    assert check_chunks([ok, np.zeros(0, np.float32)], SR, ["a" * 10, "b" * 10]) == ["chunk_empty"]
    empty = np.zeros(0, np.float32)
    assert check_chunks([empty, ok, empty], SR, None) == ["chunk_empty"]


def test_a_chunk_far_faster_than_speech_is_too_short():
    """A chunk over 40 spoken characters a second (50 letters in 1 s) is cut off, even when the row's total rate
    is fine; at 40/s it is not; with no texts, or fewer texts than chunks, only the chunks with a text are rated.
    Both chunk flags are reported together, each once."""
    ok, cut = _tone(4.0), _tone(1.0)
    assert check_chunks([ok, cut], SR, ["a" * 10, "b" * 50]) == ["chunk_too_short"]
    assert check_chunks([ok, cut, cut], SR, ["a" * 10, "b" * 50, "c" * 50]) == ["chunk_too_short"]
    assert check_chunks([ok, cut], SR, ["a" * 10, "b" * 40]) == []
    assert check_chunks([ok, cut], SR, None) == []
    assert check_chunks([ok, cut], SR, ["a" * 10]) == []
    empty = np.zeros(0, np.float32)
    assert check_chunks([cut, empty], SR, ["b" * 50, ""]) == ["chunk_too_short", "chunk_empty"]


def test_a_single_letter_is_rated_like_any_text():
    """One spoken character is still text to say: one letter in 2 s (0.5/s) is too long, in 10 ms (100/s) too
    short."""
    assert check_audio(_tone(2.0), SR, "a") == ["too_long"]
    assert check_audio(_tone(0.01), SR, "a") == ["too_short"]


def test_frame_silence_is_judged_on_rms_not_on_the_mean():
    """A signal that averages to zero in every frame is not silent when its RMS is not: a square wave of +-0.01 at
    half the sample rate (RMS 0.01, -40 dBFS) is plain sound in every 20 ms frame."""
    x = np.tile(np.array([0.01, -0.01], np.float32), SR)
    assert check_audio(x, SR, "a" * 20) == []
