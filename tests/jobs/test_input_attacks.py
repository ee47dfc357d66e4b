"""Hostile inputs: files built to cost the job memory or time, and single rows that used to end the whole job.

The rule under test: bad input gets a clear error naming the field or file; one bad row is recorded (its `error`)
and never fatal; no input makes reading it quadratic or lets a small file expand without bound in memory."""

from __future__ import annotations

import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import md_text
from jobs.inputs import RowDefaults, check_row, markdown_to_text, read_inputs
from tests.cputime import cpu_seconds

# ---- Markdown: linear time, the same text as the regular expressions it replaced -----------------------------------

# The expressions markdown_to_text applied until it was made linear (kept here as the reference).
_OLD_RULES = [
    (re.compile(r"```.*?```", re.S), " "),
    (re.compile(r"!\[[^\]]*\]\([^)]*\)"), " "),
    (re.compile(r"\[([^\]]*)\]\([^)]*\)"), r"\1"),
    (re.compile(r"^\s{0,3}#{1,6}\s*(.*?)\s*#*\s*$", re.M), r"\1.\n"),
    (re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+", re.M), ""),
    (re.compile(r"^\s*>\s?", re.M), ""),
    (re.compile(r"(\*\*|__|\*|_|`)(?=\S)(.+?)(?<=\S)\1"), r"\2"),
    (re.compile(r"<!--.*?-->", re.S), " "),
    (re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:[ \t][^<>\n]*)?/?>"), " "),
    (re.compile(r"<[A-Za-z][A-Za-z0-9.+-]{1,31}:[^<>\s]*>"), " "),
]
_OLD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s*(.*?)\s*#*\s*$", re.M)


def _old_markdown_to_text(md: str) -> str:
    for pattern, repl in _OLD_RULES:
        md = pattern.sub(repl, md)
    return re.sub(r"\.(\s*[.!?。！？])", r"\1", md)


_BOOK = """\
# Chapter One #

  ## The *first* morning

Some **bold** words, some __strong__ ones, an _aside_ and `code`; a [link](http://x.org/a_(b)) and
![a picture](pic.png "title") between them.  <!-- a note
for the editor --> Then <em>tags</em>, an <https://example.com/x> autolink, and 2 * 3 * 4 = 24.

- first item
* second item
+ third
1. numbered
2) other
   > quoted *line*
>> nested quote

```
code block
```
####### seven hashes
#no space heading
   #   spaced   heading   ###   \t
Last line with a_snake_name and **unclosed bold.
"""


def test_markdown_gives_the_old_text_on_ordinary_markdown():
    assert markdown_to_text(_BOOK) == _old_markdown_to_text(_BOOK)
    assert md_text.first_heading(_BOOK) == _OLD_HEADING.search(_BOOK).group(1)


_PIECES = ["#", "##", " ", "  ", "\t", "\n", "\n\n", "\r", "\u3000", "*", "**", "_", "__", "`", "```", "[", "]",
           "(", ")", "![", "](", "<", ">", "<!--", "-->", "-", "+", "1", "12", ".", ")", "!", "?", "a", "b c",
           "<b>", "</i>", "<a:b>", "<http://x>", "。", "٣", "\x0b", "\x1c", "\x85", "\u2028"]


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=40).map("".join))
def test_markdown_gives_exactly_what_the_old_expressions_gave(md):
    """Every pass is the expression it replaced: the same output on any mix of Markdown's marks."""
    assert markdown_to_text(md) == _old_markdown_to_text(md)
    old = _OLD_HEADING.search(md)
    assert md_text.first_heading(md) == (old.group(1) if old else None)


_HOSTILE = {  # each took quadratic (the heading: cubic) time with the expressions
    "comment": "<!--x ", "emphasis": "*a ", "strong": "**a ", "code": "`a ", "underscore": "_a ",
    "image": "![a ", "link": "[a ", "link-url": "[a](b ", "blank-lines": "\n", "quote-lines": " \n",
    "list-lines": "\n  \t", "fence": "```x ",
}


def _seconds(text: str, tries: int) -> float:
    return cpu_seconds(lambda: (markdown_to_text(text), md_text.first_heading(text)), tries)


def test_markdown_time_is_linear_on_hostile_files():
    """A few hundred KB of one repeated mark: 96 KB of "<!--x " took 9.6 s, 48 KB of "*a " 11.4 s, a 1 MB file
    about 20 minutes. Linear now: 4x the text costs well under 16x the time (and stays far from seconds)."""
    for name, unit in [*_HOSTILE.items(), ("heading-spaces", None)]:
        def text(size: int, unit: str | None = unit) -> str:
            return "# a" + " " * size + "b\n" if unit is None else "Once upon a time. " + unit * (size // len(unit))
        small, big = _seconds(text(50_000), 3), _seconds(text(200_000), 2)
        assert big < 5, f"{name}: {big:.2f}s for 200 KB"
        assert big < 10 * small + 0.1, f"{name}: 50 KB {small:.3f}s, 200 KB {big:.3f}s: not linear"


def test_markdown_file_of_500_kb_of_marks_reads_fast(tmp_path):
    from jobs.inputs import InputLimits

    f = tmp_path / "hostile.md"
    f.write_text("# Title\n\n" + "".join(u * (40_000 // len(u)) for u in _HOSTILE.values()) + "\n# a" + " " * 20_000
                 + "b\n")
    t = time.perf_counter()
    rows = read_inputs(f, limits=InputLimits(max_row_chars=1_000_000))
    assert time.perf_counter() - t < 5 and rows[0].title == "Title"


# ---- one bad row is that row's error, never the job's end ----------------------------------------------------------

FAKE = "tests.jobs.fakes:FakeBackend"
_ROW_ERROR = "field 'sample_rate' must be an integer in [4000, 48000]"


def test_an_infinite_sample_rate_or_a_4301_digit_number_fails_its_row_only_and_the_job_writes_its_manifest(tmp_path):
    """`"sample_rate": 1e999` is float inf (int() raised OverflowError: a traceback, exit 1, no manifest); a JSON
    integer of over 4300 digits made json.loads raise a plain ValueError (exit 2 naming neither file nor line)."""
    from jobs import narrate
    from jobs.manifest import from_parquet

    inp = tmp_path / "rows.jsonl"
    inp.write_text('{"id": "good", "text": "Hello there."}\n'
                   '{"id": "inf", "text": "Hi there.", "sample_rate": 1e999}\n'
                   '{"id": "nan", "text": "Hi there.", "sample_rate": NaN}\n'
                   '{"id": "big", "text": "Hi there.", "seed": ' + "9" * 5000 + "}\n"
                   '{"id": "good2", "text": "Bye now."}\n')
    out = tmp_path / "out"
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--voice", "ryan"])
    assert code == 1  # some rows failed
    man = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    assert man["good"].status == man["good2"].status == "ok"
    assert _ROW_ERROR in man["inf"].error and "got inf" in man["inf"].error
    assert _ROW_ERROR in man["nan"].error
    assert man["rows.jsonl:4"].error.startswith("rows.jsonl:4: malformed JSON (a number too long to read")


@pytest.mark.parametrize("value", [0, "", False, True, 8000.9, "8000.0", "+8000", -8000, float("inf"), [8000]])
def test_a_sample_rate_that_is_not_an_integer_in_range_is_the_rows_error_not_the_default(value):
    """0, "" and false became the default 24000 without a word (`raw.get(...) or default`), 8000.9 became 8000."""
    row = check_row({"id": "a", "text": "Hi.", "sample_rate": value}, RowDefaults(), "rows.jsonl:3")
    assert row.error is not None and row.error.startswith(f"rows.jsonl:3: {_ROW_ERROR}, got "), row
    assert "(the default sample rate)" not in row.error


@pytest.mark.parametrize("value", [8000, "8000", " 8000 ", 8000.0, None])
def test_a_sample_rate_that_is_an_integer_is_taken(value):
    row = check_row({"id": "a", "text": "Hi.", "sample_rate": value}, RowDefaults(sample_rate=16000), "r:1")
    assert row.error is None and row.sample_rate == (16000 if value is None else 8000)


def test_parquet_float_inf_sample_rate_fails_its_row_only(tmp_path):
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": ["One.", "Two.", "Three."],
                             "sample_rate": [8000.0, float("inf"), None]}), f)
    rows = read_inputs(f)
    assert [(r.id, r.sample_rate, r.error) for r in rows[::2]] == [("a", 8000, None), ("c", 24000, None)]
    assert rows[1].error.startswith(f"rows.parquet:2: {_ROW_ERROR}, got inf")


def test_yaml_catalog_prompt_with_mixed_key_types_or_an_infinite_sample_rate_fails_alone(tmp_path):
    """`{id: bad, text: ..., 1: x, note: y}`: sorting the unknown keys compared int and str (TypeError, the whole
    job); `.inf` is YAML's infinity."""
    from jobs.catalog import load_catalog

    f = tmp_path / "menu.yaml"
    f.write_text("defaults: {voice: ryan}\nprompts:\n  - {id: ok, text: Hello there.}\n"
                 "  - {id: mixed, text: Press one., 1: x, note: y}\n"
                 "  - {id: inf, text: Press two., sample_rate: .inf}\n")
    rows, _ = load_catalog(f, RowDefaults())
    by_id = {r.id: r for r in rows}
    assert by_id["ok"].error is None and by_id["mixed"].error is None  # unknown keys are ignored, as before
    assert by_id["inf"].error.startswith(f"menu.yaml:3: {_ROW_ERROR}, got inf")


def test_a_json_integer_of_over_4300_digits_is_that_lines_error(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"id": "good", "text": "Hello."}\n{"id": "big", "text": "Hi.", "seed": ' + "9" * 4301 + "}\n")
    rows = read_inputs(f)
    assert rows[0].error is None and rows[1].id == "rows.jsonl:2"
    assert rows[1].error.startswith("rows.jsonl:2: malformed JSON (a number too long to read") and len(rows[1].error) < 200


# ---- Parquet: the limit is on what the rows hold, not only on the compressed file ---------------------------------

def _dictionary_bomb(path, rows: int, width: int) -> None:
    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, type=pa.int32()), pa.array(["a" * width]))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(rows)], "text": text}), path, compression="zstd")


def test_a_small_dictionary_encoded_parquet_file_of_huge_rows_is_refused_before_its_rows_are_built(tmp_path):
    """49,585 bytes of Parquet held 20,000 rows of 50 KB (1 GB): --max-input-bytes saw only the file's size and
    to_pylist() built every row (1.3 GiB RSS). Now every batch is measured, encoded, before any row is built."""
    import tracemalloc

    from jobs.inputs import InputLimits

    f = tmp_path / "bomb.parquet"
    _dictionary_bomb(f, 2000, 50_000)  # 100 MB of text
    assert f.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb\.parquet holds more than 10000000 bytes of row fields once "
                                             r"decoded; the limit is 10000000 bytes \(--max-input-bytes\)"):
            read_inputs(f, limits=InputLimits(max_input_bytes=10_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"{peak} bytes of Python objects built for a refused file"


def test_parquet_metadata_is_checked_before_reading_rows_and_uncompressed_bytes(tmp_path):
    from jobs.inputs import InputLimits

    many = tmp_path / "many.parquet"
    pq.write_table(pa.table({"id": ["a"] * 200_000, "text": ["b"] * 200_000}), many)
    with pytest.raises(ValueError, match=r"many\.parquet holds 200000 rows .*the limit is 1000000 bytes"):
        read_inputs(many, limits=InputLimits(max_input_bytes=1_000_000))
    long = tmp_path / "long.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x" * 3_000_000]}), long, use_dictionary=False,
                   compression="zstd")
    assert long.stat().st_size < 1_000_000
    with pytest.raises(ValueError, match=r"long\.parquet holds \d+ bytes of row fields uncompressed; the limit is "
                                         r"1000000 bytes"):
        read_inputs(long, limits=InputLimits(max_input_bytes=1_000_000))


def test_parquet_read_in_batches_gives_every_row_in_order_and_a_nested_value_is_its_rows_error(tmp_path):
    f = tmp_path / "rows.parquet"
    n = 1300  # several batches
    voices = pa.DictionaryArray.from_arrays(pa.array([i % 2 for i in range(n)], type=pa.int32()),
                                            pa.array(["ryan", "vivian"]))
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"Line {i}." for i in range(n)],
                             "voice": voices, "seed": list(range(n)),
                             "instruct": [["x" * 10] * 100 if i == 700 else None for i in range(n)],
                             "other": [[1, 2, 3]] * n}), f, row_group_size=500)
    rows = read_inputs(f)
    assert [(r.id, r.text, r.voice, r.seed) for r in rows if r.error is None] == [
        (f"r{i}", f"Line {i}.", "ryan" if i % 2 == 0 else "vivian", i) for i in range(n) if i != 700]
    assert rows[700].error.startswith("rows.parquet:701: field 'instruct' must be a string, got <list<")


def test_a_parquet_file_that_is_not_one_is_named(tmp_path):
    f = tmp_path / "bad.parquet"
    f.write_bytes(b"PAR1" + b"\0" * 100 + b"PAR1")
    with pytest.raises(ValueError, match=r"bad\.parquet is not a readable Parquet file"):
        read_inputs(f)


@pytest.mark.parametrize("dictionary_pagesize_limit", [64 << 10, 1 << 30],
                         ids=["plain-pages-past-the-dictionary", "all-dictionary"])
def test_parquet_reading_work_grows_linearly_with_rows(tmp_path, monkeypatch, dictionary_pagesize_limit):
    """Before: every 512-row batch handed over (and measured, and converted) its row group's whole dictionary, which
    past the writer's dictionary limit grows with every batch: a read was quadratic (800k rows: 59 s, read_table
    1.4 s). The work is counted, not timed: dictionary entries the batches carry, for 4 times the rows."""
    from jobs import inputs

    carried = [0]
    real = inputs._parquet_batches

    def counting(*args, **kwargs):
        for batch in real(*args, **kwargs):
            carried[0] += sum(len(c.dictionary) for c in batch.columns if pa.types.is_dictionary(c.type))
            yield batch

    monkeypatch.setattr(inputs, "_parquet_batches", counting)
    work = {}
    for n in (20_000, 80_000):
        f = tmp_path / f"rows{n}.parquet"
        pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)], "text": [f"Line number {i}." for i in range(n)]}),
                       f, dictionary_pagesize_limit=dictionary_pagesize_limit)
        carried[0] = 0
        rows = read_inputs(f, RowDefaults(voice="ryan"))
        assert len(rows) == n and rows[-1].text == f"Line number {n - 1}." and rows[-1].error is None
        work[n] = carried[0]
    assert work[80_000] <= 6 * work[20_000], work  # linear: 4; quadratic: 16
    assert work[80_000] <= 2 * 2 * inputs._PARQUET_BATCHES_PER_GROUP * 80_000, work  # two passes, two columns
