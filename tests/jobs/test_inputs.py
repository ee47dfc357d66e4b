import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.inputs import RowDefaults, markdown_to_text, read_inputs


def test_folder_of_chapters_natural_order_and_markdown(tmp_path):
    (tmp_path / "ch10.md").write_text("# Ten\n\nThe **end** of [it](http://x).")
    (tmp_path / "ch2.txt").write_text("Two.")
    (tmp_path / "notes.pdf").write_text("ignored")
    rows = read_inputs(tmp_path, RowDefaults(voice="vivian"))
    assert [r.id for r in rows] == ["ch2", "ch10"]
    assert rows[1].text.split() == ["Ten.", "The", "end", "of", "it."]
    assert all(r.voice == "vivian" and r.error is None for r in rows)


def test_jsonl_bad_rows_are_kept_as_errors(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": "a", "text": "Hello.", "speaker": "ryan", "seed": 3}),
        "{not json",
        json.dumps({"id": "b", "text": "   "}),
        json.dumps({"text": "no id"}),
        json.dumps({"id": "c", "text": "x", "format": "mp3"}),
        json.dumps({"id": "a", "text": "dup"}),
        json.dumps([1, 2]),
    ]))
    rows = read_inputs(f)
    assert rows[0].error is None and rows[0].voice == "ryan" and rows[0].seed == 3
    errors = [r.error for r in rows[1:]]
    assert "malformed JSON" in errors[0]
    assert "'text'" in errors[1] and "'id'" in errors[2] and "'format'" in errors[3]
    assert "duplicate id" in errors[4] and "object" in errors[5]
    assert all(errors)


def test_parquet_rows(tmp_path):
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["One.", "Two."], "voice": ["ryan", None]}), f)
    rows = read_inputs(f, RowDefaults(voice="vivian"))
    assert [(r.id, r.voice) for r in rows] == [("x", "ryan"), ("y", "vivian")]


def test_missing_and_unsupported_inputs(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_inputs(tmp_path / "nope.txt")
    (tmp_path / "a.docx").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_inputs(tmp_path / "a.docx")
    with pytest.raises(ValueError, match="no chapter files"):
        read_inputs(tmp_path)


def test_markdown_code_and_images_dropped():
    assert markdown_to_text("A ![x](y.png) b\n```\ncode\n```\n- item").split() == ["A", "b", "item"]
