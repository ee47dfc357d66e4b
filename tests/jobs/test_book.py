"""`--book m4b`: one M4B with a chapter per chapter, read back from its MP4 boxes by tests/jobs/independent.py
(the writer is FFmpeg through PyAV), and cross-checked with PyAV's own reader."""

from __future__ import annotations

import json
import struct
import zlib

import pytest

from jobs import narrate
from jobs.book import title_from
from jobs.manifest import from_parquet
from tests.jobs import independent as ind

NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet", "--voice", "ryan"]


def png(w: int = 8, h: int = 8) -> bytes:
    raw = b"".join(b"\x00" + b"\x20\x40\x80" * w for _ in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture()
def chapters(tmp_path):
    d = tmp_path / "book"
    d.mkdir()
    (d / "01-opening.md").write_text("# A *Dark* Night\n\nIt was a dark and stormy night. The rain fell.")
    (d / "02-the_storm.txt").write_text("The storm grew. Nobody slept.")
    (d / "10-last.md").write_text("No heading in this one, just text to read.")
    return d


def summary(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("master", ["none", "acx"])
def test_m4b_has_a_chapter_per_chapter_at_the_right_times(chapters, tmp_path, capsys, master):
    import av

    cover = tmp_path / "cover.png"
    cover.write_bytes(png())
    out = tmp_path / "out"
    assert narrate.main([str(chapters), "--out", str(out), *NOISE, "--master", master, "--book", "m4b",
                         "--book-title", "Storm Book", "--author", "A. Writer", "--cover", str(cover)]) == 0
    book = summary(capsys)["book"]
    assert book["missing"] == [] and not book["reused"]
    path = out / book["key"]
    assert path.suffix == ".m4b" and path.read_bytes()[8:12] == b"M4B "  # ftyp major brand
    f = ind.mp4_book(path.read_bytes())
    titles = [title for _, title in f["chapters"]]
    assert titles == ["A Dark Night", "The storm", "Last"]  # heading, else the file name
    with av.open(str(path)) as c:  # what FFmpeg-based players see agrees
        assert [ch["metadata"]["title"] for ch in c.chapters()] == titles
    # starts: cumulative durations of the chapter files, decoded here with libsndfile
    recs = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    starts, t = [], 0.0
    for cid in ("01-opening", "02-the_storm", "10-last"):
        starts.append(t)
        x, sr, _ = ind.read((out / recs[cid].key).read_bytes())
        t += len(x) / sr
    # to the sample (0.1 ms: the resampler may round a chapter's length); the audio is on its mark too: see
    # test_chapter_marks_sit_on_their_audio (0.03 s here hid the encoder's 23 ms of priming)
    assert [start for start, _ in f["chapters"]] == pytest.approx(starts, abs=1e-4)
    assert f["length_s"] == pytest.approx(t, abs=0.1) and f["channels"] == 1 and f["sample_rate"] == 44100
    tags = f["tags"]
    assert tags["\xa9nam"] == ["Storm Book"] and tags["\xa9ART"] == ["A. Writer"] and tags["\xa9wrt"] == ["ryan"]
    assert tags["stik"] == [2] and bytes(tags["covr"][0]) == cover.read_bytes()


def test_same_book_is_reused_and_a_failed_chapter_is_reported(chapters, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(chapters), "--out", str(out), *NOISE, "--book", "m4b"]
    assert narrate.main(args) == 0
    first = summary(capsys)["book"]
    assert narrate.main(args) == 0
    again = summary(capsys)["book"]
    assert again["reused"] and again["key"] == first["key"]
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "c1", "text": "Chapter one text.", "title": "One"},
        {"id": "c2", "text": "Chapter two text.", "voice": "nobody"},  # unknown voice: this chapter fails
        {"id": "c3", "text": "Chapter three text.", "title": "Three"}]))
    assert narrate.main([str(rows), "--out", str(tmp_path / "o2"), *NOISE, "--book", "m4b"]) == 1
    book = summary(capsys)["book"]
    assert book["missing"] == ["c2"] and [c["title"] for c in book["chapters"]] == ["One", "Three"]


@pytest.mark.parametrize("extra,message", [(["--cover", "/nope.png"], "cover: /nope.png does not exist"),
                                           (["--book", "epub"], "invalid choice: 'epub'")])
def test_bad_book_options_fail_before_synthesis(chapters, tmp_path, capsys, extra, message):
    from tests.jobs.media_fakes import NoiseBackend

    NoiseBackend.calls.clear()
    try:
        code = narrate.main([str(chapters), "--out", str(tmp_path / "o"), *NOISE, "--book", "m4b", *extra])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err and NoiseBackend.calls == []


def test_titles():
    assert title_from("03-the-storm", None) == "The storm"
    assert title_from("chapter_1", "  Heading   here ") == "Heading here"
    assert title_from("007", None) == "007"


def jpeg(w: int = 16, h: int = 8) -> bytes:
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mjpeg") as f:
        s = f.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = w, h, "yuvj420p"
        frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), (200, 40, 90), np.uint8), format="rgb24")
        for p in [*s.encode(frame.reformat(format="yuvj420p")), *s.encode(None)]:
            f.mux(p)
    return buf.getvalue()


def test_jpeg_cover_is_stored_as_given(chapters, tmp_path, capsys):
    cover = tmp_path / "cover.jpg"
    cover.write_bytes(jpeg())
    out = tmp_path / "out"
    assert narrate.main([str(chapters), "--out", str(out), *NOISE, "--book", "m4b", "--cover", str(cover)]) == 0
    f = ind.mp4_book((out / summary(capsys)["book"]["key"]).read_bytes())
    assert f["tags"]["covr"] == [cover.read_bytes()] and f["tags"]["stik"] == [2]
    assert f["tags"]["\xa9wrt"] == ["ryan"] and "\xa9nam" not in f["tags"]  # narrator: the voice; no title given


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_a_cover_that_is_not_an_image_fails_before_synthesis(chapters, tmp_path, capsys, content):
    from tests.jobs.media_fakes import NoiseBackend

    cover = tmp_path / "cover.png"
    cover.write_bytes(content)
    NoiseBackend.calls.clear()
    try:
        code = narrate.main([str(chapters), "--out", str(tmp_path / "o"), *NOISE, "--book", "m4b", "--cover",
                             str(cover)])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "cover: cover.png is not a readable image" in capsys.readouterr().err
    assert NoiseBackend.calls == []


def _rows(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chapter_marks_sit_on_their_audio(tmp_path, capsys):
    """The frames had no pts, so the AAC encoder's priming (1024 samples) stayed in the timeline and every
    chapter's audio played 23 ms after its mark. A silent first chapter shows where the second one's audio is."""
    import av
    import numpy as np

    rows = _rows(tmp_path, [{"id": "c1", "text": "SILENT and quiet for a while.", "title": "One"},
                            {"id": "c2", "text": "The storm grew. Nobody slept.", "title": "Two"}])
    out = tmp_path / "out"
    assert narrate.main([str(rows), "--out", str(out), *NOISE, "--book", "m4b"]) == 0
    book = summary(capsys)["book"]
    mark = ind.mp4_book((out / book["key"]).read_bytes())["chapters"][1][0]
    recs = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    x, sr, _ = ind.read((out / recs["c2"].key).read_bytes())
    expected = mark + np.argmax(np.abs(x) > 0.02) / sr  # the chapter's own first loud sample
    with av.open(str(out / book["key"])) as c:
        y = np.concatenate([f.to_ndarray().reshape(-1) for f in c.decode(audio=0)])
    assert np.argmax(np.abs(y) > 0.02) / 44100 == pytest.approx(expected, abs=1e-3)


def test_a_chapter_with_no_audio_gets_no_mark_and_the_book_is_made(tmp_path, capsys):
    """A row with no samples (flagged `empty`, written as a WAV of zero samples) made the AAC encoder fail
    (av.error.MemoryError) and the job crash with no manifest; every re-run renders that row again and crashed
    the same way. Now it has no chapter mark (a zero-length one would share the next chapter's start) and the
    summary lists it."""
    rows = _rows(tmp_path, [{"id": "c1", "text": "Chapter one text.", "title": "One"},
                            {"id": "c2", "text": "NOTHING", "title": "Two"},
                            {"id": "c3", "text": "Chapter three text.", "title": "Three"}])
    out = tmp_path / "out"
    args = [str(rows), "--out", str(out), *NOISE, "--book", "m4b"]
    assert narrate.main(args) == 0
    book = summary(capsys)["book"]
    assert book["empty"] == ["c2"] and book["missing"] == []
    assert [(c["id"], c["title"]) for c in book["chapters"]] == [("c1", "One"), ("c3", "Three")]
    f = ind.mp4_book((out / book["key"]).read_bytes())
    assert [title for _, title in f["chapters"]] == ["One", "Three"]
    assert f["chapters"][1][0] == pytest.approx(book["chapters"][1]["start_s"], abs=1e-3)
    man = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    assert man["c2"].status == "suspect" and "empty" in man["c2"].flags
    assert narrate.main(args) == 0  # a re-run renders the empty row again, and reuses the book
    again = summary(capsys)["book"]
    assert again["reused"] and again["key"] == book["key"]


def test_a_book_of_only_empty_chapters_is_not_made(tmp_path, capsys):
    rows = _rows(tmp_path, [{"id": "c1", "text": "NOTHING", "title": "One"}])
    out = tmp_path / "out"
    code = narrate.main([str(rows), "--out", str(out), *NOISE, "--book", "m4b"])
    s = summary(capsys)
    assert "every written chapter is empty" in s["book"]["error"] and (out / "manifest.parquet").exists()
    assert not (out / "book").exists() and code == 1


THREE = [{"id": f"c{i}", "text": f"Chapter {i} text.", "title": f"T{i}"} for i in (1, 2, 3)]


def test_the_manifest_is_written_before_the_book(tmp_path, capsys, monkeypatch):
    """The book came first: minutes for a long job, and any failure in it cost the manifest."""
    import jobs.book

    out, seen = tmp_path / "out", []
    write_book = jobs.book.write_book

    def watched(*a, **k):
        seen.append((out / "manifest.parquet").exists())
        return write_book(*a, **k)

    monkeypatch.setattr(jobs.book, "write_book", watched)
    assert narrate.main([str(_rows(tmp_path, THREE)), "--out", str(out), *NOISE, "--book", "m4b"]) == 0
    assert seen == [True] and summary(capsys)["book"]["key"]


def test_a_book_that_fails_in_any_way_keeps_the_manifest(tmp_path, capsys, monkeypatch):
    """Only ValueError/StorageError were caught: any other failure (an encoder's av.error.*) crashed the job with no
    manifest and no summary."""
    import jobs.book

    def broken(*a, **k):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(jobs.book, "write_book", broken)
    out = tmp_path / "out"
    assert narrate.main([str(_rows(tmp_path, THREE)), "--out", str(out), *NOISE, "--book", "m4b"]) == 1
    s = summary(capsys)
    assert s["book"] == {"error": "book: RuntimeError: encoder exploded"} and s["failed"] == 0
    assert len(from_parquet((out / "manifest.parquet").read_bytes())) == 3


def test_a_book_that_cannot_be_written_exits_1(tmp_path, capsys):
    """It exited 0, the summary's book.error the only sign."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "book").write_bytes(b"")  # a file where the book folder goes (refused as root too, unlike chmod)
    assert narrate.main([str(_rows(tmp_path, THREE)), "--out", str(out), *NOISE, "--book", "m4b"]) == 1
    s = summary(capsys)
    assert "File exists" in s["book"]["error"] and s["failed"] == 0 and s["manifest"]


def test_sigterm_writes_the_manifest_and_makes_no_book(tmp_path, capsys, monkeypatch):
    """After SIGTERM the job still assembled a partial book (3 s per 300 s of audio: minutes for a long book, past
    a Kubernetes grace period) before it wrote the manifest."""
    import signal

    from jobs import runner

    monkeypatch.setattr(runner, "_stop", None)  # a fresh stop event for this run (it is process-wide)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    try:
        code = narrate.main([str(_rows(tmp_path, THREE)), "--out", str(out), "--model", "fake", "--backend",
                             "tests.jobs.fakes:SigtermFake", "--runner", "local", "--no-progress", "--quiet",
                             "--voice", "ryan", "--batch-size", "1", "--book", "m4b"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    s = summary(capsys)
    assert code == 1 and s["ok"] == 1 and s["failed_ids"] == ["c2", "c3"]  # c1 finished, the rest left
    assert "the job was stopped" in s["book"]["error"] and not (out / "book").exists()
    assert (out / "manifest.parquet").exists()
