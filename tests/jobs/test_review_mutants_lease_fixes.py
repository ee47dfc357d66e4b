"""Defects the mutation review of jobs/manifest.py and jobs/pending.py found (tests/jobs/test_review_mutants_lease.py):
a stored value the manifest check accepted that the Parquet manifest cannot hold, and caption files a pending journal
stopped listing while they were still in storage. Each test fails without its fix (jobs/manifest.py `_field_ok`,
jobs/pending.py `finish`)."""

from __future__ import annotations

import io
import json

import pytest

from jobs import pending
from jobs.manifest import ManifestRecord, from_sidecar, read_stored, to_parquet
from jobs.storage import LocalSink, StorageError

OBJ = "prompts/welcome-0123456789abcdef0123.wav"


@pytest.mark.parametrize("value, ok", [(2**53, True), (-(2**53), True), (2**53 + 1, False), (2**63, False),
                                       (10**400, False), (1.5e300, True)],
                         ids=["2**53", "-2**53", "2**53+1", "2**63", "10**400", "1.5e300"])
def test_a_float_field_holds_only_integers_a_double_holds_exactly(value, ok):
    """A sidecar's `duration_s` that is an integer a float64 column cannot hold exactly (pyarrow refuses any beyond
    2**53) was taken as a record: the output was reused, and every later pass failed to encode its manifest
    (catalog: nothing stored, `manifest_error`, exit 3; narrate: JSON lines only) until the sidecar was found and
    removed. Such a sidecar is "not done" now, like an integer out of its int32 column's range."""
    rec = ManifestRecord(id="welcome", key=OBJ, status="ok").to_dict()
    got = from_sidecar(json.dumps({**rec, "duration_s": value}).encode())
    assert (got is not None) is ok
    if ok:
        to_parquet([got])


def test_a_stored_float_column_of_huge_integers_is_quarantined_not_trusted():
    """The same from a stored manifest whose `duration_s` column is an integer column (pandas wrote it): a row
    holding 2**62 was a record, and the pass's own manifest could not be written."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ["a", "b"], "key": [OBJ, OBJ], "status": ["ok", "ok"],
                      "duration_s": pa.array([2, 2**62], pa.int64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    records, bad = read_stored(buf.getvalue())
    assert [r.id for r in records] == ["a"] and [row["id"] for _, row in bad] == ["b"]
    to_parquet(records)


def test_captions_left_by_a_delete_cut_short_stay_journalled_through_a_mark_pass(tmp_path, monkeypatch):
    """A delete pass deletes a journalled object's audio, then its sidecar, then its captions; the storage refused
    the captions, so the key stayed journalled (failed: 1). A `--retire mark` pass next looked only for the audio
    and the sidecar, found neither, took the object for one never written and dropped it from the journal: the
    .srt and .vtt stayed in storage for ever, listed by no manifest and no journal. The mark pass keeps it
    journalled while any of its files is there, and the next delete pass deletes them."""
    sink = LocalSink(str(tmp_path))
    srt, vtt = OBJ.removesuffix(".wav") + ".srt", OBJ.removesuffix(".wav") + ".vtt"
    for k in (OBJ, f"{OBJ}.json", srt, vtt):
        sink.put(k, b"x")
    key = pending.journal_key("c")
    sink.put(key, json.dumps({"catalog": "c", "objects": [OBJ], "packages": []}).encode())
    real = LocalSink.delete

    def captions_refused(self, k):
        if k == srt:
            raise StorageError(f"delete {k}: AccessDenied")
        real(self, k)

    with monkeypatch.context() as m:
        m.setattr(LocalSink, "delete", captions_refused)
        assert pending.finish(sink, pending.Journal(key, "c", [OBJ]), [], set(), "prompts", True) == {
            "failed": 1, "left": 1}
    assert sink.get(OBJ) is None and sink.get(srt) == b"x"
    assert pending.finish(sink, pending.Journal(key, "c", [OBJ]), [], set(), "prompts", False) == {"left": 1}
    assert json.loads(sink.get(key))["objects"] == [OBJ]
    assert pending.finish(sink, pending.Journal(key, "c", [OBJ]), [], set(), "prompts", True) == {"deleted": 1}
    assert sink.get(srt) is None and sink.get(vtt) is None and sink.get(key) is None
