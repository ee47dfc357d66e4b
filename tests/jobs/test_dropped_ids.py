"""Two inputs into one --out: the second run's manifest replaces the first's; the ids only the first listed are
warned about and reported in the summary's `dropped_ids` (the run is not refused: an edited book that lost a chapter
is the same case)."""

from __future__ import annotations

import json

from jobs import narrate


def _run(rows, out, capsys) -> tuple[int, dict, str]:
    code = narrate.main([str(rows), "--model", "fake", "--voice", "vivian", "--out", f"file://{out}",
                         "--backend", "tests.jobs.fakes:FakeBackend", "--runner", "local", "--no-progress",
                         "--quiet"])
    out_text, err = capsys.readouterr()
    return code, json.loads(out_text.strip().splitlines()[-1]), err


def _rows(path, ids):
    path.write_text("".join(json.dumps({"id": i, "text": f"Part {i} of {path.stem}."}) + "\n" for i in ids))
    return path


def test_ids_only_the_previous_manifest_lists_are_reported(tmp_path, capsys, caplog):
    out = tmp_path / "out"
    book_a = _rows(tmp_path / "bookA.jsonl", [f"ch{i:02d}" for i in range(1, 14)])
    book_b = _rows(tmp_path / "bookB.jsonl", ["ch01"])
    code, first, _ = _run(book_a, out, capsys)
    assert code == 0 and "dropped_ids" not in first
    code, second, _ = _run(book_b, out, capsys)
    assert code == 0 and second["ok"] == 1
    assert second["dropped_ids"] == {"rows": 12, "ids": [f"ch{i:02d}" for i in range(2, 12)]}
    assert "12 id(s) of the previous manifest" in caplog.text and "'ch02'" in caplog.text
    assert "use another --out per input" in caplog.text
    code, again, _ = _run(book_b, out, capsys)  # the same input again: nothing dropped
    assert code == 0 and "dropped_ids" not in again
