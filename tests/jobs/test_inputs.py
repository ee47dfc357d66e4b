import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.inputs import (
    FORMATS,
    ROW_FIELDS,
    SAMPLE_RATES,
    RowDefaults,
    check_row,
    is_unicode,
    markdown_to_text,
    read_inputs,
)


def test_folder_of_chapters_natural_order_and_markdown(tmp_path):
    (tmp_path / "ch10.md").write_text("# Ten\n\nThe **end** of [it](http://x).")
    (tmp_path / "ch2.txt").write_text("Two.")
    (tmp_path / "notes.pdf").write_text("ignored")
    rows = read_inputs(tmp_path, RowDefaults(voice="vivian"))
    assert [r.id for r in rows] == ["ch2", "ch10"]
    assert rows[1].text.split() == ["Ten.", "The", "end", "of", "it."]
    assert all(r.voice == "vivian" and r.error is None for r in rows)


def test_folder_skips_what_is_not_a_chapter_file_and_orders_alike_names_one_way(tmp_path, monkeypatch):
    """A folder named like a chapter and macOS's hidden "._" files are not chapters (a folder failed the whole job);
    names equal under the natural order ("ch1", "ch01", "Ch1") sort the same way whatever order the directory
    lists them in."""
    (tmp_path / "sub.md").mkdir()
    (tmp_path / "._ch1.md").write_bytes(b"\x00\x05\x16\x07binary")
    for name in ("ch01.txt", "Ch1.txt", "ch1.txt"):
        (tmp_path / name).write_text(name + ".")
    orders = set()
    real = type(tmp_path).iterdir
    for flip in (False, True):
        monkeypatch.setattr(type(tmp_path), "iterdir", lambda self, flip=flip: iter(sorted(real(self),
                                                                                           reverse=flip)))
        rows = read_inputs(tmp_path, RowDefaults(voice="vivian"))
        assert all(r.error is None for r in rows)
        orders.add(tuple(r.id for r in rows))
    assert orders == {("Ch1", "ch01", "ch1")}


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


def test_markdown_html_strips_tags_and_comments_never_prose_between_a_less_and_a_greater_than():
    """`<[^>]+>` deleted everything from "< 5" to a later "> 2", paragraphs apart. Tags are stripped on one line
    only; a comment may span lines (notes to the editor are not read); autolinks go, like link URLs."""
    md = ("# Results\n\nOn cold mornings the reading was < 5 degrees, so the crew waited.\n\n"
          "They talked for hours.\n\nBy noon the ratio was > 2 and the boats went out.\n")
    assert " ".join(markdown_to_text(md).split()) == ("Results. On cold mornings the reading was < 5 degrees, so "
                                                      "the crew waited. They talked for hours. By noon the ratio "
                                                      "was > 2 and the boats went out.")
    html = ('A<br/>b <span class="x">c</span> d<!-- a note\nover lines\n\n--> e <https://example.com/x> f\n\n'
            "if a <b\nor c> then")
    assert markdown_to_text(html).split() == ["A", "b", "c", "d", "e", "f", "if", "a", "<b", "or", "c>", "then"]


# ---- any row at all (Hypothesis): a result, never an exception; an error that names the row and stays short ------

_scalar = (st.none() | st.booleans() | st.integers(-(2 ** 80), 2 ** 80) | st.floats() | st.text(max_size=20)
           | st.sampled_from(["", " ", "wav", "flac", "24000", "8000.0", "1e999", "\ud800", "x" * 5000]))
_value = st.recursive(_scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                      max_leaves=8) | st.just(list(range(3000)))
_rows = st.fixed_dictionaries({"id": st.text(min_size=1, max_size=10) | _value, "text": st.just("Hello.") | _value},
                              optional={f: _value for f in ROW_FIELDS if f not in ("id", "text")}) | _value


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(raw=_rows)
def test_any_row_gives_a_row_or_a_short_error_never_an_exception(raw):
    row = check_row(raw, RowDefaults(), "rows.jsonl:7")
    if row.error is not None:
        assert row.error.startswith("rows.jsonl:7: ") and len(row.error) < 300, row.error[:400]
        assert is_unicode(row.error) and is_unicode(row.id)
        return
    assert isinstance(raw, dict) and row.text == raw["text"] and row.text.strip() and is_unicode(row.text)
    assert row.format in FORMATS and SAMPLE_RATES[0] <= row.sample_rate <= SAMPLE_RATES[1]
    assert isinstance(row.seed, int) and not isinstance(row.seed, bool) and 0 <= row.seed < 2 ** 63
    assert all(v is None or isinstance(v, str) for v in (row.voice, row.language, row.instruct, row.model))


def test_jsonl_rows_split_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 are valid raw inside JSON strings (json.dumps(ensure_ascii=False) leaves them so);
    str.splitlines() cut such rows into two malformed halves. "\\r\\n" line ends still work."""
    rows = [{"id": "ls", "text": "First line.\u2028Second line."}, {"id": "ps", "text": "One.\u2029Two."},
            {"id": "nel", "text": "Old mainframe text\x85with a NEL."}, {"id": "plain", "text": "Plain row."}]
    f = tmp_path / "rows.jsonl"
    f.write_bytes(("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n").encode())
    got = read_inputs(f, RowDefaults(voice="ryan"))
    assert [(r.id, r.text, r.error) for r in got] == [(r["id"], r["text"], None) for r in rows]
