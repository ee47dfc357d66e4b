"""--captions --lexicon: the content key names the lexicon entries synthesis applied sentence by sentence, so editing
an entry that fires only inside a sentence chunk renders again instead of reusing the old audio."""

from __future__ import annotations

import json

from jobs import narrate
from jobs.manifest import from_parquet
from tests.jobs.fakes import FakeBackend


def _run(rows, lexicon, out, capsys):
    FakeBackend.calls.clear()
    code = narrate.main([str(rows), "--model", "fake", "--voice", "vivian", "--out", f"file://{out}",
                         "--backend", "tests.jobs.fakes:FakeBackend", "--runner", "local", "--no-progress",
                         "--quiet", "--captions", "--lexicon", str(lexicon)])
    capsys.readouterr()
    assert code == 0
    return from_parquet((out / "manifest.parquet").read_bytes())[0], [j.text for c in FakeBackend.calls for j in c]


def test_an_entry_that_fires_only_per_sentence_is_in_the_key(tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"id": "r1", "text": "We flew to St. Louis today."}) + "\n")
    lexicon, out = tmp_path / "lex.yaml", tmp_path / "out"
    # the splitter cuts after "St.": "St. Louis" never fires, "Louis" does, in the second sentence
    lexicon.write_text('"St. Louis": "Saint Lewis"\n"Louis": "Lewis"\n')
    first, said = _run(rows, lexicon, out, capsys)
    assert "Lewis today." in said and first.lexicon == ["Louis"] and not first.reused
    lexicon.write_text('"St. Louis": "Saint Lewis"\n"Louis": "Loo-ee"\n')
    second, said = _run(rows, lexicon, out, capsys)
    assert "Loo-ee today." in said and not second.reused and second.key != first.key
    third, said = _run(rows, lexicon, out, capsys)  # unchanged: reused
    assert said == [] and third.reused and third.key == second.key


def test_one_word_with_an_exact_and_an_ignore_case_entry_both_count_in_the_key(tmp_path):
    """Review: the captions path kept one fired entry per word, so with `polish` (case exact) and `Polish` (case
    ignore) firing in different sentences, editing the second one's respelling reused the old audio."""
    from jobs import deliver, lexicon
    from jobs.inputs import Utterance
    from jobs.render import RenderConfig, plan_key

    def lex(second: str):
        f = tmp_path / "lex.yaml"
        f.write_text("- {word: polish, respelling: POLL-ish, case: exact}\n"
                     f"- {{word: polish, respelling: {second}, case: ignore}}\n")
        return lexicon.load(f)

    text = "I polish the car. Polish is a language."
    row = Utterance(id="a", text=text, voice="ryan", language="english", seed=1)
    for captions in (False, True):
        plans = [(plan_key(row, RenderConfig(model="fake", captions=captions, lexicon=lex(s)))[0],
                  deliver.plan_text(text, RenderConfig(model="fake", captions=captions, lexicon=lex(s))).synth)
                 for s in ("POE-lish", "PO-lisch")]
        assert plans[0][1] != plans[1][1] and plans[0][0] != plans[1][0], captions


def test_key_extra_names_only_the_features_that_are_on():
    """With no mastering, speed 1.0, no captions and no lexicon the content key has no extra field (keys from before
    these features stay valid); each feature that is on adds its own field and no other."""
    from jobs import deliver, mastering
    from jobs.render import RenderConfig

    text = "Hello there. General Kenobi."
    assert deliver.key_extra(text, RenderConfig(model="fake")) == {}
    assert deliver.key_extra(text, RenderConfig(model="fake", speed=1.25)) == {"speed": 1.25}
    assert deliver.key_extra(text, RenderConfig(model="fake", captions=True)) == {"captions": True}
    acx = RenderConfig(model="fake", master=mastering.MasterConfig("acx"))
    assert set(deliver.key_extra(text, acx)) == {"master"}


def test_without_captions_the_text_is_chunked_as_before_captions_existed():
    """Captions off: chunks are split_text's (sentences packed together up to max_chars), the same as before the
    feature, so old content keys and audio stay valid; captions on: one sentence per chunk, for one cue each."""
    from jobs import deliver
    from jobs.render import RenderConfig
    from jobs.split import split_text

    text = "Hello there. General Kenobi."
    off = deliver.plan_text(text, RenderConfig(model="fake"))
    assert off.synth == off.display == split_text(text, 200) == [text]
    on = deliver.plan_text(text, RenderConfig(model="fake", captions=True))
    assert on.synth == on.display == ["Hello there.", "General Kenobi."]


def test_a_lexicon_that_fires_nowhere_in_a_row_leaves_its_key_as_it_was():
    """The key names the lexicon entries that fired, not the lexicon: a row none of whose words is in it keeps the key
    (and the audio) it had without --lexicon; a row where an entry fires gets a `lexicon` field."""
    from jobs import deliver
    from jobs.lexicon import Lexicon
    from jobs.render import RenderConfig

    cfg = RenderConfig(model="fake", lexicon=Lexicon(({"word": "SQL", "respelling": "sequel"},)))
    assert cfg.lexicon and deliver.key_extra("Hello there.", cfg) == {}
    assert set(deliver.key_extra("Use SQL here.", cfg)) == {"lexicon"}
