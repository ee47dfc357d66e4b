import pytest

from jobs.storage import (
    LocalSink,
    RetryPolicy,
    S3Sink,
    StorageError,
    _retry,
    content_key,
    open_sink,
)


def test_content_key_is_deterministic_and_sensitive():
    a = content_key({"text": "hi", "voice": "ryan"}, "ch 1/x", "wav")
    assert a == content_key({"voice": "ryan", "text": "hi"}, "ch 1/x", "wav")
    assert a != content_key({"text": "hi", "voice": "vivian"}, "ch 1/x", "wav")
    assert a.startswith("audio/ch_1_x-") and a.endswith(".wav")


def test_local_sink_roundtrip(tmp_path):
    sink = open_sink(f"file://{tmp_path}/out")
    assert isinstance(sink, LocalSink)
    sink.preflight()
    sink.put("a/b.wav", b"RIFF1234")
    assert sink.get("a/b.wav") == b"RIFF1234" and sink.size("a/b.wav") == 8
    assert sink.list("a/") == ["a/b.wav"] and sink.get("zz") is None
    sink.delete("a/b.wav")
    assert sink.size("a/b.wav") is None
    with pytest.raises(ValueError, match="escapes"):
        sink.put("../evil", b"x")


def test_unwritable_folder_fails_preflight(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")  # works as root too, unlike chmod
    with pytest.raises(StorageError, match="not writable"):
        open_sink(str(blocker / "sub")).preflight()


def test_uri_schemes():
    s3 = open_sink("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Sink) and s3.uri == "s3://bucket/some/prefix" and s3.url("k") == \
        "s3://bucket/some/prefix/k"
    with pytest.raises(ValueError, match="scheme"):
        open_sink("gs://b/p")


class _Err(Exception):
    def __init__(self, code):
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


def test_retry_backs_off_then_succeeds_or_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _Err("InternalError")
        return "ok"

    from jobs.storage import _s3_retryable

    pol = RetryPolicy(attempts=4, base_delay=0.001)
    assert _retry("put", flaky, pol, _s3_retryable) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(StorageError, match="after 1 attempt"):
        _retry("put", lambda: (_ for _ in ()).throw(_Err("AccessDenied")), pol, _s3_retryable)
    with pytest.raises(StorageError, match="after 4 attempt"):
        _retry("put", lambda: (_ for _ in ()).throw(_Err("SlowDown")), pol, _s3_retryable)


@pytest.mark.parametrize("fails", ["write", "rename"])
def test_a_failed_local_write_leaves_no_temp_file(tmp_path, monkeypatch, fails):
    """A write cut short (disk full) or a rename refused left its dot-named temp file on every attempt: list()
    hides them and nothing removed them (4 per failed object, more per failed manifest)."""
    import errno
    import os

    def full(fd):  # a file system that allocates late reports the full disk when the data is synced
        raise OSError(errno.ENOSPC, "No space left on device")

    def refuse(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    if fails == "write":
        monkeypatch.setattr(os, "fsync", full)
    else:
        monkeypatch.setattr(os, "replace", refuse)
    sink = LocalSink(str(tmp_path / "out"), RetryPolicy(attempts=3, base_delay=0.001))
    with pytest.raises(StorageError, match=r"after 3 attempt\(s\)"):
        sink.put("audio/row.wav", b"x" * 1000)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


def test_a_local_object_is_synced_before_its_name_and_its_name_after(tmp_path, monkeypatch):
    """The data reaches the disk before the rename gives it its name, and the rename is synced too: after a crash or
    a power cut a named object is whole (a resume trusts an object whose size matches its sidecar's)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    LocalSink(str(tmp_path / "out")).put("audio/row.wav", b"x" * 1000)
    assert events == [("fsync", "file"), ("replace", "row.wav"), ("fsync", "dir")]
    assert (tmp_path / "out" / "audio" / "row.wav").read_bytes() == b"x" * 1000
