"""Pronunciation lexicon: matching rules, what reaches the synthesizer, content keys, and bad files."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs import narrate
from jobs.lexicon import _WORD, Entry, Lexicon, _marked, load
from jobs.manifest import from_parquet
from jobs.scripts import UNBOUNDED, in_blocks

NOISE = ["--model", "fake", "--backend", "tests.jobs.media_fakes:NoiseBackend", "--runner", "local",
         "--no-progress", "--quiet", "--voice", "ryan"]


def lex(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_matching_rules(tmp_path):
    lx = load(lex(tmp_path, "l.yaml", "SQL: sequel\nnginx: engine x\nNew York: noo york\nNY: New York\n"
                                      "Polish: poe-lish\npolish: pah-lish\n2024: twenty twenty-four\n東京: とうきょう\n"))
    text, fired = lx.apply("SQL, MySQL, sql; Nginx/NGINX. New  York in NY! Polish polish POLISH 12024 2024 在東京。")
    assert text == ("sequel, MySQL, sql; engine x/engine x. noo york in New York! poe-lish pah-lish pah-lish "
                    "12024 twenty twenty-four 在とうきょう。")
    # whole words only; lower-case entries ignore case, others are exact; "NY" -> "New York" is not re-spelled
    assert [e.word for e in fired] == ["SQL", "nginx", "New York", "NY", "Polish", "polish", "2024", "東京"]
    assert lx.apply("nothing here") == ("nothing here", [])
    csv = load(lex(tmp_path, "l.csv", "word,respelling,case\nGIF,jif,ignore\nKubernetes,koo-ber-net-eez,exact\n"))
    assert csv.apply("gif Gif kubernetes Kubernetes")[0] == "jif jif kubernetes koo-ber-net-eez"
    listed = load(lex(tmp_path, "l2.yml", "- {word: Dr, respelling: doctor}\n- word: ACME\n  respelling: ack me\n"))
    assert listed.apply("Dr Who at ACME")[0] == "doctor Who at ack me"
    assert load(lex(tmp_path, "empty.yaml", "")).apply("x") == ("x", [])


def test_a_latin_entry_is_respelled_inside_cjk_text_without_spaces():
    """Chinese and Japanese put no space around a Latin word, Korean attaches its particles to it: a CJK or Hangul
    neighbour is a word boundary, so "SQL" in "我们用SQL查询" or "SQL을" is respelled (it never fired: the neighbour
    counted as a letter touching the match). A Latin letter, a digit or an underscore still is no boundary."""
    lx = Lexicon((Entry("SQL", "sequel"), Entry("nginx", "engine x")))
    assert lx.apply("我们用SQL查询，部署nginx服务。")[0] == "我们用sequel查询，部署engine x服务。"
    assert lx.apply("서울에서 SQL을 배운다")[0] == "서울에서 sequel을 배운다"
    assert lx.apply("MySQL SQLite 1SQL SQL_x")[0] == "MySQL SQLite 1SQL SQL_x"


def test_a_combining_mark_belongs_to_the_character_before_it():
    """A combining mark (Unicode category M) is part of the word it follows, though `\\w` does not match it: a
    decomposed "José" ("Jose" + U+0301, as macOS and many PDFs write it) is not "Jose" (it was respelled and the
    accent landed on the respelling), Hindi "रामा" is not "राम" + a vowel sign (U+093E), "が" written as "か" +
    U+3099 is not "か". A mark before a match belongs to the letter before it."""
    lx = Lexicon((Entry("Jose", "Hosay"), Entry("राम", "Raam"), Entry("か", "ka")))
    assert lx.apply("Jose\u0301 met Jose.")[0] == "Jose\u0301 met Hosay."
    assert lx.apply("cafe\u0301Jose")[0] == "cafe\u0301Jose"
    assert lx.apply("रामा राम")[0] == "रामा Raam"
    assert lx.apply("か\u3099か")[0] == "か\u3099ka"

def test_a_replacement_fires_reaches_synthesis_and_changes_the_key(tmp_path):
    from tests.jobs.media_fakes import NoiseBackend

    ch = tmp_path / "ch.txt"
    ch.write_text("Deploy nginx now. Nothing else.")
    out = tmp_path / "out"

    def run(*extra):
        NoiseBackend.calls.clear()
        assert narrate.main([str(ch), "--out", str(out), *NOISE, *extra]) == 0
        (rec,) = from_parquet((out / "manifest.parquet").read_bytes())
        return rec, [j.text for batch in NoiseBackend.calls for j in batch]

    plain, said = run()
    assert said == ["Deploy nginx now. Nothing else."] and plain.lexicon == []
    a = lex(tmp_path, "a.yaml", "nginx: engine x\n")
    rec, said = run("--lexicon", str(a))
    assert said == ["Deploy engine x now. Nothing else."] and rec.lexicon == ["nginx"]
    assert rec.key != plain.key and "lexicon" in json.loads(rec.params)
    # an entry that does not fire for this text leaves the key alone; changing the one that fires re-renders
    b = lex(tmp_path, "b.yaml", "nginx: engine x\nkubectl: cube control\n")
    same, said = run("--lexicon", str(b))
    assert same.key == rec.key and same.reused and said == []
    c = lex(tmp_path, "c.yaml", "nginx: engine ex\n")
    changed, said = run("--lexicon", str(c))
    assert changed.key != rec.key and said == ["Deploy engine ex now. Nothing else."]
    # a lexicon that fires nowhere keeps the original key
    d = lex(tmp_path, "d.yaml", "kubectl: cube control\n")
    assert run("--lexicon", str(d))[0].key == plain.key


@pytest.mark.parametrize("name,text,message", [
    ("bad.yaml", "SQL: sequel\nnginx: [engine x\n", "bad.yaml:3: not valid YAML"),
    ("empty-respelling.yaml", "SQL: sequel\nGIF:\n", "empty-respelling.yaml:2: the respelling of 'GIF'"),
    ("nested.yaml", "SQL:\n  - a\n", "nested.yaml:1: the respelling must be a string"),
    ("dup.yaml", "nginx: a\nkubectl: b\nnginx: c\n", "dup.yaml:3: 'nginx' is already defined on line 1"),
    ("dup.csv", "word,respelling,case\nGIF,jif,ignore\ngif,gif,\n", "dup.csv:3: 'gif' is already defined on line 2"),
    ("case.yaml", "- {word: a, respelling: b, case: upper}\n", "case.yaml:1: case must be one of"),
    ("keys.yaml", "- {word: a, respelling: b, say: c}\n", "keys.yaml:1: unknown key(s) ['say']"),
    ("scalar.yaml", "just text\n", "scalar.yaml:1: expected a mapping"),
    ("header.csv", "term,say\nSQL,sequel\n", "header.csv:1: the header must be 'word,respelling'"),
    ("fields.csv", "word,respelling\nSQL,sequel\nGIF,jif,extra\n", "fields.csv:3: expected 2 fields, got 3"),
    ("blank.csv", "word,respelling\n,sequel\n", "blank.csv:2: the word must be a non-empty string"),
    ("lex.txt", "SQL sequel\n", "unsupported file type '.txt'"),
])
def test_bad_files_name_the_line(tmp_path, capsys, name, text, message):
    path = lex(tmp_path, name, text)
    with pytest.raises(ValueError) as e:
        load(path)
    assert message in str(e.value)
    ch = lex(tmp_path, "ch.txt", "Hello.")
    assert narrate.main([str(ch), "--out", str(tmp_path / "out"), *NOISE, "--lexicon", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing synthesized


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("word,respelling\ncafé,kafay\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load(bad)


def test_csv_rows_end_at_newlines_only(tmp_path):
    """A U+0085 or U+2028 inside a CSV field is not a line end (str.splitlines() made it one: "expected 2 fields,
    got 1"); a quoted field may hold a newline; "\\r\\n" line ends work."""
    path = lex(tmp_path, "l.csv", 'word,respelling\r\nNEL\x85name,nell name\r\nQwen,"kwen\u2028"\r\n'
                                  'GIF,"jif\ngif"\r\n')
    lx = load(path)
    assert lx.apply("NEL name, Qwen and GIF")[0] == "nell name, kwen and jif gif"


def _one_group_per_entry(lx: Lexicon, text: str) -> tuple[str, list]:
    """The matcher as it was before it lost its groups (a named group per entry says which entry matched): the
    oracle of the test below."""
    order = sorted(range(len(lx.entries)), key=lambda i: (-len(lx.entries[i].word), not lx.entries[i].exact))
    alts = []
    for n, i in enumerate(order):
        e = lx.entries[i]
        body = r"\s+".join(re.escape(w) for w in e.word.split())
        body = body if e.exact else f"(?i:{body})"
        left = "" if in_blocks(e.word[0], UNBOUNDED) else rf"(?<!{_WORD})"
        right = "" if in_blocks(e.word[-1], UNBOUNDED) else rf"(?!{_WORD})"
        alts.append(f"(?P<e{n}>{left}{body}{right})")
    fired = {}

    def sub(m):
        i = order[int(m.lastgroup[1:])]
        if _marked(text, m.start(), m.end(), not in_blocks(lx.entries[i].word[0], UNBOUNDED)):
            return m.group(0)
        fired.setdefault(i, lx.entries[i])
        return lx.entries[i].respelling

    return re.compile("|".join(alts)).sub(sub, text), list(fired.values())


@pytest.mark.parametrize("text", ["a猫", "a猫 a", "aaa a猫", "猫a猫"])
def test_a_longer_entry_with_other_boundaries_wins_over_a_shorter_one(text):
    """The pattern writes each boundary once per run of entries that share it, in the longest-first order: "a猫"
    (no boundary on its CJK side) sits between "aaa" and "a" (a boundary on both sides), so it must be tried before
    "a" (which matches the "a" of "a猫": a CJK neighbour is a boundary). Grouping all entries of one boundary kind
    together, across the order, lets "a" win."""
    lx = Lexicon((Entry("aaa", "<3>"), Entry("a猫", "<cat>"), Entry("a", "<1>")))
    assert lx.apply(text) == _one_group_per_entry(lx, text)
    assert "<cat>" in lx.apply(text)[0]


_LETTERS = "aAsSſ猫 \u0301"   # case pairs, the long s (s in any case), a CJK letter, a space, a combining mark


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(words=st.lists(st.text(_LETTERS, min_size=1, max_size=4).map(" ".join).map(str.split).map(" ".join)
                      .filter(bool), min_size=1, max_size=8),
       cases=st.lists(st.sampled_from(["auto", "exact", "ignore"]), min_size=8, max_size=8),
       text=st.text(_LETTERS + "\t\n.", max_size=40))
def test_the_entry_a_match_is_named_as_one_group_per_entry_named_it(words, cases, text):
    """The matcher has one alternation without groups and finds the entry of each match by its words: the same
    text and the same entries fired as the one-group-per-entry matcher it replaced (which was 200x slower with
    2,000 entries), with entries that differ only in case, spaces or the long s, CJK sides and marks."""
    entries = tuple(Entry(w, f"<{n}>", c) for n, (w, c) in enumerate(zip(words, cases)))
    lx = Lexicon(entries)
    assert lx.apply(text) == _one_group_per_entry(lx, text)
