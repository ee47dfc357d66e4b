"""Pronunciation lexicon: words and phrases replaced by respellings before synthesis (`--lexicon FILE`).

File formats
    YAML: a mapping `word: respelling`, or a list of `{word, respelling, case}` mappings.
    CSV:  a header row `word,respelling` (optional third column `case`), then one entry per row.

Matching rules
    - Whole words only: a match may not touch a letter, digit, underscore or combining mark on either side ("SQL"
      does not match inside "MySQL", "Jose" not inside a decomposed "José"). Sides that are CJK or Hangul characters
      need no boundary, and a CJK or Hangul neighbour is one (no spaces there: "用SQL查询", "SQL을").
    - Whitespace inside a phrase matches any run of whitespace ("New  York" matches "New York").
    - Case: an entry written all in lower case matches any case ("nginx" matches "Nginx", "NGINX"); an entry with
      an upper-case letter matches exactly ("SQL" matches "SQL" only). `case: exact` or `case: ignore` overrides.
    - Longest entry first (an exact entry before a case-insensitive one of the same text, so "Polish" and
      "polish" can both be listed), left to right, in one pass: a respelling is never rewritten again.
    - The respelling is inserted as written.

Errors name the file and line: a missing or empty word or respelling, a bad `case`, a duplicate entry, a malformed
file. The digest of the entries that fired for a row goes into that row's content key, so editing an entry
re-renders exactly the rows it touches.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .scripts import UNBOUNDED, in_blocks

CASES = ("auto", "exact", "ignore")


@dataclass(frozen=True)
class Entry:
    word: str
    respelling: str
    case: str = "auto"
    line: int = 0

    @property
    def exact(self) -> bool:
        return self.case == "exact" or (self.case == "auto" and self.word != self.word.lower())


@dataclass(frozen=True)
class Lexicon:
    entries: tuple[Entry, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(Entry(**e) if isinstance(e, dict) else e for e in self.entries))

    def __bool__(self) -> bool:
        return bool(self.entries)

    @property
    def digest(self) -> str:
        return digest(self.entries)

    def apply(self, text: str) -> tuple[str, list[Entry]]:
        """(text with respellings, entries that fired, each once, in order of first use)."""
        if not self.entries:
            return text, []
        fired: dict[int, Entry] = {}
        matcher = _compiled(self.entries)

        def sub(m: re.Match[str]) -> str:
            i = matcher.which(m.group(0))
            if _marked(text, m.start(), m.end(), matcher.sides[i][0]):
                return m.group(0)   # "Jose" + U+0301 is the word "José", not "Jose"
            fired.setdefault(i, self.entries[i])
            return self.entries[i].respelling

        return matcher.pattern.sub(sub, text), list(fired.values())


_FREE = "".join(f"{re.escape(chr(lo))}-{re.escape(chr(hi))}" for lo, hi in UNBOUNDED)
_WORD = rf"[^\W{_FREE}]"
"""What a match may not touch: a letter, digit or underscore outside the UNBOUNDED scripts (a CJK or Hangul
neighbour is a boundary). Combining marks, which `\\w` does not match, are checked on each match (`_marked`): a class
of all of them made every entry's pattern ~6 KB longer (13 s to compile 2,000 entries)."""


_LEFT, _RIGHT = rf"(?<!{_WORD})", rf"(?!{_WORD})"


def _marked(text: str, start: int, end: int, bounded_left: bool) -> bool:
    """Whether a match touches a combining mark (Unicode category M: an accent written after its letter, an Indic
    vowel sign): one right after it belongs to its last character; one right before it, to the letter before it
    (a side that needs no boundary, CJK or Hangul, does not mind that)."""
    after = end < len(text) and unicodedata.category(text[end]).startswith("M")
    before = bounded_left and start > 0 and unicodedata.category(text[start - 1]).startswith("M")
    return after or before


class _Matcher:
    """One lexicon, compiled: `pattern` is one alternation of every entry, longest first (exact before
    case-insensitive among equals), with its boundaries and no group; `which` says which entry a match is.
    (A named group per entry made every match attempt pay for all the groups: 211 ms per 300-character chunk with
    2,000 entries, against 10 ms without them, and ~3 ms with the boundaries written once per run below.)"""

    def __init__(self, entries: tuple[Entry, ...]) -> None:
        # per entry: whether its (left, right) side needs a word boundary (apply's mark check reads the left one)
        self.sides = sides = [(not in_blocks(e.word[0], UNBOUNDED), not in_blocks(e.word[-1], UNBOUNDED))
                              for e in entries]
        # longest first, exact before case-insensitive; among entries of one length, those with the same boundaries
        # together (fewer runs below). That moves no entry past one that can match where it does: two entries of
        # one length matching at one place read the same text up to case, and no UNBOUNDED character has a case,
        # so both have the same boundaries.
        order = sorted(range(len(entries)), key=lambda i: (-len(entries[i].word), sides[i], not entries[i].exact))
        runs: list[tuple[tuple[bool, bool], list[str]]] = []   # consecutive entries with the same boundaries
        self.by_len: dict[int, list[tuple[int, re.Pattern[str]]]] = {}
        for i in order:
            e = entries[i]
            words = e.word.split()
            body = r"\s+".join(re.escape(w) for w in words)
            if not e.exact:
                body = f"(?i:{body})"
            if runs and runs[-1][0] == sides[i]:
                runs[-1][1].append(body)
            else:
                runs.append((sides[i], [body]))
            self.by_len.setdefault(len(" ".join(words)), []).append((i, re.compile(body)))
        # `L(?:A|B)R` tries what `LAR|LBR` tries, in the same order (a failed R goes back to B): the same matches,
        # with the boundary classes (costly to compile: a bitmap of their ranges each) written once per run, not once
        # per entry. benchmarks/lexicon.py: compile and apply times against the pattern with per-entry boundaries.
        self.pattern = re.compile("|".join(f"{_LEFT if left else ''}(?:{'|'.join(bodies)}){_RIGHT if right else ''}"
                                           for (left, right), bodies in runs))

    def which(self, matched: str) -> int:
        """The entry `pattern` matched: the first, in its order, whose words are `matched`. Case-insensitive matching
        is character for character and a run of whitespace is one space, so only entries of the same length once
        spaces are single can be it. Entries that read the same text alike share their boundaries: this is the
        alternative the pattern took."""
        candidates = self.by_len[len(" ".join(matched.split()))]
        return next(i for i, body in candidates if body.fullmatch(matched))


_CACHE: dict[tuple[Entry, ...], _Matcher] = {}


def _compiled(entries: tuple[Entry, ...]) -> _Matcher:
    if entries not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[entries] = _Matcher(entries)
    return _CACHE[entries]


def digest(entries: tuple[Entry, ...] | list[Entry]) -> str:
    canon = [[e.word, e.respelling, "exact" if e.exact else "ignore"] for e in entries]
    return hashlib.sha256(json.dumps(sorted(canon), ensure_ascii=False).encode()).hexdigest()[:20]


def _entry(word: object, respelling: object, case: object, where: str, line: int) -> Entry:
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"lexicon: {where}: the word must be a non-empty string, got {word!r}")
    if not isinstance(respelling, str) or not respelling.strip():
        raise ValueError(f"lexicon: {where}: the respelling of {word!r} must be a non-empty string, "
                         f"got {respelling!r}")
    case = "auto" if case in (None, "") else case
    if case not in CASES:
        raise ValueError(f"lexicon: {where}: case must be one of {list(CASES)}, got {case!r}")
    return Entry(" ".join(word.split()), " ".join(respelling.split()), str(case), line)


def _check_duplicates(entries: list[Entry], path: Path) -> None:
    seen: dict[tuple[str, bool], Entry] = {}
    for e in entries:
        k = (e.word if e.exact else e.word.lower(), e.exact)
        if k in seen:
            raise ValueError(f"lexicon: {path.name}:{e.line}: {e.word!r} is already defined on line "
                             f"{seen[k].line}")
        seen[k] = e


def _read_yaml(path: Path, text: str) -> list[Entry]:
    import yaml

    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path.name}:{mark.line + 1}" if mark else path.name
        raise ValueError(f"lexicon: {where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if node is None:
        return []
    out = []
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            line = k.start_mark.line + 1
            if not isinstance(v, yaml.ScalarNode):
                raise ValueError(f"lexicon: {path.name}:{line}: the respelling must be a string")
            out.append(_entry(k.value if isinstance(k, yaml.ScalarNode) else None, v.value, None,
                              f"{path.name}:{line}", line))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            line = item.start_mark.line + 1
            if not isinstance(item, yaml.MappingNode):
                raise ValueError(f"lexicon: {path.name}:{line}: each item must be a mapping with word and "
                                 "respelling")
            odd = next((k for k, _ in item.value if not isinstance(k, yaml.ScalarNode)), None)
            if odd is not None:  # {[a]: b, ...}: a list or mapping as a key (unhashable: it raised TypeError)
                raise ValueError(f"lexicon: {path.name}:{odd.start_mark.line + 1}: a key must be word, respelling "
                                 f"or case, got a {'list' if isinstance(odd, yaml.SequenceNode) else 'mapping'}")
            d = {k.value: v.value for k, v in item.value if isinstance(v, yaml.ScalarNode)}
            extra = set(d) - {"word", "respelling", "case"}
            if extra:
                raise ValueError(f"lexicon: {path.name}:{line}: unknown key(s) {sorted(extra)}")
            out.append(_entry(d.get("word"), d.get("respelling"), d.get("case"), f"{path.name}:{line}", line))
    else:
        raise ValueError(f"lexicon: {path.name}:1: expected a mapping of word: respelling or a list of entries")
    return out


def _read_csv(path: Path, text: str) -> list[Entry]:
    # the csv module finds the line ends ("\n", "\r\n", quoted newlines): str.splitlines() would also cut a row
    # at U+2028, U+0085 and the like, or inside a quoted field
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in next(rows)]
    except StopIteration:
        return []
    except csv.Error as e:
        raise ValueError(f"lexicon: {path.name}:1: not valid CSV ({e})") from None
    if header[:2] != ["word", "respelling"] or not set(header) <= {"word", "respelling", "case"}:
        raise ValueError(f"lexicon: {path.name}:1: the header must be 'word,respelling' (optionally ',case'), "
                         f"got {','.join(header)!r}")
    out = []
    try:
        for row in rows:
            line = rows.line_num
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ValueError(f"lexicon: {path.name}:{line}: expected {len(header)} fields, got {len(row)}")
            d = dict(zip(header, row))
            out.append(_entry(d["word"], d["respelling"], d.get("case", "").strip() or None,
                              f"{path.name}:{line}", line))
    except csv.Error as e:
        raise ValueError(f"lexicon: {path.name}:{rows.line_num}: not valid CSV ({e})") from None
    return out


def load(path: str | Path) -> Lexicon:
    """Read a lexicon file (.yaml/.yml/.csv).

    Raises:
        ValueError: "lexicon: FILE:LINE: ..." for any problem, or a missing / unsupported file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"lexicon: {p} is not a file" if p.exists() else f"lexicon: {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")  # Excel's "CSV UTF-8" starts with a BOM (inputs accept one too)
    except UnicodeDecodeError as e:
        raise ValueError(f"lexicon: {p.name}: not UTF-8 text ({e})") from None
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        entries = _read_yaml(p, text)
    elif suffix == ".csv":
        entries = _read_csv(p, text)
    else:
        raise ValueError(f"lexicon: unsupported file type {p.suffix!r}; use .yaml, .yml or .csv")
    _check_duplicates(entries, p)
    return Lexicon(tuple(entries), source=str(p))
