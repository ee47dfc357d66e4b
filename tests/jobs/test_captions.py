"""Captions: parsed with standard parsers (srt, webvtt-py) and checked against the rendered audio itself."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from jobs import captions, catalog, narrate
from jobs.manifest import from_parquet
from tests.jobs import independent as ind

TONE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:ToneBackend", "--runner", "local",
        "--no-progress", "--quiet", "--voice", "ryan", "--captions"]
TEXT = "The first sentence is here. A second one follows!\n\nA new paragraph, with a clause. Last one?"
SENTENCES = ["The first sentence is here.", "A second one follows!", "A new paragraph, with a clause.", "Last one?"]


def parse_both(out, rec):
    import srt
    import webvtt

    srt_key, vtt_key = rec.captions
    assert srt_key.endswith(".srt") and vtt_key.endswith(".vtt")
    subs = list(srt.parse((out / srt_key).read_text()))
    vtt = webvtt.from_buffer(io.StringIO((out / vtt_key).read_text()))
    a = [(s.start.total_seconds(), s.end.total_seconds(), s.content.replace("\n", " ")) for s in subs]
    b = [(_secs(c.start), _secs(c.end), c.text.replace("\n", " ")) for c in vtt]
    assert [x[2] for x in a] == [x[2] for x in b]
    for (s1, e1, _), (s2, e2, _) in zip(a, b):
        assert s1 == pytest.approx(s2, abs=1e-3) and e1 == pytest.approx(e2, abs=1e-3)
    return a


def _secs(stamp: str) -> float:
    h, m, s = stamp.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def check_cues_match_audio(cues, x, sr, quiet_db):
    """Sound inside every cue, nothing above the quiet level between cues: times come from the audio."""
    fdb = ind.frame_db(x, sr)

    def frames(a, b):
        return fdb[int(round(a * 100)) + 2: int(round(b * 100)) - 2]

    for start, end, _ in cues:
        inside = frames(start, end)
        assert inside.size and inside.min() > quiet_db + 20, (start, end)
    for (_, end, _), (start, _, _) in zip(cues, cues[1:]):
        assert frames(end, start).max() < quiet_db  # the pause between sentences
    loud = np.flatnonzero(fdb > quiet_db)
    assert abs(loud[0] / 100 - cues[0][0]) <= 0.02 and abs((loud[-1] + 1) / 100 - cues[-1][1]) <= 0.02


@pytest.mark.parametrize("extra,quiet_db", [([], -60), (["--master", "acx"], -55), (["--master", "telephony"], -60),
                                             (["--speed", "1.6", "--pause", "0.3"], -60)])
def test_one_cue_per_sentence_timed_from_the_audio(tmp_path, extra, quiet_db):
    ch = tmp_path / "ch.txt"
    ch.write_text(TEXT)
    out = tmp_path / "out"
    assert narrate.main([str(ch), "--out", str(out), *TONE, *extra]) == 0
    (rec,) = from_parquet((out / "manifest.parquet").read_bytes())
    cues = parse_both(out, rec)
    assert [c[2] for c in cues] == SENTENCES and rec.num_chunks == 4
    x, sr, _ = ind.read((out / rec.key).read_bytes())
    check_cues_match_audio(cues, x, sr, quiet_db)
    if "--master" in extra and "acx" in extra:
        assert 0.5 <= cues[0][0] <= 1.0  # the room tone at the head is part of the timing


def test_captions_on_request_for_catalog_prompts_and_not_otherwise(tmp_path):
    cat = tmp_path / "c.csv"
    cat.write_text("id,text,voice\nhello,Hello there. Please hold.,ryan\n")
    base = ["--model", "fake", "--backend", "tests.jobs.media_fakes:ToneBackend", "--runner", "local",
            "--no-progress", "--quiet"]
    assert catalog.main([str(cat), "--out", str(tmp_path / "plain"), *base]) == 0
    (rec,) = from_parquet((tmp_path / "plain" / "catalog-manifest.parquet").read_bytes())
    assert rec.captions == [] and not list((tmp_path / "plain").rglob("*.vtt"))
    out = tmp_path / "cap"
    assert catalog.main([str(cat), "--out", str(out), *base, "--captions", "--master", "telephony"]) == 0
    (rec,) = from_parquet((out / "catalog-manifest.parquet").read_bytes())
    cues = parse_both(out, rec)
    assert [c[2] for c in cues] == ["Hello there.", "Please hold."]
    x, sr, _ = ind.read((out / rec.key).read_bytes())
    check_cues_match_audio(cues, x, sr, -60)


def test_caption_text_is_the_written_text_even_when_a_lexicon_respells_it(tmp_path):
    lex = tmp_path / "lex.csv"
    lex.write_text("word,respelling\nSQL,sequel\n")
    ch = tmp_path / "ch.txt"
    ch.write_text("We love SQL. It is fine.")
    out = tmp_path / "out"
    assert narrate.main([str(ch), "--out", str(out), *TONE, "--lexicon", str(lex)]) == 0
    (rec,) = from_parquet((out / "manifest.parquet").read_bytes())
    assert [c[2] for c in parse_both(out, rec)] == ["We love SQL.", "It is fine."]
    assert rec.lexicon == ["SQL"]


def test_formats_escaping_and_edge_cases():
    import srt
    import webvtt

    cue_list = captions.cues(["a <b>bold</b> & --> arrow", "", "late"], [(0, 24000), (30000, 40000),
                             (3600 * 24000 + 12, 3601 * 24000)], 24000, offset_s=0.25)
    assert [c.text for c in cue_list] == ["a <b>bold</b> & --> arrow", "late"]  # blank text: no cue
    vtt = captions.to_vtt(cue_list)
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; --&gt; arrow" in vtt and "01:00:00.250 --> 01:00:01.250" in vtt
    parsed = webvtt.from_buffer(io.StringIO(vtt))
    assert len(parsed) == 2
    s = list(srt.parse(captions.to_srt(cue_list)))
    assert s[0].content == "a <b>bold</b> & --> arrow" and s[1].start.total_seconds() == pytest.approx(3600.25)
    long = captions.to_srt([captions.Cue(0, 1, "word " * 30)])
    assert max(len(line) for line in long.splitlines()) <= captions.LINE_CHARS and "\n\n" not in long.strip()
    assert captions.to_srt([]) == "" and captions.to_vtt([]).startswith("WEBVTT")
    # clipped to the file, never overlapping, never zero-length
    clipped = captions.cues(["x", "y", "z"], [(0, 100), (50, 100), (90, 100)], 100, offset_s=-0.6, duration_s=0.2)
    assert [(c.start_s, c.end_s) for c in clipped] == [(0.0, 0.2), (0.0, 0.2)]  # "z" falls outside the file
    times = [(s.start, s.end) for s in srt.parse(captions.to_srt(clipped))]
    assert times[0][1] <= times[1][0] < times[1][1]
    assert json.dumps(captions.caption_keys("audio/a-1.mp3")) == '["audio/a-1.srt", "audio/a-1.vtt"]'


def test_sentence_chunks_keep_long_sentences_within_the_budget():
    chunks = captions.sentence_chunks("Short. " + "word " * 60 + "end.", 50)
    assert chunks[0] == "Short." and all(len(c) <= 50 for c in chunks) and len(chunks) > 3


def test_retired_prompts_take_their_captions_along(tmp_path):
    cat = tmp_path / "c.csv"
    cat.write_text("id,text,voice\na,First prompt.,ryan\nb,Second prompt.,ryan\n")
    base = [str(cat), "--model", "fake", "--backend", "tests.jobs.media_fakes:ToneBackend", "--runner", "local",
            "--no-progress", "--quiet", "--captions", "--out", str(tmp_path / "out")]
    assert catalog.main(base) == 0
    assert len(list((tmp_path / "out").rglob("*.vtt"))) == 2
    cat.write_text("id,text,voice\na,First prompt.,ryan\n")
    assert catalog.main([*base, "--retire", "delete"]) == 0
    assert [p.name.split("-")[0] for p in (tmp_path / "out").rglob("*.vtt")] == ["a"]
    assert len(list((tmp_path / "out").rglob("*.srt"))) == 1
