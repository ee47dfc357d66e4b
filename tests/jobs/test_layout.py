"""`qtts catalog --layout asterisk`: package folders per codec, safe file names, levels of every package file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from jobs import catalog
from jobs.layout import safe_name
from jobs.manifest import from_parquet
from tests.jobs import independent as ind

NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet"]
PROMPTS = """
defaults: {voice: ryan}
prompts:
  - {id: welcome, text: "Welcome to the company line, please listen closely.", language: english}
  - {id: digits/1, text: "One, for the first option on the list.", language: english}
  - {id: "Café menu", text: "Pour le menu, appuyez sur un, s'il vous plaît.", language: french}
  - {id: "bad*id", text: "Never synthesized."}
  - {id: "../escape", text: "Never synthesized."}
  - {id: "WELCOME", text: "Same file name as welcome on a case-insensitive disk.", language: english}
"""


def read_raw(path, codec):
    """Headerless files decoded here: G.711 with libsndfile RAW, linear with numpy, G.722 by its length."""
    if codec in ("ulaw", "alaw"):
        x, sr = sf.read(path, format="RAW", subtype=codec.upper(), samplerate=8000, channels=1, dtype="float64")
        return x, sr
    if codec == "sln16":
        return np.fromfile(path, "<i2").astype(np.float64) / 32768, 16000
    raise AssertionError(codec)


def test_asterisk_layout(tmp_path, capsys):
    cat = tmp_path / "ivr.yaml"
    cat.write_text(PROMPTS)
    out = tmp_path / "out"
    assert catalog.main([str(cat), "--out", str(out), *NOISE, "--layout", "asterisk"]) == 1  # bad ids: exit 1
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert s["layout"] == {"name": "asterisk", "written": 3, "kept": 0}
    man = {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}
    assert "'*' are not allowed" in man["bad*id"].error and man["bad*id"].status == "failed"
    assert "'.' or '..'" in man["../escape"].error
    assert "same file name as 'welcome'" in man["WELCOME"].error
    names = {"welcome": "en/welcome", "digits/1": "en/digits/1", "Café menu": "fr/Cafe-menu"}
    for cid, name in names.items():
        rec = man[cid]
        assert rec.status == "ok", (rec.flags, rec.error)
        expected = [f"asterisk/{c}/sounds/{name}.{c}" for c in ("ulaw", "alaw", "sln16", "g722")]
        assert rec.layout == expected and all((out / k).is_file() for k in expected)
        for codec in ("ulaw", "alaw", "sln16"):
            x, sr = read_raw(out / f"asterisk/{codec}/sounds/{name}.{codec}", codec)
            law = codec if codec != "sln16" else "linear"
            level = ind.dbm0(ind.p56_level_db(x, sr), law)
            assert -20.0 <= level <= -18.0, (cid, codec, level)
            assert len(x) / sr == pytest.approx(rec.duration_s, abs=0.05)
        g722 = (out / f"asterisk/g722/sounds/{name}.g722").read_bytes()
        assert len(g722) == pytest.approx(rec.duration_s * 8000, rel=0.02)  # 64 kbit/s
    assert sorted(p.name for p in (out / "asterisk").iterdir()) == ["alaw", "g722", "index.json", "sln16", "ulaw"]
    # a second run keeps the package files; a prompt that leaves the catalog is removed with --retire delete
    assert catalog.main([str(cat), "--out", str(out), *NOISE, "--layout", "asterisk"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layout"]["kept"] == 3
    cat.write_text(PROMPTS.replace('  - {id: digits/1, text: "One, for the first option on the list.", '
                                   'language: english}\n', ""))
    assert catalog.main([str(cat), "--out", str(out), *NOISE, "--layout", "asterisk", "--retire", "delete"]) == 1
    capsys.readouterr()
    assert not (out / "asterisk/ulaw/sounds/en/digits/1.ulaw").exists()
    assert (out / "asterisk/ulaw/sounds/en/welcome.ulaw").exists()


def test_a_level_flag_survives_runs_that_keep_the_package_files(tmp_path, capsys, monkeypatch):
    """Package files that failed their level check flagged the prompt only on the run that wrote them: the next
    run kept the files and reported it ok. The index now holds each file's measured level; kept files are flagged
    from it. An index entry from before (a bare master key: levels unknown) has its files written again."""
    from jobs import mastering

    # stand-in for a prompt whose package level lands off target: a tolerance the noise cannot meet
    monkeypatch.setitem(mastering.TELEPHONY, "level_tolerance", 0.001)
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    cat.write_text("defaults: {voice: ryan, language: english}\nprompts:\n"
                   "  - {id: welcome, text: Welcome to the company line please listen closely.}\n")

    def run():
        assert catalog.main([str(cat), "--out", str(out), *NOISE, "--layout", "asterisk"]) == 0
        layout = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["layout"]
        return layout, from_parquet((out / "catalog-manifest.parquet").read_bytes())[0]

    layout, first = run()
    assert layout["written"] == 1 and first.status == "suspect"
    assert "layout:ulaw:speech_level" in first.flags
    layout, second = run()
    assert layout["kept"] == 1 and (second.status, second.flags) == (first.status, first.flags)
    index = json.loads((out / "asterisk/index.json").read_text())
    assert index["en/welcome"]["master"] == first.key and set(index["en/welcome"]["dbm0"]) == {
        "ulaw", "alaw", "sln16", "g722"}
    (out / "asterisk/index.json").write_text(json.dumps({"en/welcome": first.key}))  # the old index format
    layout, third = run()
    assert layout["written"] == 1 and (third.status, third.flags) == (first.status, first.flags)
    assert json.loads((out / "asterisk/index.json").read_text()) == index


@pytest.mark.parametrize("args,message", [(["--layout", "pbx"], "invalid choice: 'pbx'"),
                                          (["--layout", "asterisk", "--master", "acx"], "needs the telephony preset"),
                                          (["--layout", "asterisk", "--master", "telephony", "--codec", "ulaw"],
                                           "leave --codec unset")])
def test_bad_layout_options(tmp_path, capsys, args, message):
    cat = tmp_path / "c.csv"
    cat.write_text("id,text,voice\na,Hello.,ryan\n")
    try:
        code = catalog.main([str(cat), "--out", str(tmp_path / "o"), *NOISE, *args])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("pid,name", [("welcome", "welcome"), ("vm intro", "vm-intro"), ("Ünïcödé", "Unicode"),
                                      ("digits/1", "digits/1"), ("a_b-c.d", "a_b-c.d")])
def test_safe_names(pid, name):
    assert safe_name(pid) == name


@pytest.mark.parametrize("pid", ["", "/", "a//b", "..", "a/../b", ".hidden", "x" * 65, "what?", "日本", 'a"b',
                                 "a\\b", "a:b", "a/b/c/d/e"])
def test_ids_that_cannot_be_file_names(pid):
    with pytest.raises(ValueError, match="cannot be a file name"):
        safe_name(pid)


V1 = "Welcome to the company line, please listen closely."
V2 = "Welcome to the NEW company line, please listen closely now."


def _one_prompt(cat, text):
    cat.write_text(json.dumps({"defaults": {"voice": "ryan", "language": "english"},
                               "prompts": [{"id": "welcome", "text": text}]}))


def _run(cat, out, capsys, *extra):
    code = catalog.main([str(cat), "--out", str(out), *NOISE, "--layout", "asterisk", *extra])
    lines = capsys.readouterr().out.strip().splitlines()
    return code, json.loads(lines[-1]) if lines else None


def _refuse(monkeypatch, refused, error=None):
    """LocalSink.put refuses the keys `refused` says (a StorageError, or `error`)."""
    from jobs.storage import LocalSink, StorageError

    put = LocalSink.put

    def refusing(self, key, data, *args, **kwargs):
        if refused(key):
            raise (error or StorageError)(f"put {key} failed after 4 attempt(s): AccessDenied")
        return put(self, key, data, *args, **kwargs)

    monkeypatch.setattr(LocalSink, "put", refusing)


def _files(out):
    return {c: (out / f"asterisk/{c}/sounds/en/welcome.{c}").read_bytes() for c in ("ulaw", "alaw", "sln16", "g722")}


class Killed(BaseException):
    """Stand-in for a SIGKILL between two package file writes: nothing after it runs."""


@pytest.mark.parametrize("error", [None, Killed], ids=["refused", "killed"])
def test_a_half_written_package_is_never_kept(tmp_path, capsys, monkeypatch, error):
    """A package file write the storage refused flagged the prompt suspect (exit 0) and the index kept the earlier
    master while some files held the new audio (as after a kill between the writes): when the prompt went back to
    its earlier text, the mixed set was kept, status ok, and the PBX played the new audio for the old prompt. Now
    the prompt's index entry leaves the stored index before any of its files is written, a refused write exits 1
    (`layout.failed`), and the next pass writes every file again."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _one_prompt(cat, V1)
    assert _run(cat, out, capsys)[0] == 0
    v1 = _files(out)
    _one_prompt(cat, V2)
    with monkeypatch.context() as m:
        _refuse(m, lambda key: key.startswith("asterisk/alaw/"), error)
        if error is None:
            code, s = _run(cat, out, capsys)
            rec = from_parquet((out / "catalog-manifest.parquet").read_bytes())[0]
            assert code == 1 and s["layout"]["failed"] == 1, s
            assert "layout:storage" in rec.flags and "AccessDenied" in rec.error
        else:
            with pytest.raises(Killed):
                _run(cat, out, capsys)
    assert _files(out)["ulaw"] != v1["ulaw"]  # half written: the new u-law, the old A-law
    assert "en/welcome" not in json.loads((out / "asterisk/index.json").read_text())
    _one_prompt(cat, V1)
    code, s = _run(cat, out, capsys)
    assert code == 0 and s["layout"] == {"name": "asterisk", "written": 1, "kept": 0}
    assert _files(out) == v1


@pytest.mark.parametrize("manifest_refused", [False, True])
def test_a_refused_index_write_keeps_the_manifest(tmp_path, capsys, monkeypatch, manifest_refused):
    """The index put after rendering raised out of the pass: no summary, exit 2 ("nothing done"), and the manifest
    of the prompts and files it wrote neither written nor kept locally. Now the prompts whose files the index does
    not list are flagged `layout:storage` (the next pass writes their files again), the manifest is written (exit
    1), or kept locally when the storage refuses it too (exit 3)."""
    from jobs import narrate
    from jobs.storage import RetryPolicy

    monkeypatch.setattr(narrate, "MANIFEST_RETRY", RetryPolicy(attempts=1, base_delay=0, max_delay=0))
    monkeypatch.chdir(tmp_path)
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _one_prompt(cat, V1)
    refused = {"asterisk/index.json", *(["catalog-manifest.parquet"] if manifest_refused else [])}
    with monkeypatch.context() as m:
        _refuse(m, refused.__contains__)
        code, s = _run(cat, out, capsys)
    assert s is not None and s["layout"]["failed"] == 1 and s["layout"]["written"] == 1, s
    if manifest_refused:
        assert code == 3 and not (out / "catalog-manifest.parquet").exists()
        raw = (tmp_path / s["manifest_local"]).read_bytes()
    else:
        assert code == 1
        raw = (out / "catalog-manifest.parquet").read_bytes()
    rec = from_parquet(raw)[0]
    assert rec.status == "suspect" and "layout:storage" in rec.flags and "index.json" in rec.error
    assert not (out / "asterisk/index.json").exists()
    code, s = _run(cat, out, capsys)
    assert code == 0 and s["layout"]["written"] == 1


def test_a_refused_index_write_while_deleting_packages_is_a_failed_delete(tmp_path, capsys, monkeypatch):
    """remove_packages' index put raised after the pass wrote its manifest: exit 2 and no summary. Now the retired
    prompt keeps its files listed with error "retired: delete failed: ..." (exit 1, the manifest says so), and the
    next --retire delete pass finishes: files and index entry gone."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    cat.write_text(json.dumps({"defaults": {"voice": "ryan", "language": "english"}, "prompts": [
        {"id": "welcome", "text": V1}, {"id": "bye", "text": "Thank you for calling, goodbye for now."}]}))
    assert _run(cat, out, capsys)[0] == 0
    _one_prompt(cat, V1)
    with monkeypatch.context() as m:
        _refuse(m, lambda key: key == "asterisk/index.json")
        code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == 1 and s is not None and s["delete_failed"] == 1, s
    bye = {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}["bye"]
    assert bye.status == "retired" and bye.error.startswith("retired: delete failed") and len(bye.layout) == 4
    assert "en/bye" in json.loads((out / "asterisk/index.json").read_text())
    code, s = _run(cat, out, capsys, "--retire", "delete")
    assert code == 0 and s["delete_failed"] == 0
    assert set(json.loads((out / "asterisk/index.json").read_text())) == {"en/welcome"}
    assert not list((out / "asterisk").rglob("bye.*"))
    bye = {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}["bye"]
    assert bye.layout == [] and bye.error == "retired: object deleted", bye.error
