"""Batch-job inputs and outputs pinned by a mutation review of jobs/inputs.py and jobs/storage.py: each test here
failed on a one-line change (a "mutant") that the rest of the suite let pass, named in its docstring. Every size
limit at its exact boundary, reads that never go past the limit, S3 keys that must not leave the download folder,
and storage errors that must surface. Local files and an in-process S3 stand-in (no moto_server, no Ray)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from jobs import inputs
from jobs.inputs import InputLimits, RowDefaults, check_row, mark_duplicates, read_inputs, read_text
from jobs.storage import LocalSink, RetryPolicy, S3Sink, StorageError

NO_WAIT = RetryPolicy(attempts=3, base_delay=0.0, max_delay=0.0)


# ---- local text files ------------------------------------------------------------------------------------------

def test_a_text_file_of_exactly_max_input_bytes_is_read(tmp_path):
    """(mutant: st_size >= max_input_bytes refused a file at the limit)"""
    f = tmp_path / "book.txt"
    f.write_bytes(b"Hello there." * 10)
    assert read_text(f, InputLimits(max_input_bytes=120)) == "Hello there." * 10
    with pytest.raises(ValueError, match=r"is 120 bytes; the limit is 119"):
        read_text(f, InputLimits(max_input_bytes=119))


class _LyingOs:
    """`os` as qwen_tts_core.files sees it, but fstat() says `shown` bytes (a file that grows after it was measured)
    and the reads of what fdopen() gives are recorded."""

    def __init__(self, shown: int, reads: list[int]) -> None:
        self.shown, self.reads = shown, reads

    def __getattr__(self, name: str):
        return getattr(os, name)

    def fstat(self, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        return os.stat_result((st.st_mode, *st[1:6], self.shown, *st[7:]))

    def fdopen(self, fd: int, *a, **k) -> _Reader:
        return _Reader(os.fdopen(fd, *a, **k), self.reads)


class _Reader:
    def __init__(self, f, reads: list[int]) -> None:
        self.f, self.reads = f, reads

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def read(self, n: int = -1) -> bytes:
        self.reads.append(n)
        return self.f.read(n)


def test_a_file_that_grows_past_the_limit_after_its_size_was_read_is_refused_reading_no_more(tmp_path, monkeypatch):
    """fstat() said 10 bytes; 1000 are there by the read: the read stops at limit + 1 and the file is refused
    (mutants: `f.read()` of all of it; the grew-past check dropped, so the first limit + 1 bytes were narrated)."""
    import qwen_tts_core.files

    (tmp_path / "book.txt").write_bytes(b"a" * 1000)
    reads: list[int] = []
    monkeypatch.setattr(qwen_tts_core.files, "os", _LyingOs(10, reads))
    with pytest.raises(ValueError, match=r"grew past 100 bytes while it was read"):
        read_text(tmp_path / "book.txt", InputLimits(max_input_bytes=100))
    assert reads == [101]


def test_a_nul_byte_past_the_first_kib_still_marks_a_binary_file(tmp_path):
    """(mutant: only the first KiB searched for NUL, so a binary file with a text-like head was narrated)"""
    f = tmp_path / "book.txt"
    f.write_bytes(b"Chapter one. " * 200 + b"\0\x01\x02")
    with pytest.raises(ValueError, match="is a binary file"):
        read_inputs(f)


def test_a_byte_order_mark_is_not_narrated(tmp_path):
    """Notepad's "UTF-8" writes a BOM (mutant: decoded as plain utf-8, so U+FEFF began the chapter and a JSONL file's
    first row was malformed JSON)."""
    (tmp_path / "book.txt").write_bytes("\ufeffHello there.".encode())
    assert read_text(tmp_path / "book.txt", InputLimits()) == "Hello there."
    (tmp_path / "rows.jsonl").write_bytes("\ufeff".encode() + b'{"id": "a", "text": "Hi."}\n')
    assert [(r.id, r.error) for r in read_inputs(tmp_path / "rows.jsonl")] == [("a", None)]


# ---- rows --------------------------------------------------------------------------------------------------------

def test_a_row_of_exactly_max_row_chars_is_taken():
    """(mutant: len(text) >= max_row_chars)"""
    limits = InputLimits(max_row_chars=50)
    assert check_row({"id": "a", "text": "x" * 50}, RowDefaults(), "r", limits).error is None
    assert "has 51 characters of text; the limit is 50" in check_row({"id": "a", "text": "x" * 51}, RowDefaults(),
                                                                      "r", limits).error


@pytest.mark.parametrize("sr, ok", [(4000, True), (48000, True), ("48000", True), (3999, False), (48001, False),
                                    ("9" * 5000, False)])
def test_sample_rate_bounds_and_a_huge_digit_string(sr, ok):
    """48000 is the top of the range (mutant: sr < 48000); a 5000-digit string is the row's error, never the
    job's ValueError (mutant: the 12-digit bound dropped, int() refusing over 4300 digits)."""
    row = check_row({"id": "a", "text": "Hi.", "sample_rate": sr}, RowDefaults(), "r")
    assert (row.error is None) is ok, row.error
    if not ok:
        assert "field 'sample_rate' must be an integer in [4000, 48000]" in row.error


def test_a_row_that_failed_keeps_its_own_error_when_its_id_repeats():
    """(mutant: mark_duplicates overwrote a failed row's reason with 'duplicate id')"""
    rows = [check_row({"id": "a", "text": "Hi."}, RowDefaults(), "r:1"),
            check_row({"id": "a", "text": "Hi.", "format": "mp3"}, RowDefaults(), "r:2")]
    marked = mark_duplicates(rows)
    assert marked[0].error is None and "field 'format' must be one of" in marked[1].error


# ---- Parquet: the stored and decoded size bounds -----------------------------------------------------------------

def _parquet(path: Path, ids: list[str], texts: list[str]) -> Path:
    pq.write_table(pa.table({"id": ids, "text": texts}), path, compression="zstd")
    return path


def _stored(path: Path) -> int:
    meta = pq.read_metadata(path)
    return sum(meta.row_group(i).column(j).total_uncompressed_size for i in range(meta.num_row_groups)
               for j in range(meta.row_group(i).num_columns))


def test_parquet_row_fields_of_exactly_the_limit_stored_are_read(tmp_path):
    """(mutant: stored >= max_input_bytes)"""
    f = _parquet(tmp_path / "r.parquet", ["a"], ["x" * 100_000])
    stored = _stored(f)
    assert f.stat().st_size < stored   # compressed: only the stored bound is at stake
    assert [r.text for r in read_inputs(f, limits=InputLimits(max_input_bytes=stored))] == ["x" * 100_000]
    with pytest.raises(ValueError, match=rf"holds {stored} bytes of row fields uncompressed; the limit is "
                                         rf"{stored - 1}"):
        read_inputs(f, limits=InputLimits(max_input_bytes=stored - 1))


def test_parquet_rows_decoding_to_exactly_the_limit_are_read(tmp_path):
    """A dictionary-encoded column decodes to 16 bytes a row plus its values' UTF-8 bytes; that total at the limit
    is read, one byte over is refused (mutant: total >= max_input_bytes)."""
    ids = [f"r{i}" for i in range(300)]
    text = "é" * 500
    f = _parquet(tmp_path / "r.parquet", ids, [text] * 300)
    decoded = 16 * 300 + sum(len(i) for i in ids) + 300 * len(text.encode())
    assert _stored(f) < decoded and f.stat().st_size < decoded
    assert len(read_inputs(f, limits=InputLimits(max_input_bytes=decoded))) == 300
    with pytest.raises(ValueError, match=rf"holds more than {decoded - 1} bytes of row fields once decoded"):
        read_inputs(f, limits=InputLimits(max_input_bytes=decoded - 1))


# ---- S3 inputs, through an in-process stand-in for boto3's client ------------------------------------------------

def _denied(op: str, code: str = "AccessDenied") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "no"}}, op)


class _Body:
    def __init__(self, data: bytes, s3: FakeS3) -> None:
        self.data, self.s3, self.closed = data, s3, False
        s3.bodies.append(self)

    def iter_chunks(self, n: int):
        for i in range(0, len(self.data), 7):   # small chunks: the cap is checked between them
            yield self.data[i:i + 7]

    def read(self) -> bytes:
        return self.data

    def close(self) -> None:
        self.closed = True


class _Pages:
    def __init__(self, s3: FakeS3) -> None:
        self.s3 = s3

    def paginate(self, Bucket: str, Prefix: str):
        keys = sorted(k for k in self.s3.objects if k.startswith(Prefix))
        return [{"Contents": [{"Key": k, "Size": self.s3.listed.get(k, len(self.s3.objects[k]))} for k in keys]}]


class FakeS3:
    """Objects of one bucket in a dict; `listed` overrides the sizes listings and heads report (an object that
    grows after it was listed); `fail` maps an operation to the error it raises."""

    def __init__(self, objects: dict[str, bytes] | None = None) -> None:
        self.objects = dict(objects or {})
        self.listed: dict[str, int] = {}
        self.fail: dict[str, Exception] = {}
        self.calls: list[tuple[str, str]] = []
        self.bodies: list[_Body] = []

    def _call(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if op in self.fail:
            raise self.fail[op]

    def head_object(self, Bucket: str, Key: str) -> dict:
        self._call("head_object", Key)
        return {"ContentLength": self.listed.get(Key, len(self.objects[Key]))}

    def get_object(self, Bucket: str, Key: str) -> dict:
        self._call("get_object", Key)
        if Key not in self.objects:
            raise _denied("GetObject", "NoSuchKey")
        return {"Body": _Body(self.objects[Key], self)}

    def put_object(self, Bucket: str, Key: str, Body: bytes, **kw) -> dict:
        self._call("put_object", Key)
        self.objects[Key] = bytes(Body)
        return {}

    def delete_object(self, Bucket: str, Key: str) -> dict:
        self._call("delete_object", Key)
        self.objects.pop(Key, None)
        return {}

    def get_paginator(self, name: str) -> _Pages:
        assert name == "list_objects_v2"
        return _Pages(self)


@pytest.fixture()
def s3(monkeypatch):
    import boto3

    fake = FakeS3()
    monkeypatch.setattr(boto3, "client", lambda *a, **k: fake)
    return fake


def test_an_s3_object_of_exactly_the_limit_is_read_and_its_body_closed(s3, tmp_path):
    """(mutant: the download refusing size >= budget)"""
    s3.objects["book.txt"] = b"Hello there." * 10
    rows = read_inputs("s3://b/book.txt", RowDefaults(voice="ryan"), InputLimits(max_input_bytes=120))
    assert [r.text for r in rows] == ["Hello there." * 10]
    assert s3.bodies and all(b.closed for b in s3.bodies)


def test_an_s3_object_one_byte_over_is_refused_by_its_size_before_any_download(s3, tmp_path):
    """(mutant: head size > limit + 1, so an object one byte over was downloaded, then refused)"""
    s3.objects["book.txt"] = b"x" * 121
    with pytest.raises(ValueError, match=r"is 121 bytes; the limit is 120"):
        inputs.fetch_s3_input("s3://b/book.txt", tmp_path, 120)
    assert [op for op, _ in s3.calls] == ["head_object"]


def test_read_inputs_gives_the_s3_download_its_own_limit(s3):
    """Refused by its listed size, never fetched (mutant: read_inputs calling fetch_s3_input without
    max_input_bytes: the 256 MiB default let it download, and only the local copy was refused)."""
    s3.objects["book.txt"] = b"x" * 121
    with pytest.raises(ValueError, match=r"s3://b/book\.txt is 121 bytes; the limit is 120"):
        read_inputs("s3://b/book.txt", limits=InputLimits(max_input_bytes=120))
    assert s3.calls == [("head_object", "book.txt")]


def test_a_download_that_grows_past_the_limit_stops_and_closes_its_body(s3, tmp_path):
    """(mutant: body.close() dropped from the finally: a refused download left its connection open)"""
    s3.objects["book.txt"] = b"x" * 500
    s3.listed["book.txt"] = 100
    with pytest.raises(ValueError, match=r"grew while it was downloaded.*\(100 bytes\)"):
        inputs.fetch_s3_input("s3://b/book.txt", tmp_path, 100)
    assert len(s3.bodies) == 1 and s3.bodies[0].closed


def test_an_s3_key_that_climbs_out_lands_in_the_download_folder(s3, tmp_path):
    """The local name of an object is its key's last part (mutant: dest / key, so '../evil.txt' was written next
    to the download folder, outside it)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    s3.objects["../evil.txt"] = b"Hello."
    got = inputs.fetch_s3_input("s3://b/../evil.txt", dest, 100)
    assert got == dest / "evil.txt" and got.read_bytes() == b"Hello."
    assert not (tmp_path / "evil.txt").exists()


def test_a_prefixs_chapter_files_are_its_own_files_only_and_share_one_budget(s3, tmp_path):
    """Keys below the prefix with a '/' in the rest (a subfolder, '../x.txt') are not chapters (mutant: every
    key ending .txt, written to folder / '../x.txt', outside the folder); the chapter files share the limit as they
    download, whatever the listing said (mutant: each file given the whole limit)."""
    dest = tmp_path / "dest"
    dest.mkdir()
    s3.objects.update({"book/ch1.txt": b"One. " * 4, "book/../../x.txt": b"Out.", "book/sub/ch2.txt": b"Sub."})
    folder = inputs.fetch_s3_input("s3://b/book/", dest, 100)
    assert sorted(p.name for p in folder.iterdir()) == ["ch1.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    s3.objects = {"book/ch1.txt": b"a" * 60, "book/ch2.txt": b"b" * 60}
    s3.listed = {"book/ch1.txt": 10, "book/ch2.txt": 10}
    with pytest.raises(ValueError, match=r"s3://b/book/ch2\.txt grew while it was downloaded.*\(40 bytes\)"):
        inputs.fetch_s3_input("s3://b/book/", tmp_path / "again", 100)


def test_a_prefix_whose_chapter_files_add_up_to_exactly_the_limit_is_read(s3, tmp_path):
    """(mutant: listed total >= limit refused)"""
    s3.objects.update({"book/ch1.txt": b"a" * 60, "book/ch2.txt": b"b" * 40})
    folder = inputs.fetch_s3_input("s3://b/book/", tmp_path, 100)
    assert sorted(p.name for p in folder.iterdir()) == ["ch1.txt", "ch2.txt"]
    with pytest.raises(ValueError, match=r"holds more than 99 bytes of chapter files"):
        inputs.fetch_s3_input("s3://b/book/", tmp_path / "again", 99)


# ---- outputs -----------------------------------------------------------------------------------------------------

def test_a_key_into_a_sibling_folder_that_shares_the_roots_name_is_refused(tmp_path):
    """'../out-evil/x' resolves to a path that starts with the root's string but is not under it (mutant: a string
    prefix test instead of the path's parents)."""
    sink = LocalSink(str(tmp_path / "out"))
    with pytest.raises(ValueError, match="escapes the output folder"):
        sink.put("../out-evil/x.wav", b"data")
    assert not (tmp_path / "out-evil").exists()


def test_a_read_only_file_system_is_not_retried(tmp_path, monkeypatch):
    """EROFS is the same next time (mutant: only ENAMETOOLONG and PermissionError taken as final)."""
    calls = []

    def refuse(*a):
        calls.append(a)
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StorageError, match=r"after 1 attempt\(s\)"):
        LocalSink(str(tmp_path), NO_WAIT).put("a/x.wav", b"data")
    assert len(calls) == 1


def test_a_key_naming_a_folder_reads_as_no_object(tmp_path):
    """(mutant: get() reading any existing path, so a folder key raised IsADirectoryError)"""
    sink = LocalSink(str(tmp_path))
    sink.put("audio/x.wav", b"data")
    assert sink.get("audio") is None and sink.get("audio/x.wav") == b"data"


def _s3_sink(fake: FakeS3, prefix: str = "runs/one") -> S3Sink:
    sink = S3Sink("b", prefix, NO_WAIT)
    sink._client = fake
    return sink


def test_a_refused_s3_read_is_an_error_not_a_missing_object():
    """AccessDenied on a get is a StorageError; only NoSuchKey/404 is 'missing' (mutants: every error read as
    missing; AccessDenied added to the missing codes). A missing output reads as None."""
    fake = FakeS3({"runs/one/a.wav": b"data"})
    sink = _s3_sink(fake)
    assert sink.get("a.wav") == b"data" and sink.get("b.wav") is None
    fake.fail["get_object"] = _denied("GetObject")
    with pytest.raises(StorageError, match="AccessDenied"):
        sink.get("a.wav")
    assert [op for op, _ in fake.calls].count("get_object") == 3   # two reads, then one refused (not retried)


def test_a_refused_s3_write_is_an_error_after_one_attempt():
    """A put S3 refuses surfaces (never a silently missing object), and is not retried."""
    fake = FakeS3()
    fake.fail["put_object"] = _denied("PutObject")
    with pytest.raises(StorageError, match=r"put s3://b/runs/one/a\.wav failed after 1 attempt"):
        _s3_sink(fake).put("a.wav", b"data")
    assert fake.calls == [("put_object", "runs/one/a.wav")]


def test_s3_listing_gives_keys_relative_to_the_prefix():
    """(mutant: the prefix stripped without its '/', so every key came back as '/a.wav')"""
    fake = FakeS3({"runs/one/a.wav": b"1", "runs/one/m/b.json": b"2", "runs/other/c.wav": b"3"})
    assert _s3_sink(fake).list() == ["a.wav", "m/b.json"]
    assert _s3_sink(fake).list("m/") == ["m/b.json"]
    assert _s3_sink(fake, "").list("runs/o") == ["runs/one/a.wav", "runs/one/m/b.json", "runs/other/c.wav"]



def test_a_left_over_temp_file_is_not_listed(tmp_path):
    """A write cut short (or a preflight probe) leaves a dot-file; list() hides it, so it is never taken for an
    output (mutant: dot-files listed)."""
    sink = LocalSink(str(tmp_path))
    sink.put("audio/x.wav", b"data")
    (tmp_path / "audio" / ".x.wav.0123abcd.tmp").write_bytes(b"half")
    (tmp_path / ".qtts-probe-1").write_bytes(b"ok")
    assert sink.list() == ["audio/x.wav"] and sink.list("audio/") == ["audio/x.wav"]
