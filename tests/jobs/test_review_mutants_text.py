"""Mutation review of the text side of the batch jobs: the splitter, Markdown to text, the pronunciation lexicon.

Each test pins a rule the suite left open (a hand-written mutant of jobs/split.py, jobs/md_text.py or jobs/lexicon.py
passed every test before it): no text lost, doubled or reordered, limits that hold at their boundaries, bad files
refused with an error naming the file and line."""

from __future__ import annotations

import pytest

from jobs import lexicon
from jobs.lexicon import Entry, Lexicon
from jobs.md_text import markdown_to_text
from jobs.split import key_text, normalize_text, split_sentences, split_text
from tests.jobs.test_input_attacks import _old_markdown_to_text
from tests.jobs.test_lexicon import lex

# ---- split.py -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank", ["\n \n", "\n\t\n", "\r\n \r\n", "\n\u3000\n"])
def test_a_blank_line_holding_only_spaces_starts_a_paragraph(blank):
    """A blank line is a paragraph break even when an editor left spaces or a tab on it (mutant: only "\\n\\n" was
    one, so the two paragraphs were packed into one chunk and their key text had no break)."""
    text = f"One.{blank}Two."
    assert split_text(text, 100) == ["One.", "Two."]
    assert key_text(text) == "One.\n\nTwo."


def test_key_text_ignores_whitespace_at_the_ends_and_blank_paragraphs():
    """Texts that give the same chunks give the same key text: spaces around the text and blank lines before, after
    or between paragraphs do not count (mutants: the ends kept, or empty paragraphs kept as extra breaks)."""
    assert normalize_text("  Hello \n  there.\t") == "Hello there."
    assert key_text("  Hello   there.  ") == key_text("Hello there.") == "Hello there."
    assert key_text("\n\n One.\n\n\n \n\nTwo. \n\n") == "One.\n\nTwo."
    assert split_text("\n\n One.\n\n\n \n\nTwo. \n\n", 100) == ["One.", "Two."]


@pytest.mark.parametrize("closer", list("\"'”’)）]」』】》"))
def test_every_closing_mark_stays_with_the_sentence_it_closes(closer):
    """A closing quote or bracket after a sentence end belongs to that sentence, and the next one starts after it
    (mutants: "’" or "]" dropped from the closers, so "Go!’ Then" was not a sentence end at all)."""
    assert split_sentences(f"He said go.{closer} Then he left.") == [f"He said go.{closer}", "Then he left."]
    assert split_sentences(f"好。{closer}然后。") == [f"好。{closer}", "然后。"]


def test_a_sentence_exactly_at_the_budget_is_kept_as_written():
    """A sentence of exactly `max_chars` characters is one chunk, unchanged (mutant: `<` for `<=` cut it at its
    clause and packed the pieces again, which lost the space between "," and the CJK text after it)."""
    for s in ("日本語です, 東京です", "Hello there, 你好吗", "alpha beta, gamma delta."):
        assert split_text(s, len(s)) == [s]
        assert split_text(s, len(s) + 1) == [s]


def test_pieces_of_sentences_pack_exactly_up_to_the_budget():
    """Sentences (and clauses of a long one) are packed while the chunk is at most `max_chars`, the boundary
    included (mutant: `<` packed only strictly under the budget, so "aaa. bbbb." at 10 became two chunks)."""
    assert split_text("aaa. bbbb.", 10) == ["aaa. bbbb."]
    assert split_text("aaaa, bbbbbb, cccccc ddddddddd.", 13) == ["aaaa, bbbbbb,", "cccccc", "ddddddddd."]


def test_a_long_sentence_is_cut_at_its_clauses_and_its_pieces_packed_among_themselves():
    """An over-long sentence is cut at clause punctuation first, at spaces only inside an over-long clause (mutant:
    cut at spaces only, "one, two three four" crossed the comma); its pieces are packed together before they join
    the paragraph, so it starts a chunk of its own when they fill one (mutant: unpacked clauses were glued to the
    sentence before: other chunks, other keys and audio)."""
    assert split_text("one, two three four five six.", 20) == ["one,", "two three four five", "six."]
    assert split_text("Hi. aaaaaaa, bbbbbbb, ccccccc.", 20) == ["Hi.", "aaaaaaa, bbbbbbb,", "ccccccc."]


def test_the_space_between_packed_pieces_depends_on_the_characters_at_the_seam():
    """No space after a piece that ends in CJK text or before one that starts with it; one space between Latin
    pieces, whatever the pieces start or end with elsewhere (mutant: the left piece's first character decided)."""
    assert split_text("Hello 你好。 World.", 200) == ["Hello 你好。World."]
    assert split_text("你好 world. Next one.", 200) == ["你好 world. Next one."]


# ---- md_text.py -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mark", ["²", "³", "¹²"])
def test_a_superscript_number_at_a_line_start_is_not_a_list_marker(mark):
    """Only decimal digits make a numbered list marker (`\\d` in the expression it replaced): "²) text" is read
    (mutant: str.isdigit took superscripts for digits and dropped them with the marker)."""
    md = f"{mark}) squared\n{mark}. cubed"
    assert markdown_to_text(md) == _old_markdown_to_text(md) == md


def test_brackets_followed_by_a_space_and_parentheses_are_prose_not_a_link():
    """A link is `[text](url)` with nothing between "]" and "(": "[1] (the appendix)" is read as written (mutant: a
    space was allowed there, and the parenthesis was dropped like a URL)."""
    for md in ("Read [1] (the appendix) first.", "A ![map] (north) here."):
        assert markdown_to_text(md) == _old_markdown_to_text(md) == md


def test_an_html_comment_closes_only_after_its_opening():
    """`<!--.*?-->`: the "-->" must start after "<!--", so "<!--->" opens a comment that runs to the next "-->"
    (mutant: the search began one character early and "<!--->" closed itself, leaking the note)."""
    md = "a <!---> note b --> c"
    assert markdown_to_text(md) == _old_markdown_to_text(md) == "a   c"


def test_an_autolink_scheme_is_at_most_32_characters():
    """`<scheme:...>` is an autolink (dropped like a link URL) for a scheme of 2 to 32 characters; a longer one is
    not a scheme, and the text is read (mutant: any length was dropped)."""
    assert markdown_to_text("See <" + "a" * 32 + ":x> now.").split() == ["See", "now."]
    md = "See <" + "a" * 33 + ":x> now."
    assert markdown_to_text(md) == _old_markdown_to_text(md) == md


# ---- lexicon.py -----------------------------------------------------------------------------------------------------


def test_the_longest_entry_wins_where_several_start():
    """Longest entry first, whatever the file's order: "New York" is one match, not "New" and then " York"
    (mutants: the shortest first, or the file's order)."""
    lx = Lexicon((Entry("New", "noo"), Entry("York", "yorrk"), Entry("New York", "noo-york")))
    assert lx.apply("New York, New, York.")[0] == "noo-york, noo, yorrk."


def test_a_word_boundary_is_any_letter_not_only_ascii():
    """A match may not touch a letter on either side, accented or not (mutant: the right boundary was [A-Za-z0-9_]
    only, so "Ren" was respelled inside "René")."""
    lx = Lexicon((Entry("Ren", "wren"),))
    assert lx.apply("René and Renée met Ren.")[0] == "René and Renée met wren."


def test_each_side_of_an_entry_decides_its_own_boundary():
    """The side of an entry that is a CJK character needs no boundary; a Latin side still does (mutants: the left
    side judged by the last character, the right side by the first)."""
    lx = Lexicon((Entry("K歌", "kei-ge"),))
    assert lx.apply("OK歌 K歌曲 K歌")[0] == "OK歌 kei-ge曲 kei-ge"


def test_the_content_digest_is_of_what_an_entry_does_not_how_it_was_written():
    """`case: auto` on a word with a capital is `case: exact`, and lower case is `case: ignore`: the same matching,
    the same digest (mutant: the declared case went into the digest, so rewriting a file re-rendered everything)."""
    assert lexicon.digest([Entry("SQL", "sequel")]) == lexicon.digest([Entry("SQL", "sequel", "exact")])
    assert lexicon.digest([Entry("nginx", "engine x")]) == lexicon.digest([Entry("nginx", "engine x", "ignore")])
    assert lexicon.digest([Entry("SQL", "sequel")]) != lexicon.digest([Entry("SQL", "sequel", "ignore")])


@pytest.mark.parametrize("text,message", [
    ('" ": blank\n', "l.yaml:1: the word must be a non-empty string"),
    ('nginx: engine x\nSQL: "  "\n', "l.yaml:2: the respelling of 'SQL' must be a non-empty string"),
    ("- just a word\n", "l.yaml:1: each item must be a mapping with word and respelling"),
])
def test_a_blank_word_or_respelling_or_a_bare_list_item_is_a_file_line_error(tmp_path, text, message):
    """Whitespace is empty: a word of spaces would crash the matcher, a respelling of spaces would delete the word
    from the text (mutants: only "" was refused; a list item that is no mapping was not checked)."""
    with pytest.raises(ValueError) as e:
        lexicon.load(lex(tmp_path, "l.yaml", text))
    assert str(e.value).startswith("lexicon: ") and message in str(e.value)


def test_words_and_respellings_are_whitespace_normalized_and_an_empty_case_is_auto(tmp_path):
    """An entry's word and respelling are stored with single spaces (the manifest's `lexicon` names them, the digest
    hashes them), so "New   York" and "New York" are one entry; `case: ""` is auto, as an empty CSV cell is."""
    lx = lexicon.load(lex(tmp_path, "l.yaml", '- {word: " new   york ", respelling: " noo   york ", case: ""}\n'))
    assert lx.entries[0].word == "new york" and lx.entries[0].respelling == "noo york"
    assert lx.entries[0].case == "auto" and lx.apply("NEW  YORK")[0] == "noo york"
    with pytest.raises(ValueError, match=r"l2\.yaml:2: 'New York' is already defined on line 1"):
        lexicon.load(lex(tmp_path, "l2.yaml", '"New York": a\n"New   York": b\n'))


def test_exact_entries_that_differ_in_case_are_not_duplicates(tmp_path):
    """Two exact entries are duplicates only when they are the same text ("SQL" and "Sql" are two words; mutant: they
    were compared in lower case and the file was refused)."""
    lx = lexicon.load(lex(tmp_path, "l.yaml", "SQL: sequel\nSql: squeal\n"))
    assert lx.apply("SQL Sql sql")[0] == "sequel squeal sql"


def test_a_csv_header_as_spreadsheets_write_it_is_read(tmp_path):
    """The header is matched without case or padding ("Word, Respelling, Case"), a case cell may be padded, and a
    row of empty cells (a spreadsheet's trailing ",,") is skipped (mutants: each of these refused the file)."""
    lx = lexicon.load(lex(tmp_path, "l.csv", "Word, Respelling, Case\nGIF,jif, ignore\n,,\n , ,\nSQL,sequel,\n"))
    assert [(e.word, e.respelling, e.case) for e in lx.entries] == [("GIF", "jif", "ignore"), ("SQL", "sequel", "auto")]
    assert lx.apply("gif SQL")[0] == "jif sequel"


def test_a_csv_column_that_is_not_word_respelling_or_case_is_refused(tmp_path):
    """A third column that is not `case` is a header error naming the file, never silently ignored (mutant: only the
    first two columns were checked)."""
    with pytest.raises(ValueError, match=r"^lexicon: l\.csv:1: the header must be 'word,respelling'"):
        lexicon.load(lex(tmp_path, "l.csv", "word,respelling,say\nSQL,sequel,x\n"))


@pytest.mark.parametrize("where,text", [
    ("l.csv:1", "word,respelling\n".replace("word", "w" * 200_000)),
    ("l.csv:3", "word,respelling\nSQL,sequel\nGIF," + "j" * 200_000 + "\n"),
])
def test_a_csv_field_over_the_csv_limit_is_a_file_line_error(tmp_path, where, text):
    """A field over the csv module's size limit is `not valid CSV` naming the file and line, never a csv.Error
    traceback (mutants: the error was not caught, in the header or in a row)."""
    with pytest.raises(ValueError, match=rf"^lexicon: {where}: not valid CSV"):
        lexicon.load(lex(tmp_path, "l.csv", text))


def test_the_file_type_is_read_from_a_suffix_in_any_case_and_a_folder_is_no_file(tmp_path):
    """"NAMES.YAML" and "Names.Csv" are lexicons (mutant: a case-sensitive suffix refused them); a folder named like
    a lexicon is refused by name (mutant: read_text raised IsADirectoryError)."""
    assert lexicon.load(lex(tmp_path, "NAMES.YAML", "nginx: engine x\n")).apply("nginx")[0] == "engine x"
    assert lexicon.load(lex(tmp_path, "Names.Csv", "word,respelling\nSQL,sequel\n")).apply("SQL")[0] == "sequel"
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ValueError, match=r"^lexicon: .*dir\.yaml is not a file"):
        lexicon.load(tmp_path / "dir.yaml")


def test_compiled_lexicons_are_not_kept_without_bound():
    """A long-lived worker compiles a pattern per lexicon it sees: the cache is bounded (mutant: it grew for ever)."""
    for i in range(100):
        Lexicon((Entry(f"word{i}", "x"),)).apply("text")
    assert 0 < len(lexicon._CACHE) <= 65
