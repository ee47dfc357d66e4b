"""Several catalogs at one output: each owns its prompts there (by its name) and retires only its own.

Before, every run retired (with `--retire delete`: deleted the audio of) every prompt of the output's manifest that
was not in its own catalog, so menus_en.yaml and menus_es.yaml sharing a prefix deleted each other's audio on
every run and rendered it all again on the next."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import catalog, retire
from jobs.manifest import from_parquet

FAKE = "tests.jobs.fakes:FakeBackend"
EN = [{"id": "welcome", "text": "Welcome."}, {"id": "sales", "text": "Press one for sales."},
      {"id": "beep", "text": "Beep."}]
ES = [{"id": "welcome", "text": "Bienvenido."}, {"id": "ventas", "text": "Pulse uno para ventas."},
      {"id": "beep", "text": "Beep."}]


def _write(path, prompts, name=None, **defaults):
    doc = {"defaults": {"voice": "ryan", **defaults}, "prompts": prompts}
    path.write_text(yaml.safe_dump({**doc, "name": name} if name is not None else doc))
    return path


def _run(cat, out, capsys, *extra):
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--retire", "delete", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {})


def _refused(cat, out, capsys, *extra):
    """(exit code, stderr) of a run that writes no summary."""
    code = catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", *extra])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def _manifest(out):
    """{catalog name: {id: record}}"""
    by: dict = {}
    for r in from_parquet((out / "catalog-manifest.parquet").read_bytes()):
        by.setdefault(r.catalog, {})[r.id] = r
    return by


def _objects(out):
    return sorted(p.name for p in (out / "prompts").glob("*.wav"))


def test_two_catalogs_at_one_output_keep_each_others_prompts(tmp_path, capsys):
    out = tmp_path / "out"
    en, es = _write(tmp_path / "menus_en.yaml", EN), _write(tmp_path / "menus_es.yaml", ES)
    assert _run(en, out, capsys)[0] == 0
    code, s = _run(es, out, capsys)
    assert code == 0 and (s["new"], s["retired"], s["total"]) == (3, 0, 3)  # was: en's 3 retired and deleted
    assert len(_objects(out)) == 5 and s["catalog"] == "menus_es"
    code, s = _run(en, out, capsys)
    assert code == 0 and (s["unchanged"], s["retired"], s["synthesized"]) == (3, 0, 0)  # was: 3 new, 3 retired
    man = _manifest(out)
    assert set(man) == {"menus_en", "menus_es"}
    assert set(man["menus_en"]) == {"welcome", "sales", "beep"}
    assert set(man["menus_es"]) == {"welcome", "ventas", "beep"}
    assert all(r.status == "ok" and (out / r.key).exists() for m in man.values() for r in m.values())
    assert man["menus_en"]["beep"].key == man["menus_es"]["beep"].key  # same prompt: one object, shared
    assert man["menus_en"]["welcome"].key != man["menus_es"]["welcome"].key
    assert len(_objects(out)) == 5
    beep = out / man["menus_en"]["beep"].key

    _write(en, EN[:1])  # en drops "sales" (its own: deleted) and "beep" (es still uses it: kept)
    code, s = _run(en, out, capsys)
    man = _manifest(out)
    assert code == 0 and s["retired"] == 2 and s["delete_failed"] == 0
    assert man["menus_en"]["sales"].error == retire.DELETED and not (out / man["menus_en"]["sales"].key).exists()
    assert man["menus_en"]["beep"].error == retire.KEPT and beep.exists()
    code, s = _run(es, out, capsys)
    assert code == 0 and (s["unchanged"], s["retired"]) == (3, 0) and beep.exists()
    _write(es, ES[:2])  # now nobody uses "beep": es deletes it
    code, s = _run(es, out, capsys)
    assert code == 0 and s["retired"] == 1 and not beep.exists()
    code, s = _run(en, out, capsys)
    man = _manifest(out)
    assert code == 0 and set(man["menus_en"]) == {"welcome"} and set(man["menus_es"]) == {"welcome", "ventas", "beep"}
    assert _objects(out) == sorted(r.key.split("/")[-1] for m in man.values() for r in m.values()
                                   if r.status == "ok")


def test_two_catalogs_with_layout_keep_each_others_package_files(tmp_path, capsys):
    out = tmp_path / "out"
    en = _write(tmp_path / "en.yaml", EN[:2], language="english")
    es = _write(tmp_path / "es.yaml", ES[:2], language="spanish")
    for cat in (en, es, en):
        assert _run(cat, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    assert len(list(out.glob("asterisk/*/sounds/*/*"))) == 16  # 4 prompts x 4 codecs (was: es's 8 deleted)
    man = _manifest(out)
    files = {c: [k for r in m.values() for k in r.layout] for c, m in man.items()}
    assert len(files["en"]) == len(files["es"]) == 8 and all((out / k).exists() for ks in files.values() for k in ks)
    index = json.loads((out / "asterisk/index.json").read_text())
    assert set(index) == {"en/welcome", "en/sales", "es/welcome", "es/ventas"}
    _write(en, EN[:1], language="english")
    assert _run(en, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    assert not any((out / k).exists() for k in man["en"]["sales"].layout)
    assert all((out / k).exists() for k in files["es"])
    assert set(json.loads((out / "asterisk/index.json").read_text())) == {"en/welcome", "es/welcome", "es/ventas"}


def _as_before_names(out):
    """Rewrite the output's manifest as a version before catalog names wrote it: no `catalog` column."""
    path = out / "catalog-manifest.parquet"
    table = pq.read_table(path)
    pq.write_table(table.drop_columns(["catalog"]), path)


def test_an_output_written_before_names_is_adopted_without_rendering_or_retiring(tmp_path, capsys):
    out = tmp_path / "out"
    cat = _write(tmp_path / "ivr.yaml", EN)
    assert _run(cat, out, capsys)[0] == 0
    _as_before_names(out)
    objects = _objects(out)
    code, s = _run(cat, out, capsys)
    assert code == 0 and (s["unchanged"], s["new"], s["retired"], s["synthesized"], s["adopted"]) == (3, 0, 0, 0, 3)
    assert set(_manifest(out)) == {"ivr"} and set(_manifest(out)["ivr"]) == {"welcome", "sales", "beep"}
    assert _objects(out) == objects
    code, s = _run(cat, out, capsys)
    assert code == 0 and (s["unchanged"], s["synthesized"]) == (3, 0) and "adopted" not in s


def test_an_unnamed_record_not_in_the_catalog_stays_unclaimed_and_a_named_pass_can_clear_it(tmp_path, capsys):
    """A prompt that left the catalog while the output was written before names: it might be another catalog's,
    so it stays unclaimed (kept, its object never deleted); listing its id under a name claims it, and that name
    with no prompts retires it (the README's way to clear records nobody claims)."""
    out = tmp_path / "out"
    cat = _write(tmp_path / "ivr.yaml", EN)
    assert _run(cat, out, capsys)[0] == 0
    _as_before_names(out)
    sales = out / _manifest(out)[None]["sales"].key
    _write(cat, [EN[0], EN[2]])
    for _ in range(2):
        code, s = _run(cat, out, capsys)
        assert code == 0 and (s["retired"], s["synthesized"], s.get("unclaimed")) == (0, 0, 1) and sales.exists()
        assert set(_manifest(out)[None]) == {"sales"} and set(_manifest(out)["ivr"]) == {"welcome", "beep"}
    cleanup = _write(tmp_path / "leftovers.yaml", [EN[1]], name="cleanup")
    code, s = _run(cleanup, out, capsys)
    assert code == 0 and (s["adopted"], s["synthesized"]) == (1, 0) and "unclaimed" not in s
    _write(cleanup, [], name="cleanup")
    code, s = _run(cleanup, out, capsys, "--retire-all")
    assert code == 0 and s["retired"] == 1 and not sales.exists() and None not in _manifest(out)


def test_two_catalogs_that_shared_an_output_before_names_lose_nothing_more(tmp_path, capsys):
    """The old code's last pass (es) left a manifest of es's prompts (and en's, retired). en adopts it first: it
    deletes nothing, es claims its prompts with nothing rendered again, and from then on both are kept."""
    out = tmp_path / "out"
    en, es = _write(tmp_path / "menus_en.yaml", EN), _write(tmp_path / "menus_es.yaml", ES)
    assert _run(es, out, capsys)[0] == 0
    _as_before_names(out)
    es_objects = [out / r.key for r in _manifest(out)[None].values()]
    assert _run(en, out, capsys)[0] == 0 and all(p.exists() for p in es_objects)
    code, s = _run(es, out, capsys)
    assert code == 0 and (s["synthesized"], s["total"], s["ok"]) == (0, 3, 3)
    for cat in (en, es, en):
        assert _run(cat, out, capsys)[0] == 0
    man = _manifest(out)
    assert set(man) == {"menus_en", "menus_es"} and all(p.exists() for p in es_objects)
    assert all((out / r.key).exists() for r in man["menus_en"].values() if r.status == "ok")
    assert {i for i, r in man["menus_en"].items() if r.status == "ok"} == {"welcome", "sales", "beep"}


def test_a_renamed_catalog_keeps_its_prompts_by_name(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    cat = _write(tmp_path / "ivr.yaml", EN)
    assert _run(cat, out, capsys)[0] == 0
    renamed = tmp_path / "ivr-2.yaml"
    cat.rename(renamed)
    code, s = _run(renamed, out, capsys, "--name", "ivr")  # the remedy: the old name
    assert code == 0 and (s["unchanged"], s["retired"], s["synthesized"]) == (3, 0, 0)
    assert set(_manifest(out)) == {"ivr"}
    _write(renamed, EN[:2], name="ivr")  # or name: in the file
    code, s = _run(renamed, out, capsys)
    assert code == 0 and (s["catalog"], s["unchanged"], s["retired"]) == ("ivr", 2, 1)
    # without it, the renamed file is another catalog: nothing is deleted or rendered again, and a warning says so
    _write(renamed, EN[:2])
    code, s = _run(renamed, out, capsys)
    assert code == 0 and (s["catalog"], s["new"], s["retired"], s["synthesized"]) == ("ivr-2", 2, 0, 0)
    assert "run it with --name 'ivr'" in caplog.text
    assert set(_manifest(out)) == {"ivr", "ivr-2"}


@pytest.mark.parametrize("name,why", [
    ("", "must not be empty"),
    ("en/menus", "must not be a path"),
    ("en\\menus", "must not be a path"),
    ("..", "must not be a path"),
    ("x" * 101, "is longer than 100 characters"),
    ("menus\ten", "must be printable"),
    (" menus", "must not start or end with a space"),
])
def test_a_bad_name_is_refused_before_anything_is_written(tmp_path, capsys, name, why):
    out, cat = tmp_path / "out", _write(tmp_path / "ivr.yaml", EN)
    code, err = _refused(cat, out, capsys, "--name", name)
    assert code == 2 and err.startswith("error: --name ") and why in err and not out.exists()
    _write(cat, EN, name=name)  # the same rules for name: in the file, which names --name as the way out
    code, err = _refused(cat, out, capsys)
    assert code == 2 and err.startswith("error: catalog name ") and f"(name: in the catalog) {why}" in err
    assert err.rstrip().endswith("give a valid one with --name") and not out.exists()


def test_a_bad_name_from_the_file_name_or_two_names_that_differ_are_refused(tmp_path, capsys):
    out = tmp_path / "out"
    cat = _write(tmp_path / "bad\x01name.yaml", EN)
    code, err = _refused(cat, out, capsys)
    assert code == 2 and "from the file name" in err and "must be printable" in err and "--name" in err
    assert not out.exists()
    assert _run(cat, out, capsys, "--name", "ivr")[0] == 0  # the way out
    cat = _write(tmp_path / "ivr.yaml", EN, name="menus")
    code, err = _refused(cat, out, capsys, "--name", "ivr")
    assert code == 2 and "--name 'ivr' differs from the catalog's name: 'menus'" in err
    _write(cat, EN, name=5)
    code, err = _refused(cat, out, capsys)
    assert code == 2 and "catalog name 5 (name: in the catalog) must be a string" in err


# The review of names (each test fails on the code before it):

EN_ONLY = [{"id": "welcome", "text": "Welcome."}, {"id": "sales", "text": "Press one for sales."}]
ES_ONLY = [{"id": "bienvenida", "text": "Bienvenido."}, {"id": "ventas", "text": "Pulse uno para ventas."}]


def test_the_first_catalog_after_the_upgrade_adopts_only_its_own_ids(tmp_path, capsys):
    """Before: it adopted every unnamed record, marked the other catalog's current prompts retired under its name and
    deleted their audio on its next --retire delete pass."""
    out = tmp_path / "out"
    en, es = _write(tmp_path / "menus_en.yaml", EN_ONLY), _write(tmp_path / "menus_es.yaml", ES_ONLY)
    assert _run(en, out, capsys)[0] == 0 and _run(es, out, capsys)[0] == 0
    _as_before_names(out)
    es_objects = [out / r.key for r in _manifest(out)[None].values() if r.id in ("bienvenida", "ventas")]
    for _ in range(2):
        code, s = _run(en, out, capsys)
        assert code == 0 and all(p.exists() for p in es_objects) and (s["retired"], s.get("unclaimed")) == (0, 2)
    man = _manifest(out)
    assert set(man[None]) == {"bienvenida", "ventas"} and all(r.status == "ok" for r in man[None].values())
    code, s = _run(es, out, capsys)
    assert code == 0 and (s["adopted"], s["synthesized"], s["retired"]) == (2, 0, 0) and "unclaimed" not in s
    assert set(_manifest(out)) == {"menus_en", "menus_es"} and all(p.exists() for p in es_objects)


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "--name" in r.getMessage()]


def test_two_different_catalogs_sharing_prompts_are_not_called_renamed(tmp_path, capsys, caplog):
    """Before: 'sales' (which shares 2 of 'support''s 3 prompts) was told to run with --name support, which retires
    support's own prompt."""
    out = tmp_path / "out"
    common = [{"id": "welcome", "text": "Welcome."}, {"id": "goodbye", "text": "Goodbye."}]
    support = _write(tmp_path / "support.yaml", [*common, {"id": "t1", "text": "Describe your problem."}])
    sales = _write(tmp_path / "sales.yaml", [*common, {"id": "s1", "text": "Offers."}, {"id": "s2", "text": "Two."}])
    assert _run(support, out, capsys)[0] == 0 and _run(sales, out, capsys)[0] == 0
    assert _warnings(caplog) == []
    cat = _write(tmp_path / "ivr.yaml", EN)  # a real rename warns on the new name's first run only, as a question
    assert _run(cat, out, capsys)[0] == 0
    cat.rename(tmp_path / "ivr-2.yaml")
    assert _run(tmp_path / "ivr-2.yaml", out, capsys)[0] == 0
    (msg,) = _warnings(caplog)
    assert "if this catalog was renamed from 'ivr', run it with --name 'ivr'" in msg
    assert _run(tmp_path / "ivr-2.yaml", out, capsys)[0] == 0 and len(_warnings(caplog)) == 1


def test_an_explicitly_named_empty_catalog_retires_its_name(tmp_path, capsys):
    """Before: an empty catalog was refused, so a stray name (a renamed file run once) kept its objects and package
    files forever."""
    out = tmp_path / "out"
    cat = _write(tmp_path / "ivr.yaml", EN[:2], language="english")
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    stray = _write(tmp_path / "ivr-v2.yaml", EN[:2], language="english")
    assert _run(stray, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    _write(cat, EN[:1], language="english")  # "sales" leaves ivr: kept while the stray name lists it
    assert _run(cat, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    sales = _manifest(out)["ivr"]["sales"]
    files = [out / k for k in _manifest(out)["ivr-v2"]["sales"].layout]
    assert sales.error == retire.KEPT and (out / sales.key).exists() and all(p.exists() for p in files)
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"prompts": []}))
    code, err = _refused(empty, out, capsys, "--retire", "delete")
    assert code == 2 and "lists no prompts" in err and "--name NAME" in err and "--retire-all" in err
    # named but without --retire-all: refused too (an export that failed down to nothing must not retire a catalog)
    code, err = _refused(empty, out, capsys, "--name", "ivr-v2", "--retire", "delete")
    assert code == 2 and "--retire-all" in err
    code, err = _refused(stray, out, capsys, "--retire-all")      # a catalog that lists prompts: not this option's
    assert code == 2 and err.startswith("error: --retire-all")
    conf = tmp_path / "all.yaml"
    conf.write_text("retire_all: true\n")                          # a shared config cannot turn it on
    code, err = _refused(empty, out, capsys, "--name", "ivr-v2", "--config", str(conf))
    assert code == 2 and "retire_all" in err and "command line" in err
    code, s = _run(empty, out, capsys, "--name", "ivr-v2", "--layout", "asterisk", "--retire-all")
    assert code == 0 and (s["retired"], s["total"], s["delete_failed"]) == (2, 2, 0)
    assert not (out / sales.key).exists() and not any(p.exists() for p in files)
    assert (out / _manifest(out)["ivr"]["welcome"].key).exists()
    header = tmp_path / "old.csv"
    header.write_text("id,text\n")  # a CSV with only its header: the same, by name
    assert _refused(header, out, capsys)[0] == 2
    assert _refused(header, out, capsys, "--name", "ivr")[0] == 2
    code, s = _run(header, out, capsys, "--name", "ivr", "--retire-all")
    assert code == 0 and s["retired"] == 1 and not (out / _manifest(out)["ivr"]["welcome"].key).exists()


def test_two_files_of_one_name_delete_nothing_and_are_warned_about(tmp_path, capsys, caplog):
    """Before: en/menus.yaml and es/menus.yaml were one catalog that deleted the other's audio on every run."""
    out = tmp_path / "out"
    (tmp_path / "en").mkdir(), (tmp_path / "es").mkdir()
    en = _write(tmp_path / "en/menus.yaml", EN[:2])
    es = _write(tmp_path / "es/menus.yaml", ES[:2])  # "welcome": the same id, another text
    es2 = _write(tmp_path / "es/menus-b.yaml", [ES_ONLY[0], {"id": "x", "text": "Otra."}], name="menus")
    assert _run(en, out, capsys)[0] == 0
    en_audio = out / _manifest(out)["menus"]["welcome"].key
    code, s = _run(es, out, capsys)
    assert code == 0 and en_audio.exists() and s.get("turned_over") == 2  # was deleted (superseded)
    code, s = _run(es2, out, capsys)  # other ids: retired, not deleted
    assert code == 0 and s["retired"] == 2 and s["turned_over"] == 2
    assert all((out / r.key).exists() for r in _manifest(out)["menus"].values())
    assert any("give each its own --name" in m for m in _warnings(caplog))
    code, s = _run(es2, out, capsys)  # a pass that keeps its prompts deletes as usual
    assert code == 0 and "turned_over" not in s and not en_audio.exists()
    one = _write(tmp_path / "one.yaml", [EN[0]])  # a one-prompt catalog that replaces its prompt: warned, deleted
    assert _run(one, out, capsys)[0] == 0
    first = out / _manifest(out)["one"]["welcome"].key
    _write(one, [EN[1]])
    code, s = _run(one, out, capsys)
    assert code == 0 and s["turned_over"] == 1 and s["retired"] == 1 and not first.exists()


def test_names_are_compared_in_nfc():
    import unicodedata
    nfd, nfc = unicodedata.normalize("NFD", "menüs"), unicodedata.normalize("NFC", "menüs")
    assert catalog.catalog_name(None, None, f"{nfd}.yaml") == nfc
    assert catalog.catalog_name(nfd, nfc, "x.yaml") == nfc


def test_lease_wait_waits_for_a_held_lease(tmp_path, capsys, monkeypatch):
    """Before: a pass that found the lease held exited 2 at once, however soon it was free again."""
    import threading

    from jobs import lease
    from jobs.storage import LocalSink

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(lease, "POLL_S", 0.1)
    cat = _write(tmp_path / "ivr.yaml", EN)
    held, release = threading.Event(), threading.Event()

    def holder():
        with lease.hold(LocalSink(str(out))):
            held.set()
            release.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    held.wait(10)
    code, err = _refused(cat, out, capsys, "--lease-wait", "0.3")
    assert code == 2 and "holds the lease" in err
    threading.Timer(0.5, release.set).start()
    code, s = _run(cat, out, capsys, "--lease-wait", "30")
    t.join()
    assert code == 0 and s["new"] == 3


def test_a_package_file_another_catalog_uses_with_other_audio_is_not_overwritten(tmp_path, capsys):
    """Two catalogs with one id and language (or ids that differ only in case) but other text: before, each run
    overwrote the other's package file, and when the last writer retired its prompt the file kept the retired
    audio. Now the file is the catalog's that has it; the other's prompt is flagged `layout:taken` with an error
    naming the owner, and gets the file once the owner lets it go. The same audio in both catalogs is shared."""
    out = tmp_path / "out"
    a = _write(tmp_path / "a.yaml", [{"id": "hours", "text": "Open nine to five."}, EN[0]], language="english")
    b = _write(tmp_path / "b.yaml", [{"id": "hours", "text": "We are open all day long, every day."}, EN[0],
                                     {"id": "Sales", "text": "Sales, press one."}], language="english")
    ulaw = out / "asterisk/ulaw/sounds/en/hours.ulaw"
    assert _run(a, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    made_by_a = ulaw.read_bytes()
    _write(a, [{"id": "hours", "text": "Open nine to five."}, EN[0], {"id": "sales", "text": "Press one."}],
           language="english")
    assert _run(a, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    code, s = _run(b, out, capsys, "--layout", "asterisk")
    man = _manifest(out)
    hours, sales = man["b"]["hours"], man["b"]["Sales"]
    assert ulaw.read_bytes() == made_by_a and s["layout"]["taken"] == 2
    for rec, owner in ((hours, "hours"), (sales, "sales")):
        assert rec.layout == [] and "layout:taken" in rec.flags and f"prompt {owner!r} of catalog 'a'" in rec.error
    assert man["b"]["welcome"].layout == man["a"]["welcome"].layout  # one audio, one shared package
    assert _run(a, out, capsys, "--layout", "asterisk")[0] in (0, 1)  # a again: its file is still its own
    assert ulaw.read_bytes() == made_by_a
    _write(a, [EN[0]], language="english")  # a lets 'hours' go: its file is deleted, not left with its audio
    assert _run(a, out, capsys, "--layout", "asterisk")[0] in (0, 1)
    assert not ulaw.exists() and (out / "asterisk/ulaw/sounds/en/welcome.ulaw").exists()
    code, s = _run(b, out, capsys, "--layout", "asterisk")  # b's 'hours' gets the file now
    hours = _manifest(out)["b"]["hours"]
    assert ulaw.exists() and ulaw.read_bytes() != made_by_a and "layout:taken" not in hours.flags and hours.layout


def test_storage_refusing_the_manifest_write_loses_no_catalogs_records(tmp_path, capsys, monkeypatch):
    """The manifest at a shared output holds every catalog's records: a pass of one catalog whose manifest write the
    storage refuses must leave the last good manifest (the other catalog's records included) in place, fail
    visibly, and the next pass must find every record and object."""
    from jobs.catalog import MANIFEST_KEY
    from jobs.storage import LocalSink, StorageError

    monkeypatch.chdir(tmp_path)   # where a manifest the storage refused is kept (write_manifest), not the checkout
    out = tmp_path / "out"
    en = _write(tmp_path / "en.yaml", EN[:2])
    es = _write(tmp_path / "es.yaml", ES[:2])
    assert _run(en, out, capsys)[0] == 0 and _run(es, out, capsys)[0] == 0
    before = (out / MANIFEST_KEY).read_bytes()
    put = LocalSink.put

    def refuse_manifest(self, key, data, content_type="application/octet-stream"):
        if key == MANIFEST_KEY:
            raise StorageError(f"put {key} failed after 1 attempt(s): SlowDown")
        return put(self, key, data, content_type)

    _write(en, EN[:1] + [{"id": "hours", "text": "Open nine to five."}])   # sales leaves en, hours joins
    with monkeypatch.context() as m:
        m.setattr(LocalSink, "put", refuse_manifest)
        code = catalog.main([str(en), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                             "local", "--no-progress", "--quiet", "--retire", "delete"])
    capsys.readouterr()
    assert code != 0                                            # visible, not a clean exit
    assert (out / MANIFEST_KEY).read_bytes() == before          # the last good manifest, every catalog's records
    man = _manifest(out)
    assert set(man["es"]) == {"welcome", "ventas"} and all((out / r.key).exists() for r in man["es"].values())
    code, s = _run(en, out, capsys)                             # storage back: the next pass completes
    man = _manifest(out)
    assert code == 0 and set(man["es"]) == {"welcome", "ventas"} and man["en"]["hours"].status == "ok"
    assert all((out / r.key).exists() for r in man["es"].values())
