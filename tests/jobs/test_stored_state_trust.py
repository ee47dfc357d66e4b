"""What a catalog pass reads back from its output (the stored manifest, a reused output's sidecar, the --layout
index) is not trusted: `--retire delete` deletes only keys of the shape this job writes, a corrupt or hostile row is
quarantined instead of failing every pass, and a corrupt index is rebuilt. Also: case-insensitive stores, and CSV
catalogs with a text longer than csv's default field limit."""

from __future__ import annotations

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs import catalog, layout, retire, storage
from jobs.inputs import InputLimits, RowDefaults
from jobs.manifest import ManifestRecord, from_parquet, to_parquet
from jobs.storage import LocalSink, content_key

FAKE = "tests.jobs.fakes:FakeBackend"
MANIFEST = catalog.MANIFEST_KEY


def _write(path, prompts, **defaults):
    path.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", **defaults}, "prompts": prompts}))


def _run(cat, out, capsys, *extra):
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {})


def _manifest(out):
    return {r.id: r for r in from_parquet((out / MANIFEST).read_bytes())}


def _store(out, records):
    (out / MANIFEST).write_bytes(to_parquet(list(records)))


def _precious(out, *names):
    for n in names:
        (out / n).parent.mkdir(parents=True, exist_ok=True)
        (out / n).write_bytes(b"PRECIOUS")


# 1. --retire delete deletes only what this job writes


def test_refusal_accepts_only_keys_of_the_shape_this_job_writes():
    key = content_key({"text": "hi"}, "main menu", "wav", "prompts")
    assert retire.refusal(key, "prompts") is None
    assert retire.refusal(content_key({"t": 1}, "ümlaut ünïcode", "ulaw", "prompts"), "prompts") is None
    for bad in ("important/master-recording.wav", "manifest.parquet", MANIFEST, "../outside.wav",
                f"{key}.json", key.replace("prompts/", "audio/"), key.replace("prompts/", "prompts/../"),
                "prompts/x-0123456789abcdef012.wav", "prompts/x-0123456789abcdef0123.pdf",
                "prompts/sub/x-0123456789abcdef0123.wav", "prompts/.x-0123456789abcdef0123.wav",
                "prompts/-0123456789abcdef0123.wav", "asterisk/ulaw/sounds/en/welcome.ulaw", 7, None):
        assert retire.refusal(bad, "prompts"), bad
    assert retire.refusal(layout.package_key("g722", "en", "digits/1"), package=True) is None
    for bad in ("asterisk/index.json", "asterisk/ulaw/sounds/en/../../../../x.ulaw", "asterisk/ulaw/sounds/en/a.alaw",
                "asterisk/ulaw/sounds/xx/a.ulaw", "asterisk/mp3/sounds/en/a.mp3", "important/a.ulaw", key,
                "asterisk/ulaw/sounds/en/a b.ulaw", "asterisk/ulaw/sounds/en/.ulaw"):
        assert retire.refusal(bad, package=True), bad


def test_refusal_accepts_keys_written_before_stems_had_a_byte_limit():
    """Before commit 52c5de5 a stem was cut at 80 characters only: an 80-character CJK id made a 240-byte stem,
    written fine on S3 and listed in manifests since; refusal took it for another job's file and never deleted it."""
    legacy = "prompts/" + "日" * 80 + "-0123456789abcdef0123.wav"
    assert retire.refusal(legacy, "prompts") is None
    assert storage.safe_stem("日" * 90, max_bytes=0) == "日" * 80  # the old rule, from its one owner
    assert storage.safe_stem("日" * 90) == "日" * 66  # the rule now (200 bytes)
    assert retire.refusal(content_key({}, "日" * 90, "wav", "prompts"), "prompts") is None
    for bad in ("日" * 81, "日 本" * 20, "日" * 79 + "."):  # neither rule makes these
        assert retire.refusal(f"prompts/{bad}-0123456789abcdef0123.wav", "prompts"), bad


def test_a_stored_manifest_row_naming_other_files_gets_them_refused_not_deleted(tmp_path, capsys):
    """Before: the retired record's key and previous_keys were deleted whatever they named."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0
    _precious(out, "important/master-recording.wav", "manifest.parquet")
    man = _manifest(out)
    real = man["bye"].key
    man["bye"].key, man["bye"].previous_keys = "important/master-recording.wav", ["manifest.parquet", MANIFEST]
    man["welcome"].previous_keys = ["important/master-recording.wav"]
    _store(out, man.values())
    _write(cat, [{"id": "welcome", "text": "Welcome."}])
    code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == 0 and s["delete_refused"] == 4
    assert (out / "important/master-recording.wav").read_bytes() == b"PRECIOUS"
    assert (out / "manifest.parquet").read_bytes() == b"PRECIOUS" and (out / MANIFEST).exists()
    assert (out / real).exists()  # the object the record no longer names is left alone too (never guessed)
    after = _manifest(out)
    assert after["bye"].status == "retired" and after["bye"].error.startswith(retire.REFUSED)
    assert "important/master-recording.wav" in after["bye"].error and after["bye"].previous_keys == []
    assert after["welcome"].previous_keys == [] and after["welcome"].status == "ok"
    assert _run(cat, out, capsys, "--retire", "delete")[0] == 0  # recorded once; nothing is ever retried
    assert (out / "important/master-recording.wav").exists() and "bye" not in _manifest(out)


def test_a_reused_outputs_sidecar_cannot_add_keys_to_delete(tmp_path, capsys):
    """Before: a reused output's record was its sidecar, previous_keys/layout/catalog included."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}])
    assert _run(cat, out, capsys)[0] == 0
    shaped = "prompts/keep-0123456789abcdef0123.wav"  # even a key of the right shape: not the sidecar's field
    _precious(out, "important/contract.pdf", shaped)
    side = out / f"{_manifest(out)['welcome'].key}.json"
    d = json.loads(side.read_text())
    d.update(previous_keys=["important/contract.pdf", shaped], layout=["asterisk/ulaw/sounds/en/menu.ulaw"],
             catalog="someone-else")
    side.write_text(json.dumps(d))
    code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == 0 and s["reused"] == 2
    assert (out / "important/contract.pdf").read_bytes() == b"PRECIOUS" and (out / shaped).exists()
    rec = _manifest(out)["welcome"]
    assert rec.previous_keys == [] and rec.layout == [] and rec.catalog == "ivr"


def test_layout_files_a_stored_row_lists_are_deleted_only_when_they_are_package_files(tmp_path, capsys):
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome to the line."}, {"id": "bye", "text": "Goodbye now."}],
           language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    _precious(out, "important/notes.ulaw")
    man = _manifest(out)
    package = list(man["bye"].layout)
    man["bye"].layout = [*package, "important/notes.ulaw", "asterisk/index.json", MANIFEST]
    _store(out, man.values())
    _write(cat, [{"id": "welcome", "text": "Welcome to the line."}], language="english")
    code, _ = _run(cat, out, capsys, "--layout", "asterisk", "--retire", "delete")
    assert code == 0
    assert not any((out / k).exists() for k in package)  # its real package files are deleted
    assert (out / "important/notes.ulaw").read_bytes() == b"PRECIOUS" and (out / MANIFEST).exists()
    assert set(json.loads((out / layout.INDEX_KEY).read_text())) == {"en/welcome"}
    bye = _manifest(out)["bye"]
    assert bye.layout == [] and bye.error.startswith(retire.REFUSED) and "important/notes.ulaw" in bye.error


# 2. a corrupt or hostile stored manifest


def test_a_stored_key_out_of_the_folder_neither_crashes_nor_blocks_later_passes(tmp_path, capsys):
    """Before: LocalSink's ValueError escaped _delete after the first manifest write: exit 2 on every pass."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out, capsys)[0] == 0
    _precious(tmp_path, "outside.wav")
    man = _manifest(out)
    man["bye"].key = "../outside.wav"
    _store(out, man.values())
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "new", "text": "Hello."}])
    code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == 0 and s["retired"] == 1 and s["delete_refused"] == 1
    assert (tmp_path / "outside.wav").read_bytes() == b"PRECIOUS"
    assert _run(cat, out, capsys, "--retire", "delete")[0] == 0
    assert sorted(_manifest(out)) == ["new", "welcome"]


def test_a_key_the_sink_refuses_with_valueerror_is_a_failed_delete():
    class Refusing:
        def delete(self, key):
            raise ValueError(f"key {key!r} escapes the output folder")

    key = content_key({"x": 1}, "bye", "wav", "prompts")
    assert "escapes" in retire._delete(Refusing(), key)
    rec = ManifestRecord(id="bye", key=key, status="retired", error=retire.PENDING)
    failed, changed, refused = retire.purge([rec], Refusing(), [], "prompts")
    assert (failed, changed, refused) == (1, True, 0) and rec.error.startswith("retired: delete failed")


def _table(out):
    return pq.read_table(io.BytesIO((out / MANIFEST).read_bytes()))


def _put(out, table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    (out / MANIFEST).write_bytes(buf.getvalue())


def _set(table, name, array):
    return table.set_column(table.column_names.index(name), name, array)


@pytest.mark.parametrize("damage, quarantined", [
    (lambda t: _set(t, "attempts", pa.array([2**40, 1], pa.int64())), 1),   # too big for the int32 column
    (lambda t: _set(t, "status", pa.array(["ok", "gone"])), 1),
    (lambda t: _set(t, "previous_keys", pa.array([None, None], pa.list_(pa.string()))), 0),  # null: the default
    (lambda t: _set(t, "layout", pa.array([[None], []], pa.list_(pa.string()))), 1),
    (lambda t: _set(t, "attempts", pa.array([1.5, 1], pa.float64())), 1),  # not a whole number
    (lambda t: t.drop(["layout", "previous_keys", "catalog", "retries"]), 0),  # an older manifest: defaults
    (lambda t: _set(t, "attempts", pa.array([None, 1.0], pa.float64())), 0),  # pandas: an int column with a null
], ids=["int64-attempts", "unknown-status", "null-lists", "null-in-list", "fraction-attempts", "older-columns",
        "float-attempts"])
def test_a_corrupt_manifest_row_is_quarantined_and_kept(tmp_path, capsys, caplog, damage, quarantined):
    """Before: TypeError tracebacks (a null list) or exit 3 on every pass (a key of type int); then: the row was
    left out of the manifest the pass wrote (what it named unlisted for ever) and the pass exited 0. Now it is kept
    in the quarantine file beside the manifest, and every pass exits 1 while the file holds it."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "bye", "text": "Goodbye."}, {"id": "welcome", "text": "Welcome."}])
    assert _run(cat, out, capsys)[0] == 0
    stored = damage(_table(out))
    _put(out, stored)
    code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == (1 if quarantined else 0) and s["ok"] == 2 and s["synthesized"] == 0  # nothing rendered again
    assert s.get("quarantined", {}).get("rows", 0) == quarantined
    assert {r.id: r.status for r in from_parquet((out / MANIFEST).read_bytes())} == {"bye": "ok", "welcome": "ok"}
    if not quarantined:
        assert not (out / catalog.QUARANTINE_KEY).exists()
        assert _run(cat, out, capsys, "--retire", "delete")[:1] == (0,)
        return
    assert "quarantined" in caplog.text and "(id '" in caplog.text  # names the row
    held = [json.loads(line) for line in (out / catalog.QUARANTINE_KEY).read_text().splitlines()]
    bad = [r for r in stored.to_pylist() if r["id"] == held[0]["row"]["id"]]
    assert len(held) == 1 and json.loads(json.dumps(bad[0])) == held[0]["row"] and held[0]["why"]  # as stored
    assert s["quarantined"]["new"] == 1 and s["quarantined"]["file"].endswith(catalog.QUARANTINE_KEY)
    code, s = _run(cat, out, capsys, "--retire", "delete")  # still held: still exit 1, not added twice
    assert code == 1 and s["quarantined"]["rows"] == 1 and s["quarantined"]["new"] == 0
    assert len((out / catalog.QUARANTINE_KEY).read_text().splitlines()) == 1
    (out / catalog.QUARANTINE_KEY).unlink()  # an operator dealt with it
    assert _run(cat, out, capsys, "--retire", "delete")[:1] == (0,)


def test_a_quarantined_row_of_another_catalog_keeps_what_it_names(tmp_path, capsys):
    """Before: catalog b's live record, quarantined (a null in its flags), was left out of what a pass of catalog a
    counted as live: a's --retire delete of the same prompt (one shared object) deleted b's audio, and b's record
    vanished from the manifest."""
    a, b, out = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "out"
    _write(a, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}])
    _write(b, [{"id": "welcome", "text": "Welcome."}])
    assert _run(a, out, capsys)[0] == 0 and _run(b, out, capsys)[0] == 0
    table = _table(out)
    rows = table.to_pylist()
    for r in rows:
        if r["catalog"] == "b":
            r["flags"], shared = [None], r["key"]
    _put(out, pa.Table.from_pylist(rows, schema=table.schema))
    _write(a, [{"id": "menu", "text": "Press one."}])
    code, s = _run(a, out, capsys, "--retire", "delete")
    assert code == 1 and s["retired"] == 1 and s["quarantined"]["rows"] == 1
    assert (out / shared).exists() and (out / f"{shared}.json").exists()  # b's current prompt's audio
    assert _manifest(out)["welcome"].status == "retired"  # a's, listed until nothing holds the object
    held = json.loads((out / catalog.QUARANTINE_KEY).read_text())["row"]
    assert held["catalog"] == "b" and held["key"] == shared and held["flags"] == [None]
    assert _run(a, out, capsys, "--retire", "delete")[0] == 1 and (out / shared).exists()


def test_held_keys_name_everything_a_quarantined_row_lists_and_purge_and_remove_packages_keep_them(tmp_path):
    key = content_key({"x": 1}, "welcome", "wav", "prompts")
    old = content_key({"x": 0}, "welcome", "wav", "prompts")
    files = [layout.package_key(c, "en", "welcome") for c in layout.ASTERISK_CODECS]
    row = {"id": "welcome", "key": key, "status": "gone", "previous_keys": [old, None], "layout": files + [7]}
    held = retire.held_keys([row, {"key": 7}, "junk"])
    assert {key, f"{key}.json", old, f"{old}.json", *files} <= held
    deleted = []

    class Recording(LocalSink):
        def delete(self, k):
            deleted.append(k)

    sink = Recording(str(tmp_path))
    gone = ManifestRecord(id="Welcome", key=key.replace("welcome", "Welcome"), status="retired", error=retire.PENDING,
                          previous_keys=[old], layout=list(files))  # (its key matches a held one ignoring case)
    assert retire.purge([gone], sink, [], "prompts", held=held) == (0, True, 0)
    assert layout.remove_packages([gone], sink, held=held) == 0
    assert deleted == [] and gone.error == retire.WAITING and gone.previous_keys == [old] and gone.layout == files
    assert retire.purge([gone], sink, [], "prompts") == (0, True, 0) and layout.remove_packages([gone], sink) == 0
    assert set(deleted) >= {gone.key, old, *files} and gone.layout == [] and gone.previous_keys == []


@pytest.mark.parametrize("damage, column", [
    (lambda t: t.drop(["status"]), "'status' is missing"),
    (lambda t: t.drop(["id"]), "'id' is missing"),
    (lambda t: _set(t, "status", pa.nulls(2)), "'status' is null in every row"),
    (lambda t: _set(t, "key", pa.array([7, 8])), "'key' is of type int64, not string"),
    (lambda t: _set(t, "flags", pa.array(["a", "b"])), "'flags' is of type string, not list<item: string>"),
], ids=["no-status-column", "no-id-column", "null-status-column", "int-keys", "string-flags"])
def test_a_manifest_whose_columns_are_not_the_schema_exits_2_naming_the_column(tmp_path, capsys, damage, column):
    """Before: every row (of every catalog) was quarantined, dropped from the manifest the pass wrote, and the pass
    exited 0: the objects of other catalogs' prompts stayed in storage unlisted for ever."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "bye", "text": "Goodbye."}, {"id": "welcome", "text": "Welcome."}])
    assert _run(cat, out, capsys)[0] == 0
    _put(out, damage(_table(out)))
    before = (out / MANIFEST).read_bytes()
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "new", "text": "New."}])
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "delete"])
    err = capsys.readouterr().err
    assert code == 2 and f"{out}/{MANIFEST}: column {column}" in err and "nothing done" in err
    assert (out / MANIFEST).read_bytes() == before and not (out / catalog.QUARANTINE_KEY).exists()
    assert len(list((out / "prompts").glob("*.wav"))) == 2  # nothing rendered, nothing deleted


def test_a_pandas_round_trip_of_the_manifest_quarantines_nothing(tmp_path):
    """Before: clearing one cell of an int column in pandas made the column float64 and every row was quarantined."""
    pd = pytest.importorskip("pandas")
    from jobs.manifest import read_manifest

    good = [ManifestRecord(id="a", key=content_key({}, "a", "wav", "prompts"), status="ok", flags=["x"], attempts=2,
                           lufs=-16.0), ManifestRecord(id="b", key=None, status="failed", error="boom")]
    path = tmp_path / "m.parquet"
    path.write_bytes(to_parquet(good))
    df = pd.read_parquet(path)
    df.loc[df.id == "b", "attempts"] = None
    df.to_parquet(path)
    records, bad = read_manifest(path.read_bytes())
    assert bad == [] and records[0] == good[0] and records[1].attempts == 0 and type(records[0].attempts) is int


def test_read_manifest_names_each_row_it_leaves_out():
    from jobs.manifest import read_manifest

    good = ManifestRecord(id="a", key=content_key({}, "a", "wav", "prompts"), status="ok")
    table = pa.Table.from_pylist([good.to_dict(), {**good.to_dict(), "id": "b", "status": None},
                                  {**good.to_dict(), "id": None}])
    buf = io.BytesIO()
    pq.write_table(table, buf)
    records, bad = read_manifest(buf.getvalue())
    assert records == [good]
    assert bad[0].startswith("row 2 (id 'b'): field 'status'") and bad[1].startswith("row 3: field 'id'")


@pytest.mark.parametrize("cut", [100, 0], ids=["cut-short", "empty"])
def test_an_unreadable_manifest_exits_2_naming_it(tmp_path, capsys, cut):
    """An empty manifest object is damaged too (review: it was read as no manifest at all, and the pass wrote one of
    its own catalog's records only: every other catalog's records at the output, their pending deletes and retired
    prompts, were dropped)."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}])
    assert _run(cat, out, capsys)[0] == 0
    damaged = (out / MANIFEST).read_bytes()[:cut]
    (out / MANIFEST).write_bytes(damaged)
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet"])
    assert code == 2 and f"{out}/{MANIFEST} cannot be read" in capsys.readouterr().err
    assert (out / MANIFEST).read_bytes() == damaged


# 3. case-insensitive stores


def _rename_then_retire(cat, out, capsys, after_rename=lambda man: None, extra=()):
    """Welcome -> welcome (same text), then welcome leaves the catalog; --retire delete passes. Returns the
    manifest after the rename pass (`after_rename` checks storage then)."""
    _write(cat, [{"id": "Welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}], language="english")
    assert _run(cat, out, capsys, *extra)[0] == 0
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}], language="english")
    code, s = _run(cat, out, capsys, "--retire", "delete", *extra)
    assert code == 0 and s["retired"] == 1
    renamed = _manifest(out)
    after_rename(renamed)
    _write(cat, [{"id": "menu", "text": "Press one."}], language="english")
    for _ in range(2):  # (the second pass drops the records whose deletes are done)
        assert _run(cat, out, capsys, "--retire", "delete", *extra)[0] == 0
    return renamed


def test_a_case_only_rename_on_a_case_insensitive_store_keeps_the_current_prompts_audio(tmp_path, capsys,
                                                                                       monkeypatch):
    """Before: retiring 'Welcome' deleted prompts/Welcome-<h>.wav, which on a case-folding store (macOS, SMB) is
    the object 'welcome' reused."""
    real = LocalSink._path
    monkeypatch.setattr(storage.LocalSink, "_path", lambda self, key: real(self, key.lower()))
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"

    def welcome_is_there(man):
        sink = LocalSink(str(out))
        assert man["welcome"].status == "ok" and sink.get(man["welcome"].key)
        assert sink.get(f"{man['welcome'].key}.json")

    renamed = _rename_then_retire(cat, out, capsys, welcome_is_there)
    assert renamed["Welcome"].status == "retired" and renamed["Welcome"].error == retire.WAITING  # kept, listed
    assert renamed["welcome"].key.lower() == renamed["Welcome"].key.lower()
    assert set(_manifest(out)) == {"menu"} and [p.name[:5] for p in (out / "prompts").iterdir()] == ["menu-"] * 2


@pytest.mark.parametrize("extra", [(), ("--layout", "asterisk")], ids=["objects", "layout"])
def test_a_case_only_rename_on_a_case_sensitive_store_leaves_nothing_behind(tmp_path, capsys, extra):
    """Before: prompts/Welcome-<h>.wav, another object than prompts/welcome-<h>.wav on a case-sensitive store (S3,
    a Linux folder), was kept as 'a current prompt uses it', its record dropped: in storage, unlisted, for ever.
    Now it stays listed (pending) while 'welcome' is current and is deleted once no current key matches it."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    renamed = _rename_then_retire(cat, out, capsys, extra=extra)
    gone = renamed["Welcome"]
    assert gone.status == "retired" and gone.error == retire.WAITING and gone.key != renamed["welcome"].key
    assert set(_manifest(out)) == {"menu"}
    assert sorted(p.name[:5] for p in (out / "prompts").iterdir()) == ["menu-"] * 2  # Welcome-<h>.wav deleted too
    if extra:
        assert gone.layout and all(k.split("/")[-1].startswith("Welcome.") for k in gone.layout)  # listed, pending
        files = sorted(p.name for p in (out / layout.ROOT).rglob("*") if p.is_file())
        assert files == ["index.json", "menu.alaw", "menu.g722", "menu.sln16", "menu.ulaw"]


def test_purge_keeps_a_key_that_matches_a_live_one_ignoring_case_listed_until_none_does():
    deleted = []

    class Sink:
        def delete(self, key):
            deleted.append(key)

    key = content_key({"x": 1}, "Welcome", "wav", "prompts")
    live = ManifestRecord(id="welcome", key=key.replace("Welcome", "welcome"), status="ok")
    gone = ManifestRecord(id="Welcome", key=key, status="retired", error=retire.PENDING)
    old = content_key({"x": 0}, "menu", "wav", "prompts")
    menu = ManifestRecord(id="menu", key=content_key({"x": 2}, "menu", "wav", "prompts"), status="ok",
                          previous_keys=[old.replace("menu", "MENU")])
    shared = [ManifestRecord(id="menu", key=old, status="ok", catalog="other")]
    assert retire.purge([live, gone, menu], Sink(), shared, "prompts") == (0, True, 0)
    assert deleted == [] and gone.error == retire.WAITING and menu.previous_keys == [old.replace("menu", "MENU")]
    live.status, shared[0].status = "retired", "retired"
    assert retire.purge([gone, menu], Sink(), shared, "prompts") == (0, True, 0)
    assert {key, old.replace("menu", "MENU")} <= set(deleted) and gone.error == retire.DELETED
    assert menu.previous_keys == []


def test_remove_packages_keeps_a_file_that_matches_a_live_one_ignoring_case_listed_until_none_does(tmp_path):
    """Before: retiring 'Welcome' deleted asterisk/<codec>/sounds/en/Welcome.<ext>: on a case-folding store, the
    file of the current prompt 'welcome'; then: kept, and dropped from the record (left unlisted on a case-sensitive
    store)."""
    deleted = []

    class Recording(LocalSink):
        def delete(self, key):
            deleted.append(key)
            super().delete(key)

    sink = Recording(str(tmp_path))
    files = {c: layout.package_key(c, "en", "welcome") for c in layout.ASTERISK_CODECS}
    live = ManifestRecord(id="welcome", key="k", status="ok", layout=list(files.values()))
    upper = [k.replace("/welcome.", "/Welcome.") for k in files.values()]
    gone = ManifestRecord(id="Welcome", key="k", status="retired", error=retire.DELETED, layout=list(upper))
    assert layout.remove_packages([live, gone], sink) == 0
    assert deleted == [] and gone.layout == upper
    live.status = "retired"
    assert layout.remove_packages([gone], sink) == 0
    assert deleted == upper and gone.layout == []


@pytest.mark.parametrize("content", [b'{"en/welcome": {"master": "x"', b"[]", b'"text"', b"\xff\xfe"])
def test_a_corrupt_layout_index_is_rebuilt_with_a_warning(tmp_path, capsys, caplog, content):
    """Before: a cut-short index exited 2 after synthesis without a manifest (not naming the file); `[]` raised."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    prompts = [{"id": "welcome", "text": "Welcome to the line."}]
    _write(cat, prompts, language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    (out / layout.INDEX_KEY).write_bytes(content)
    _write(cat, [*prompts, {"id": "menu", "text": "Press one for sales."}], language="english")
    code, s = _run(cat, out, capsys, "--layout", "asterisk", "--retire", "delete")
    assert code == 0 and s["layout"]["written"] == 2 and (out / MANIFEST).exists()
    assert layout.INDEX_KEY in caplog.text and "taken as empty" in caplog.text
    assert set(json.loads((out / layout.INDEX_KEY).read_text())) == {"en/welcome", "en/menu"}


@pytest.mark.parametrize("dbm0", ['{"ulaw": "x"}', '{"ulaw": [1]}', '{"ulaw": {}}', '{"ulaw": true}',
                                  '{"ulaw": NaN}', '{"ulaw": Infinity}', '{"mp3": -19.0}', '{"1": null}'])
def test_an_odd_layout_index_entry_remakes_that_prompts_packages(tmp_path, capsys, dbm0):
    """Before: an index that is a JSON object with a level that is not a number raised TypeError (traceback, exit 1,
    after synthesis and without a manifest) on every pass."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome to the line."}], language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] == 0
    index = json.loads((out / layout.INDEX_KEY).read_text())
    good = index["en/welcome"]["dbm0"]
    (out / layout.INDEX_KEY).write_text(json.dumps({"en/welcome": {**index["en/welcome"], "dbm0": "@"}})
                                        .replace('"@"', dbm0))
    code, s = _run(cat, out, capsys, "--layout", "asterisk")
    assert code == 0 and s["layout"]["written"] == 1 and s["layout"]["kept"] == 0
    assert json.loads((out / layout.INDEX_KEY).read_text())["en/welcome"]["dbm0"].keys() == good.keys()
    assert _run(cat, out, capsys, "--layout", "asterisk")[1]["layout"]["kept"] == 1


# 5. a long text in a CSV catalog


def test_a_csv_prompt_longer_than_csvs_default_field_limit_is_read(tmp_path):
    """Before: a 150,000-character text (under --max-row-chars 200000) failed the whole catalog: csv's field
    limit is 131072."""
    path = tmp_path / "big.csv"
    path.write_text('id,text\nok,Hello there.\nlong,"' + "word " * 30000 + '"\n')
    limit = csv.field_size_limit()
    rows = catalog.read_catalog(path, RowDefaults(voice="ryan"))
    assert [(r.id, len(r.text), r.error) for r in rows] == [("ok", 12, None), ("long", 150000, None)]
    assert csv.field_size_limit() == limit  # put back
    rows = catalog.read_catalog(path, RowDefaults(voice="ryan"), InputLimits(max_row_chars=100_000))
    assert rows[0].error is None and "100000" in rows[1].error  # over --max-row-chars: that row fails, alone
