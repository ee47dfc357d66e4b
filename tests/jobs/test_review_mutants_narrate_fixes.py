"""Two defects of jobs/narrate.py found by the mutation review of the narration job (tests/jobs/
test_review_mutants_narrate.py), each pinned by a test that failed before its fix: a config file's string values
were never checked for lone surrogates (the command line's None for every option not given replaced them before the
check), and the manifest table went to the sys.stdout of import time, not the one the summary goes to."""

from __future__ import annotations

import contextlib
import io
import json

from jobs import narrate
from jobs.manifest import ManifestRecord
from jobs.runner import RunOptions

FAKE = "tests.jobs.fakes:FakeBackend"


def test_a_config_value_that_is_not_unicode_fails_the_job_up_front(tmp_path, capsys):
    """`voice: "ry\\udc80an"` in the YAML (PyYAML gives a lone surrogate) was let through and failed every row;
    now exit 2 naming the option before any synthesis, as the same value on the command line (the check merged
    {**conf, **vars(args)}: every option not given is None there and replaced the config's value)."""
    from tests.jobs.fakes import FakeBackend

    (tmp_path / "c.yaml").write_text('instruct: "calm \\udc80 voice"\n')
    inp = tmp_path / "rows.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    FakeBackend.calls.clear()
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{tmp_path}/out", "--backend", FAKE,
                         "--runner", "local", "--no-progress", "--voice", "ryan", "--config", str(tmp_path / "c.yaml")])
    assert code == 2 and "--instruct is not valid Unicode" in capsys.readouterr().err
    assert not FakeBackend.calls and not (tmp_path / "out").exists()
    args = narrate.build_parser().parse_args(["b.txt", "--voice", "ryan"])
    narrate.build_options(args, "audio", {"voice": "ry\udc80an"})  # the command line's value is the one used


def test_the_table_goes_where_the_summary_goes(tmp_path, capsys):
    """A caller that redirects sys.stdout (contextlib.redirect_stdout, a test's capture) got the JSON summary but
    not the table: print_manifest's default stream was bound at import."""
    opts = RunOptions(output=f"file://{tmp_path}/out", runner="local")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        narrate.finish([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts, "manifest.parquet", 0.0,
                       quiet=False)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3 and lines[0].startswith("id ") and lines[1].startswith("a ")
    assert json.loads(lines[2])["ok"] == 1 and capsys.readouterr().out == ""
