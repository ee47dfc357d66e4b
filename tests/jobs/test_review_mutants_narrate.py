"""The narration job's options, checks, manifest and summary (jobs/narrate.py) and what a person sees while a job runs
(jobs/progress.py), pinned by a mutation review: each test here failed on a one-line change (a "mutant") that the
rest of the suite let pass, named in its docstring. Option precedence (command line over config file over the
documented defaults), every numeric option at its bounds and named as typed, config files that are empty, not a
mapping or hold the wrong kind of value, the manifest's retries and where it is kept when the output refuses it,
exit codes, the book's metadata; the progress bar's log lines, the stderr filter and the logging it re-points.
Fake backend, one process, no Ray."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import threading
import types
from pathlib import Path

import pytest

from jobs import narrate, progress
from jobs.inputs import InputLimits, RowDefaults, Utterance
from jobs.manifest import ManifestRecord, from_parquet
from jobs.render import RenderConfig
from jobs.runner import RunOptions
from jobs.storage import LocalSink, StorageError

FAKE = "tests.jobs.fakes:FakeBackend"


def _options(argv: list[str], conf: dict | None = None):
    args = narrate.build_parser().parse_args(["book.txt", *argv])
    return narrate.build_options(args, "audio", {} if conf is None else conf)


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def _narrate(tmp_path: Path, *extra: str) -> tuple[int, Path]:
    inp = tmp_path / "rows.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    out = tmp_path / "out"
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE, "--runner",
                         "local", "--no-progress", "--voice", "ryan", *extra])
    return code, out


# ---- the config file -------------------------------------------------------------------------------------------

def test_a_config_that_is_missing_empty_not_yaml_or_not_a_mapping(tmp_path):
    """An empty file sets nothing; a missing file, broken YAML or a list is a ValueError (exit 2) naming the file
    (mutants: the missing file read anyway (FileNotFoundError), `or {}` dropped (an empty file refused), YAMLError
    not caught, a list taken as no options)."""
    assert narrate.load_config(_config(tmp_path, "")) == {}
    assert narrate.load_config(_config(tmp_path, "# only a comment\n")) == {}
    with pytest.raises(ValueError, match=r"config: .*nowhere\.yaml does not exist"):
        narrate.load_config(str(tmp_path / "nowhere.yaml"))
    with pytest.raises(ValueError, match=r"config: .*c\.yaml is not valid YAML"):
        narrate.load_config(_config(tmp_path, "voice: [ryan\n"))
    with pytest.raises(ValueError, match=r"c\.yaml must hold a mapping of option names to values"):
        narrate.load_config(_config(tmp_path, "- voice\n- ryan\n"))


def test_a_key_set_to_null_in_the_config_is_not_set(tmp_path):
    """`voice: ~` leaves the option unset (its default), it is not the value None checked as a string
    (mutant: null values kept, so `--voice must be a string, got None`)."""
    conf = narrate.load_config(_config(tmp_path, "voice: ~\nseed: 3\nformat: ~\n"))
    assert conf == {"seed": 3}
    defaults, *_ = _options([], conf)
    assert defaults.voice is None and defaults.seed == 3 and defaults.format == "wav"


def test_retire_all_cannot_come_from_a_config_file(tmp_path):
    """A config shared by runs must not retire every prompt of each catalog (mutant: retire_all left out of the
    command-line-only keys)."""
    with pytest.raises(ValueError, match=r"config: \['retire_all'\] can only be given on the command line"):
        narrate.load_config(_config(tmp_path, "retire_all: true\n"))


def test_an_unknown_config_key_is_named_with_the_keys_there_are(tmp_path):
    """(mutants: the unknown-key check dropped, so a KeyError escaped instead of a ValueError (exit 2); the list of
    valid keys left out of the message; that list offering `func` and command-line-only keys)"""
    with pytest.raises(ValueError) as e:
        narrate.load_config(_config(tmp_path, "colour: red\nvoice: ryan\n"))
    msg = str(e.value)
    assert msg.startswith("config: unknown option(s) ['colour']; the keys are [")
    keys = eval(msg.split("the keys are ", 1)[1])  # noqa: S307 - a list literal this module printed
    assert "voice" in keys and "layout" in keys and "book" in keys
    assert not {"func", "help", "input", "config", "catalog", "retire_all"} & set(keys)


@pytest.mark.parametrize(("conf", "message"), [
    ({"actors": True}, "--actors must be an integer, got True"),
    ({"pause_s": True}, "--pause must be a number, got True"),
    ({"runner": "fast"}, "--runner must be one of ['ray', 'local'], got 'fast'"),
    ({"output": 5}, "--out must be a string, got 5"),
    ({"max_row_chars": "many"}, "--max-row-chars must be an integer, got 'many'"),
])
def test_a_config_value_of_the_wrong_kind_is_named_with_its_file(tmp_path, conf, message):
    """A switch's or a number's value is checked by kind, YAML's true is no number, the choices hold for config
    values too, and the message names the option as typed and the config file (mutants: bool taken as an int or a
    float, choices unchecked, `(config FILE)` dropped, --out and --max-row-chars named by their config keys)."""
    with pytest.raises(ValueError) as e:
        narrate.check_config(conf, "c.yaml")
    assert str(e.value) == f"{message} (config c.yaml)"


def test_an_integer_option_takes_a_whole_float_from_yaml(tmp_path):
    """`actors: 2.0` (YAML floats) is an integer option's value (mutant: only ints accepted)."""
    narrate.check_config({"actors": 2.0, "max_row_chars": 1e3}, "c.yaml")
    _, _, opts, limits = _options([], {"actors": 2.0, "max_row_chars": 1e3})
    assert opts.actors == 2 and isinstance(opts.actors, int) and limits.max_row_chars == 1000


# ---- options: precedence and defaults ---------------------------------------------------------------------------

def test_a_command_line_zero_beats_the_config_and_the_config_beats_the_default():
    """The one precedence rule: a value typed on the command line, even 0, over the config's, over the built-in
    default (mutants: a falsy command-line value lost to the config; the config over the command line)."""
    conf = {"seed": 5, "pause_s": 1.0, "language": "German", "max_attempts": 4}
    defaults, render, _, _ = _options(["--seed", "0", "--pause", "0", "--language", "French"], conf)
    assert defaults.seed == 0 and render.pause_s == 0 and defaults.language == "French"
    assert render.max_attempts == 4
    assert narrate.option_value(types.SimpleNamespace(x=None), {"x": 2}, "x", 9) == 2
    assert narrate.option_value(types.SimpleNamespace(), {}, "x", 9) == 9


def test_options_nobody_gives_are_the_documented_defaults():
    """Every option's default is the one its --help names (and the option objects' own): language auto, 24 kHz,
    200 characters, 0.4 s pauses, 3 attempts, output file://./output, backend auto, runner ray, 1 actor, 0.5 CPUs,
    batches of 4, app qtts, 4 calls per replica, progress on, verbose off, no captions, engine cpu float32 with 8
    sessions and the 8.0/64 guard, revision 'unknown' (mutants: each default changed)."""
    defaults, render, opts, limits = _options([])
    assert defaults == RowDefaults()
    want = RenderConfig(model="")
    for f in ("model", "revision", "max_chars", "pause_s", "max_attempts", "sampling", "key_prefix", "retry_on",
              "master", "speed", "captions"):
        assert getattr(render, f) == getattr(want, f), f
    assert render.retry_on == ("guard", "max_new_tokens") and render.revision == "unknown"
    assert opts == RunOptions()
    assert limits == InputLimits()


def test_options_given_reach_the_option_objects():
    """(mutants: --voices-uri and --max-row-chars dropped on the way; a guard of 0 passed as 0.0, not None
    (off); a frame cap the user chose retried as a runaway)"""
    _, render, opts, limits = _options(["--voices-uri", "s3://voices/x", "--max-row-chars", "500",
                                        "--guard-frames-per-token", "0", "--max-new-tokens", "300"])
    assert opts.engine.voices_uri == "s3://voices/x" and limits.max_row_chars == 500
    assert opts.engine.guard_frames_per_token is None
    assert render.retry_on == ("guard",) and render.sampling == {"max_new_tokens": 300}


@pytest.mark.parametrize(("value", "want"), [
    ("none", ()), (" guard , max_new_tokens ", ("guard", "max_new_tokens")), ("guard,", ("guard",)),
])
def test_retry_on_lists_reasons_and_none_means_no_retries(value, want):
    """(mutants: "none" kept as a reason; the reasons not stripped of spaces)"""
    _, render, _, _ = _options(["--retry-on", value])
    assert render.retry_on == want


# ---- numeric options: bounds, kinds, names ----------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "ok", "bad", "message"), [
    ("--attempts", "1", "0", "--attempts must be an integer >= 1, got 0"),
    ("--actors", "1", "0", "--actors must be an integer >= 1, got 0"),
    ("--num-cpus", "0", "-0.5", "--num-cpus must be a number >= 0, got -0.5"),
    ("--num-gpus", "0", "-1", "--num-gpus must be a number >= 0, got -1.0"),
    ("--batch-size", "1", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--max-inflight-per-replica", "1", "0", "--max-inflight-per-replica must be an integer >= 1, got 0"),
    ("--guard-frames-per-token", "0", "-1", "--guard-frames-per-token must be a number >= 0, got -1.0"),
    ("--guard-base-frames", "0", "-1", "--guard-base-frames must be an integer >= 0, got -1"),
    ("--max-row-chars", "1", "0", "--max-row-chars must be an integer >= 1, got 0"),
    ("--max-input-bytes", "1", "0", "--max-input-bytes must be an integer >= 1, got 0"),
    ("--max-chars", "8", "7", "--max-chars must be an integer >= 8, got 7"),
    ("--pause", "60", "60.5", "--pause must be a number in [0, 60], got 60.5"),
    ("--pause", "0", "-0.1", "--pause must be a number in [0, 60], got -0.1"),
    ("--sample-rate", "48000", "48001", "--sample-rate must be an integer in [4000, 48000], got 48001"),
    ("--sample-rate", "4000", "3999", "--sample-rate must be an integer in [4000, 48000], got 3999"),
])
def test_each_numeric_option_at_its_bounds_named_as_typed(flag, ok, bad, message):
    """A bound is allowed, one past it is a ValueError (exit 2) naming the option as typed on the command line
    (mutants: each lower bound moved or dropped, the bounds exclusive, --attempts named --max-attempts, names
    with underscores)."""
    _options([flag, ok])
    with pytest.raises(ValueError) as e:
        _options([flag, bad])
    assert str(e.value) == message


def test_a_number_option_refuses_true_a_fraction_and_a_number_too_big_for_a_float():
    """YAML's true is not 1, 2.5 actors is not 2, and an integer too large for a float is the option's error, not
    an OverflowError (mutants: bool accepted, a fraction truncated, OverflowError not caught)."""
    with pytest.raises(ValueError, match=r"^--actors must be an integer, got True$"):
        narrate.option_number("actors", True)
    with pytest.raises(ValueError, match=r"^--actors must be an integer, got 2\.5$"):
        narrate.option_number("actors", 2.5)
    assert narrate.option_number("actors", 2.0) == 2
    with pytest.raises(ValueError, match=r"^--pause must be a number, got 1000"):
        _options([], {"pause_s": 10**400})


# ---- prepare: the plan before any work --------------------------------------------------------------------------

def _prepare(monkeypatch, backend: str, revision: str = "unknown"):
    seen = {}

    def resolve_models(rows, default_model, be, *, engine, app, revision):
        seen["revision"] = revision
        return rows, {}, "m"

    monkeypatch.setattr(narrate, "resolve_backend", lambda opts: backend)
    monkeypatch.setattr(narrate, "resolve_models", resolve_models)
    monkeypatch.setattr(narrate, "check_voices", lambda rows, *a: rows)
    monkeypatch.setattr(narrate, "voice_file_paths", lambda *a: {"v.wav": Path("/abs/v.wav")})
    monkeypatch.setattr(narrate, "voice_file_digests", lambda paths: {k: "d" for k in paths})
    rows = [Utterance(id="a", text="Hi.", voice="v.wav")]
    _, render, opts, backend = narrate.prepare(rows, RowDefaults(), RenderConfig(model="", revision=revision),
                                               RunOptions(num_gpus=1.0, runner="local"))
    return seen["revision"], render, opts


def test_prepare_passes_a_revision_only_when_one_was_given(monkeypatch):
    """(mutant: the placeholder 'unknown' passed to the hub as a revision)"""
    assert _prepare(monkeypatch, "engine")[0] is None
    assert _prepare(monkeypatch, "engine", "v2")[0] == "v2"


def test_the_serve_backend_takes_no_gpus_and_no_voice_paths(monkeypatch):
    """Serve replicas hold the GPUs and the voices: job workers get neither; the engine backend gets the voice
    files' absolute paths and its GPUs; a module:Class backend no paths (mutants: --num-gpus kept for Serve;
    voice paths sent to every backend but Serve)."""
    _, render, opts = _prepare(monkeypatch, "serve")
    assert opts.num_gpus == 0.0 and render.voice_paths == {} and render.voice_files == {"v.wav": "d"}
    _, render, opts = _prepare(monkeypatch, "engine")
    assert opts.num_gpus == 1.0 and render.voice_paths == {"v.wav": "/abs/v.wav"}
    _, render, _ = _prepare(monkeypatch, FAKE)
    assert render.voice_paths == {}


# ---- the table, the manifest and the summary --------------------------------------------------------------------

def test_the_table_shows_each_failed_rows_error_and_each_rows_flags():
    """(mutants: a failed row shown with its key; flags left out)"""
    out = io.StringIO()
    narrate.print_manifest([ManifestRecord(id="good", key="audio/good.wav", status="suspect", flags=["short"]),
                            ManifestRecord(id="bad", key=None, status="failed", error="voice: unknown")], out)
    lines = out.getvalue().splitlines()
    assert lines[1].endswith("audio/good.wav [short]") and lines[2].endswith("ERROR voice: unknown")


class _Flaky:
    """The output's sink, refusing the manifest `fails` times (OSError, as a local disk does), then taking it."""

    def __init__(self, real: LocalSink, fails: int) -> None:
        self.real, self.fails, self.puts = real, fails, 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def put(self, key, data, content_type="application/octet-stream"):
        self.puts += 1
        if self.puts <= self.fails:
            raise OSError(5, "Input/output error")
        self.real.put(key, data, content_type)


def _flaky_output(monkeypatch, tmp_path, fails):
    sinks = []

    def open_sink(uri, retry=None):
        sinks.append(_Flaky(LocalSink(str(tmp_path / "out")), fails))
        return sinks[-1]

    sleeps: list[float] = []
    monkeypatch.setattr(narrate, "open_sink", open_sink)
    monkeypatch.setattr(narrate.time, "sleep", sleeps.append)
    return sinks, sleeps


def test_the_manifest_write_is_retried_with_growing_waits(tmp_path, monkeypatch):
    """Three refusals (OSError) then the write: 4 attempts, waiting 1, 2 and 4 s between them (mutants: one
    attempt only; OSError not retried; a flat 8 s wait; a wait after the last attempt)."""
    sinks, sleeps = _flaky_output(monkeypatch, tmp_path, 3)
    opts = RunOptions(output=f"file://{tmp_path}/out", runner="local")
    url, extra = narrate.write_manifest([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts,
                                        "manifest.parquet")
    assert url == f"file://{tmp_path.resolve()}/out/manifest.parquet" and extra == {}
    assert sinks[0].puts == 4 and sleeps == [1.0, 2.0, 4.0]
    assert [r.id for r in from_parquet((tmp_path / "out" / "manifest.parquet").read_bytes())] == ["a"]


def test_a_manifest_the_output_refuses_is_kept_in_the_working_directory(tmp_path, monkeypatch, capsys):
    """Every attempt refused: no wait after the last, the manifest kept in the working directory (before the
    temp dir) under a name of its own (time and pid: a later run's never replaces it), the message naming where
    it should have gone and how often it was tried (mutants: temp dir first; one fixed name; a wait after the last
    attempt; the URL and count left out)."""
    sinks, sleeps = _flaky_output(monkeypatch, tmp_path, 99)
    for d in ("cwd", "tmp"):
        (tmp_path / d).mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setattr(narrate.tempfile, "tempdir", str(tmp_path / "tmp"))
    opts = RunOptions(output=f"file://{tmp_path}/out", runner="local")
    url, extra = narrate.write_manifest([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts,
                                        "manifest.parquet")
    assert url is None and sleeps == [1.0, 2.0, 4.0] and sinks[0].puts == 4
    local = Path(extra["manifest_local"])
    assert local.parent == (tmp_path / "cwd").resolve() and list((tmp_path / "tmp").iterdir()) == []
    assert re.fullmatch(rf"manifest-\d{{8}}-\d{{6}}-{os.getpid()}\.parquet", local.name), local.name
    err = capsys.readouterr().err
    want = f"could not write the manifest to file://{tmp_path.resolve()}/out/manifest.parquet after 4 attempts"
    assert want in err


def test_a_manifest_is_kept_in_the_temp_dir_when_the_working_directory_is_gone(tmp_path, monkeypatch):
    """The working directory deleted under the job (getcwd raises OSError): the temp dir takes the manifest
    (mutants: no temp-dir fallback; an OSError of the first place escaping write_manifest)."""
    _flaky_output(monkeypatch, tmp_path, 99)
    (tmp_path / "gone").mkdir()
    (tmp_path / "tmp").mkdir()
    monkeypatch.chdir(tmp_path / "gone")
    (tmp_path / "gone").rmdir()
    monkeypatch.setattr(narrate.tempfile, "tempdir", str(tmp_path / "tmp"))
    opts = RunOptions(output=f"file://{tmp_path}/out", runner="local")
    url, extra = narrate.write_manifest([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts,
                                        "manifest.parquet")
    assert url is None and Path(extra["manifest_local"]).parent == (tmp_path / "tmp").resolve()


def test_an_unreadable_previous_manifest_costs_nothing(tmp_path, capsys, caplog):
    """Garbage where the previous manifest was: a warning, then this run's manifest replaces it (exit 0) (mutant:
    the read error raised, losing the run's manifest and summary)."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.parquet").write_bytes(b"not parquet at all")
    opts = RunOptions(output=f"file://{tmp_path}/out", runner="local")
    with caplog.at_level(logging.WARNING, logger="jobs.narrate"):
        code = narrate.finish([ManifestRecord(id="a", key="audio/a.wav", status="ok")], opts, "manifest.parquet",
                              0.0, quiet=True)
    assert code == 0 and "could not read the previous manifest" in caplog.text
    assert [r.id for r in from_parquet((tmp_path / "out" / "manifest.parquet").read_bytes())] == ["a"]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ok"] == 1


def _tables(monkeypatch) -> list[list[str]]:
    """The ids of each table finish() prints (print_manifest writes to the sys.stdout of import time, which no
    capture fixture sees: see fix.diff)."""
    tables: list[list[str]] = []
    monkeypatch.setattr(narrate, "print_manifest", lambda records, out=None: tables.append([r.id for r in records]))
    return tables


def test_the_summary_names_the_resolved_output_and_quiet_leaves_out_the_table(tmp_path, monkeypatch, capsys):
    """`output` is the folder as resolved (an absolute file:// URI, not the relative one typed); --quiet prints
    the JSON summary alone, without it the table too (mutants: the URI as typed; quiet inverted)."""
    monkeypatch.chdir(tmp_path)
    tables = _tables(monkeypatch)
    opts = RunOptions(output="file://out", runner="local")
    recs = [ManifestRecord(id="a", key="audio/a.wav", status="ok")]
    assert narrate.finish(recs, opts, "manifest.parquet", 0.0, quiet=True) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["output"] == f"file://{tmp_path.resolve()}/out"
    assert tables == []
    narrate.finish(recs, opts, "manifest.parquet", 0.0, quiet=False)
    assert tables == [["a"]]


@pytest.mark.parametrize(("summary", "code"), [
    ({"failed": 0}, 0), ({"failed": 1}, 1), ({"failed": 0, "book": {"key": "book/b.m4b"}}, 0),
    ({"failed": 0, "book": {"error": "no"}}, 1), ({"failed": 0, "manifest_error": "x"}, 3),
    ({"failed": 2, "manifest_error": "x"}, 3),
])
def test_exit_codes(summary, code):
    """(mutants: one failed row exit 0; a book not made exit 0; a manifest not written exit 1)"""
    assert narrate.exit_code(summary) == code


# ---- run: config-only settings, exit 2 ------------------------------------------------------------------------

def test_quiet_and_the_book_from_the_config_file_count(tmp_path, monkeypatch, capsys):
    """`quiet: true` in the config prints the summary alone; `book: m4b` with a missing cover fails before any
    synthesis (exit 2), as on the command line (mutants: the config's quiet and book ignored)."""
    from tests.jobs.fakes import FakeBackend

    tables = _tables(monkeypatch)
    code, _ = _narrate(tmp_path, "--config", _config(tmp_path, "quiet: true\n"))
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and len(out) == 1 and json.loads(out[0])["total"] == 1 and tables == []
    code, _ = _narrate(tmp_path)
    assert code == 0 and tables == [["a"]]
    FakeBackend.calls.clear()
    code, _ = _narrate(tmp_path, "--config", _config(tmp_path, f"book: m4b\ncover: {tmp_path / 'no.jpg'}\n"))
    assert code == 2 and "cover:" in capsys.readouterr().err and not FakeBackend.calls


def test_an_output_that_is_not_writable_exits_2_before_any_work(tmp_path, capsys):
    """--out naming a file: StorageError from the preflight, exit 2 (mutants: StorageError not caught up front;
    exit 1 for an unusable setting)."""
    from tests.jobs.fakes import FakeBackend

    (tmp_path / "afile").write_text("x")
    FakeBackend.calls.clear()
    inp = tmp_path / "rows.jsonl"
    inp.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    code = narrate.main([str(inp), "--model", "fake", "--out", f"file://{tmp_path}/afile", "--backend", FAKE,
                         "--runner", "local", "--no-progress", "--voice", "ryan"])
    assert code == 2 and "is not writable" in capsys.readouterr().err and not FakeBackend.calls


# ---- the book's metadata ----------------------------------------------------------------------------------------

def _book(monkeypatch, meta, rows, fail: Exception | None = None):
    seen = {}

    def book_or_reuse(records, titles, sink, m):
        seen["meta"], seen["titles"] = m, titles
        if fail is not None:
            raise fail
        return {"key": "book/b.m4b"}

    import jobs.book

    monkeypatch.setattr(jobs.book, "book_or_reuse", book_or_reuse)
    opts = RunOptions(output="file:///nonexistent-qtts-out", runner="local")
    got = narrate.make_book([], rows, RenderConfig(model=""), opts, meta, threading.Event())
    return got, seen


def test_the_book_title_option_and_the_narrator_default(monkeypatch):
    """--book-title is the book's title; without --narrator the narrator is the rows' voices, each once, sorted
    (mutants: the title read from another option; the narrator default dropped; voices repeated, unsorted)."""
    args = narrate.build_parser().parse_args(["b.txt", "--book", "m4b", "--book-title", "Dune", "--author", "F H"])
    meta = narrate.book_options(args, {})
    assert (meta.title, meta.author, meta.narrator) == ("Dune", "F H", None)
    rows = [Utterance(id="2", text="x", voice="vivian"), Utterance(id="1", text="x", voice="ryan"),
            Utterance(id="3", text="x", voice="vivian"), Utterance(id="4", text="x")]
    got, seen = _book(monkeypatch, meta, rows)
    assert got == {"key": "book/b.m4b"} and seen["meta"].narrator == "ryan, vivian"
    assert seen["meta"].title == "Dune"
    given = narrate.book_options(narrate.build_parser().parse_args(["b.txt", "--book", "m4b", "--narrator", "Al"]),
                                 {})
    assert _book(monkeypatch, given, rows)[1]["meta"].narrator == "Al"


def test_a_book_the_storage_refuses_reports_the_storage_error_as_it_is(monkeypatch):
    """(mutant: a StorageError reported as an unexpected error, `book: StorageError: ...`)"""
    meta = narrate.book_options(narrate.build_parser().parse_args(["b.txt", "--book", "m4b"]), {})
    got, _ = _book(monkeypatch, meta, [], StorageError("put book/b.m4b failed after 4 attempt(s): SlowDown"))
    assert got == {"error": "put book/b.m4b failed after 4 attempt(s): SlowDown"}


# ---- progress: the tracker --------------------------------------------------------------------------------------

def test_the_tracker_counts_finished_rows_their_audio_and_rows_started_twice():
    """A row finished twice (run again after its worker was lost) counts once; a row started on two nodes is
    reported with both (mutants: a second start replacing the first; started rows counted as done; audio not
    summed; rows started once reported as restarted)"""
    t = progress.Tracker()
    t.started(["a", "b"], "node1")
    t.started(["b"], "node2")
    assert t.snapshot() == (0, 0)
    t.finished([("a", "ok", 1.5)])
    t.finished([("b", "ok", 2.0)])
    t.finished([("b", "ok", 2.0)])
    assert t.snapshot() == (2, 3.5)
    assert t.restarts() == {"b": ["node1", "node2"]}


# ---- progress: the bar ------------------------------------------------------------------------------------------

class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = _Clock()
    monkeypatch.setattr(progress, "time", c)
    return c


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "jobs.progress"]


def test_the_log_line_bar_every_5_percent_every_15_s_and_at_the_end(clock, caplog):
    """Without a terminal: a line each 5 % of the rows, else each 15 s, and always the last row; an unchanged
    count logs nothing (mutants: the step 20 %; 150 s; the last row not forced; the last line's count not kept, so
    every later row logged; an unchanged set logged again)."""
    caplog.set_level(logging.INFO, logger="jobs.progress")
    bar = progress.Bar(100, "narrate", True, io.StringIO())
    bar.set(5, 1.0)      # 5 %
    bar.set(8, 2.0)      # 3 rows since the last line, 0 s
    clock.now += 16
    bar.set(9, 2.5)      # 4 rows, but 16 s since the last line
    bar.set(98, 9.0)
    bar.set(100, 9.5)    # the end, 2 rows after the last line
    bar.set(100, 9.5)    # nothing new
    assert _lines(caplog) == ["narrate: 5/100 rows, 1.0 s of audio", "narrate: 9/100 rows, 2.5 s of audio",
                              "narrate: 98/100 rows, 9.0 s of audio", "narrate: 100/100 rows, 9.5 s of audio"]
    bar.set(150, 9.5)    # never past the total
    assert bar.done == 100 and bar.audio_s == 9.5 and len(_lines(caplog)) == 4


def test_no_progress_means_no_log_lines_and_no_bar(monkeypatch, caplog):
    """--no-progress: neither log lines nor tqdm, even on a terminal (mutants: log lines when disabled; tqdm when
    disabled)."""
    caplog.set_level(logging.INFO, logger="jobs.progress")
    monkeypatch.setenv("QTTS_PROGRESS", "1")
    stream = io.StringIO()
    bar = progress.Bar(10, "narrate", False, stream)
    bar.set(10, 3.0)
    bar.close()
    assert _lines(caplog) == [] and stream.getvalue() == ""


def test_the_tqdm_bar_on_a_terminal_counts_rows_and_audio(monkeypatch):
    """QTTS_PROGRESS=1 draws the bar on any stream; it shows rows done of the total and the seconds of audio
    (mutants: QTTS_PROGRESS ignored; tqdm moved by the count instead of the difference; no audio postfix)."""
    monkeypatch.setenv("QTTS_PROGRESS", "1")
    stream = io.StringIO()
    bar = progress.Bar(10, "narrate", True, stream)
    bar.set(3, 1.0)
    bar.set(5, 2.5)
    bar.close()
    last = stream.getvalue().split("\r")[-1]
    assert "5/10 rows" in last and "2.5 s audio" in last


# ---- progress: the console and its stderr filter ----------------------------------------------------------------

NOISE_LINE = (b"(raylet) [2026-12-07 10:00:00,000 I 12 34] core_worker.cc:512: Actor with class name: 'Tracker' "
              b"and ID: 'ab' has constructor arguments in the object store and max_restarts > 0.\n")


def test_the_console_drops_ray_noise_and_keeps_everything_else(capfd):
    """A line of Ray noise is dropped wherever in the line its pattern sits; other lines and a last line without
    a newline come through, all of it by the time the console closes (mutants: nothing filtered; the pattern
    matched at the line's start only; the last partial line lost; close not waiting for the pump)."""
    with progress.Console(verbose=False):
        os.write(2, b"before\n" + NOISE_LINE + b"after\nno newline")
    assert capfd.readouterr().err == "before\nafter\nno newline"


def test_verbose_shows_the_noise_unfiltered(capfd):
    """--verbose: nothing filtered (mutant: the filter used only with --verbose; its close without an open)."""
    with progress.Console(verbose=True):
        os.write(2, NOISE_LINE)
    assert capfd.readouterr().err == NOISE_LINE.decode()


def test_a_long_line_without_a_newline_is_passed_on_before_the_console_closes(capfd):
    """More than 8 KiB with no newline (a progress bar of Ray's drawn with \\r) reaches the terminal while the job
    runs, not at its end (mutant: held until a newline or the close)."""
    import time

    with progress.Console(verbose=False):
        os.write(2, b"x" * 9000)
        deadline, seen = time.monotonic() + 10, ""
        while len(seen) < 9000 and time.monotonic() < deadline:
            seen += capfd.readouterr().err
            time.sleep(0.01)
        assert len(seen) == 9000
    assert capfd.readouterr().err == ""


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
def test_the_console_leaves_stderr_and_the_open_files_as_it_found_them(capfd):
    """After the console fd 2 is the same file again and no descriptor is left open (mutants: the saved
    descriptor, the pipe's read end or a copy of stderr leaked; the filter not closed)."""
    before, st = _fds(), os.fstat(2)
    for _ in range(3):
        with progress.Console(verbose=False) as c:
            c.bar(5, "narrate")
    after = os.fstat(2)
    assert (after.st_dev, after.st_ino) == (st.st_dev, st.st_ino) and _fds() == before


def test_log_handlers_on_stderr_follow_the_console_and_come_back(tmp_path):
    """Logging to stderr goes through the console's stream while it is open (in order with the bar) and back to
    stderr after; a handler writing to a file is left alone (mutants: the handler not re-pointed, not restored,
    the console's stack not closed; file handlers re-pointed too)."""
    root = logging.getLogger()
    h = logging.StreamHandler(sys.stderr)
    fh = logging.FileHandler(tmp_path / "log.txt")
    root.addHandler(h)
    root.addHandler(fh)
    try:
        with progress.Console(verbose=False) as c:
            assert h.stream is c.stream and h.stream is not sys.stderr and fh.stream is not c.stream
        assert h.stream is sys.stderr and c.stream.closed
    finally:
        root.removeHandler(h)
        root.removeHandler(fh)
        fh.close()


def test_the_consoles_bars_are_closed_with_it(monkeypatch):
    """(mutant: the bar not closed when the console exits, its tqdm left drawn)"""
    monkeypatch.setenv("QTTS_PROGRESS", "1")
    with progress.Console(verbose=True) as c:
        bar = c.bar(4, "narrate")
        bar.set(2, 1.0)
        assert bar._tqdm is not None
    assert bar._tqdm is None


def test_ray_datas_bars_banners_and_logs_only_with_verbose(monkeypatch):
    """Without --verbose: no Ray Data bars, execution banner or stats logs, its loggers at WARNING (its progress
    logger at ERROR); with --verbose all of them, but bars only on a terminal (mutants: each setting left on, the
    bars drawn into a log file, the loggers left at INFO or WARNING). A stand-in `ray.data` module: no Ray."""
    ctx = types.SimpleNamespace()
    fake_data = types.SimpleNamespace(DataContext=types.SimpleNamespace(get_current=lambda: ctx))
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(data=fake_data))
    monkeypatch.setitem(sys.modules, "ray.data", fake_data)
    names = ("ray.data", "ray.serve", "ray.data._internal.progress")
    saved = {n: logging.getLogger(n).level for n in names}
    try:
        progress.quiet_ray_data(False)
        assert vars(ctx) == {"enable_progress_bars": False, "enable_operator_progress_bars": False,
                             "print_on_execution_start": False, "enable_auto_log_stats": False,
                             "verbose_stats_logs": False}
        assert [logging.getLogger(n).level for n in names] == [logging.WARNING, logging.WARNING, logging.ERROR]
        monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, not a terminal
        progress.quiet_ray_data(True)
        assert vars(ctx) == {"enable_progress_bars": False, "enable_operator_progress_bars": True,
                             "print_on_execution_start": True, "enable_auto_log_stats": True,
                             "verbose_stats_logs": False}
        assert [logging.getLogger(n).level for n in names] == [logging.INFO] * 3
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)
