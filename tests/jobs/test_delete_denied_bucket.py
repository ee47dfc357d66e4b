"""A bucket that takes writes but refuses deletes: narrate (which never deletes) runs, naming the probe it leaves;
a caller that deletes (catalog --retire delete keeps the strict preflight()) is refused up front."""

from __future__ import annotations

import json

import pytest

from jobs import narrate, storage
from jobs.storage import StorageError, open_sink


@pytest.fixture()
def deletes_denied(monkeypatch):
    """Every S3Sink client refuses DeleteObject with AccessDenied (a deny policy / write-once bucket)."""
    from botocore.exceptions import ClientError

    made = storage.S3Sink.client.fget

    def client(self):
        c = made(self)

        def deny(**kw):
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "deletes denied"}}, "DeleteObject")

        c.delete_object = deny
        return c

    monkeypatch.setattr(storage.S3Sink, "client", property(client))


def _keys(bucket: str) -> list[str]:
    import boto3

    return sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket).get("Contents", []))


def test_narrate_renders_to_a_delete_denied_bucket_and_names_the_probe(tmp_path, capsys, caplog, s3_bucket,
                                                                        deletes_denied):
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    code = narrate.main([str(rows), "--model", "fake", "--voice", "vivian", "--out", f"s3://{s3_bucket}/run",
                         "--backend", "tests.jobs.fakes:FakeBackend", "--runner", "local", "--no-progress",
                         "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["ok"] == 1
    probes = [k for k in _keys(s3_bucket) if ".qtts-probe-" in k]
    assert len(probes) == 1 and "run/manifest.parquet" in _keys(s3_bucket)
    assert f"s3://{s3_bucket}/{probes[0]}" in caplog.text and "never deletes" in caplog.text


def test_strict_preflight_still_refuses_a_delete_denied_bucket(s3_bucket, deletes_denied):
    with pytest.raises(StorageError, match="deletes are refused"):
        open_sink(f"s3://{s3_bucket}/cat").preflight()
