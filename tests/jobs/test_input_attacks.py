"""Hostile inputs: files built to cost the job memory or time, and single rows that used to end the whole job.

The rule under test: bad input gets a clear error naming the field or file; one bad row is recorded (its `error`)
and never fatal; no input makes reading it quadratic or lets a small file expand without bound in memory."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import md_text
from jobs.inputs import markdown_to_text

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


def _seconds(text: str) -> float:
    t = time.perf_counter()
    markdown_to_text(text)
    md_text.first_heading(text)
    return time.perf_counter() - t


def test_markdown_time_is_linear_on_hostile_files():
    """A few hundred KB of one repeated mark: 96 KB of "<!--x " took 9.6 s, 48 KB of "*a " 11.4 s, a 1 MB file
    about 20 minutes. Linear now: 4x the text costs well under 16x the time (and stays far from seconds)."""
    for name, unit in [*_HOSTILE.items(), ("heading-spaces", None)]:
        def text(size: int, unit: str | None = unit) -> str:
            return "# a" + " " * size + "b\n" if unit is None else "Once upon a time. " + unit * (size // len(unit))
        small = min(_seconds(text(50_000)) for _ in range(3))
        big = _seconds(text(200_000))
        assert big < 5, f"{name}: {big:.2f}s for 200 KB"
        assert big < 10 * small + 0.1, f"{name}: 50 KB {small:.3f}s, 200 KB {big:.3f}s: not linear"


def test_markdown_file_of_500_kb_of_marks_reads_fast(tmp_path):
    from jobs.inputs import InputLimits, read_inputs

    f = tmp_path / "hostile.md"
    f.write_text("# Title\n\n" + "".join(u * (40_000 // len(u)) for u in _HOSTILE.values()) + "\n# a" + " " * 20_000
                 + "b\n")
    t = time.perf_counter()
    rows = read_inputs(f, limits=InputLimits(max_row_chars=1_000_000))
    assert time.perf_counter() - t < 5 and rows[0].title == "Title"
