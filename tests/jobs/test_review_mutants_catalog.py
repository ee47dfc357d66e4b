"""Prompt catalogs (jobs/catalog.py) and audiobooks (jobs/book.py) pinned by a mutation review: each test here failed
on a one-line change (a "mutant") that the rest of the suite let pass, named in its docstring. Catalog names at
their limits, what counts as a catalog taken over or renamed, the catalog file's defaults and CSV rules, the
schedule's options, a lease that cannot be read; the book's chapter order, ends and length, its key and its
reuse. Plain functions and `catalog.main` with the fake backend on local files (no Ray, no network)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from jobs import book, catalog, codecs
from jobs.book import BookMeta, book_key, book_or_reuse, title_from, write_book
from jobs.inputs import RowDefaults
from jobs.manifest import ManifestRecord, from_parquet
from jobs.storage import LocalSink, StorageError

FAKE = "tests.jobs.fakes:FakeBackend"


def _write(path, prompts, **defaults):
    path.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", **defaults}, "prompts": prompts}))
    return path


def _main(cat, out, *extra):
    return catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", *extra])


def _summary(capsys):
    lines = capsys.readouterr().out.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _rec(id_, key, status="ok", catalog_=None):
    return ManifestRecord(id=id_, key=key, status=status, catalog=catalog_)


# ---- catalog names -----------------------------------------------------------------------------------------------

def test_a_name_of_exactly_the_limit_is_taken_and_one_more_is_not():
    """(mutants: `>=` refused a name of NAME_MAX characters; `> NAME_MAX + 1` took one of 101)"""
    assert catalog.catalog_name("x" * catalog.NAME_MAX, None, "ivr.yaml") == "x" * catalog.NAME_MAX
    with pytest.raises(ValueError, match="is longer than 100 characters"):
        catalog.catalog_name("x" * (catalog.NAME_MAX + 1), None, "ivr.yaml")


@pytest.mark.parametrize("name, why", [
    (".", "must not be a path"),             # (mutant: only ".." refused)
    ("menus ", "must not start or end with a space"),   # (mutant: only a leading space refused)
    ("   ", "must not be empty"),            # (mutant: only "" counted as empty; blanks said "space")
])
def test_more_names_that_are_refused(name, why):
    with pytest.raises(ValueError, match=f"^--name .*{why}"):
        catalog.catalog_name(name, None, "ivr.yaml")


# ---- ownership, renames, catalogs taken over --------------------------------------------------------------------

def test_a_catalogs_own_record_of_an_id_wins_over_an_unnamed_one_it_adopts():
    """`owned` lists adopted records first and the catalog's own last, so reconcile's id map keeps its own (mutant:
    the unnamed record's older key won: the pass counted the prompt changed and listed its own object as
    superseded)."""
    unnamed = _rec("welcome", "prompts/welcome-old.wav")
    own = _rec("welcome", "prompts/welcome-new.wav", catalog_="ivr")
    mine, others, adopted = catalog.owned([own, unnamed], "ivr", {"welcome"})
    assert mine[-1] is own and adopted == 1 and others == []
    from jobs.retire import reconcile

    current = [ManifestRecord(id="welcome", key="prompts/welcome-new.wav", status="ok", reused=True)]
    _, counts = reconcile(current, mine, "delete")
    assert counts["unchanged"] == 1 and current[0].previous_keys == []


def _cat(name, pairs, status="ok"):
    return [_rec(i, f"prompts/{i}-{k}.wav", status, name) for i, k in pairs]


def test_look_alike_asks_at_nine_in_ten_shared_prompts_and_not_below():
    """Another catalog all (or all but one in ten) of whose current prompts are this one's is named as perhaps
    this catalog's earlier name (mutants: `>` needed more than 9 of 10; `8 *` asked at 8 of 10, where two
    catalogs that only share prompts would be told to take each other's name, which retires one's own)."""
    ten = [(f"p{i}", "a") for i in range(10)]
    here = _cat("new", ten[:9])
    assert catalog.look_alike(here, _cat("old", ten)) == ["old"]
    assert catalog.look_alike(_cat("new", ten[:8]), _cat("old", ten)) == []


def test_look_alike_counts_current_prompts_with_the_same_content_of_named_catalogs_only():
    """(mutants: this pass's failed records counted as its prompts; the other's retired records counted; ids
    compared without their content; records nobody claims reported as a catalog named None)"""
    pairs = [("a", "1"), ("b", "1")]
    assert catalog.look_alike(_cat("new", pairs, "failed"), _cat("old", pairs)) == []
    assert catalog.look_alike(_cat("new", pairs), [*_cat("old", pairs), *_cat("old", [("c", "1")], "retired")]) \
        == ["old"]
    assert catalog.look_alike(_cat("new", pairs), _cat("old", [("a", "2"), ("b", "2")])) == []
    assert catalog.look_alike(_cat("new", pairs), _cat(None, pairs)) == []


def test_a_pass_whose_changed_prompts_all_failed_has_not_turned_the_catalog_over():
    """A failed render keeps its prompt's old version: not a catalog that lost its prompts (mutants: the failed
    record's key, or its id alone, taken as the prompt's; a two-prompt catalog whose re-renders failed then held
    its deletes and warned of two files of one name)."""
    previous = _cat("ivr", [("a", "1"), ("b", "1")])
    failed = _cat("ivr", [("a", "2"), ("b", "2")], "failed")
    assert catalog.turned_over(previous, failed) == 0


def test_prompts_renamed_with_the_same_content_keep_the_catalog():
    """An id renamed with its text unchanged keeps its object (mutant: only ids counted, so renaming two prompts
    read as another catalog of the same name and the pass deleted nothing)."""
    before = [_rec("main menu", "prompts/main-menu-1.wav", "ok", "ivr"), _rec("Bye", "prompts/bye-1.wav", "ok", "ivr")]
    after = [_rec("main_menu", "prompts/main-menu-1.wav", "ok", "ivr"), _rec("bye", "prompts/bye-1.wav", "ok", "ivr")]
    assert catalog.turned_over(before, after) == 0
    assert catalog.turned_over(_cat("ivr", [("a", "1"), ("b", "1")]), _cat("ivr", [("c", "3"), ("d", "3")])) == 2


def test_turned_over_counts_current_prompts_only():
    """A prompt retired earlier is not one this pass turns over (mutant: retired records counted, so a one-prompt
    catalog that replaced its prompt, with one retired record about, held its deletes as if two were lost)."""
    previous = [*_cat("ivr", [("a", "1")]), *_cat("ivr", [("old", "0")], "retired")]
    assert catalog.turned_over(previous, _cat("ivr", [("b", "2")])) == 1


def test_a_failed_render_with_a_shared_old_key_is_not_a_kept_prompt():
    """(mutant: the failed record's key counted as a live object the pass keeps)"""
    previous = _cat("ivr", [("a", "1"), ("b", "1")])
    current = [_rec("c", "prompts/a-1.wav", "failed", "ivr"), _rec("d", "prompts/d-2.wav", "ok", "ivr")]
    assert catalog.turned_over(previous, current) == 2


# ---- the catalog file --------------------------------------------------------------------------------------------

def test_yaml_defaults_carry_instruct_format_and_model_to_every_prompt(tmp_path):
    """(mutants: each of these three defaults dropped, the command line's used instead)"""
    cat = tmp_path / "ivr.yaml"
    cat.write_text("defaults: {instruct: calm, format: wav-ulaw, model: other}\nprompts:\n  - {id: a, text: Hi.}\n")
    (row,) = catalog.read_catalog(cat, RowDefaults(voice="ryan"))
    assert (row.instruct, row.format, row.model, row.error) == ("calm", "wav-ulaw", "other", None)


def test_a_csv_catalog_needs_both_an_id_and_a_text_column(tmp_path):
    """(mutants: a header without `text`, or without `id`, taken: every row then failed, or got an id made up)"""
    for header in ("id,words\na,Hello.\n", "name,text\na,Hello.\n"):
        (tmp_path / "c.csv").write_text(header)
        with pytest.raises(ValueError, match="needs a header row with at least 'id' and 'text'"):
            catalog.read_catalog(tmp_path / "c.csv", RowDefaults(voice="ryan"))


def test_an_empty_csv_cell_takes_the_default(tmp_path):
    """A CSV has no way to leave a field out but an empty cell (mutant: "" given as the value, the row failed)."""
    (tmp_path / "c.csv").write_text("id,text,voice,sample_rate\na,Hello.,,\n")
    (row,) = catalog.read_catalog(tmp_path / "c.csv", RowDefaults(voice="ryan", sample_rate=8000))
    assert (row.voice, row.sample_rate, row.error) == ("ryan", 8000, None)


def test_reading_a_long_csv_catalog_puts_csvs_field_limit_back(tmp_path):
    """csv's field limit is one global of the process: raised while a catalog with a long text is read, then put
    back (mutant: left raised, for every other CSV read in the process)."""
    before = csv.field_size_limit()
    (tmp_path / "c.csv").write_text("id,text\na," + "Hello there. " * 12000 + "\n")
    catalog.read_catalog(tmp_path / "c.csv", RowDefaults(voice="ryan"))
    assert csv.field_size_limit() == before


# ---- the schedule and its options --------------------------------------------------------------------------------

def test_every_reads_minutes_and_days_and_refuses_zero_and_trailing_words():
    """(mutants: `m` read as seconds, `d` as hours; 0 taken, a pass straight after the last for ever; `1h30`
    read as one hour)"""
    assert catalog.parse_every("15m") == 900 and catalog.parse_every("1d") == 86400
    assert catalog.parse_every("1.5h") == 5400
    for bad in ("0", "0s", "1h30", "1 hour"):
        with pytest.raises(ValueError, match="expected a positive duration"):
            catalog.parse_every(bad)


@pytest.mark.parametrize("wait", ["-1", "86401"])
def test_a_lease_wait_out_of_range_is_refused_before_anything(tmp_path, capsys, wait):
    """(mutants: either bound dropped: the pass ran)"""
    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}]), tmp_path / "out"
    assert _main(cat, out, "--lease-wait", wait) == 2
    assert "lease-wait must be 0..86400 seconds" in capsys.readouterr().err and not out.exists()


def test_a_bad_name_with_every_is_refused_once_not_on_every_pass(tmp_path, capsys):
    """(mutant: `--name` not checked up front: each scheduled pass failed on it, exit 2 only at --max-runs)"""
    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}]), tmp_path / "out"
    assert _main(cat, out, "--name", "en/menus", "--every", "0.01s", "--max-runs", "3") == 2
    assert capsys.readouterr().err.count("error: --name 'en/menus' must not be a path") == 1


def test_a_one_off_pass_that_crashes_is_not_a_silent_exit_1(tmp_path, monkeypatch):
    """Without --every an unexpected error ends the run with its traceback (mutant: turned into exit 1 with no
    word of what failed)."""
    def broken(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(catalog, "run_once", broken)
    cat = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}])
    with pytest.raises(RuntimeError, match="unexpected"):
        _main(cat, tmp_path / "out")


# ---- the lease ----------------------------------------------------------------------------------------------------

def test_a_lease_that_cannot_be_read_counts_as_lost_and_no_manifest_is_written(tmp_path, capsys, monkeypatch):
    """(mutant: a StorageError reading the lease passed as "still ours", and the pass wrote its manifest and
    deleted on a guess)"""
    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}]), tmp_path / "out"

    def unreadable(sink):
        raise StorageError("get .catalog-lease failed after 4 attempt(s): SlowDown")

    monkeypatch.setattr(catalog.lease, "check_writes", unreadable)
    assert _main(cat, out) == 1
    s = _summary(capsys)
    assert "cannot read the catalog lease" in s["lease_lost"] and s["rendered_before_loss"] == 1
    assert not (out / catalog.MANIFEST_KEY).exists()


# ---- exit codes -----------------------------------------------------------------------------------------------------

def test_a_manifest_not_written_outranks_failed_prompts(tmp_path, capsys, monkeypatch):
    """Exit 3 (the manifest is not at the output) whatever else failed (mutant: a failed prompt made it exit 1,
    which reads as "see the manifest")."""
    monkeypatch.chdir(tmp_path)
    cat = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}, {"id": "b", "text": "FOREVER."}])

    def refused(*a, **k):
        return "file://nowhere", {"manifest_error": "refused"}

    monkeypatch.setattr(catalog, "write_manifest", refused)
    assert _main(cat, tmp_path / "out") == 3
    assert _summary(capsys)["failed"] == 1


# ---- the book -----------------------------------------------------------------------------------------------------

SR = 16000


def _chapters(sink, spec, fmt="wav-16k"):
    """ManifestRecords of chapters written to `sink`: spec = [(id, seconds)], each a tone at the codec's rate."""
    recs = []
    rate = codecs.get(fmt).sample_rate
    for i, (cid, seconds) in enumerate(spec):
        n = int(round(seconds * rate))
        pcm = (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(n) / rate)).astype(np.float32)
        key = f"audio/{cid}-{i:020d}.{codecs.get(fmt).ext}"
        sink.put(key, codecs.encode(pcm, fmt))
        recs.append(ManifestRecord(id=cid, key=key, status="ok", format=fmt, sample_rate=rate))
    return recs


def _decoded_chapters(path):
    import av

    with av.open(str(path)) as c:
        marks = [(float(ch["start"] * ch["time_base"]), float(ch["end"] * ch["time_base"]),
                  ch["metadata"]["title"]) for ch in c.chapters()]
        samples = sum(f.samples for f in c.decode(audio=0))
    return marks, samples


def test_chapters_stay_in_the_order_given_each_ending_where_the_next_begins(tmp_path):
    """Input order, not id order (mutant: sorted by id, "intro" after "chapter-1"); the summary's starts and
    duration are the book's (mutant: counted at the model's rate), and so are the marks a player reads."""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("intro", 1.0), ("chapter-1", 2.0), ("afterword", 0.5)])
    info = write_book(recs, ["Intro", "One", "After"], sink, BookMeta(title="T"))
    assert [c["id"] for c in info["chapters"]] == ["intro", "chapter-1", "afterword"]
    assert [c["start_s"] for c in info["chapters"]] == [0.0, 1.0, 3.0] and info["duration_s"] == 3.5
    marks, _ = _decoded_chapters(tmp_path / "out" / info["key"])
    assert [t for *_, t in marks] == ["Intro", "One", "After"]
    assert [(round(a, 3), round(b, 3)) for a, b, _ in marks] == [(0.0, 1.0), (1.0, 3.0), (3.0, 3.5)]


def test_the_whole_last_chapter_is_in_the_book(tmp_path):
    """The encoder holds back its last frames until it is flushed (mutant: not flushed, the book ended up to
    two AAC frames, 46 ms, before the last chapter did)."""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 0.5), ("c2", 0.5)])
    info = write_book(recs, ["One", "Two"], sink, BookMeta())
    _, samples = _decoded_chapters(tmp_path / "out" / info["key"])
    assert samples >= book.SAMPLE_RATE  # both chapters, to the sample or more (AAC pads its last frame)


def test_chapters_in_a_headerless_telephony_format_are_decoded_as_that_format(tmp_path):
    """A raw u-law chapter has no header to say what it is (mutant: decoded without its codec name: the book was
    not made)."""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 1.0), ("c2", 0.5)], fmt="ulaw")
    info = write_book(recs, ["One", "Two"], sink, BookMeta())
    assert info["duration_s"] == 1.5 and [c["start_s"] for c in info["chapters"]] == [0.0, 1.0]


def test_a_chapter_object_missing_from_the_output_is_named(tmp_path):
    """(mutant: read as a chapter of no audio, the book made without it and nothing said)"""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 0.5), ("c2", 0.5)])
    sink.delete(recs[1].key)
    with pytest.raises(ValueError, match=r"book: chapter 'c2' \(audio/c2-.*\) is missing from the output"):
        write_book(recs, ["One", "Two"], sink, BookMeta())


def test_a_chapter_written_without_a_key_is_missing_not_skipped_silently(tmp_path):
    """(mutant: only a record's status was read: one that says ok with no object was left out of both lists)"""
    sink = LocalSink(str(tmp_path / "out"))
    recs = [*_chapters(sink, [("c1", 0.5)]), ManifestRecord(id="c2", key=None, status="ok")]
    assert write_book(recs, ["One", "Two"], sink, BookMeta())["missing"] == ["c2"]


def test_the_book_key_changes_with_titles_tags_and_cover(tmp_path):
    """A changed title, tag or cover image is a new book (mutants: left out of the key, and the old book, with
    the old titles or cover, was reused)."""
    cover = tmp_path / "cover.png"
    cover.write_bytes(b"A")
    recs = [_rec("c1", "audio/c1.wav"), _rec("c2", "audio/c2.wav")]
    meta = BookMeta(title="T", cover=str(cover))
    base = book_key(recs, ["One", "Two"], meta)
    assert base != book_key(recs, ["One", "Second"], meta)
    assert base != book_key(recs, ["One", "Two"], BookMeta(title="T", author="Someone", cover=str(cover)))
    cover.write_bytes(b"B")   # another image under the same name
    assert base != book_key(recs, ["One", "Two"], meta)


@pytest.mark.parametrize("title, stem", [
    ("../../etc/passwd", "etc-passwd"),   # (mutant: '/' kept: the book written outside book/)
    ("...Hidden.", "Hidden"),             # (mutant: dots kept at the ends: a hidden file)
    ("x" * 200, "x" * 60),                # (mutant: no bound on the stem)
])
def test_the_book_key_is_one_short_file_name_under_book(title, stem):
    key = book_key([_rec("c1", "audio/c1.wav")], ["One"], BookMeta(title=title))
    assert key.startswith(f"book/{stem}-") and key.count("/") == 1 and key.endswith(".m4b")


def test_a_book_whose_file_is_gone_is_made_again(tmp_path):
    """Its record (`<key>.json`) alone is no book (mutant: reused, the summary naming a file that is not there)."""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 0.5)])
    first = book_or_reuse(recs, ["One"], sink, BookMeta())
    sink.delete(first["key"])
    again = book_or_reuse(recs, ["One"], sink, BookMeta())
    assert not again["reused"] and (tmp_path / "out" / first["key"]).exists()


@pytest.mark.parametrize("stored", [b"not json", b'{"key": "book/other.m4b", "chapters": []}', b'{"key": "K"}'])
def test_a_book_record_that_is_not_this_books_is_made_again(tmp_path, stored):
    """(mutants: a sidecar that is not JSON crashed the book; one of another key, or with no chapter list, was
    taken as this book's)"""
    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 0.5)])
    first = book_or_reuse(recs, ["One"], sink, BookMeta())
    sink.put(first["key"] + ".json", stored.replace(b"K", first["key"].encode()))
    again = book_or_reuse(recs, ["One"], sink, BookMeta())
    assert not again["reused"] and again["chapters"] == first["chapters"]


def test_titles_from_file_names_and_headings():
    """(mutants: a blank heading taken as the title; numbers inside the name cut too; the rest of the name
    lower-cased; runs of spaces inside a heading kept)"""
    assert title_from("03-the-storm", "   ") == "The storm"
    assert title_from("03-part-2-the-end", None) == "Part 2 the end"
    assert title_from("01_BBC-news", None) == "BBC news"
    assert title_from("x", "A\n  long\theading") == "A long heading"


def test_the_books_tags_name_album_artist_and_genre(tmp_path):
    """What audiobook players show (mutants: no album, album artist, comment or genre tag)"""
    from tests.jobs import independent as ind

    sink = LocalSink(str(tmp_path / "out"))
    recs = _chapters(sink, [("c1", 0.5)])
    info = write_book(recs, ["One"], sink, BookMeta(title="Storm", author="A. Writer", narrator="ryan"))
    tags = ind.mp4_book((tmp_path / "out" / info["key"]).read_bytes())["tags"]
    assert tags["\xa9alb"] == ["Storm"] and tags["aART"] == ["A. Writer"] and tags["\xa9gen"] == ["Audiobook"]
    assert tags["\xa9cmt"] == ["Narrated by ryan (Qwen3-TTS)"]


def _bmp(w=4, h=4) -> bytes:
    import struct

    row = b"\x10\x20\x30" * w + b"\x00" * ((4 - 3 * w % 4) % 4)
    pixels = row * h
    header = struct.pack("<2sIHHI", b"BM", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def test_a_cover_must_be_a_jpeg_or_png_by_name_and_by_content(tmp_path):
    """(mutants: a BMP named .png taken as the cover; a PNG named .gif taken)"""
    from tests.jobs.test_book import png

    bmp = tmp_path / "cover.png"
    bmp.write_bytes(_bmp())
    with pytest.raises(ValueError, match="cover: cover.png must be a JPEG or PNG image, got 'bmp'"):
        BookMeta(cover=str(bmp)).check()
    gif = tmp_path / "cover.gif"
    gif.write_bytes(png())
    with pytest.raises(ValueError, match="cover: use a .jpg or .png image, got 'cover.gif'"):
        BookMeta(cover=str(gif)).check()



class _Held:
    """A lease a test loses at a chosen point (as an S3 lease lapses: `check()` raises from then on)."""

    lost = False

    def check(self):
        if self.lost:
            raise catalog.lease.LeaseLost("lost the catalog lease (taken over)")

    def fence(self):
        return None


def _lose_lease_after(monkeypatch, name, nth=1):
    """Hold a _Held lease for the pass and lose it right after the `nth` call of `catalog.<name>` returns."""
    import contextlib

    held, real, calls = _Held(), getattr(catalog, name), []

    @contextlib.contextmanager
    def hold(sink, **kw):
        yield held

    def then_lose(*a, **k):
        res = real(*a, **k)
        calls.append(1)
        held.lost = held.lost or len(calls) == nth
        return res

    monkeypatch.setattr(catalog.lease, "hold", hold)
    monkeypatch.setattr(catalog, name, then_lose)


def test_a_lease_lost_before_the_manifest_write_leaves_the_stored_manifest_as_it_was(tmp_path, capsys,
                                                                                    monkeypatch):
    """The lease is checked again after reconcile (and the --layout packages, minutes for a big catalog), before
    the manifest is written (mutant: not, and a pass another had taken over replaced that pass's manifest)."""
    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}, {"id": "b", "text": "Bye."}]), tmp_path / "o"
    assert _main(cat, out, "--retire", "delete") == 0
    capsys.readouterr()
    before = (out / catalog.MANIFEST_KEY).read_bytes()
    _write(cat, [{"id": "a", "text": "Hi."}])
    _lose_lease_after(monkeypatch, "reconcile")
    assert _main(cat, out, "--retire", "delete") == 1
    assert "lost the catalog lease" in _summary(capsys)["lease_lost"]
    assert (out / catalog.MANIFEST_KEY).read_bytes() == before


def test_a_lease_lost_after_the_manifest_write_deletes_nothing(tmp_path, capsys, monkeypatch):
    """The deletes come after the manifest that lists them as pending, and only while the lease holds (mutant: no
    check before `purge`: a pass another had taken over deleted what that pass may list as current)."""
    from jobs import retire

    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}, {"id": "b", "text": "Bye."}]), tmp_path / "o"
    assert _main(cat, out, "--retire", "delete") == 0
    capsys.readouterr()
    bye = {r.id: r for r in from_parquet((out / catalog.MANIFEST_KEY).read_bytes())}["b"].key
    _write(cat, [{"id": "a", "text": "Hi."}])
    _lose_lease_after(monkeypatch, "write_manifest")
    assert _main(cat, out, "--retire", "delete") == 1
    assert "lost the catalog lease" in _summary(capsys)["lease_lost"] and (out / bye).exists()
    assert {r.id: r for r in from_parquet((out / catalog.MANIFEST_KEY).read_bytes())}["b"].error == retire.PENDING


def test_a_delete_pass_leaves_another_catalogs_retired_package_files(tmp_path, capsys):
    """Catalog b retired a prompt with `--retire mark` (its files stay: b's choice). Catalog a's `--retire delete
    --layout asterisk` pass deletes its own retired prompts' package files only (mutant: b's retired records were
    handed to remove_packages with a's, and a deleted b's files)."""
    out = tmp_path / "out"
    a = _write(tmp_path / "a.yaml", [{"id": "hours", "text": "Open nine to five."}, {"id": "x", "text": "Bye now."}],
               language="english")
    b = _write(tmp_path / "b.yaml", [{"id": "promo", "text": "Ask about our offer."}, {"id": "hi", "text": "Hello."}],
               language="english")
    assert _main(a, out, "--layout", "asterisk") in (0, 1) and _main(b, out, "--layout", "asterisk") in (0, 1)
    _write(b, [{"id": "hi", "text": "Hello."}], language="english")
    assert _main(b, out, "--layout", "asterisk", "--retire", "mark") in (0, 1)
    capsys.readouterr()
    promo = {(r.catalog, r.id): r for r in from_parquet((out / catalog.MANIFEST_KEY).read_bytes())}[("b", "promo")]
    assert promo.status == "retired" and promo.layout and all((out / k).exists() for k in promo.layout)
    _write(a, [{"id": "hours", "text": "Open nine to five."}], language="english")
    assert _main(a, out, "--layout", "asterisk", "--retire", "delete") in (0, 1)
    assert all((out / k).exists() for k in promo.layout)


@pytest.mark.parametrize("retire, nth", [("mark", 1), ("delete", 2)])
def test_a_lease_lost_after_the_last_manifest_write_leaves_the_pending_journal(tmp_path, capsys, monkeypatch,
                                                                               retire, nth):
    """The journal of what the pass may create is another pass's once the lease is lost: left as it was, and the
    loss reported, exit 1 (mutants: no lease check before `pending.finish`, with --retire mark or delete: the
    journal was rewritten or removed and the pass exited 0)."""
    from jobs import pending

    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}, {"id": "b", "text": "Bye."}]), tmp_path / "o"
    assert _main(cat, out, "--retire", retire) == 0
    capsys.readouterr()
    _write(cat, [{"id": "a", "text": "Hi there."}, {"id": "b", "text": "Bye."}])   # a's old version: superseded
    _lose_lease_after(monkeypatch, "write_manifest", nth)
    assert _main(cat, out, "--retire", retire) == 1
    assert "lost the catalog lease" in _summary(capsys)["lease_lost"]
    assert (out / pending.journal_key("ivr")).exists()


def test_a_journalled_leftover_whose_delete_is_refused_fails_the_pass(tmp_path, capsys, monkeypatch):
    """A pass cut off before its manifest left a new object only its journal lists; the next delete pass's delete
    of it refused is a failure, exit 1 (mutant: the journal's failed count ignored, exit 0 with the leftover
    still served)."""
    cat, out = _write(tmp_path / "ivr.yaml", [{"id": "a", "text": "Hi."}]), tmp_path / "o"
    assert _main(cat, out, "--retire", "delete") == 0
    _write(cat, [{"id": "a", "text": "Hi there."}])

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed()

    with monkeypatch.context() as m:
        m.setattr(catalog, "write_manifest", killed)
        with pytest.raises(Killed):
            _main(cat, out, "--retire", "delete")
    _write(cat, [{"id": "a", "text": "Hi."}])   # rolled back: the new version is a leftover

    def refuse(self, key):
        raise StorageError(f"delete {key} failed after 1 attempt(s): AccessDenied")

    capsys.readouterr()
    monkeypatch.setattr(LocalSink, "delete", refuse)
    assert _main(cat, out, "--retire", "delete") == 1
    assert _summary(capsys)["pending"]["failed"]
