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
