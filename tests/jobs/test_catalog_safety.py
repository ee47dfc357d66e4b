"""`catalog --retire delete` never deletes what a current prompt uses, a refused delete is kept and retried, and
two passes over one output never overlap (the lease)."""

from __future__ import annotations

import contextlib
import json

import pytest
import yaml

from jobs import catalog, lease, narrate, retire
from jobs.manifest import from_parquet
from jobs.storage import LocalSink, RetryPolicy, S3Sink, StorageError

FAKE = "tests.jobs.fakes:FakeBackend"


def _write(path, prompts, **defaults):
    path.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", **defaults}, "prompts": prompts}))


def _run(cat, out, capsys, *extra):
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "delete", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {})


def _manifest(out):
    return {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}


def test_a_rename_to_the_same_key_stem_keeps_the_live_object(tmp_path, capsys):
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "main menu", "text": "Press one for sales."}])
    assert _run(cat, out, capsys)[0] == 0
    _write(cat, [{"id": "main_menu", "text": "Press one for sales."}])
    code, s = _run(cat, out, capsys)
    man = _manifest(out)
    assert code == 0 and s["retired"] == 1 and man["main_menu"].status == "ok"
    assert man["main menu"].key == man["main_menu"].key  # same stem, same content: one object
    assert (out / man["main_menu"].key).exists() and (out / f"{man['main_menu'].key}.json").exists()
    assert man["main menu"].status == "retired" and "kept" in man["main menu"].error
    assert _run(cat, out, capsys)[0] == 0 and (out / man["main_menu"].key).exists()  # and stays


def test_a_layout_rename_to_the_same_file_name_keeps_the_new_package(tmp_path, capsys):
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "main menu", "text": "Press one for sales."}], language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    _write(cat, [{"id": "main-menu", "text": "Press one for sales, two for support."}], language="english")
    code, _ = _run(cat, out, capsys, "--layout", "asterisk")
    man = _manifest(out)
    assert code in (0, 1) and man["main-menu"].status in ("ok", "suspect") and man["main-menu"].layout
    assert all((out / k).exists() for k in man["main-menu"].layout)
    index = json.loads((out / "asterisk/index.json").read_text())
    assert {k: v["master"] for k, v in index.items()} == {"en/main-menu": man["main-menu"].key}
    assert man["main menu"].status == "retired" and man["main menu"].layout == []


def test_a_prompt_retired_after_a_failed_render_loses_its_package_files_and_master(tmp_path, capsys):
    """The failed record replaced the written one with layout=[] and the key of the render that failed, so a later
    --retire delete left the package files, the index entry and the last written master in place for good."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    welcome = {"id": "welcome", "text": "Welcome to the company line."}
    _write(cat, [welcome, {"id": "promo", "text": "Our promotion ends on Friday."}], language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    first = _manifest(out)["promo"]
    _write(cat, [welcome, {"id": "promo", "text": "Our promotion ends FOREVER."}], language="english")  # fails
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 1
    failed = _manifest(out)["promo"]
    assert failed.status == "failed" and failed.layout == first.layout and failed.previous_keys == [first.key]
    assert (out / first.key).exists() and all((out / k).exists() for k in first.layout)  # still what plays
    _write(cat, [welcome], language="english")
    code, s = _run(cat, out, capsys, "--layout", "asterisk")
    assert code == 0 and s["retired"] == 1
    assert sorted(p.name for p in out.rglob("*promo*")) == []
    assert set(json.loads((out / "asterisk/index.json").read_text())) == {"en/welcome"}
    assert _manifest(out)["promo"].error == retire.DELETED


def test_the_version_a_failed_render_kept_is_deleted_once_the_prompt_is_written_again(tmp_path, capsys,
                                                                                      monkeypatch):
    """A changed prompt whose re-render failed kept its last written object; once it rendered again the old
    object was no longer in any record and --retire delete never removed it. A refused delete is tried again."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "hours", "text": "We open at nine."}])
    assert _run(cat, out, capsys)[0] == 0
    k1 = _manifest(out)["hours"].key
    _write(cat, [{"id": "hours", "text": "We open at FOREVER."}])
    assert _run(cat, out, capsys)[0] == 1 and (out / k1).exists()
    _write(cat, [{"id": "hours", "text": "We open at ten."}])

    def refuse(self, key):
        raise StorageError(f"delete {key} failed after 1 attempt(s): AccessDenied")

    with monkeypatch.context() as m:
        m.setattr(LocalSink, "delete", refuse)
        code, s = _run(cat, out, capsys)
    rec = _manifest(out)["hours"]
    assert code == 1 and s["delete_failed"] == 1 and rec.status == "ok" and k1 in rec.previous_keys
    code, s = _run(cat, out, capsys)
    rec = _manifest(out)["hours"]
    assert code == 0 and rec.reused and rec.previous_keys == [] and not (out / k1).exists()
    assert sorted(p.name for p in out.glob("prompts/*")) == sorted([rec.key.split("/")[-1],
                                                                    f"{rec.key.split('/')[-1]}.json"])


def test_a_failed_prompts_own_object_is_kept_when_another_catalog_retires_it(tmp_path, capsys, monkeypatch):
    """Review finding: catalogs A and B share a prompt, so one object K. A's pass could not read K's sidecar (a
    transient storage error) and recorded the prompt failed with key K and no previous_keys: nothing listed K as in
    use, and B's next --retire delete pass, dropping the prompt, deleted the object A's prompt still stands on."""
    out = tmp_path / "out"
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    welcome = {"id": "welcome", "text": "Welcome to our line."}
    _write(a, [welcome])
    _write(b, [welcome, {"id": "other", "text": "Other prompt."}])
    assert _run(a, out, capsys)[0] == 0 and _run(b, out, capsys)[0] == 0
    key = _manifest(out)["welcome"].key
    real_get = LocalSink.get

    def get(self, k):
        if k == key + ".json":
            raise StorageError(f"get {k} failed after 4 attempt(s): SlowDown")
        return real_get(self, k)

    with monkeypatch.context() as m:
        m.setattr(LocalSink, "get", get)
        assert _run(a, out, capsys)[0] == 1
    def a_welcome():
        return {(r.catalog, r.id): r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}[
            ("a", "welcome")]

    assert a_welcome().status == "failed" and a_welcome().key == key and (out / key).exists()
    _write(b, [{"id": "other", "text": "Other prompt."}])
    assert _run(b, out, capsys)[0] == 0
    assert (out / key).exists() and (out / (key + ".json")).exists()   # A's prompt still uses it
    assert _run(a, out, capsys)[0] == 0
    assert (a_welcome().status, a_welcome().key, a_welcome().reused) == ("ok", key, True)   # healthy again


def test_a_refused_delete_is_recorded_counted_and_retried(tmp_path, capsys, monkeypatch):
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0
    bye = _manifest(out)["bye"].key

    def refuse(self, key):
        raise StorageError(f"delete {key} failed after 1 attempt(s): AccessDenied")

    with monkeypatch.context() as m:
        m.setattr(LocalSink, "delete", refuse)
        _write(cat, [{"id": "welcome", "text": "Welcome."}])
        code, s = _run(cat, out, capsys)
    rec = _manifest(out)["bye"]
    assert code == 1 and s["delete_failed"] == 1 and s["retired"] == 1
    assert rec.status == "retired" and rec.error.startswith("retired: delete failed") and (out / bye).exists()
    code, s = _run(cat, out, capsys)  # the storage lets us delete again: the leftover goes
    assert code == 0 and s["delete_failed"] == 0 and not (out / bye).exists()
    assert _manifest(out)["bye"].error == retire.DELETED
    assert _run(cat, out, capsys)[0] == 0 and set(_manifest(out)) == {"welcome"}


def _stored_live_objects_exist(out):
    """What a reader of the stored manifest relies on: every current prompt's object is there."""
    return all((out / r.key).exists() for r in _manifest(out).values() if r.status in retire.LIVE)


@pytest.mark.parametrize("refused", [1, 2], ids=["first-write", "second-write"])
def test_a_delete_pass_whose_manifest_write_is_refused_never_leaves_a_manifest_listing_deleted_objects(
        tmp_path, capsys, monkeypatch, refused):
    """The pass deleted retired and superseded objects before writing the manifest: when that write was refused,
    the stored manifest (the last good one) listed as current objects that were gone. Now the manifest listing the
    pass's records is written first (its deletes pending), then the deletes, then the manifest again; a refused
    write at either point leaves a stored manifest whose current objects all exist, and the next pass finishes the
    deletes."""
    monkeypatch.chdir(tmp_path)  # where write_manifest keeps a manifest the storage refused
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."},
                 {"id": "hours", "text": "We open at nine."}])
    assert _run(cat, out, capsys)[0] == 0
    first = _manifest(out)
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "hours", "text": "We open at ten."}])
    put, puts = LocalSink.put, []

    def refuse_one_manifest_write(self, key, data, content_type="application/octet-stream"):
        if key == catalog.MANIFEST_KEY:
            puts.append(key)
            if len(puts) == refused:
                raise StorageError(f"put {key} failed after 1 attempt(s): SlowDown")
        return put(self, key, data, content_type)

    with monkeypatch.context() as m:
        m.setattr(LocalSink, "put", refuse_one_manifest_write)
        m.setattr(narrate, "MANIFEST_RETRY", RetryPolicy(attempts=1))  # refused means refused, not retried
        code, _ = _run(cat, out, capsys)
    assert code == 3 and _stored_live_objects_exist(out)
    stored = _manifest(out)
    if refused == 1:  # nothing deleted: the last good manifest and its objects
        assert all((out / r.key).exists() for r in first.values())
        assert stored["bye"].status == "ok" and stored["hours"].key == first["hours"].key
    else:  # the deletes are listed as pending on the manifest that was written
        assert stored["bye"].status == "retired" and stored["bye"].error == retire.PENDING
        assert stored["hours"].previous_keys == [first["hours"].key]
    code, s = _run(cat, out, capsys)  # the storage is back: the next pass finishes the deletes
    man = _manifest(out)
    assert code == 0 and s["delete_failed"] == 0 and _stored_live_objects_exist(out)
    assert man["bye"].error == retire.DELETED and man["hours"].previous_keys == []
    assert not (out / first["bye"].key).exists() and not (out / first["hours"].key).exists()
    assert sorted(p.name for p in (out / "prompts").glob("*.wav")) == sorted(
        man[i].key.split("/")[1] for i in ("welcome", "hours"))


def _retire_bye_with_its_delete_refused(cat, out, capsys, monkeypatch) -> str:
    """Two passes: welcome and bye written, then bye retired while the storage refuses deletes; bye's key."""
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0
    bye = _manifest(out)["bye"].key

    def refuse(self, key):
        raise StorageError(f"delete {key} failed after 1 attempt(s): AccessDenied")

    _write(cat, [{"id": "welcome", "text": "Welcome."}])
    with monkeypatch.context() as m:
        m.setattr(LocalSink, "delete", refuse)
        assert _run(cat, out, capsys)[0] == 1 and (out / bye).exists()
    return bye


def test_a_prompt_back_after_a_refused_retirement_delete_takes_the_leftover_with_it(tmp_path, capsys,
                                                                                 monkeypatch):
    """A retired prompt whose delete was refused came back with new text: its retired record was dropped and
    the old object stayed in storage, listed nowhere. The new version now carries it and deletes it."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    bye = _retire_bye_with_its_delete_refused(cat, out, capsys, monkeypatch)
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye, see you soon."}])
    code, s = _run(cat, out, capsys)
    man = _manifest(out)
    assert code == 0 and s["new"] == 1 and man["bye"].status == "ok" and man["bye"].previous_keys == []
    assert not (out / bye).exists() and (out / man["bye"].key).exists()


def _listed_objects(out) -> set[str]:
    return {k for r in _manifest(out).values() for k in (r.key, *r.previous_keys) if k}


def _unlisted_audio(out) -> list[str]:
    listed = _listed_objects(out)
    return [p.relative_to(out).as_posix() for p in out.rglob("*.wav") if p.relative_to(out).as_posix() not in listed]


def test_a_prompt_back_after_a_refused_retirement_delete_whose_render_fails_keeps_the_leftover_listed(
        tmp_path, capsys, monkeypatch):
    """Review: the leftover was carried only when the returning prompt rendered; when its render failed, the retired
    record was dropped and the old object was listed nowhere, for good."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    bye = _retire_bye_with_its_delete_refused(cat, out, capsys, monkeypatch)
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "FOREVER goodbye."}])  # fails
    assert _run(cat, out, capsys)[0] == 1
    rec = _manifest(out)["bye"]
    assert rec.status == "failed" and bye in rec.previous_keys and not _unlisted_audio(out)
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye, see you."}])
    assert _run(cat, out, capsys)[0] == 0
    assert not (out / bye).exists() and not _unlisted_audio(out) and _manifest(out)["bye"].previous_keys == []


def test_deletes_listed_by_a_stopped_pass_survive_a_mark_pass(tmp_path, capsys, monkeypatch):
    """A pass stopped between its manifest and its deletes lists the superseded version on the prompt's record; a
    later `--retire mark` pass (or one that adopts unnamed records, which runs as mark) rebuilt the list without it,
    so no later delete pass ever removed it."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "hours", "text": "We open at nine."}])
    assert _run(cat, out, capsys)[0] == 0
    old = _manifest(out)["hours"].key
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "hours", "text": "We open at ten."}])

    class Killed(BaseException):
        pass

    def killed(*a, **k):
        raise Killed()   # the process dies right after the first manifest write

    with monkeypatch.context() as m:
        m.setattr(catalog, "purge", killed)
        with pytest.raises(Killed):
            _run(cat, out, capsys)
    assert _manifest(out)["hours"].previous_keys == [old]
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "mark"])
    capsys.readouterr()
    assert code == 0 and _manifest(out)["hours"].previous_keys == [old]
    assert _run(cat, out, capsys)[0] == 0 and not (out / old).exists() and not _unlisted_audio(out)


def test_a_lease_lost_during_the_deletes_never_rewrites_the_manifest(tmp_path, capsys, monkeypatch):
    """Review: the lease was checked before the deletes, not before the second manifest write: a pass whose lease
    another pass took over meanwhile replaced that pass's manifest. And a lease lost after the first write is not
    "did nothing" (exit 2): the pass rendered and recorded; it exits 1 and says its deletes are pending."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0

    class Held:
        lost = False

        def check(self):
            if self.lost:
                raise lease.LeaseLost("lost the catalog lease (taken over)")

        def fence(self):
            return None

    held, writes = Held(), []

    @contextlib.contextmanager
    def hold(sink, **kw):
        yield held

    real_purge, real_put = catalog.purge, LocalSink.put

    def purge_then_lose(*a, **k):
        res = real_purge(*a, **k)
        held.lost = True
        return res

    def put(self, key, data, content_type="application/octet-stream"):
        if key == catalog.MANIFEST_KEY:
            writes.append(held.lost)
        return real_put(self, key, data, content_type)

    monkeypatch.setattr(catalog.lease, "hold", hold)
    monkeypatch.setattr(catalog, "purge", purge_then_lose)
    monkeypatch.setattr(LocalSink, "put", put)
    _write(cat, [{"id": "welcome", "text": "Welcome."}])
    code, s = _run(cat, out, capsys)
    assert writes == [False]                      # no write after the lease was lost
    assert code == 1 and "lost the catalog lease" in s["lease_lost"]
    assert _manifest(out)["bye"].error == retire.PENDING


def test_a_local_delete_the_file_system_refuses_is_recorded_not_a_crash(tmp_path, capsys, monkeypatch):
    """LocalSink.delete let a PermissionError out (no StorageError): a pass ended in a traceback after its first
    manifest write. Now it is a refused delete like any other: recorded, exit 1, tried again next pass."""
    from pathlib import Path

    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0
    bye = _manifest(out)["bye"].key
    real = Path.unlink

    def unlink(self, missing_ok=False):
        if self.name.startswith("bye"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    _write(cat, [{"id": "welcome", "text": "Welcome."}])
    with monkeypatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        code, s = _run(cat, out, capsys)
    assert code == 1 and s["delete_failed"] == 1 and (out / bye).exists()
    assert _manifest(out)["bye"].error.startswith("retired: delete failed")
    assert _run(cat, out, capsys)[0] == 0 and not (out / bye).exists()


def test_an_overlapping_pass_is_refused_while_one_holds_the_lease(tmp_path, capsys, monkeypatch):
    """(v1.yaml and v2.yaml are two versions of one catalog: one --name, else each would own its own prompts.)"""
    out, v1, v2 = tmp_path / "out", tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    _write(v1, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}])
    _write(v2, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press two."}])
    assert _run(v1, out, capsys, "--name", "ivr")[0] == 0
    real, nested = catalog.run_rows, []

    def run_rows_then_overlap(*a, **k):  # a second pass starts while the first is between render and reconcile
        res = real(*a, **k)
        if not nested:
            nested.append(catalog.main([str(v2), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE,
                                        "--runner", "local", "--no-progress", "--quiet", "--retire", "delete",
                                        "--name", "ivr"]))
        return res

    monkeypatch.setattr(catalog, "run_rows", run_rows_then_overlap)
    code = catalog.main([str(v1), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "delete", "--name", "ivr"])
    assert nested == [2] and "another catalog run holds the lease" in capsys.readouterr().err
    assert code == 0 and all((out / r.key).exists() for r in _manifest(out).values())
    monkeypatch.setattr(catalog, "run_rows", real)
    assert _run(v2, out, capsys, "--name", "ivr")[0] == 0  # released: the next pass runs (it is "ivr" too)
    assert sorted(p.name for p in (out / "prompts").glob("*.wav")) == sorted(
        r.key.split("/")[1] for r in _manifest(out).values())


def test_s3_lease_is_exclusive_released_and_taken_over_when_stale(s3_bucket):
    sink = S3Sink(s3_bucket, "ivr")
    key = "ivr/" + lease.LEASE_KEY
    with lease.hold(sink) as held:
        held.check()
        with pytest.raises(lease.LeaseHeld, match="another catalog run holds the lease"), lease.hold(sink):
            pass
    assert sink.size(lease.LEASE_KEY) is None  # released
    sink.client.put_object(Bucket=s3_bucket, Key=key, Body=b'{"host": "dead", "pid": 1}')
    with pytest.raises(lease.LeaseHeld, match="dead pid 1"), lease.hold(sink):
        pass
    with lease.hold(sink, ttl_s=0):  # a lease nobody renewed for ttl_s is taken over
        assert json.loads(sink.get(lease.LEASE_KEY))["host"] != "dead"
    assert sink.size(lease.LEASE_KEY) is None


def _replies_lost(client, monkeypatch, calls: set[int]):
    """client.put_object whose reply is lost on the given calls (1-based): the write takes, and botocore sends it
    again, whose answer (a 412 for a conditional write) is what the caller sees."""
    real, n = client.put_object, [0]

    def put_object(**kw):
        n[0] += 1
        if n[0] in calls:
            real(**kw)
        return real(**kw)

    monkeypatch.setattr(client, "put_object", put_object)
    return n


def test_s3_lease_survives_conditional_writes_whose_reply_was_lost(s3_bucket, monkeypatch):
    """A lost reply makes botocore send a conditional write again, and the store refuses the copy (412: the lease
    has changed - by the first copy). The acquire then read its own lease as another run's (LeaseHeld: the pass did
    nothing, and the lease blocked the next passes for ttl_s); a renewal read it as lost (the pass did not
    reconcile). The lease's token tells them apart."""
    import time

    sink = S3Sink(s3_bucket, "ivr")
    n = _replies_lost(sink.client, monkeypatch, {1, 2})    # the acquire, then the first renewal
    with lease.hold(sink, ttl_s=3) as held:
        deadline = time.monotonic() + 10
        while n[0] < 3 and time.monotonic() < deadline:      # the first renewal (each ttl_s / 3 = 1 s)
            time.sleep(0.1)
        assert n[0] >= 3
        time.sleep(1.5)                                        # one more renewal, with the ETag read back
        held.check()
        assert not held.lost
    assert sink.size(lease.LEASE_KEY) is None              # released
    sink.client.put_object(Bucket=s3_bucket, Key="ivr/" + lease.LEASE_KEY, Body=b'{"host": "other", "token": "x"}')
    with pytest.raises(lease.LeaseHeld, match="other"), lease.hold(sink):
        pass                                                   # another run's lease is still another run's


def test_every_survives_a_pass_that_raises(tmp_path, capsys, monkeypatch):
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise OverflowError("Python int too large to convert to C long")
        return 0, {"ok": 1}

    monkeypatch.setattr(catalog, "run_once", flaky)
    (tmp_path / "c.yaml").write_text("prompts: []")
    code = catalog.main([str(tmp_path / "c.yaml"), "--model", "fake", "--out", f"file://{tmp_path}/o", "--every",
                         "0.01s", "--max-runs", "2", "--runner", "local", "--no-progress"])
    assert len(calls) == 2 and code == 0 and "OverflowError" in capsys.readouterr().err


def test_a_config_file_sets_the_schedule_retire_and_quiet_too(tmp_path, capsys, monkeypatch):
    """`--config` promised defaults for every option, but retire, every, max_runs and quiet were read from the
    command line only (a config's `retire: delete` ran as mark, silently); the command line still wins."""
    calls = []

    def record(catalog_path, defaults, render, opts, retire, quiet=False, **kw):
        calls.append((retire, quiet))
        return 0, {"ok": 1}

    monkeypatch.setattr(catalog, "run_once", record)
    (tmp_path / "c.yaml").write_text("prompts: []")
    conf = tmp_path / "conf.yaml"
    conf.write_text("retire: delete\nevery: 0.01s\nmax_runs: 2\nquiet: true\n")
    base = [str(tmp_path / "c.yaml"), "--model", "fake", "--out", f"file://{tmp_path}/o", "--runner", "local",
            "--no-progress", "--config", str(conf)]
    assert catalog.main(base) == 0 and calls == [("delete", True)] * 2
    calls.clear()
    assert catalog.main([*base, "--retire", "mark", "--max-runs", "1"]) == 0 and calls == [("mark", True)]
    conf.write_text("input: other.yaml\n")
    assert catalog.main(base) == 2 and "can only be given on the command line" in capsys.readouterr().err
    conf.write_text("out: somewhere\n")
    assert catalog.main(base) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) ['out']; the keys are" in err and "'output'" in err


def test_s3_lease_counts_as_lost_when_renewals_cannot_reach_the_store(s3_bucket, monkeypatch):
    """Review finding: renewals failing with no answer (an outage, not a 412) were only warned about and check()
    kept passing: once the lease was ttl_s old another pass took it over, and this one went on to write the manifest
    and delete. A lease not renewed for two thirds of ttl_s now counts as lost, before anyone can take it over."""
    import time

    sink = S3Sink(s3_bucket, "ivr")
    with lease.hold(sink, ttl_s=3) as held:
        held.check()
        real = sink.client.put_object

        def unreachable(**kw):
            raise ConnectionError("Could not connect to the endpoint URL")

        monkeypatch.setattr(sink.client, "put_object", unreachable)
        time.sleep(2.3)                                       # past 2/3 of ttl_s, before ttl_s: nobody took it yet
        with pytest.raises(lease.LeaseLost):
            held.check()
        time.sleep(1.2)
        monkeypatch.setattr(sink.client, "put_object", real)
        other = S3Sink(s3_bucket, "ivr")
        with lease.hold(other, ttl_s=3) as theirs:            # stale now: another pass takes it over
            theirs.check()
            with pytest.raises(lease.LeaseLost):
                held.check()                                  # and this one stays lost


# --- a pass cut off before its manifest: the pending journal ----------------------------------------------------------
def _files(out):
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))


def _unlisted(out):
    """Files at the output that no manifest record lists (the manifest, index and journals aside)."""
    listed = set()
    for r in _manifest(out).values():
        for k in [r.key, *r.previous_keys, *r.layout]:
            if k:
                listed.update({k, f"{k}.json"})
    return [f for f in _files(out) if f not in listed and not f.startswith("catalog-manifest")
            and f != "asterisk/index.json"]


@pytest.mark.parametrize("cut", ["killed", "refused"])
def test_a_pass_cut_off_before_its_manifest_leaves_nothing_a_delete_pass_cannot_find(tmp_path, capsys, monkeypatch,
                                                                                    cut):
    """Review: a pass killed after rendering (or whose manifest write the storage refused: exit 3) left its new
    objects, sidecars, package files and index entry listed by no manifest; after the catalog change was rolled
    back, no `--retire delete --layout asterisk` pass ever deleted them and the PBX kept serving the pulled prompt.
    The pass journals what it may create before rendering; a later delete pass deletes what no record claims. Another
    catalog sharing the output keeps everything, and a `--retire mark` pass in between deletes nothing."""
    from jobs import pending

    cat, other, out = tmp_path / "ivr.yaml", tmp_path / "other.yaml", tmp_path / "out"
    p1 = [{"id": "a", "text": "Welcome to the line."}, {"id": "b", "text": "Press one for sales."}]
    _write(cat, p1)
    _write(other, [{"id": "promo2", "text": "Ask about our winter offer."}])
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    assert _run(other, out, capsys, "--layout", "asterisk")[0] == 0
    theirs = [f for f in _files(out) if "promo2" in f]
    _write(cat, [p1[0], {"id": "b", "text": "Press two for sales."}, {"id": "promo", "text": "Ask about our offer."}])

    class Killed(BaseException):
        pass

    def refuse(*a, **k):
        if cut == "killed":
            raise Killed()
        return "file://nowhere", {"manifest_error": "refused"}   # what write_manifest says when it kept a local copy

    with monkeypatch.context() as m:
        m.setattr(catalog, "write_manifest", refuse)
        if cut == "killed":
            with pytest.raises(Killed):
                _run(cat, out, capsys, "--layout", "asterisk")
        else:
            assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 3
    journal = out / pending.journal_key("ivr")
    assert journal.exists() and any("promo" in f for f in _unlisted(out))
    _write(cat, p1)   # the change is rolled back
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "mark", "--layout", "asterisk"])
    capsys.readouterr()
    assert code == 0 and journal.exists() and _unlisted(out)   # mark deletes nothing, the journal keeps it
    code, s = _run(cat, out, capsys, "--layout", "asterisk")
    assert code == 0 and s["pending"]["deleted"] >= 3, s
    assert _unlisted(out) == [] and not journal.exists()
    assert sorted(json.loads((out / "asterisk/index.json").read_text())) == ["en/a", "en/b", "en/promo2"]
    assert all((out / f).exists() for f in theirs)
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0 and not journal.exists()   # nothing left to do


def test_a_journal_that_cannot_be_written_stops_the_pass_before_rendering(tmp_path, capsys, monkeypatch):
    from tests.jobs.fakes import FakeBackend

    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "a", "text": "Welcome to the line."}])
    real = LocalSink.put

    def put(self, key, data, ctype="application/octet-stream"):
        if key.startswith("catalog-manifest.pending"):
            raise StorageError("injected refusal")
        return real(self, key, data, ctype)

    monkeypatch.setattr(LocalSink, "put", put)
    FakeBackend.calls.clear()
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet"])
    assert code == 2 and "injected refusal" in capsys.readouterr().err
    assert FakeBackend.calls == [] and not list(out.glob("prompts/*"))


def test_a_damaged_journal_holds_what_it_names_and_fails_each_pass_until_removed(tmp_path, capsys):
    from jobs import pending

    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "a", "text": "Welcome to the line."}, {"id": "b", "text": "Press one for sales."}])
    assert _run(cat, out, capsys)[0] == 0
    b = _manifest(out)["b"].key
    _write(cat, [{"id": "a", "text": "Welcome to the line."}, {"id": "b", "text": "Press two for sales."}])
    journal = out / pending.journal_key("ivr")
    journal.write_text('{"catalog": "ivr", "objects": ["' + b + '"')   # cut short
    code, s = _run(cat, out, capsys)
    damaged = out / f"{pending.journal_key('ivr')}.damaged"
    assert code == 1 and s["pending"]["damaged"].endswith(damaged.name) and damaged.exists()
    assert (out / b).exists() and _manifest(out)["b"].previous_keys == [b]   # held, still listed for later
    assert _run(cat, out, capsys)[0] == 1   # until an operator removes the file
    damaged.unlink()
    assert _run(cat, out, capsys)[0] == 0 and not (out / b).exists() and not journal.exists()


def test_a_damaged_journal_holds_non_ascii_keys_as_well():
    """Second review: the journal is JSON (ensure_ascii), so a key with a non-ASCII stem is stored escaped
    (prompts/\\u6b22...); a damaged journal's held set took the escaped spelling only, and the real key could be
    deleted by purge / remove_packages."""
    import json

    from jobs import pending

    keys = ["prompts/welcome-0123456789abcdef.wav", "prompts/欢迎-0123456789abcdef.wav", "prompts/café-0123.wav"]
    raw = json.dumps({"catalog": "ivr", "objects": keys, "packages": []}, indent=1).encode()
    held = pending._held(raw[: len(raw) - 5])   # cut short: damaged
    assert set(keys) <= held
