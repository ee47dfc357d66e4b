"""An s3:// input's size is checked before it is downloaded (a real moto_server on 127.0.0.1: the moto_s3 fixture).

It was downloaded in full into the temp dir first (a prefix: every chapter file), then --max-input-bytes was checked
on the local copy: a 1 GiB object past a 1 KB limit still cost its transfer and its size on the driver's disk."""

from __future__ import annotations

import boto3
import pytest

from jobs.inputs import InputLimits, RowDefaults, read_inputs


@pytest.fixture()
def gets(monkeypatch):
    """The keys this test's S3 clients fetched (GetObject calls: download_file makes them too)."""
    seen: list[str] = []
    real = boto3.client

    def client(*a, **k):
        c = real(*a, **k)
        c.meta.events.register("before-parameter-build.s3.GetObject", lambda params, **_: seen.append(params["Key"]))
        return c

    monkeypatch.setattr(boto3, "client", client)
    return seen


def test_an_object_over_the_limit_is_refused_by_its_size_before_it_is_downloaded(s3_bucket, gets):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="books/book.txt", Body=b"Hello there. " * 20_000)
    gets.clear()
    with pytest.raises(ValueError, match=rf"^input: s3://{s3_bucket}/books/book\.txt is 260000 bytes; the limit is "
                                         r"1000 \(--max-input-bytes\)"):
        read_inputs(f"s3://{s3_bucket}/books/book.txt", limits=InputLimits(max_input_bytes=1000))
    assert gets == []


def test_a_prefix_whose_chapter_files_add_up_past_the_limit_is_refused_before_any_is_downloaded(s3_bucket, gets):
    s3 = boto3.client("s3")
    for i in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"book/ch{i}.txt", Body=b"Chapter text. " * 40)  # 560 bytes each
    gets.clear()
    with pytest.raises(ValueError, match=rf"^input: s3://{s3_bucket}/book/ holds more than 1000 bytes of chapter "
                                         r"files .*\(--max-input-bytes\)"):
        read_inputs(f"s3://{s3_bucket}/book/", limits=InputLimits(max_input_bytes=1000))
    assert gets == []


def test_s3_inputs_within_the_limit_are_read(s3_bucket, gets):
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="book/ch2.txt", Body=b"Two.")
    s3.put_object(Bucket=s3_bucket, Key="book/ch10.md", Body=b"# Ten\n\nThe **end**.")
    s3.put_object(Bucket=s3_bucket, Key="book/cover.jpg", Body=b"\xff" * 5000)  # not a chapter: not counted or fetched
    s3.put_object(Bucket=s3_bucket, Key="rows.jsonl", Body=b'{"id": "a", "text": "Hi."}\n')
    limits = InputLimits(max_input_bytes=100)
    rows = read_inputs(f"s3://{s3_bucket}/book/", RowDefaults(voice="ryan"), limits)
    assert [(r.id, r.text.split(), r.error) for r in rows] == [("ch2", ["Two."], None),
                                                               ("ch10", ["Ten.", "The", "end."], None)]
    assert [r.id for r in read_inputs(f"s3://{s3_bucket}/rows.jsonl", RowDefaults(voice="ryan"), limits)] == ["a"]
    assert sorted(gets) == ["book/ch10.md", "book/ch2.txt", "rows.jsonl"]
    with pytest.raises(ValueError, match=rf"input: cannot read s3://{s3_bucket}/nope\.txt"):
        read_inputs(f"s3://{s3_bucket}/nope.txt", limits=limits)


def test_a_download_stops_at_the_limit_when_the_object_grew_after_its_size_was_read(s3_bucket, tmp_path):
    from jobs.inputs import _download

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="big.txt", Body=b"x" * 3_000_000)
    with pytest.raises(ValueError, match="grew while it was downloaded"):
        _download(s3, s3_bucket, "big.txt", tmp_path / "big.txt", "s3://b/big.txt", 1_500_000)
    assert (tmp_path / "big.txt").stat().st_size <= 1_500_000


def _flaky_reads(monkeypatch, fail: set[int]):
    """StreamingBody.read raises botocore's ReadTimeoutError on the reads numbered in `fail` (1 is the first)."""
    import botocore.response
    from botocore.exceptions import ReadTimeoutError

    real, reads = botocore.response.StreamingBody.read, [0]

    def read(self, amt=None):
        reads[0] += 1
        if reads[0] in fail:
            raise ReadTimeoutError(endpoint_url="simulated")
        return real(self, amt)

    monkeypatch.setattr(botocore.response.StreamingBody, "read", read)
    return reads


def test_a_transient_error_mid_download_fetches_the_object_again(s3_bucket, monkeypatch, caplog):
    """Before: a read timeout while streaming the body failed the job (exit 2); download_file, used before the byte
    cap, retried it."""
    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="book.txt", Body=b"Hello there. " * 1000)
    s3.put_object(Bucket=s3_bucket, Key="book/ch1.txt", Body=b"One. " * 300_000)  # two chunks of 1 MiB
    s3.put_object(Bucket=s3_bucket, Key="book/ch2.txt", Body=b"Two.")
    _flaky_reads(monkeypatch, {1})
    rows = read_inputs(f"s3://{s3_bucket}/book.txt", RowDefaults(voice="ryan"), InputLimits(max_input_bytes=20_000))
    assert len(rows) == 1 and rows[0].text == "Hello there. " * 1000
    assert "fetching it again" in caplog.text
    _flaky_reads(monkeypatch, {2})  # the second read of a chapter: 1 MiB already written, removed, fetched again
    limits = InputLimits(max_input_bytes=1_600_000, max_row_chars=2_000_000)
    rows = read_inputs(f"s3://{s3_bucket}/book/", RowDefaults(voice="ryan"), limits)
    assert [(r.id, len(r.text), r.error) for r in rows] == [("ch1", 1_500_000, None), ("ch2", 4, None)]


def test_a_download_that_keeps_failing_fails_naming_the_input(s3_bucket, monkeypatch):
    from jobs import inputs

    s3 = boto3.client("s3")
    s3.put_object(Bucket=s3_bucket, Key="book.txt", Body=b"Hello there.")
    reads = _flaky_reads(monkeypatch, set(range(1, 100)))
    with pytest.raises(ValueError, match=rf"input: cannot read s3://{s3_bucket}/book\.txt \(ReadTimeoutError"):
        read_inputs(f"s3://{s3_bucket}/book.txt")
    assert reads[0] == inputs.DOWNLOAD_ATTEMPTS
