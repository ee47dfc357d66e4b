"""Bad rows, bad chunks, bad sidecars and bad options: each fails alone (or up front), never the whole job, and the
manifest is never lost. Fake backend, one process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import narrate
from jobs.inputs import RowDefaults, Utterance, check_row
from jobs.manifest import ManifestRecord, from_parquet
from jobs.render import RenderConfig, _chunk_jobs, plan_key, render_rows
from jobs.storage import LocalSink, RetryPolicy, StorageError, content_key, open_sink
from jobs.synth import ChunkResult

FAKE = "tests.jobs.fakes:FakeBackend"


def _narrate(tmp_path, rows, *extra):
    inp = tmp_path / "rows.jsonl"
    inp.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    out = tmp_path / "out"
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--quiet", "--voice", "ryan", *extra])
    return code, out


def _manifest(out):
    return {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}


# --- finding 1/2: rows that cannot be stored fail alone ----------------------------------------------------------
def test_lone_surrogate_in_text_or_id_and_a_huge_seed_fail_their_row_only(tmp_path, capsys):
    code, out = _narrate(tmp_path, ['{"id": "good", "text": "Hello there."}',
                                    '{"id": "bad-text", "text": "Hi \\ud800 there."}',
                                    '{"id": "bad\\udc80", "text": "Hi there."}',
                                    '{"id": "big", "text": "Hi there.", "seed": 100000000000000000000}'])
    assert code == 1
    man = _manifest(out)
    assert man["good"].status == "ok"
    assert "field 'text' is not valid Unicode" in man["bad-text"].error
    assert "field 'id' is not valid Unicode" in man["bad\\udc80"].error  # the id is kept, escaped
    assert "field 'seed' must be an integer in [0, 2**63)" in man["big"].error
    assert sorted(p.name for p in (out / "audio").glob("*.wav")) == [man["good"].key.split("/")[1]]


@pytest.mark.parametrize("field", ["id", "text", "voice", "speaker", "language", "instruct", "model", "title"])
def test_every_string_field_must_be_valid_unicode(field):
    raw = {"id": "a", "text": "Hello.", field: "x\udfff"}
    row = check_row(raw, RowDefaults(voice="ryan"), "rows.jsonl:1")
    assert row.error is not None and f"field '{field}' is not valid Unicode" in row.error
    assert row.error.encode() and row.id.encode()  # what goes to the manifest is storable


@pytest.mark.parametrize("seed,ok", [(0, True), ("7", True), (2**63 - 1, True), (3.0, True), (-1, False),
                                     (2**63, False), (True, False), (1.5, False), ("x", False)])
def test_seed_range_is_the_engines(seed, ok):
    row = check_row({"id": "a", "text": "Hi.", "seed": seed}, RowDefaults(voice="ryan"), "w")
    assert (row.error is None) == ok, row.error
    if not ok:
        assert "field 'seed'" in row.error


def test_retry_seeds_stay_in_the_engines_range():
    row = Utterance(id="a", text="Hi.", voice="ryan", seed=2**63 - 1)
    seeds = [_chunk_jobs(row, RenderConfig(model="m"), ["Hi."], attempt)[0].seed for attempt in range(3)]
    assert seeds[0] == 2**63 - 1 and all(0 <= s < 2**63 for s in seeds) and len(set(seeds)) == 3
    assert _chunk_jobs(Utterance(id="b", text="x", seed=5), RenderConfig(model="m"), ["x"], 1)[0].seed == 1_000_008


def test_a_manifest_parquet_cannot_hold_is_kept_locally_as_json_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    recs = [ManifestRecord(id="ok", key="audio/ok.wav", status="ok"),
            ManifestRecord(id="bad\udc80", key=None, status="failed", seed=10**20)]
    opts = narrate.RunOptions(output=f"file://{tmp_path}/out", runner="local")
    code = narrate.finish(recs, opts, "manifest.parquet", 0.0, quiet=False)
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert code == 3 and summary["manifest"] is None and "Parquet" in summary["manifest_error"]
    kept = [json.loads(line) for line in Path(summary["manifest_local"]).read_text().splitlines()]
    assert summary["manifest_local"].endswith(".jsonl") and [r["id"] for r in kept] == ["bad\udc80", "ok"]
    assert kept[0]["seed"] == 10**20 and "bad\\udc80" in out.out  # the table printed it escaped


def test_a_manifest_that_cannot_be_written_anywhere_still_gives_the_summary(tmp_path, monkeypatch, capsys):
    """A full disk: the output, the working directory and the temp dir all refuse the manifest part-way. The
    local fallback wrote in place (a truncated manifest-*.parquet look-alike in the cwd and the temp dir) and its
    StorageError escaped finish(): no summary. Now nothing is left behind and the summary says the manifest is
    lost (exit 3)."""
    import errno
    import tempfile

    def disk_full(fd):  # the data was written; the full disk shows when it is synced (late allocation)
        raise OSError(errno.ENOSPC, "No space left on device")

    for d in ("out", "cwd", "tmp"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setattr(narrate, "MANIFEST_RETRY", RetryPolicy(attempts=2, base_delay=0.001, max_delay=0.001))
    monkeypatch.setattr(os, "fsync", disk_full)
    opts = narrate.RunOptions(output=f"file://{tmp_path}/out", runner="local", retry=RetryPolicy(1, 0.001))
    code = narrate.finish([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts, "manifest.parquet", 0.0,
                          quiet=True)
    monkeypatch.undo()
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 3 and summary["manifest"] is None and "manifest_local" not in summary
    assert "No space left on device" in summary["manifest_error"]
    assert "cannot keep the manifest locally either" in summary["manifest_error"] and "is lost" in err
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []


# --- finding 7: a chunk with no audio or NaN audio ---------------------------------------------------------------
SENT = "This is a perfectly ordinary sentence of narration that goes on for a while."


class BadChunks:
    """0.06 s/char tone; a chunk with LOST comes back empty, NAN is NaN on the first `nan_attempts` seeds."""

    def __init__(self, nan_attempts: int) -> None:
        self.nan_attempts = nan_attempts

    def synthesize(self, jobs):
        out = []
        for j in jobs:
            n = 0 if "LOST" in j.text else int(24000 * 0.06 * len(j.text))
            pcm = (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / 24000)).astype(np.float32)
            if "NAN" in j.text and j.seed // 1_000_003 < self.nan_attempts:
                pcm[:] = np.nan
            out.append(ChunkResult(pcm, "eos"))
        return out


def _long_row(rid, marker):
    return Utterance(id=rid, text="\n\n".join([SENT] * 3 + [f"{marker} {SENT}"] + [SENT] * 3), voice="ryan")


def test_empty_chunk_is_flagged_and_nan_chunk_is_retried_then_fails(tmp_path):
    sink, cfg = open_sink(f"file://{tmp_path}"), RenderConfig(model="fake")
    empty = render_rows([_long_row("lost", "LOST")], BadChunks(0), sink, cfg)[0]
    assert empty.status == "suspect" and "chunk_empty" in empty.flags
    healed = render_rows([_long_row("healed", "NAN")], BadChunks(1), sink, cfg)[0]
    assert healed.status == "ok" and healed.attempts == 2
    broken = render_rows([_long_row("broken", "NAN")], BadChunks(99), sink, cfg)[0]
    assert broken.status == "failed" and "chunk 4 of 7: non-finite samples" in broken.error
    assert broken.attempts == cfg.max_attempts and not list(tmp_path.glob("audio/broken-*"))


def test_nan_is_never_encoded():
    from jobs.audio import encode

    with pytest.raises(ValueError, match="non-finite"):
        encode(np.full(100, np.nan, np.float32), 24000, "wav")


# --- finding 8: a malformed sidecar means "not done" -------------------------------------------------------------
@pytest.mark.parametrize("content", ["null", "[1, 2]", '"text"', "{", '{"bytes": "99"}'])
def test_a_malformed_sidecar_is_rendered_again(tmp_path, capsys, content):
    rows = [{"id": "a", "text": "Hello there."}, {"id": "b", "text": "Hi there."}]
    assert _narrate(tmp_path, rows)[0] == 0
    side = next((tmp_path / "out").glob("audio/a-*.wav.json"))
    good = json.loads(side.read_text())
    side.write_text(content if content != '{"bytes": "99"}' else json.dumps({**good, "bytes": "99"}))
    code, out = _narrate(tmp_path, rows)
    man = _manifest(out)
    assert code == 0 and not man["a"].reused and man["b"].reused
    assert json.loads(side.read_text())["bytes"] == good["bytes"]


# --- finding 9: option values that would fail every row ----------------------------------------------------------
@pytest.mark.parametrize("args,config,message", [
    (["--max-chars", "5"], None, "--max-chars must be an integer >= 8"),
    (["--max-chars", "0"], None, "--max-chars must be an integer >= 8"),
    (["--sample-rate", "100"], None, "--sample-rate must be an integer in [4000, 48000]"),
    (["--num-cpus", "-1"], None, "--num-cpus must be a number >= 0"),
    (["--max-sessions", "0"], None, "--max-sessions must be an integer >= 1"),
    (["--seed", "-3"], None, "--seed must be an integer in [0, 2**63)"),
    ([], "actors: two\n", "--actors must be an integer, got 'two'"),
    ([], "format: mp3\n", "--format must be one of"),
    ([], "retry_on: true\n", "--retry-on must be a string, got True"),       # these raised TypeError in the options
    ([], "lexicon: 5\n", "--lexicon must be a string, got 5"),
    ([], "backend: [engine]\n", "--backend must be a string, got ['engine']"),
    ([], "captions: maybe\n", "--captions must be true or false, got 'maybe'"),
    (["--voice", "ry\udc80an"], None, "--voice is not valid Unicode"),
    # inf passed the check and failed every row (OverflowError); 1e5 s would allocate gigabytes per gap
    (["--pause", "inf"], None, "--pause must be a finite number, got inf"),
    (["--pause", "1e308"], None, "--pause must be a number in [0, 60], got 1e+308"),
    (["--pause", "100000"], None, "--pause must be a number in [0, 60], got 100000.0"),
    ([], "pause_s: .inf\n", "--pause must be a finite number, got inf"),
    ([], "pause_s: 61\n", "--pause must be a number in [0, 60], got 61"),
    (["--num-gpus", "inf"], None, "--num-gpus must be a finite number, got inf"),
    # sampling values and the device failed every row (exit 1) instead of the job up front
    (["--temperature", "-1"], None, "--temperature must be > 0"),
    (["--top-p", "inf"], None, "--top-p must be a finite number"),
    ([], "max_new_tokens: 0\n", "--max-new-tokens must be in [1,"),
    (["--device", "tpu"], None, "--device must be a torch device"),
    ([], "input: other.txt\n", "config: ['input'] can only be given on the command line"),
])
def test_bad_option_values_exit_2_naming_the_option(tmp_path, capsys, args, config, message):
    from tests.jobs.fakes import FakeBackend

    if config:
        (tmp_path / "c.yaml").write_text(config)
        args = [*args, "--config", str(tmp_path / "c.yaml")]
    FakeBackend.calls.clear()
    code, out = _narrate(tmp_path, [{"id": "a", "text": "Hello there."}], *args)
    assert code == 2 and message in capsys.readouterr().err
    assert not FakeBackend.calls and not out.exists()


_yaml_value = st.none() | st.booleans() | st.integers(-3, 10 ** 6) | st.floats(allow_nan=False) | st.text(max_size=6) \
    | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conf=st.dictionaries(st.sampled_from(sorted({a.dest for a in narrate.build_parser()._actions} - {"help"})),
                            _yaml_value, min_size=1, max_size=3))
def test_any_config_file_gives_options_or_a_value_error(tmp_path, conf):
    """Any YAML values for the options: the job's options, or a ValueError (exit 2) naming the option; never a
    TypeError from deep inside (a YAML list, number or bool where a string goes)."""
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(conf))
    args = narrate.build_parser().parse_args(["rows.jsonl", "--config", str(path)])
    try:
        narrate.build_options(args, "audio")
    except ValueError as e:
        assert len(str(e)) < 600, str(e)[:300]


def test_a_key_only_the_other_command_uses_is_named_in_a_warning(tmp_path, caplog):
    """One config format serves narrate and catalog (check_config accepts either's keys), so `layout: asterisk` in a
    narrate config, or `book: m4b` in a catalog's, did nothing and said nothing (found by the new-user review).
    Each command now warns naming them; shared keys and a command's own keys stay quiet."""
    import logging

    path = tmp_path / "c.yaml"
    path.write_text("voice: ryan\nlayout: asterisk\nretire: delete\nbook: m4b\n")
    with caplog.at_level(logging.WARNING, logger="jobs.narrate"):
        narrate.load_config(str(path), "narrate")
    said = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(said) == 1 and "['layout', 'retire'] are only for catalog; narrate ignores them" in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.narrate"):
        narrate.load_config(str(path), "catalog")
    said = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
    assert len(said) == 1 and "['book'] is only for narrate; catalog ignores it" in said[0], said
    caplog.clear()
    path.write_text("voice: ryan\nlanguage: English\n")
    with caplog.at_level(logging.WARNING, logger="jobs.narrate"):
        narrate.load_config(str(path), "narrate")
        narrate.load_config(str(path), "catalog")
    assert not [r for r in caplog.records if "ignores" in r.getMessage()]


# --- finding 10: keys of long multi-byte ids ---------------------------------------------------------------------
def test_a_long_cjk_id_gets_a_key_that_fits_a_file_name(tmp_path, capsys):
    rid = "第一章" * 27
    code, out = _narrate(tmp_path, [{"id": "good", "text": "Hello there."}, {"id": rid, "text": "Hi there."}])
    man = _manifest(out)
    assert code == 0 and man[rid].status == "ok"
    assert len(man[rid].key.split("/")[1].encode()) <= 200 + 32
    # keys of ids whose stem already fitted are exactly what they were
    assert man["good"].key == "audio/good-f2f78aa242f9250ed02b.wav"
    long_ascii = content_key({"text": "t"}, "x" * 100, "wav")
    assert long_ascii.startswith(f"audio/{'x' * 80}-")


def test_a_name_too_long_is_not_retried(tmp_path):
    sink = LocalSink(str(tmp_path), RetryPolicy(attempts=4, base_delay=5.0))
    with pytest.raises(StorageError, match=r"after 1 attempt\(s\)"):
        sink.put("a" * 300 + ".wav", b"x")


# --- finding 11: paragraphs are in the key -----------------------------------------------------------------------
def test_paragraph_edits_change_the_key_other_whitespace_does_not():
    cfg = RenderConfig(model="fake")

    def key(text):
        return plan_key(Utterance(id="ch1", text=text, voice="ryan"), cfg)[0]

    assert key("It was late. The storm came.") != key("It was late.\n\nThe storm came.")
    assert key("It was late.\n\nThe storm came.") == key("It was late.\n \n\n  The storm came.  ")
    assert key("It was late.\nThe storm came.") == key("It was late.   The storm came.")


# --- an error with no text ---------------------------------------------------------------------------------------
def test_a_backend_failing_with_no_message_still_gives_the_manifest(tmp_path, capsys):
    """str(e) == "" (a bare assert, MemoryError()): the handler that records "job aborted" for every row raised
    IndexError on `str(e).splitlines()[0]`, so the job crashed with no manifest and no summary."""
    inp = tmp_path / "rows.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    out = tmp_path / "out"
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{out}", "--backend",
                         "tests.jobs.fakes:BrokenBackend", "--runner", "local", "--no-progress", "--quiet",
                         "--voice", "ryan"])
    assert code == 1
    assert _manifest(out)["a"].error == "job aborted: AssertionError"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failed_ids"] == ["a"]


def test_a_hub_error_with_no_message_is_still_a_value_error(monkeypatch):
    """The hub look-up's error text had the same `splitlines()[0]`: an empty one raised IndexError, not the
    ValueError that makes the job exit 2 naming the model."""
    import huggingface_hub

    from jobs.models import resolve_checkpoint_ref

    def not_cached(*a, **k):
        raise FileNotFoundError("not cached")

    def unreachable(*a, **k):
        raise ConnectionError()

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(ValueError, match=r"'org/model' is not in the local cache and the hub cannot be reached "
                                         r"\(ConnectionError\)"):
        resolve_checkpoint_ref("org/model")


def test_a_blank_model_is_refused_not_the_current_folder(tmp_path, monkeypatch, checkpoint_factory):
    """Path("") is the current folder: a blank model name used whatever checkpoint sat in the working directory."""
    from jobs.models import resolve_checkpoint_ref

    monkeypatch.chdir(checkpoint_factory("custom_voice", "tiny"))
    for blank in ("", " "):
        with pytest.raises(ValueError, match="model: empty"):
            resolve_checkpoint_ref(blank)


def test_a_row_naming_a_checkpoint_of_deeply_nested_json_fails_alone(tmp_path, checkpoint_factory):
    """The parser's RecursionError escaped the row's ValueError handling: the whole job failed."""
    import shutil
    from types import SimpleNamespace

    from jobs.inputs import Utterance
    from jobs.models import resolve_models

    good = checkpoint_factory("custom_voice", "tiny")
    bad = Path(shutil.copytree(good, tmp_path / "bad"))
    (bad / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    eng = SimpleNamespace(dtype="float32", device="cpu", guard_frames_per_token=0, guard_base_frames=0)
    rows = [Utterance(id="r1", text="hi", voice="vivian"),
            Utterance(id="r2", text="hi", voice="vivian", model=str(bad))]
    out, _, _ = resolve_models(rows, str(good), "engine", engine=eng)
    errors = {r.id: r.error for r in out}
    assert errors["r1"] is None and "not a readable JSON file (RecursionError" in errors["r2"], errors


@pytest.mark.parametrize("fmt", [0, False, [], "MP3!"])
def test_a_format_that_is_no_format_is_the_rows_error_not_the_default(fmt):
    """`format: 0` or `false` silently became the default format (`raw.get("format") or default`)."""
    row = check_row({"id": "a", "text": "Hello.", "format": fmt}, RowDefaults(), "f:1")
    assert row.error and "field 'format' must be one of" in row.error
    for absent in ({}, {"format": None}, {"format": ""}):   # not given (an empty CSV cell): the default
        assert check_row({"id": "a", "text": "Hello.", **absent}, RowDefaults(format="flac"), "f:1").format == "flac"
