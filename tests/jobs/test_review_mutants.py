"""Behaviour of the batch jobs the suite did not pin, found by hand mutation testing of jobs/ (each test here was
seen failing on the mutant named in its docstring and passing on the real code). Plain functions, no Ray."""

from __future__ import annotations

import json

import pytest

from jobs import pending
from jobs.manifest import (
    ManifestRecord,
    from_parquet,
    from_sidecar,
    to_parquet,
)
from jobs.storage import LocalSink, StorageError

OBJ = "prompts/welcome-0123456789abcdef0123.wav"


def _sidecar(**fields) -> bytes:
    rec = ManifestRecord(id="welcome", key="prompts/welcome-0123456789abcdef0123.wav", status="ok").to_dict()
    return json.dumps({**rec, **fields}).encode()


def test_a_sidecar_is_a_written_record_only():
    """A committed output's sidecar counts (the output is reused) only when it records a written status (mutant:
    a `failed` record's sidecar taken as done, so its row was never rendered again)."""
    assert from_sidecar(_sidecar()) is not None and from_sidecar(_sidecar(status="suspect")) is not None
    assert from_sidecar(_sidecar(status="failed")) is None


@pytest.mark.parametrize("value, ok", [(2**31 - 1, True), (2**31, False), (-2**31, True), (True, False)])
def test_a_sidecar_integer_must_fit_its_column_and_not_be_a_bool(value, ok):
    """`attempts` is an int32 column: 2**31 cannot be stored (the manifest write would fail later, for the whole
    pass) and JSON `true` is no count (mutants: `<=` at the top of the range; bools taken as integers)."""
    assert (from_sidecar(_sidecar(attempts=value)) is not None) is ok


def test_a_manifest_lists_its_records_in_id_order():
    """(mutant: written in the order the pass finished them, so two runs of one catalog gave different files)"""
    records = [ManifestRecord(id=i, key=None, status="failed") for i in ("b", "c", "a")]
    assert [r.id for r in from_parquet(to_parquet(records))] == ["a", "b", "c"]


def _journal(sink: LocalSink, objects: list[str]) -> pending.Journal:
    j = pending.Journal(pending.journal_key("c"), "c", objects=list(objects))
    sink.put(j.key, json.dumps({"catalog": "c", "objects": objects, "packages": []}).encode())
    return j


def test_a_journal_naming_what_this_job_does_not_write_is_never_deleted_from(tmp_path):
    """A pending journal is read back from storage, not trusted: a key in it that is not an output of this job
    (the manifest, a path elsewhere) is refused, counted, and kept (mutant: the shape rule skipped, and a delete
    pass deleted whatever an edited journal named)."""
    sink = LocalSink(str(tmp_path))
    sink.put("catalog-manifest.parquet", b"precious")
    j = _journal(sink, ["catalog-manifest.parquet"])
    j.packages = ["catalog-manifest.parquet"]     # nor as a --layout package file (another rule, same answer)
    out = pending.finish(sink, j, [], set(), "prompts", delete=True)
    assert out.get("refused") == 2 and sink.get("catalog-manifest.parquet") == b"precious"


def test_a_mark_pass_drops_journalled_objects_that_were_never_written(tmp_path):
    """Without deletes, a journalled object that is not in storage (its row failed) is dropped from the journal,
    which then goes (mutant: kept journalled for ever)."""
    sink = LocalSink(str(tmp_path))
    j = _journal(sink, [OBJ])
    assert pending.finish(sink, j, [], set(), "prompts", delete=False) == {}
    assert sink.get(j.key) is None


def test_an_object_a_damaged_journal_names_is_not_deleted(tmp_path):
    """Keys a damaged journal holds (`Journal.held`) wait: kept and journalled (mutant: only the caller's held
    keys counted, the damaged journal's were deleted)."""
    sink = LocalSink(str(tmp_path))
    sink.put(OBJ, b"audio")
    j = _journal(sink, [OBJ])
    j.held = {OBJ}
    pending.finish(sink, j, [], set(), "prompts", delete=True)
    assert sink.get(OBJ) == b"audio" and OBJ in json.loads(sink.get(j.key))["objects"]


def test_a_journalled_object_whose_existence_storage_cannot_tell_stays_journalled(tmp_path, monkeypatch):
    """(mutant: a storage error read as "not there", the object dropped from the journal and never deleted)"""
    sink = LocalSink(str(tmp_path))
    j = _journal(sink, [OBJ])

    def size(self, key):
        raise StorageError("unreachable")
    monkeypatch.setattr(LocalSink, "size", size)
    pending.finish(sink, j, [], set(), "prompts", delete=False)
    assert json.loads(sink.get(j.key))["objects"] == [OBJ]


def test_the_journal_of_another_catalog_at_the_key_is_set_aside_not_adopted(tmp_path):
    """A journal whose `catalog` is not this one's is not this pass's to act on: moved to the .damaged file, its
    objects not adopted (mutant: adopted, and deleted as this catalog's leftovers)."""
    sink = LocalSink(str(tmp_path))
    key = pending.journal_key("c")
    sink.put(key, json.dumps({"catalog": "other", "objects": [OBJ], "packages": []}).encode())
    j = pending.begin(sink, "c", [], None, "none", set())
    assert j.objects == [] and sink.get(f"{key}.damaged") is not None and OBJ in j.held


def test_a_write_fence_counts_a_lease_not_renewed_for_two_thirds_of_its_ttl_as_lost():
    """Another pass may take the lease once it is ttl_s old, so a write is made only while the lease was renewed
    within the last two thirds (mutant: up to ttl_s, a write could land after the takeover)."""
    import io
    from datetime import datetime, timedelta, timezone
    from types import SimpleNamespace

    from jobs.lease import Fence, LeaseLost
    from jobs.storage import RetryPolicy

    def sink(age_s):
        def get_object(Bucket, Key):
            return {"Body": io.BytesIO(json.dumps({"token": "t1"}).encode()),
                    "LastModified": datetime.now(timezone.utc) - timedelta(seconds=age_s)}
        return SimpleNamespace(bucket="b", client=SimpleNamespace(get_object=get_object), retry=RetryPolicy())

    fence = Fence(".catalog-lease", "t1", ttl_s=90.0)
    fence.check(sink(30))
    with pytest.raises(LeaseLost, match="not renewed"):
        fence.check(sink(70))


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class _LeaseStore:
    """An S3 client for one lease object whose answers a test scripts: `puts` (None: the write takes, or an error
    code raised AFTER the write took when `took`), `gets` ("stored": what is stored, or an error code)."""

    def __init__(self, puts, gets, took=False) -> None:
        self.puts, self.gets, self.took, self.body = list(puts), list(gets), took, None

    def put_object(self, Bucket, Key, Body, ContentType, **cond):
        code = self.puts.pop(0)
        if code is None or self.took:
            self.body = Body
        if code is not None:
            raise _Refused(code)
        return {"ETag": '"e1"'}

    def get_object(self, Bucket, Key):
        import io
        from datetime import datetime, timezone

        what = self.gets.pop(0)
        if what == "other":    # another run's lease
            return {"Body": io.BytesIO(b'{"token": "theirs"}'), "ETag": '"e2"',
                    "LastModified": datetime.now(timezone.utc)}
        if what != "stored":
            raise _Refused(what)
        return {"Body": io.BytesIO(self.body), "ETag": '"e1"', "LastModified": datetime.now(timezone.utc)}

    def delete_object(self, **kw):
        self.body = None


def _s3_lease(client, ttl_s: float = 90.0):
    from types import SimpleNamespace

    from jobs.lease import _S3Lease

    sink = SimpleNamespace(bucket="b", client=client, _k=lambda k: f"ivr/{k}", url=lambda k: f"s3://b/ivr/{k}")
    return _S3Lease(sink, ttl_s=ttl_s)


def test_a_lease_whose_write_reply_was_lost_is_held_and_fresh():
    """The conditional write took but its reply was lost (botocore's retry refused with 412): read back, the
    lease is ours, renewed as of the start of `acquire` (mutant: never stamped, so `check()` called the fresh
    lease lost at once and the pass did not reconcile)."""
    lease = _s3_lease(_LeaseStore(puts=["PreconditionFailed"], gets=["stored"], took=True))
    lease.acquire()
    try:
        lease.check()
    finally:
        lease.release()


def test_a_lease_released_between_our_write_and_our_read_is_tried_again():
    """The holder released the lease between our refused write and our read (it is gone): the write is sent
    again and takes (mutant: one try only, the pass refused as if the lease were held)."""
    store = _LeaseStore(puts=["PreconditionFailed", None], gets=["NoSuchKey"])
    lease = _s3_lease(store)
    lease.acquire()
    try:
        lease.check()
        assert json.loads(store.body)["token"] == lease.token
    finally:
        lease.release()


def test_a_renewal_refused_because_another_run_took_the_lease_counts_it_lost_at_once():
    """(mutant: the renewal thread stopped without marking the lease lost, so the pass went on, and reconciled,
    until its own clock said the lease was old). The renewal's own verdict is read, not `check()`'s clock: the
    thread ends after its refused renewal (at ttl_s / 3) either way, however late a loaded host runs it."""
    from jobs.lease import LeaseLost

    lease = _s3_lease(_LeaseStore(puts=[None, "PreconditionFailed"], gets=["other"]), ttl_s=6.0)
    lease.acquire()
    try:
        lease._thread.join(timeout=60)
        assert not lease._thread.is_alive() and lease.lost
        with pytest.raises(LeaseLost):
            lease.check()
    finally:
        lease.release()


def test_the_version_a_failed_prompt_still_holds_is_live():
    """A prompt whose latest render failed still uses its last written version (`previous_keys`): live, never
    deleted (mutant: only its own key counted, so a retire pass deleted what the PBX still plays)."""
    from jobs.retire import live_keys

    old = "prompts/welcome-aaaaaaaaaaaaaaaaaaaa.wav"
    live = live_keys([ManifestRecord(id="welcome", key=OBJ, status="failed", previous_keys=[old])])
    assert {old, OBJ} <= live


def test_a_package_file_whose_speech_level_cannot_be_measured_is_flagged():
    """No measurable speech in a package file (silence after encoding) is a level off the target, flagged
    (mutant: an unmeasured level passed as fine)."""
    from jobs.layout import _level_flags

    assert _level_flags({"ulaw": None, "alaw": -19.0}) == ["layout:ulaw:speech_level"]


def test_a_language_names_its_package_folder_whatever_its_case():
    """`German` and `german` both go under sounds/de (mutant: case-sensitive, `German` filed under `en`)."""
    from jobs.layout import lang_code

    assert lang_code("German") == lang_code("german") == "de" and lang_code(None) == "en"


def test_chinese_sentences_are_packed_without_a_space_between_them():
    """Sentences packed into one chunk are joined with a space only between non-CJK text (mutant: always a space,
    so the model read a pause into Chinese and Japanese text, and the key text changed)."""
    from jobs.split import split_text

    assert split_text("你好。世界。", 200) == ["你好。世界。"]
    assert split_text("Hello there. 你好。", 200) == ["Hello there.你好。"]
    assert split_text("Hello there. How are you?", 200) == ["Hello there. How are you?"]
    # kana are CJK too (mutant: the range began at the unified ideographs, U+4E00)
    assert split_text("テスト. テスト.", 200) == ["テスト.テスト."]


def test_caption_spans_land_on_the_samples_join_chunks_puts_the_chunks_at():
    """Cue times come from `segments`, the audio from `join_chunks`: the same gap to the sample, also when
    pause_s * rate is a hair under an integer (0.7 s at 44.1 kHz is 30869.999... samples; mutant: truncated,
    every cue after the first one sample early per pause)."""
    import numpy as np

    from jobs.audio import join_chunks
    from jobs.captions import segments

    chunks = [np.ones(n, np.float32) for n in (100, 50, 30)]
    joined = join_chunks(chunks, 44100, 0.7)
    spans = segments([len(c) for c in chunks], 44100, 0.7)
    assert spans[-1][1] == len(joined)
    assert all(joined[a:b].all() and (a == 0 or joined[a - 1] == 0) for a, b in spans)


def test_captions_sit_next_to_their_audio_when_the_id_or_prefix_has_dots():
    """Only the audio's extension is replaced (mutant: cut at the first dot, so `chapter.1` and `chapter.2` wrote
    one `prompts/chapter.srt`)."""
    from jobs.captions import caption_keys

    stem = "books.v2/chapter.1-0123456789abcdef0123"
    assert caption_keys(f"{stem}.wav") == (f"{stem}.srt", f"{stem}.vtt")
