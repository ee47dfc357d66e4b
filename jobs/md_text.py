"""Markdown markup a narrator should not read, stripped in time linear in the file's size.

Each pass gives exactly what the regular expression in its docstring gives with `re.sub` (re.M where it starts with
"^"), and did before: those expressions backtrack, and a hostile file ("<!--x " or "*a " repeated, a run of blank
lines, a heading line of spaces) took minutes to hours. A pass that must look for a closing mark ("]", ")", "-->",
the emphasis's closer, the end of a whitespace run) remembers what it found, so no stretch of text is scanned again
for every opening mark before it. Passes whose expression is already linear stay expressions.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_FENCE = re.compile(r"```.*?```", re.S)  # an opening fence that finds no closer has no fence after it: linear
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(?:[ \t][^<>\n]*)?/?>")  # a try stops at the next "<"
_AUTOLINK = re.compile(r"<[A-Za-z][A-Za-z0-9.+-]{1,31}:[^<>\s]*>")
_STOPS = re.compile(r"\.(\s*[.!?。！？])")
_EMPHASIS_CHARS = re.compile(r"[*_`]")
_DELIMITERS = ("**", "__", "*", "_", "`")  # the alternation's order: "**" is tried before "*"


class _Next:
    """next(i): the first index >= i where `sub` starts in `text` and `ok(index)` holds, -1 if none. The last
    answer is remembered: for queries that only move forward all of them together scan `text` about once."""

    def __init__(self, text: str, sub: str, ok: Callable[[int], bool] | None = None) -> None:
        self.text, self.sub, self.ok = text, sub, ok
        self.asked, self.found = -1, -1  # every query in [asked, found] answers found; found -1: none from asked on

    def __call__(self, i: int) -> int:
        if 0 <= self.asked <= i and (self.found == -1 or i <= self.found):
            return self.found
        q = self.text.find(self.sub, i)
        while q != -1 and self.ok is not None and not self.ok(q):
            q = self.text.find(self.sub, q + 1)
        self.asked, self.found = i, q
        return q


def _line_start(text: str, i: int) -> int:
    """The first position >= i where "^" matches under re.M (after a "\\n" or at 0); -1 if none."""
    if i == 0 or text[i - 1] == "\n":
        return i
    nl = text.find("\n", i)
    return -1 if nl == -1 else nl + 1


def _space_end(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def links(text: str, image: bool) -> str:
    """`!\\[[^\\]]*\\]\\([^)]*\\)` -> " " (image), or `\\[([^\\]]*)\\]\\([^)]*\\)` -> its text (link)."""
    opening = "![" if image else "["
    close, paren = _Next(text, "]"), _Next(text, ")")
    out, done, i = [], 0, 0
    while (p := text.find(opening, i)) != -1:
        q = close(p + len(opening))
        if q == -1:
            break  # no "]" after this opening: none after any later one either
        if text.startswith("(", q + 1):
            r = paren(q + 2)
            if r == -1:
                break
            out += [text[done:p], " " if image else text[p + 1:q]]
            done = i = r + 1
            continue
        i = p + 1
    return "".join(out) + text[done:]


def _heading_at(text: str, p: int) -> tuple[int, int, int] | None:
    """`^\\s{0,3}#{1,6}\\s*(.*?)\\s*#*\\s*$` (re.M) tried at line start `p`: (group start, group end, match end).

    Worked out rather than backtracked: after the "#"s, `\\s*` takes all whitespace (newlines too); the lazy group
    ends where the rest of its line is whitespace, "#"s, whitespace; the match then ends at the "$" the greedy
    `\\s*#*\\s*` reaches first when it gives back characters one at a time."""
    n, k = len(text), p
    while k < n and k - p < 3 and text[k].isspace():
        k += 1
    if k >= n or text[k] != "#":
        return None
    j = k
    while j < n and j - k < 6 and text[j] == "#":
        j += 1
    b = _space_end(text, j)
    le = text.find("\n", b)
    le = n if le == -1 else le
    c = le
    for hashes in (False, True, False):  # the longest tail of b's line that is whitespace, "#"s, whitespace
        while c > b and (text[c - 1] == "#" if hashes else text[c - 1].isspace()):
            c -= 1
    spaces = _space_end(text, c)
    hashes = spaces
    while hashes < n and text[hashes] == "#":
        hashes += 1
    end = _space_end(text, hashes)
    for lo, hi in ((hashes, end), (c, spaces)):  # "$" in the trailing whitespace, else in the leading one
        if hi == n:
            return b, c, n
        e = text.rfind("\n", lo, hi)
        if e != -1:
            return b, c, e
    raise AssertionError("unreachable: the line end of b is in one of the two runs")


def headings(text: str) -> str:
    """`^\\s{0,3}#{1,6}\\s*(.*?)\\s*#*\\s*$` (re.M) -> `\\1.\\n`: a heading becomes a sentence of its own."""
    out, done, p = [], 0, 0
    while p != -1 and p <= len(text):
        m = _heading_at(text, p)
        if m is None:
            p = _line_start(text, p + 1) if p < len(text) else -1
            continue
        b, c, e = m
        out += [text[done:p], text[b:c], ".\n"]
        done = e
        p = _line_start(text, e) if e < len(text) else -1
    return "".join(out) + text[done:]


def first_heading(text: str) -> str | None:
    """The group of the first `^\\s{0,3}#{1,6}\\s*(.*?)\\s*#*\\s*$` (re.M) match, None when there is none."""
    p = 0
    while p != -1 and p <= len(text):
        m = _heading_at(text, p)
        if m is not None:
            return text[m[0]:m[1]]
        p = _line_start(text, p + 1) if p < len(text) else -1
    return None


def _line_marks(text: str, mark: Callable[[str, int], int]) -> str:
    """`^\\s*MARK` (re.M) -> "": `mark(text, i)` is where MARK, tried at i, ends (-1: no match). MARK never starts
    with whitespace, so every line start inside one whitespace run reaches the same first character: that run is
    scanned once, not once per line start in it."""
    out, done, p, run_from, run_end = [], 0, 0, -1, -1
    n = len(text)
    while p != -1 and p <= n:
        if not run_from <= p <= run_end:
            run_from, run_end = p, _space_end(text, p)
        m = mark(text, run_end)
        if m == -1:
            p = _line_start(text, p + 1) if p < n else -1
            continue
        out.append(text[done:p])
        done = m
        p = _line_start(text, m) if m < n else -1
    return "".join(out) + text[done:]


def _list_mark(text: str, w: int) -> int:
    """`(?:[-*+]|\\d+[.)])\\s+` at w."""
    n = len(text)
    if w < n and text[w] in "-*+":
        m = w + 1
    elif w < n and text[w].isdecimal():
        m = w
        while m < n and text[m].isdecimal():
            m += 1
        if m >= n or text[m] not in ".)":
            return -1
        m += 1
    else:
        return -1
    return _space_end(text, m) if m < n and text[m].isspace() else -1


def _quote_mark(text: str, w: int) -> int:
    """`>\\s?` at w."""
    if w >= len(text) or text[w] != ">":
        return -1
    return w + 2 if w + 1 < len(text) and text[w + 1].isspace() else w + 1


def emphasis(text: str) -> str:
    """`(\\*\\*|__|\\*|_|`)(?=\\S)(.+?)(?<=\\S)\\1` -> `\\2`: emphasis and inline code marks go, their text stays."""
    closers = {d: _Next(text, d, lambda q: not text[q - 1].isspace()) for d in _DELIMITERS}
    newline = _Next(text, "\n")
    out, done, i, n = [], 0, 0, len(text)
    while (found := _EMPHASIS_CHARS.search(text, i)) is not None:
        p = found.start()
        for d in _DELIMITERS:
            a = p + len(d)
            if not text.startswith(d, p) or a >= n or text[a].isspace():
                continue
            q = closers[d](a + 1)  # the first closer after a non-space; the group may not run over a line end
            if q == -1 or -1 < newline(a) < q:
                continue
            out += [text[done:p], text[a:q]]
            done = i = q + len(d)
            break
        else:
            i = p + 1
    return "".join(out) + text[done:]


def comments(text: str) -> str:
    """`<!--.*?-->` (re.S) -> " "."""
    out, done = [], 0
    while (p := text.find("<!--", done)) != -1:
        q = text.find("-->", p + 4)
        if q == -1:
            break  # no closer after this one: none after any later opening either
        out += [text[done:p], " "]
        done = q + 3
    return "".join(out) + text[done:]


def markdown_to_text(md: str) -> str:
    """Strip the Markdown markup a narrator should not read; headings end as their own sentence.

    A "<" is markup only when it starts an HTML tag on the same line, an HTML comment (which may run over lines
    up to its "-->") or an autolink: a bare "<" or ">" in prose ("was < 5 ... was > 2") is text and is read."""
    md = _FENCE.sub(" ", md)                             # code fences are not read aloud
    md = links(md, image=True)                           # images
    md = links(md, image=False)                          # links -> their text
    md = headings(md)                                    # headings become a sentence
    md = _line_marks(md, _list_mark)                     # list markers
    md = _line_marks(md, _quote_mark)                    # block quotes
    md = emphasis(md)                                    # emphasis / inline code
    # HTML: real tags only, each on one line, so "< 5 ... > 2" in prose stays; comments may span lines (notes)
    md = comments(md)
    md = _TAG.sub(" ", md)
    md = _AUTOLINK.sub(" ", md)                          # autolinks <https://...>, like link URLs
    return _STOPS.sub(r"\1", md)
