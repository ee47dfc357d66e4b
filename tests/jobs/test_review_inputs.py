"""Review of the long-form inputs as an attacker, a careless user and a crash: the splitter, row fields, the book.

The rules under test: splitting never drops or duplicates text and no text makes it quadratic; a row's own field is
never dropped for a default; a damaged record in storage is made again, never an error on every later run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import narrate, split
from jobs.captions import sentence_chunks
from jobs.inputs import RowDefaults, check_row, read_inputs
from jobs.split import key_text, split_text
from tests.cputime import cpu_seconds

# ---- the splitter: no text lost or doubled, whatever the script ----------------------------------------------------

_PIECES = [" ", "  ", "\n", "\n\n", "\n \n", "\t", "\u3000", "\u00a0", "\u2028", ".", "...", "!", "?", ";", "…",
           ",", ":", "，", "、", "：", "。", "！", "？", "；", '"', "'", "”", ")", "）", "」", "』", "】", "》", "[",
           "a", "word", "longerwordwithoutspaces", "Dr.", "e\u0301", "\u0301\u0301", "👨\u200d👩\u200d👧",
           "🏳️\u200d🌈", "\u200b", "\u200f", "שלום", "مرحبا", "很", "日本語", "한국어", "ｆｕｌｌ", "x" * 30, "1.5",
           "。…", ".…", "…!", "?」", "，，", ",,", ":)"]


def _letters(text: str) -> str:
    return "".join(text.split())


@settings(max_examples=1500, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join), st.integers(8, 40))
def test_split_keeps_every_character_once_in_order_within_the_budget(text, max_chars):
    """Concatenated, the chunks are the text but for whitespace; none is empty, padded or over the budget (captions'
    sentence chunks too)."""
    for chunks in (split_text(text, max_chars), sentence_chunks(text, max_chars)):
        assert _letters("".join(chunks)) == _letters(text)
        assert all(c and c == c.strip() and len(c) <= max_chars for c in chunks)
    assert split_text(key_text(text), max_chars) == split_text(text, max_chars)  # the key names the audio's chunks


# ---- the splitter: linear time on any text ------------------------------------------------------------------------

_HOSTILE = {  # a long run of one kind of punctuation that no whitespace follows
    "periods": ".", "bangs": "!?", "semicolons": ";", "closers": '."', "commas": ",", "colons": ":",
}


def _split_seconds(text: str, tries: int) -> float:
    return cpu_seconds(lambda: (split_text(text, 200), sentence_chunks(text, 200)), tries)


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_split_time_is_linear_on_runs_of_punctuation(name):
    """A sentence end (". ! ? ;") or a clause end (", :") is punctuation followed by whitespace: a run of such marks
    followed by a letter was tried from every mark in it, each try reading to the run's end (quadratic: a 200 KB
    row, which --max-row-chars lets through, took minutes in one worker)."""
    unit = _HOSTILE[name]

    def text(size: int) -> str:
        return "Once upon a time. " + unit * (size // len(unit)) + "x and the end."

    small, big = _split_seconds(text(10_000), 3), _split_seconds(text(40_000), 2)
    assert big < 5, f"{name}: {big:.2f}s for 40 KB"
    assert big < 10 * small + 0.05, f"{name}: 10 KB {small:.3f}s, 40 KB {big:.3f}s: not linear"


def test_split_time_is_linear_in_one_long_word():
    """A word longer than the budget is cut into pieces of the budget; cutting one piece at a time copied the rest
    of the word each time (a 1 MB word, no spaces, at --max-chars 8: 125k copies of up to 1 MB)."""
    def split(size: int) -> None:
        assert len(split_text("x" * size, 8)) == size // 8

    # 16x the characters: ~16x the CPU time (0.008 s, 0.125 s); copying the rest at each cut took 90x (1.03 s)
    small, big = cpu_seconds(lambda: split(50_000), 3), cpu_seconds(lambda: split(800_000), 2)
    assert big < 2, f"{big:.2f}s for a word of 800k characters"
    assert big < 40 * small + 0.05, f"50k {small:.3f}s, 800k {big:.3f}s: not linear"


# The expressions split.py used before they were made linear (the reference for what it cuts)
_CLOSERS = re.escape("\"'”’)）]」』】》")
_OLD_SENTENCE_END = re.compile(rf"(?:[.!?;…]+[{_CLOSERS}]*(?=\s|$))|(?:[。！？；…]+[{_CLOSERS}]*)")
_OLD_CLAUSE_END = re.compile(rf"(?:[,:]+[{_CLOSERS}]*(?=\s))|(?:[，、：]+)")


def _old_hard_split(piece: str, max_chars: int) -> list[str]:
    out: list[str] = []
    cur = ""
    for word in piece.split(" "):
        while len(word) > max_chars:
            if cur:
                out.append(cur)
                cur = ""
            out.append(word[:max_chars])
            word = word[max_chars:]
        if not word:
            continue
        cand = f"{cur} {word}" if cur else word
        if len(cand) <= max_chars:
            cur = cand
        else:
            out.append(cur)
            cur = word
    if cur:
        out.append(cur)
    return out


def _old_split(text: str, max_chars: int) -> tuple[list[str], list[str]]:
    def old_sentence_ends(text: str) -> list[int]:
        return [m.end() for m in _OLD_SENTENCE_END.finditer(text)]

    new = getattr(split, "_sentence_ends", None), split._CLAUSE_END, split._hard_split
    split._sentence_ends, split._CLAUSE_END, split._hard_split = old_sentence_ends, _OLD_CLAUSE_END, _old_hard_split
    try:
        return split_text(text, max_chars), sentence_chunks(text, max_chars)
    finally:
        split._sentence_ends, split._CLAUSE_END, split._hard_split = new


@settings(max_examples=3000, deadline=None, derandomize=True, database=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=60).map("".join), st.integers(8, 40))
def test_split_cuts_where_the_old_expressions_cut(text, max_chars):
    """Linear, the splitter still gives exactly the chunks it gave (content keys and audio stay the same)."""
    assert (split_text(text, max_chars), sentence_chunks(text, max_chars)) == _old_split(text, max_chars)


# ---- rows: the row's own voice is never dropped for the default ----------------------------------------------------

@pytest.mark.parametrize("voice", [None, ""])
def test_a_rows_speaker_is_its_voice_when_voice_is_null_or_empty(voice):
    """`voice` and `speaker` are one field; a Parquet file (or a CSV catalog) with both columns gives every row both
    keys, one of them null or an empty cell: the row's speaker was dropped and the default --voice read instead."""
    row = check_row({"id": "a", "text": "Hello.", "voice": voice, "speaker": "ryan"}, RowDefaults(voice="vivian"),
                    "rows:1")
    assert row.error is None and row.voice == "ryan"
    assert check_row({"id": "a", "text": "Hello.", "voice": "ryan", "speaker": None}, RowDefaults(voice="vivian"),
                     "rows:1").voice == "ryan"
    assert check_row({"id": "a", "text": "Hello.", "voice": voice, "speaker": None}, RowDefaults(voice="vivian"),
                     "rows:1").voice == "vivian"


def test_parquet_with_voice_and_speaker_columns_keeps_each_rows_voice(tmp_path):
    f = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["One.", "Two."], "voice": ["ryan", None],
                             "speaker": [None, "ryan"]}), f)
    assert [r.voice for r in read_inputs(f, RowDefaults(voice="vivian"))] == ["ryan", "ryan"]


def test_chapter_names_with_digits_that_are_not_decimal_sort_and_are_read(tmp_path):
    """Chapters sort by the numbers in their names; a name whose non-decimal part is all "digits" to str.isdigit
    (superscripts: "1²2") went through int() and ended the job with "invalid literal for int()" naming no file."""
    d = tmp_path / "book"
    d.mkdir()
    for name in ("ch10.md", "ch2.md", "1²2.md", "x³.txt", "ch٣.md"):   # ٣: Arabic-Indic three, a decimal digit
        (d / name).write_text(f"Text of {name}.")
    assert [r.id for r in read_inputs(d)] == ["1²2", "ch2", "ch٣", "ch10", "x³"]


# ---- input files that are no files: a device or a pipe named like a chapter -----------------------------------------

ROOT = Path(__file__).resolve().parents[2]
_READ = """
import resource, sys
from jobs.inputs import read_inputs
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))  # 1 GiB more than now, at most
try:
    read_inputs(sys.argv[1])
except ValueError as e:
    print("ValueError:", e)
"""


def _read_in_a_child(path: Path) -> str:
    run = subprocess.run([sys.executable, "-c", _READ, str(path)], capture_output=True, text=True, timeout=30,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_chapter_file_that_is_a_link_to_a_device_is_refused_not_read_without_end(tmp_path):
    """`book.txt -> /dev/zero` (a link in an unpacked archive): its size says 0 bytes, so the --max-input-bytes check
    let it through and read_bytes() read until memory ran out (MemoryError here, under a 1 GiB cap; the OOM killer
    on a worker's node)."""
    f = tmp_path / "book.txt"
    f.symlink_to("/dev/zero")
    out = _read_in_a_child(f)
    assert out.startswith("ValueError: input:") and str(f) in out


def test_a_chapter_file_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """A FIFO named like a chapter: opening it waited for a writer for ever (the job hung before any work)."""
    f = tmp_path / "book.md"
    os.mkfifo(f)
    try:
        out = _read_in_a_child(f)
    except subprocess.TimeoutExpired:
        pytest.fail("reading a named pipe hung")
    assert out.startswith("ValueError: input:") and str(f) in out


# ---- the book: a damaged record of it is made again, not an error on every run -------------------------------------

NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet", "--voice", "ryan"]


@pytest.mark.parametrize("damage", [b"null", b"[]", b'{"key": "x"', b'{"reused": false}'])
def test_a_damaged_book_record_makes_the_book_again(tmp_path, capsys, damage):
    """The book's JSON record (`<book>.m4b.json`) is what says "this book is made": a damaged one (null, a list,
    cut short, an object that is no record of this book) raised on every later run (exit 1, `book.error`, the book
    never made again until someone deleted the file), where a damaged row sidecar is rendered again."""
    d = tmp_path / "book"
    d.mkdir()
    (d / "01-one.md").write_text("# One\n\nIt was a dark and stormy night.")
    (d / "02-two.txt").write_text("The storm grew.")
    out = tmp_path / "out"
    args = [str(d), "--out", str(out), *NOISE, "--book", "m4b"]
    assert narrate.main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["book"]
    (out / (first["key"] + ".json")).write_bytes(damage)
    assert narrate.main(args) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["book"]
    assert "error" not in again and not again["reused"] and again["key"] == first["key"]
    assert [c["title"] for c in again["chapters"]] == ["One", "Two"]
    assert json.loads((out / (first["key"] + ".json")).read_bytes())["key"] == first["key"]
    assert narrate.main(args) == 0  # and the record written again is taken
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["book"]["reused"]
