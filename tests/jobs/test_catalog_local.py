import json

import pytest

from jobs import catalog
from jobs.catalog import parse_every, read_catalog
from jobs.inputs import RowDefaults
from jobs.manifest import from_parquet

FAKE = "tests.jobs.fakes:FakeBackend"


def _write(path, prompts):
    import yaml

    path.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", "format": "wav-ulaw", "sample_rate": 8000},
                                    "prompts": prompts}))


def _run(cat, out, *extra):
    return catalog.main([str(cat), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE,
                         "--runner", "local", "--no-progress", "--quiet", *extra])


def test_regenerates_only_new_or_changed_and_retires(tmp_path, capsys):
    from tests.jobs.fakes import FakeBackend

    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."},
                 {"id": "bye", "text": "Goodbye."}])
    assert _run(cat, out) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["new"] == 3 and first["synthesized"] == 3
    FakeBackend.calls.clear()
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press two."},
                 {"id": "new", "text": "Hello."}])
    assert _run(cat, out, "--retire", "delete") == 0
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (s["new"], s["changed"], s["unchanged"], s["retired"]) == (1, 1, 1, 1)
    assert sorted(j.text for batch in FakeBackend.calls for j in batch) == ["Hello.", "Press two."]
    man = {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}
    assert man["bye"].status == "retired" and not (out / man["bye"].key).exists()
    assert man["welcome"].reused and man["menu"].sample_rate == 8000
    # exactly the live prompts remain (old "menu" version pruned)
    assert len(list(out.glob("prompts/*.wav"))) == 3


@pytest.mark.parametrize("content,what", [
    ("prompts:\n  - {id: a, text: Hi., seed: " + "9" * 5000 + "}\n", "ValueError"),   # over Python's digit limit
    ("prompts: " + "[" * 20000 + "]" * 20000 + "\n", "RecursionError"),
])
def test_a_yaml_catalog_the_parser_cannot_take_exits_2_naming_it(tmp_path, capsys, content, what):
    """A 5000-digit integer (ValueError) or deep nesting (RecursionError) escaped the YAML error handling: a
    traceback and exit 1, which reads as "some prompts failed"."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    cat.write_text(content)
    assert _run(cat, out) == 2
    assert f"ivr.yaml is not valid YAML ({what}" in capsys.readouterr().err
    assert not out.exists()


def test_csv_and_bad_catalogs(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("id,text,voice,sample_rate\na,Hello.,ryan,8000\nb,,ryan,\n")
    rows = read_catalog(f, RowDefaults())
    assert rows[0].sample_rate == 8000 and rows[0].error is None and "'text'" in rows[1].error
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        read_catalog(bad, RowDefaults())
    (tmp_path / "x.csv").write_text("name,words\n")
    with pytest.raises(ValueError, match="header"):
        read_catalog(tmp_path / "x.csv", RowDefaults())
    with pytest.raises(ValueError, match="does not exist"):
        read_catalog(tmp_path / "none.yaml", RowDefaults())


def test_csv_row_with_more_fields_than_the_header_fails_in_the_manifest(tmp_path, capsys):
    """An unquoted comma in `text` used to cut the prompt at the comma (the rest went under DictReader's None key
    and was dropped) and ship it as ok. Now the row fails, saying to quote the text; the other rows render."""
    cat, out = tmp_path / "ivr.csv", tmp_path / "out"
    cat.write_text('id,text\nclosed,We are closed, please call again between nine and five.\nhold,Please hold.\n'
                   'quoted,"We are closed, please call again."\ntrailing,Goodbye.,\n')
    rows = {r.id: r for r in read_catalog(cat, RowDefaults(voice="ryan"))}
    assert "line 2 has 3 fields, the header has 2: quote a text that holds a comma" in rows["closed"].error
    assert rows["closed"].error.startswith("ivr.csv:1: ")
    assert [(rows[i].text, rows[i].error) for i in ("hold", "quoted", "trailing")] == [
        ("Please hold.", None), ("We are closed, please call again.", None), ("Goodbye.", None)]
    assert _run(cat, out, "--voice", "ryan") == 1
    man = {r.id: r for r in from_parquet((out / "catalog-manifest.parquet").read_bytes())}
    assert man["closed"].status == "failed" and "quote a text" in man["closed"].error
    assert [man[i].status for i in ("hold", "quoted", "trailing")] == ["ok"] * 3


@pytest.mark.parametrize("given,message", [
    ("language: 5", "field 'language' must be a string, got 5"),
    ("voice: 7", "field 'voice' must be a string, got 7"),
    ("instruct: [x]", "field 'instruct' must be a string, got ['x']"),
    ("seed: -1", "field 'seed' must be an integer in [0, 2**63), got -1"),
    ("format: mp3", "field 'format' must be one of"),
    ("sample_rate: fast", "field 'sample_rate' must be an integer in [4000, 48000], got 'fast'"),
    ("langauge: english", "unknown field(s) ['langauge']"),   # misspelt: it was dropped silently
])
@pytest.mark.parametrize("layout", [[], ["--layout", "asterisk"]])
def test_yaml_defaults_are_checked_like_row_fields(tmp_path, capsys, given, message, layout):
    """`defaults:` went unchecked into every row: `language: 5` crashed --layout (AttributeError), failed every row
    or made a manifest Parquet cannot hold (exit 3). Now: exit 2 naming the field, nothing written."""
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    cat.write_text(f"defaults: {{voice: ryan, {given}}}\nprompts:\n  - {{id: a, text: Hello there.}}\n")
    assert _run(cat, out, *layout) == 2
    assert f"error: catalog: ivr.yaml: defaults: {message}" in capsys.readouterr().err
    assert not out.exists()


def test_yaml_defaults_override_the_command_line_and_rows_override_them(tmp_path):
    cat = tmp_path / "ivr.yaml"
    cat.write_text("defaults: {language: english, seed: '7', sample_rate: 8000}\n"
                   "prompts:\n  - {id: a, text: Hi.}\n  - {id: b, text: Yo., language: german, seed: 2}\n")
    a, b = read_catalog(cat, RowDefaults(voice="ryan", language="french", seed=3))
    assert (a.voice, a.language, a.seed, a.sample_rate, a.error) == ("ryan", "english", 7, 8000, None)
    cat.write_text("defaults: {speaker: eric}\nprompts:\n  - {id: a, text: Hi.}\n")   # as in a row: the voice
    assert read_catalog(cat, RowDefaults(voice="ryan"))[0].voice == "eric"
    assert (b.language, b.seed, b.sample_rate) == ("german", 2, 8000)


def test_every():
    assert parse_every("1h") == 3600 and parse_every("30s") == 30 and parse_every("90") == 90
    with pytest.raises(ValueError, match="every"):
        parse_every("soon")


def test_every_runs_again_and_second_run_is_a_no_op(tmp_path, capsys):
    cat, out = tmp_path / "ivr.yaml", tmp_path / "out"
    _write(cat, [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."}])
    assert _run(cat, out, "--every", "0.05s", "--max-runs", "2") == 0
    first, second = (json.loads(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    assert first["new"] == 2 and second["unchanged"] == 2 and second["synthesized"] == 0
