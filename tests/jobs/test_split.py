import pytest

from jobs.split import split_sentences, split_text


def test_sentences_keep_punctuation_and_quotes():
    assert split_sentences('He said "Go!" Then he left. Dr Smith? Yes') == [
        'He said "Go!"', "Then he left.", "Dr Smith?", "Yes"]


def test_cjk_sentences_split_without_spaces():
    text = "今天天气很好。我们去公园吧！你来吗？「好的。」日本語も大丈夫です。"
    assert split_sentences(text) == ["今天天气很好。", "我们去公园吧！", "你来吗？", "「好的。」", "日本語も大丈夫です。"]


def test_chunks_pack_whole_sentences_within_budget():
    sents = [f"Sentence number {i} is here." for i in range(20)]
    chunks = split_text(" ".join(sents), max_chars=80)
    assert all(len(c) <= 80 for c in chunks)
    assert " ".join(chunks) == " ".join(sents)
    # no sentence is cut: every chunk ends a sentence
    assert all(c.endswith(".") for c in chunks)


def test_long_sentence_cut_at_clauses_then_words():
    s = "alpha beta, " * 30 + "end."
    chunks = split_text(s, max_chars=40)
    assert all(len(c) <= 40 for c in chunks)
    assert " ".join(chunks).split() == s.split()


def test_long_cjk_sentence_is_hard_split():
    s = "很" * 95 + "。"
    chunks = split_text(s, max_chars=30)
    assert all(len(c) <= 30 for c in chunks) and "".join(chunks) == s


def test_paragraphs_start_new_chunks_and_blank_text_is_empty():
    assert split_text("One.\n\nTwo.", max_chars=100) == ["One.", "Two."]
    assert split_text("  \n ", max_chars=100) == []


@pytest.mark.parametrize("bad", [0, 7, "10", True])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="max_chars"):
        split_text("x", max_chars=bad)
