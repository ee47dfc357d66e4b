"""The render pipeline in one process with a fake backend: resume, failures, retries, quality, keys."""

import json

import pyarrow.parquet as pq
import pytest

from jobs import narrate
from jobs.audio import decode
from jobs.inputs import RowDefaults, Utterance
from jobs.manifest import from_parquet
from jobs.render import RenderConfig, plan_key
from jobs.runner import RunOptions, run_rows

FAKE = "tests.jobs.fakes:FakeBackend"


def _run(rows, out, **kw):
    cfg = RenderConfig(model="fake-model", revision="r1", max_chars=40, pause_s=0.25, max_attempts=2)
    opts = RunOptions(output=f"file://{out}", backend=FAKE, runner="local", progress=False, batch_size=2, **kw)
    return run_rows(rows, cfg, opts), cfg


def test_chapters_are_chunked_joined_and_resumed(tmp_path):
    from tests.jobs.fakes import FakeBackend

    text = "First sentence here. Second one is also here. And a third to finish the chapter."
    rows = [Utterance(id="ch1", text=text, voice="vivian", seed=5), Utterance(id="ch2", text="Short.",
                                                                             voice="ryan")]
    FakeBackend.calls.clear()
    recs, cfg = _run(rows, tmp_path)
    assert [r.status for r in recs] == ["ok", "ok"], [r.error for r in recs]
    assert recs[0].num_chunks == 3 and recs[0].attempts == 1
    # one backend call per batch; all chunks of a chapter share voice and seed
    jobs = FakeBackend.calls[0]
    assert {(j.voice, j.seed) for j in jobs if j.voice == "vivian"} == {("vivian", 5)}
    pcm, sr = decode((tmp_path / recs[0].key).read_bytes())
    chars = sum(len(c) for c in ["First sentence here.", "Second one is also here.",
                                 "And a third to finish the chapter."])
    assert sr == 24000 and abs(len(pcm) - (int(1440 * chars) + 2 * 6000)) < 200  # chunks + 2 pauses
    # re-run: nothing synthesized again, same keys, reused
    FakeBackend.calls.clear()
    again, _ = _run(rows, tmp_path)
    assert FakeBackend.calls == [] and all(r.reused for r in again)
    assert [r.key for r in again] == [r.key for r in recs]
    # a changed text gets a new key; the other row is reused
    rows[1] = Utterance(id="ch2", text="Short, but changed.", voice="ryan")
    third, _ = _run(rows, tmp_path)
    assert third[0].reused and not third[1].reused and third[1].key != recs[1].key


def test_bad_rows_are_recorded_not_fatal(tmp_path):
    rows = [Utterance(id="ok", text="Fine.", voice="vivian"),
            Utterance(id="bad-voice", text="Hello.", voice="nobody"),
            Utterance(id="runaway", text="RUNAWAY once.", voice="ryan"),
            Utterance(id="forever", text="FOREVER loops.", voice="ryan"),
            Utterance(id="empty", text="", error="field 'text' must be a non-empty string")]
    recs, _ = _run(rows, tmp_path)
    by = {r.id: r for r in recs}
    assert by["ok"].status == "ok"
    assert by["bad-voice"].status == "failed" and "unknown speaker" in by["bad-voice"].error
    assert by["runaway"].status == "ok" and by["runaway"].attempts == 2
    assert by["forever"].status == "failed" and "runaway guard" in by["forever"].error \
        and by["forever"].attempts == 2
    assert by["empty"].status == "failed" and by["empty"].key is None
    assert len(list(tmp_path.glob("audio/*.wav"))) == 2


def test_partial_output_without_sidecar_is_redone(tmp_path):
    rows = [Utterance(id="a", text="Some words.", voice="vivian")]
    cfg = RenderConfig(model="fake-model", revision="r1", max_chars=40, pause_s=0.25, max_attempts=2)
    key, _ = plan_key(rows[0], cfg)
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(b"RIFF-truncated")  # a crash between audio and sidecar
    recs, _ = _run(rows, tmp_path)
    assert recs[0].status == "ok" and not recs[0].reused and recs[0].key == key
    assert json.loads((tmp_path / f"{key}.json").read_text())["bytes"] == (tmp_path / key).stat().st_size


def test_telephony_format_and_rate(tmp_path):
    rows = [Utterance(id="ivr", text="Press one.", voice="ryan", format="wav-ulaw", sample_rate=8000)]
    recs, _ = _run(rows, tmp_path)
    pcm, sr = decode((tmp_path / recs[0].key).read_bytes())
    assert sr == 8000 and recs[0].sample_rate == 8000 and abs(len(pcm) / 8000 - recs[0].duration_s) < 1e-3


def test_narrate_cli_local_exit_codes_and_manifest(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join([json.dumps({"id": "a", "text": "Hello.", "voice": "vivian"}),
                               json.dumps({"id": "b", "text": "Hi.", "voice": "nobody"}), "{oops"]))
    out = tmp_path / "out"
    code = narrate.main([str(rows), "--model", "fake", "--out", f"file://{out}", "--backend", FAKE,
                         "--runner", "local", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary["failed"] == 2 and summary["ok"] + summary["suspect"] == 1
    man = from_parquet((out / "manifest.parquet").read_bytes())
    assert sorted(r.id for r in man) == ["a", "b", "rows.jsonl:3"]
    cols = pq.read_table(out / "manifest.parquet").column_names
    for c in ("id", "key", "duration_s", "sample_rate", "model", "voice", "params", "text_hash", "status",
              "error", "attempts", "flags"):
        assert c in cols
    # missing input: clear error, exit 2, nothing written
    assert narrate.main([str(tmp_path / "none.txt"), "--model", "fake", "--out", str(tmp_path / "o2"),
                         "--runner", "local"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_defaults_fill_rows():
    assert RowDefaults().format == "wav"
    with pytest.raises(ValueError, match="max_attempts"):
        RenderConfig(model="m", max_attempts=0)


def test_storage_failure_mid_job_is_recorded_and_retried_next_run(tmp_path):
    from jobs.storage import LocalSink, RetryPolicy, StorageError

    class BrokenForOneRow(LocalSink):
        def put(self, key, data, content_type="application/octet-stream"):
            if "/doomed-" in key:
                raise StorageError(f"put {key} failed after 4 attempt(s): SlowDown")
            super().put(key, data, content_type)

    rows = [Utterance(id="fine", text="Fine.", voice="vivian"), Utterance(id="doomed", text="Hi.", voice="ryan")]
    cfg = RenderConfig(model="fake-model", revision="r1", max_chars=40)
    opts = RunOptions(output=f"file://{tmp_path}", backend=FAKE, runner="local", progress=False)
    recs = run_rows(rows, cfg, opts, sink=BrokenForOneRow(str(tmp_path), RetryPolicy(attempts=1)))
    by = {r.id: r for r in recs}
    assert by["fine"].status == "ok"
    assert by["doomed"].status == "failed" and by["doomed"].error.startswith("storage:")
    again = run_rows(rows, cfg, opts)  # storage healthy again: only the failed row is rendered
    assert [r.reused for r in again] == [True, False] and again[1].status == "ok"


class _PoisonFake:
    """FakeBackend whose whole call raises when one of its chunks has POISON in it (an input the backend chokes on);
    `down`: every call raises (a backend that is down)."""

    def __init__(self, down=False):
        from tests.jobs.fakes import FakeBackend

        self.fake, self.down, self.calls = FakeBackend(), down, []

    def synthesize(self, jobs):
        self.calls.append([j.text for j in jobs])
        if self.down or any("POISON" in j.text for j in jobs):
            raise RuntimeError("backend crashed on a bad input")
        return self.fake.synthesize(jobs)


def test_a_row_whose_call_raises_fails_alone_not_its_batch_mates(tmp_path):
    """Review: a backend call that raised failed every row of the batch with its error, and a re-run built the same
    batch, so the innocent rows failed on every run. Each row is sent again alone; only the poison row fails."""
    from jobs.render import render_rows
    from jobs.storage import open_sink

    cfg = RenderConfig(model="fake-model", revision="r1", max_chars=40, pause_s=0.25, max_attempts=2)
    rows = [Utterance(id=f"r{i}", text=f"Plain sentence number {i}. And a second one here.", voice="ryan")
            for i in range(4)]
    rows[1] = Utterance(id="r1", text="POISON here. And then more words.", voice="ryan")
    rows[2] = Utterance(id="r2", text="RUNAWAY once, retried with another seed.", voice="ryan")
    be = _PoisonFake()
    recs = render_rows(rows, be, open_sink(f"file://{tmp_path}"), cfg)
    by = {r.id: r for r in recs}
    assert by["r1"].status == "failed" and "backend crashed" in by["r1"].error
    assert all(by[i].status == "ok" for i in ("r0", "r2", "r3")), [r.error for r in recs]
    assert by["r2"].attempts == 2 and (tmp_path / by["r0"].key).exists()
    # the batch call, then each of its 4 rows alone (a row's chunks together), then the runaway chunk's retry
    assert len(be.calls) == 6 and sorted(len(c) for c in be.calls[1:5]) == [1, 1, 2, 2]
    # a backend down entirely: one more failing call per row, no retries
    down = _PoisonFake(down=True)
    recs = render_rows([Utterance(id=f"d{i}", text=f"Down {i}.", voice="ryan") for i in range(4)], down,
                       open_sink(f"file://{tmp_path / 'down'}"), cfg)
    assert all(r.status == "failed" and "backend crashed" in r.error for r in recs) and len(down.calls) == 5


class _StoppedDuringCall(_PoisonFake):
    """_PoisonFake during whose first call SIGTERM arrives (the job's stop event is set)."""

    def __init__(self, stop, down=False):
        super().__init__(down)
        self.stop = stop

    def synthesize(self, jobs):
        self.stop.set()
        return super().synthesize(jobs)


@pytest.mark.parametrize("text", ["POISON here.", "RUNAWAY once, retried with another seed."])
def test_a_stop_during_a_batch_call_makes_no_more_backend_calls_and_loses_no_row(tmp_path, monkeypatch, text):
    """Review: the row-by-row re-send of a failed batch call (and a runaway's retry) ignored the stop event: SIGTERM
    waited for one more backend call per row of the batch (each may be a long text on a busy Serve app) and then
    wrote rows rendered after the stop. Now no backend call is made once it is set; a row not finished is not
    written and is recorded as not rendered (not failed with its batch's error), and the next run renders it."""
    import threading

    from jobs import runner

    stop, not_rendered = threading.Event(), "not rendered: the job was stopped before this row finished"
    cfg = RenderConfig(model="fake-model", revision="r1", max_chars=40, pause_s=0.25, max_attempts=2)
    opts = RunOptions(output=f"file://{tmp_path}", backend=FAKE, runner="local", progress=False, batch_size=4)
    rows = [Utterance(id=f"r{i}", text=f"Plain sentence number {i}.", voice="ryan") for i in range(4)]
    rows[1] = Utterance(id="r1", text=text, voice="ryan")
    be = _StoppedDuringCall(stop)
    with monkeypatch.context() as m:
        m.setattr(runner, "build_backend", lambda args: be)
        recs = run_rows(rows, cfg, opts, stop=stop)
    assert len(be.calls) == 1                                  # the call SIGTERM arrived in, and none after it
    by = {r.id: r for r in recs}
    if "POISON" in text:    # the batch call failed: no row was rendered, none is failed with the batch's error
        assert all(r.error.startswith(not_rendered) for r in recs), [r.error for r in recs]
        assert not list(tmp_path.glob("**/*.wav"))
    else:                   # the runaway is not retried; the rows the call rendered are committed
        assert by["r1"].error.startswith(not_rendered) and not list(tmp_path.glob("**/r1-*"))
        assert all(by[i].status == "ok" and (tmp_path / by[i].key).exists() for i in ("r0", "r2", "r3"))
    again = run_rows(rows, cfg, opts)                          # nothing lost: the next run renders the rest
    assert all(r.status == "ok" for r in again), [r.error for r in again]
    assert [r.reused for r in again] == ([False] * 4 if "POISON" in text else [True, False, True, True])
