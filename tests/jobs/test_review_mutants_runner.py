"""The batch job's driver and what a catalog pass writes and deletes, pinned by a mutation review of jobs/runner.py,
jobs/layout.py and jobs/retire.py: each test here failed on a one-line change (a "mutant") that the rest of the
non-Ray suite let pass, named in its docstring. One bad row (a resume check that raises, a write that aborts the run)
is recorded and never stops the job; a stop leaves rows "not rendered", never a record without an error; outputs
committed before an abort are listed from their sidecars; the options, the Ray bookkeeping and the signal handling
the driver relies on; package file names and keys that cannot leave their folder; nothing deleted that the job does
not own or that a current prompt still uses. Local files, fakes, no Ray."""

from __future__ import annotations

import json
import signal
import socket
import threading

import numpy as np
import pytest

from jobs import audio, layout, mastering, retire, runner
from jobs.captions import caption_keys
from jobs.inputs import Utterance
from jobs.manifest import ManifestRecord
from jobs.render import NOT_RENDERED, RenderConfig, plan_key, render_rows, sidecar_key
from jobs.runner import RowTracker, RunOptions, run_rows
from jobs.storage import LocalSink, StorageError, content_key
from tests.jobs.fakes import FakeBackend

FAKE = "tests.jobs.fakes:FakeBackend"
HERE = "tests.jobs.test_review_mutants_runner"


def _cfg(**kw) -> RenderConfig:
    return RenderConfig(model="fake-model", revision="r1", max_chars=40, pause_s=0.25, max_attempts=2, **kw)


def _opts(out, **kw) -> RunOptions:
    kw = {"backend": FAKE, "runner": "local", "batch_size": 2, **kw}
    return RunOptions(output=f"file://{out}", progress=False, **kw)


def _rows(*ids: str) -> list[Utterance]:
    return [Utterance(id=i, text=f"Words for {i}.", voice="vivian") for i in ids]


# ---- options ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["actors", "batch_size", "max_inflight_per_replica", "max_worker_losses"])
def test_each_count_option_must_be_at_least_one(name):
    """(mutants: `< 1` as `< 0` accepted 0; max_worker_losses left out of the check: 0 failed every row that ever
    lost a worker without trying it once more)"""
    with pytest.raises(ValueError, match=rf"^{name} must be >= 1, got 0$"):
        RunOptions(**{name: 0})
    assert getattr(RunOptions(**{name: 1}), name) == 1


def test_an_unknown_runner_is_refused():
    """(mutant: the runner check dropped: 'spark' ran the Ray path)"""
    with pytest.raises(ValueError, match=r"runner must be one of \['ray', 'local'\], got 'spark'"):
        RunOptions(runner="spark")


def test_the_serve_backend_shares_its_inflight_budget_among_the_ray_workers_only():
    """(mutant: workers = actors in the local runner too: one process got a quarter of the per-replica budget; and
    revisions dropped: a pinned revision was never sent to the workers)"""
    cfg = _cfg(models={"fake-model": {"revision": "abc123"}, "other": {}})
    local = RunOptions(runner="local", actors=4).backend_args("serve", cfg)
    ray = RunOptions(runner="ray", actors=4).backend_args("serve", cfg)
    assert local["serve_opts"]["workers"] == 1 and ray["serve_opts"]["workers"] == 4
    assert local["revisions"] == {"fake-model": "abc123"}


def test_ray_retries_are_bounded_by_the_poison_row_rule():
    """(mutants: the bound not scaled by the rows; restarts without end (-1))"""
    assert runner.worker_retries(3, 10) == {"max_task_retries": 30, "max_restarts": 30}
    assert runner.worker_retries(2, 0) == {"max_task_retries": 2, "max_restarts": 2}


# ---- Ray bookkeeping without Ray -------------------------------------------------------------------------------

def test_a_batch_goes_row_by_row_only_when_one_of_its_rows_lost_a_worker():
    """(mutants: a finished row stayed open (it counted as lost when started again); an open start not counted as
    lost; `any` as `all`: a batch mate that never lost a worker kept the batch going whole)"""
    t = RowTracker()
    assert t.begin_batch(["a", "b"], "n1") is False
    t.finished([("a", "ok", 1.0)])
    assert t.lost_starts(["a", "b"]) == {"a": 0, "b": 1}
    assert t.begin_batch(["a"], "n1") is False          # a finished: starting it again is no loss
    assert t.begin_batch(["b", "c"], "n1") is True      # b's start never finished: its worker died
    assert t.starts == {"a": ["n1", "n1"], "b": ["n1"]}  # nothing started by a batch sent row by row


# ---- driver environment ------------------------------------------------------------------------------------------

def _job_env(monkeypatch, working_dir: str) -> None:
    cfg = {"runtime_env": {"working_dir": working_dir, "env_vars": {"A": "1"}}}
    monkeypatch.setenv(runner.JOB_CONFIG_ENV, json.dumps(cfg))
    monkeypatch.delenv("QTTS_KEEP_JOB_WORKING_DIR", raising=False)


def test_only_an_uploaded_gcs_working_dir_is_dropped_and_the_switch_keeps_it(monkeypatch):
    """(mutants: QTTS_KEEP_JOB_WORKING_DIR=1 ignored; a working_dir that is not an upload (s3://, a path) dropped)"""
    _job_env(monkeypatch, "gcs://_ray_pkg_abc.zip")
    assert runner.drop_job_working_dir() is True
    assert json.loads(runner.os.environ[runner.JOB_CONFIG_ENV])["runtime_env"] == {"env_vars": {"A": "1"}}
    _job_env(monkeypatch, "gcs://_ray_pkg_abc.zip")
    monkeypatch.setenv("QTTS_KEEP_JOB_WORKING_DIR", "1")
    assert runner.drop_job_working_dir() is False
    assert "gcs://" in runner.os.environ[runner.JOB_CONFIG_ENV]
    _job_env(monkeypatch, "s3://bucket/pkg.zip")
    assert runner.drop_job_working_dir() is False
    assert "s3://bucket/pkg.zip" in runner.os.environ[runner.JOB_CONFIG_ENV]


def test_a_ray_head_address_counts_as_listening_only_when_something_accepts():
    """(mutant: a ray:// or http URL taken as nobody listening: the driver started a local cluster instead)"""
    assert runner._listening("ray://head.example:10001") is True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert runner._listening(f"127.0.0.1:{s.getsockname()[1]}") is True
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))   # bound, not listening: refused
        assert runner._listening(f"127.0.0.1:{s.getsockname()[1]}") is False


def test_the_first_stop_signal_sets_the_event_and_a_second_leaves_at_once(monkeypatch):
    """(mutants: the first signal did not set the stop event (the job ran on); a second one did not leave)"""
    ev = threading.Event()
    monkeypatch.setattr(runner, "_stop", ev)
    monkeypatch.setattr(runner, "_interruptible", False)
    runner._on_sigterm(signal.SIGTERM, None)
    assert ev.is_set()
    with pytest.raises(SystemExit) as e:
        runner._on_sigterm(signal.SIGTERM, None)
    assert e.value.code == 128 + signal.SIGTERM


def test_sigint_is_left_alone_when_the_process_was_started_ignoring_it():
    """(mutant: SIGINT always taken over: a background `qtts ... &` was stopped by the shell's Ctrl-C)"""
    before = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        assert runner._stop_signals() == (signal.SIGTERM,)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        assert runner._stop_signals() == (signal.SIGTERM, signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)


class _Bar:
    done, audio_s = 0, 0.0

    def set(self, done, audio_s):
        self.done, self.audio_s = done, audio_s


def test_the_collector_keeps_the_first_record_of_a_row_and_none_once_frozen():
    """(mutants: a second record for a row replaced the first (two outputs for one row, the manifest listing the
    later); a frozen collector still took records (after the driver had written the rows left as aborted))"""
    out = runner._Collector({"a": 0, "b": 1}, _Bar())
    first = ManifestRecord(id="a", key="k1", status="ok", duration_s=1.0)
    out.emit(first)
    out.emit(ManifestRecord(id="a", key="k2", status="failed"))
    assert out.records == {0: first} and out.duplicates == 1
    out.frozen = True
    out.emit(ManifestRecord(id="b", key="k3", status="ok"))
    assert out.records == {0: first}


# ---- run_rows: stop, resume checks, aborts -------------------------------------------------------------------

class StopFake(FakeBackend):
    """FakeBackend that sets `stop` during its first call (a SIGTERM arriving mid-batch)."""

    stop = threading.Event()
    calls: list = []

    def synthesize(self, jobs):
        StopFake.calls.append([j.text for j in jobs])
        StopFake.stop.set()
        return super().synthesize(jobs)


def test_a_stop_mid_batch_retries_nothing_and_leaves_the_rows_not_rendered(tmp_path):
    """(mutants: stop not passed to the batch (the runaway row was retried after the stop); a stopped row recorded
    as failed without any error)"""
    StopFake.stop.clear()
    StopFake.calls.clear()
    rows = [Utterance(id="loop", text="RUNAWAY once.", voice="ryan"), Utterance(id="ok", text="Fine.", voice="ryan"),
            *_rows("later")]
    recs = run_rows(rows, _cfg(), _opts(tmp_path, backend=f"{HERE}:StopFake"), stop=StopFake.stop)
    assert [r.id for r in recs] == ["loop", "ok", "later"]
    assert recs[1].status == "ok"
    assert [(r.status, r.error) for r in (recs[0], recs[2])] == [("failed", NOT_RENDERED)] * 2
    assert StopFake.calls == [["RUNAWAY once.", "Fine."]]
    assert not (tmp_path / recs[0].key).exists() and not (tmp_path / recs[2].key).exists()


def _sink(root, *, get_raises=None, put_raises_after=None, broken_after_put=False):
    """A local sink: `get_raises` (key, exception) raised when that key is read; `put_raises_after` a key whose
    write lands and then raises RuntimeError (or, `broken_after_put`, every later read raises too)."""
    state = {"broken": False}

    class Sink(LocalSink):
        def get(self, key):
            if state["broken"] or (get_raises and key == get_raises[0]):
                raise state["broken"] or get_raises[1]
            return super().get(key)

        def put(self, key, data, content_type="application/octet-stream"):
            super().put(key, data, content_type)
            if key == put_raises_after:
                if broken_after_put:
                    state["broken"] = OSError("the disk went away")
                raise RuntimeError("write acknowledged, then the connection dropped")

    return Sink(str(root))


@pytest.mark.parametrize("exc, error", [
    (RuntimeError("disk on fire"), "resume check: RuntimeError: disk on fire"),
    (StorageError("access denied"), "storage: access denied"),
])
def test_a_resume_check_that_raises_fails_its_row_only_and_renders_nothing_for_it(tmp_path, exc, error):
    """(mutants: the resume check's exception escaped (the job stopped); the row rendered anyway; 'storage:' or the
    exception's type dropped from the row's error)"""
    cfg = _cfg()
    rows = _rows("a", "b", "c")
    key, _ = plan_key(rows[1], cfg)
    FakeBackend.calls.clear()
    recs = run_rows(rows, cfg, _opts(tmp_path), sink=_sink(tmp_path, get_raises=(sidecar_key(key), exc)))
    assert [(r.id, r.status) for r in recs] == [("a", "ok"), ("b", "failed"), ("c", "ok")]
    assert recs[1].error == error
    assert not (tmp_path / key).exists()
    assert sorted(j.text for call in FakeBackend.calls for j in call) == ["Words for a.", "Words for c."]


def test_an_invalid_row_is_never_listed_as_a_committed_output(tmp_path):
    """(mutant: invalid rows looked up too: on a resumed run a duplicate id with the same text was listed as
    the first row's reused output, ok, instead of failing with its own error)"""
    cfg = _cfg()
    rows = [*_rows("a"), Utterance(id="a", text="Words for a.", voice="vivian", error="duplicate id 'a'")]
    assert [r.status for r in run_rows(rows, cfg, _opts(tmp_path))] == ["ok", "failed"]
    again = run_rows(rows, cfg, _opts(tmp_path))
    assert again[0].reused and (again[1].status, again[1].error, again[1].reused) == ("failed", "duplicate id 'a'",
                                                                                       False)


@pytest.mark.parametrize("lookups_fail", [False, True], ids=["committed", "lookups-fail"])
def test_a_run_aborted_mid_job_keeps_what_finished_and_lists_committed_outputs(tmp_path, lookups_fail):
    """A write raising what is not a StorageError aborts the run. (mutants: the rows left marked "job aborted" over
    the records that had come back; the abort reason dropped; the exception escaping run_rows (no manifest); a
    row whose output was committed before the abort listed as aborted, or as reused, not from its sidecar; a lookup
    of committed outputs that fails stopping the job)"""
    cfg = _cfg()
    rows = _rows("a", "b", "c", "d")
    key, _ = plan_key(rows[2], cfg)
    sink = _sink(tmp_path, put_raises_after=sidecar_key(key), broken_after_put=lookups_fail)
    recs = run_rows(rows, cfg, _opts(tmp_path), sink=sink)
    assert [r.status for r in recs[:2]] == ["ok", "ok"] and not any(r.reused for r in recs)
    aborted = "job aborted: RuntimeError: write acknowledged, then the connection dropped"
    assert recs[3].status == "failed" and recs[3].error == aborted
    if lookups_fail:
        assert recs[2].status == "failed" and recs[2].error == aborted
    else:   # its audio and sidecar landed: it is done
        assert (recs[2].status, recs[2].error, recs[2].key) == ("ok", None, key)


class _Worker(FakeBackend):
    """What a Ray worker renders in the fake `_run_ray` below."""


def test_rows_committed_by_workers_whose_records_never_came_back_are_listed_from_their_sidecars(tmp_path,
                                                                                              monkeypatch):
    """A Ray run stopped after a worker committed a row but before its record reached the driver. (mutants: the
    committed row recorded as not rendered (rendered again next run); listed as reused; a row never rendered
    recorded without an error)"""
    cfg = _cfg()
    rows = _rows("a", "b")

    def fake_run_ray(pending, backend, cfg_, opts, out, stop, fence=None):
        be = runner.build_backend(opts.backend_args(backend, cfg_))
        render_rows(pending[:1], be, LocalSink(opts.output.removeprefix("file://")), cfg_, skip_existing=False)

    monkeypatch.setattr(runner, "connect_ray", lambda *a, **k: "existing")
    monkeypatch.setattr(runner, "_run_ray", fake_run_ray)
    recs = run_rows(rows, cfg, _opts(tmp_path, runner="ray"))
    assert (recs[0].status, recs[0].reused, recs[0].error) == ("ok", False, None)
    assert (recs[1].status, recs[1].error) == ("failed", NOT_RENDERED)


# ---- layout.py: package names and files --------------------------------------------------------------------------

def test_no_layout_is_the_none_layout():
    """(mutant: None refused: a caller that passes no layout got 'layout must be one of')"""
    assert layout.check_layout(None) == "none" and layout.check_layout("") == "none"


def test_the_asterisk_master_keeps_the_tail_silence_asked_for():
    """(mutant: the telephony master made for --layout asterisk dropped --tail-silence)"""
    m = mastering.MasterConfig("telephony", None, 0.7)
    assert layout.master_for("asterisk", m) == mastering.MasterConfig("telephony", "sln16", 0.7)
    assert layout.master_for("none", m) is m


@pytest.mark.parametrize("pid, name", [("  vm   intro  ", "vm-intro"), ("a/b/c/d", "a/b/c/d"),
                                       (" menu / sub menu ", "menu/sub-menu"), ("x" * 64, "x" * 64)])
def test_safe_name_trims_and_joins_whitespace_and_allows_three_subfolders(pid, name):
    """(mutants: each whitespace character its own '-' ('vm---intro'); components not trimmed (' vm' refused: a
    '-' first); `> 4` as `>= 4`: three subfolders refused)"""
    assert layout.safe_name(pid) == name


def test_the_language_name_is_matched_ignoring_case():
    """(mutant: 'German' went under en/, the wrong language folder of the PBX)"""
    assert [layout.lang_code(x) for x in ("German", "FRENCH", None, "klingon")] == ["de", "fr", "en", "en"]


def test_check_rows_says_layout_and_allows_one_name_in_two_languages():
    """(mutants: the row's error without 'layout: '; the language left out of the collision rule (welcome in en
    and Welcome in fr are two files, in two folders))"""
    rows = [Utterance(id="welcome", text="Hi.", language="english"),
            Utterance(id="Welcome", text="Salut.", language="french"),
            Utterance(id="bad*id", text="x"), Utterance(id="WELCOME", text="Hi again.", language="english")]
    out = layout.check_rows(rows)
    assert [r.error for r in out[:2]] == [None, None]
    assert out[2].error.startswith("layout: id 'bad*id' cannot be a file name")
    assert out[3].error == "layout: id 'WELCOME' maps to the same file name as 'welcome' (WELCOME)"


def test_a_package_level_exactly_at_the_tolerance_is_not_flagged():
    """(mutant: `> tol` as `>= tol`)"""
    target, tol = mastering.TELEPHONY["level_target_dbm0"], mastering.TELEPHONY["level_tolerance"]
    assert layout._level_flags({"ulaw": target + tol, "alaw": target - tol}) == []
    assert layout._level_flags({"ulaw": target + tol + 0.01}) == ["layout:ulaw:speech_level"]


@pytest.mark.parametrize("dbm0", [{"mp3": -19.0}, {"ulaw": float("nan")}, {"ulaw": float("inf")}, {"ulaw": True}])
def test_stored_levels_that_this_job_does_not_write_make_the_files_written_again(dbm0):
    """The index is read back from storage, not trusted. (mutants: a codec name not of the layout, a non-finite
    level, a bool level taken as the kept files' levels)"""
    assert layout._kept_levels({"master": "m", "dbm0": dbm0}, "m") is None
    assert layout._kept_levels({"master": "m", "dbm0": {"ulaw": -19.0, "alaw": None}}, "m") == {"ulaw": -19.0,
                                                                                                 "alaw": None}


def _master(sink: LocalSink, pid: str, status: str = "ok") -> ManifestRecord:
    """A prompt's 16 kHz telephony master (noise at a speech-like level) written at its key."""
    rng = np.random.default_rng(7)
    pcm = (0.1 * rng.standard_normal(16000)).astype(np.float32)
    key = f"prompts/{pid.replace('/', '_')}-0123456789abcdef0123.wav"
    sink.put(key, audio.encode(pcm, 16000, "wav"))
    return ManifestRecord(id=pid, key=key, status=status, language="english")


def test_a_kept_package_with_a_file_gone_is_written_again_and_a_suspect_prompt_gets_one(tmp_path):
    """(mutants: a prompt whose index entry matched its master was kept although one of its files had been deleted
    (the PBX played nothing); a suspect prompt (written, flagged) given no package files)"""
    sink = LocalSink(str(tmp_path))
    rec = _master(sink, "welcome", status="suspect")
    rows = [Utterance(id="welcome", text="x", language="english")]
    assert layout.write_packages([rec], rows, sink) == {"written": 1, "kept": 0}
    assert all((tmp_path / k).is_file() for k in rec.layout) and len(rec.layout) == 4
    (tmp_path / rec.layout[1]).unlink()
    again = ManifestRecord(id="welcome", key=rec.key, status="ok", language="english")
    assert layout.write_packages([again], rows, sink) == {"written": 1, "kept": 0}
    assert (tmp_path / rec.layout[1]).is_file()
    third = ManifestRecord(id="welcome", key=rec.key, status="ok", language="english")
    assert layout.write_packages([third], rows, sink) == {"written": 0, "kept": 1}


def test_a_prompt_whose_master_is_gone_is_flagged_not_packaged(tmp_path):
    """(mutant: the flag dropped: the prompt stayed ok with package files listed that were never written)"""
    sink = LocalSink(str(tmp_path))
    rec = ManifestRecord(id="welcome", key="prompts/welcome-0123456789abcdef0123.wav", status="ok",
                         language="english")
    counts = layout.write_packages([rec], [Utterance(id="welcome", text="x", language="english")], sink)
    assert counts == {"written": 0, "kept": 0} and rec.status == "suspect" and rec.flags == ["layout:missing_master"]
    assert not (tmp_path / "asterisk/ulaw").exists()


def test_an_unreadable_index_leaves_retired_packages_listed_as_a_failed_delete(tmp_path):
    """(mutants: the retired prompts got no error (the pass said nothing about files it could not delete); the
    count of failed deletes 0 (exit 0))"""
    class Sink(LocalSink):
        def get(self, key):
            if key == layout.INDEX_KEY:
                raise StorageError("get asterisk/index.json failed: AccessDenied")
            return super().get(key)

    files = [layout.package_key(c, "en", "bye") for c in layout.ASTERISK_CODECS]
    gone = ManifestRecord(id="bye", key="k", status="retired", error=retire.PENDING, layout=list(files))
    done = ManifestRecord(id="old", key="k2", status="retired", error=retire.DELETED)
    assert layout.remove_packages([gone, done], Sink(str(tmp_path))) == 1
    assert gone.error == "retired: delete failed: get asterisk/index.json failed: AccessDenied"
    assert gone.layout == files and done.error == retire.DELETED


def test_retiring_a_prompt_whose_name_has_a_dot_drops_its_own_index_entry(tmp_path):
    """(mutant: the index entry of asterisk/<c>/sounds/en/v1.2.<ext> taken as en/v1: en/v1.2 stayed in the index)"""
    sink = LocalSink(str(tmp_path))
    recs = [_master(sink, "v1.2"), _master(sink, "v1")]
    rows = [Utterance(id=r.id, text="x", language="english") for r in recs]
    assert layout.write_packages(recs, rows, sink)["written"] == 2
    recs[0].status = "retired"
    assert layout.remove_packages(recs, sink) == 0
    index = json.loads((tmp_path / layout.INDEX_KEY).read_text())
    assert sorted(index) == ["en/v1"] and recs[0].layout == []


# ---- retire.py: what a pass deletes --------------------------------------------------------------------------

def _objects(sink: LocalSink, key: str) -> list[str]:
    """An output with its sidecar and captions, written."""
    keys = [key, sidecar_key(key), *caption_keys(key)]
    for k in keys:
        sink.put(k, b"x")
    return keys


def test_a_superseded_version_goes_with_its_sidecar_and_captions_and_the_pass_says_it_changed(tmp_path):
    """(mutants: only the audio deleted (its sidecar and captions left in storage, unlisted for ever); purge
    reporting no change after emptying a record's previous_keys (the manifest kept listing deleted objects))"""
    sink = LocalSink(str(tmp_path))
    old = content_key({"x": 0}, "welcome", "wav", "prompts")
    left = _objects(sink, old)
    rec = ManifestRecord(id="welcome", key=content_key({"x": 1}, "welcome", "wav", "prompts"), status="ok",
                         previous_keys=[old])
    assert retire.purge([rec], sink, [], "prompts") == (0, True, 0)
    assert rec.previous_keys == [] and not any((tmp_path / k).exists() for k in left)


def test_a_retired_record_with_nothing_left_is_not_processed_again(tmp_path):
    """(mutant: a done record run through the deletes again: its refused key counted again on every pass)"""
    deleted = []

    class Sink(LocalSink):
        def delete(self, key):
            deleted.append(key)

    rec = ManifestRecord(id="x", key="../outside.wav", status="retired",
                         error=retire.refused_error("../outside.wav", "not an output"))
    assert retire.purge([rec], Sink(str(tmp_path)), [], "prompts") == (0, False, 0) and deleted == []


def test_a_refused_key_is_cut_in_the_records_error():
    """(mutant: the whole key in the error: a stored key of any length copied into every later manifest)"""
    assert retire.refused_error("k" * 300, "why") == f"{retire.REFUSED}: {'k' * 200!r} is why"


def test_a_key_beside_the_prefix_folder_is_refused():
    """(mutant: `startswith(prefix)` without the '/': 'prompts_old-<hash>.wav' at the output's root, a file of the
    shape this job writes but not in its folder, was deletable)"""
    key = content_key({"x": 1}, "welcome", "wav", "prompts")
    assert retire.refusal(key, "prompts") is None
    for bad in (key.replace("prompts/", "prompts_"), key.replace("prompts/", "promptsX"),
                key.replace("prompts/", "prompts-old-")):
        assert retire.refusal(bad, "prompts") == "not an output this job writes (prompts/<id>-<20 hex>.<ext>)", bad


def test_an_unknown_retire_mode_is_refused():
    """(mutant: the mode check dropped: 'purge' classified as a delete pass)"""
    with pytest.raises(ValueError, match=r"retire must be one of \['mark', 'delete'\], got 'purge'"):
        retire.reconcile([], [], "purge")


def _key(n: int, stem: str = "welcome") -> str:
    return content_key({"x": n}, stem, "wav", "prompts")


@pytest.mark.parametrize("left", ["previous_keys", "layout"])
def test_a_retired_record_is_kept_while_it_still_lists_something_to_delete(left):
    """(mutants: a retired record whose own object is gone dropped by a delete pass although earlier versions
    (previous_keys) or package files (layout) were still listed: those stayed in storage, unlisted for ever)"""
    rest = {"previous_keys": [_key(0, "bye")]} if left == "previous_keys" else {
        "layout": [layout.package_key("ulaw", "en", "bye")]}
    bye = ManifestRecord(id="bye", key=_key(1, "bye"), status="retired", error=retire.DELETED, **rest)
    out, counts = retire.reconcile([], [bye], "delete")
    assert out == [bye] and counts["retired"] == 0
    done = ManifestRecord(id="old", key=_key(2, "old"), status="retired", error=retire.DELETED)
    assert retire.reconcile([], [done], "delete")[0] == []


def test_a_failed_prompt_carries_the_deletes_its_last_record_still_listed():
    """(mutant: only the last written key carried: the versions the previous record listed to delete (a pass
    stopped before its deletes) were dropped from every record, never deleted)"""
    old = ManifestRecord(id="welcome", key=_key(1), status="ok", previous_keys=[_key(0)])
    now = ManifestRecord(id="welcome", key=_key(2), status="failed", error="boom")
    retire.reconcile([now], [old], "delete")
    assert now.previous_keys == [_key(1), _key(0)]


def test_counts_and_superseded_versions_by_retire_mode():
    """(mutants: a prompt rendered again at the same key (its object had gone) counted as unchanged; a "mark" pass
    listing the superseded version for deletion (mark deletes nothing); a "mark" pass dropping retired records
    whose deletes were done by an earlier delete pass; a prompt that left under "mark" said delete pending)"""
    old = ManifestRecord(id="a", key=_key(1, "a"), status="ok")
    again = ManifestRecord(id="a", key=_key(1, "a"), status="ok", reused=False)
    assert retire.reconcile([again], [old], "mark")[1]["changed"] == 1
    same = ManifestRecord(id="a", key=_key(1, "a"), status="ok", reused=True)
    assert retire.reconcile([same], [old], "mark")[1]["unchanged"] == 1
    for mode, listed in (("mark", []), ("delete", [_key(1, "a")])):
        new = ManifestRecord(id="a", key=_key(2, "a"), status="ok")
        retire.reconcile([new], [ManifestRecord(id="a", key=_key(1, "a"), status="ok")], mode)
        assert new.previous_keys == listed, mode
    done = ManifestRecord(id="old", key=_key(2, "old"), status="retired", error=retire.DELETED)
    assert retire.reconcile([], [done], "mark")[0] == [done]
    for mode, error in (("mark", None), ("delete", retire.PENDING)):
        gone = ManifestRecord(id="b", key=_key(3, "b"), status="ok")
        assert retire.reconcile([], [gone], mode)[1]["retired"] == 1
        assert (gone.status, gone.error) == ("retired", error), mode
