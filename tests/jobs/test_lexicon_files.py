"""Lexicon files as editors save them, and malformed ones: a `lexicon: FILE:LINE` error, never a traceback."""

from __future__ import annotations

import pytest

from jobs import lexicon


@pytest.mark.parametrize("name", ["names.csv", "names.yaml"])
def test_a_lexicon_with_a_utf8_bom_reads_like_one_without(tmp_path, name):
    """Excel's "CSV UTF-8" writes a BOM: the header read as '\\ufeffword' and the file was refused (inputs and
    catalogs already accept a BOM)."""
    f = tmp_path / name
    f.write_text("\ufeff" + ("word,respelling\nnginx,engine x\n" if name.endswith(".csv") else "nginx: engine x\n"),
                 encoding="utf-8")
    lex = lexicon.load(f)
    assert [(e.word, e.respelling) for e in lex.entries] == [("nginx", "engine x")]
    assert lex.apply("Run Nginx.")[0] == "Run engine x."


@pytest.mark.parametrize("key", ["[a]", "{a: 1}"])
def test_a_list_entry_with_a_list_or_mapping_as_a_key_is_a_file_line_error(tmp_path, key):
    """`- {[a]: b, word: nginx, respelling: engine x}` raised TypeError (unhashable list)."""
    f = tmp_path / "names.yaml"
    f.write_text(f"- {{word: redis, respelling: red iss}}\n- {{{key}: b, word: nginx, respelling: engine x}}\n")
    with pytest.raises(ValueError, match=r"^lexicon: names\.yaml:2: a key must be word, respelling or case"):
        lexicon.load(f)
