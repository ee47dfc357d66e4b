"""What a catalog pass reads back from its output (the stored manifest, a reused output's sidecar, the --layout
index) is not trusted: `--retire delete` deletes only keys of the shape this job writes, a corrupt or hostile row is
quarantined instead of failing every pass, and a corrupt index is rebuilt. Also: case-insensitive stores, and CSV
catalogs with a text longer than csv's default field limit."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from jobs import catalog, layout
from jobs.inputs import InputLimits, RowDefaults
from jobs.manifest import from_parquet, to_parquet

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
