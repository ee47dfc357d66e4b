"""Review of the scheduled catalog passes, stopping and leases (user, attacker, crash): each test failed on the code
before its fix. Fakes where real Ray is not the point; moto_server for the S3 lease."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import yaml

from jobs import catalog, lease, runner
from jobs.inputs import Utterance
from jobs.render import RenderConfig
from jobs.storage import S3Sink
from tests.jobs.fakes import FakeBackend

FAKE = "tests.jobs.fakes:FakeBackend"


def _take_lease(sink: S3Sink) -> None:
    """Another run takes the output's lease over (its token in the lease object)."""
    sink.client.put_object(Bucket=sink.bucket, Key=sink._k(lease.LEASE_KEY),
                           Body=json.dumps({"host": "other", "pid": 2, "token": "theirs"}).encode())


def test_a_lease_lost_mid_batch_is_a_stop_every_row_left_is_not_rendered_and_nothing_is_written(s3_bucket):
    """Review item (a): lease loss was special-cased (render_batch's isinstance(FencedSink) check before a batch)
    beside the stop path. A lease lost during a batch's backend call left each row of the batch to find out on
    its own write: every row failed with 'storage: lost the catalog lease' (a storage failure, with one lease read
    per row), not recorded as not rendered. Now a lost lease is a stop on the one path: no write and no backend
    call after it, every row not finished 'not rendered' naming the loss, and the next batch makes no call."""
    sink = S3Sink(s3_bucket, "ivr")
    cfg = RenderConfig(model="fake", revision="r1")
    rows = [Utterance(id=f"p{i}", text=f"Prompt number {i}.", voice="ryan") for i in range(3)]

    class TakenOver(FakeBackend):
        n = 0

        def synthesize(self, jobs):
            self.n += 1
            _take_lease(sink)
            return super().synthesize(jobs)

    with lease.hold(sink) as held:
        fenced = lease.fenced(S3Sink(s3_bucket, "ivr"), held.fence())
        be, seen = TakenOver(), []
        recs = runner.render_batch(rows, be, fenced, cfg, seen.append)
        assert be.n == 1
        assert [k for k in sink.list() if k.startswith("audio/")] == []
        assert all(r.status == "failed" and r.error.startswith("not rendered: lost the catalog lease")
                   for r in recs), [r.error for r in recs]
        again = runner.render_batch(rows, be, fenced, cfg, seen.append)
        assert be.n == 1 and all(r.error.startswith("not rendered: lost the catalog lease") for r in again)


@pytest.mark.parametrize("every", [None, "1h"])
def test_a_one_off_pass_stopped_before_it_started_exits_1(tmp_path, capsys, monkeypatch, every):
    """A SIGTERM that arrived while the command started (reading its config, before the pass began) skipped the
    pass loop, and a single pass (a Job/CronJob) exited 0 with nothing regenerated and no summary: read as
    succeeded. Now it exits 1 as a pass stopped mid-render does; --every still ends its schedule with 0."""
    monkeypatch.setattr(runner, "_stop", None)   # (a process-wide event: a fresh one for this run)
    handler = signal.getsignal(signal.SIGTERM)
    real = catalog.load_config

    def load_config(path, *args):
        runner.stop_on_sigterm().set()   # SIGTERM during start-up
        return real(path, *args)

    monkeypatch.setattr(catalog, "load_config", load_config)
    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"}, "prompts": [{"id": "p0", "text": "Prompt."}]}))
    try:
        code = catalog.main([str(cat), "--model", "m", "--out", f"file://{tmp_path / 'out'}", "--backend", FAKE,
                             "--runner", "local", "--no-progress", "--quiet", *(["--every", every] if every else [])])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert code == (0 if every else 1) and not (tmp_path / "out" / "prompts").exists()
    assert ("stopped by SIGTERM before the pass began" in capsys.readouterr().err) == (every is None)


@pytest.mark.parametrize("started", ["in-a-terminal", "in-the-background"])
def test_ctrl_c_stops_a_pass_as_sigterm_does(tmp_path, capsys, monkeypatch, started):
    """SIGINT (Ctrl-C in the terminal that runs `qtts catalog --every 1h`, or `docker stop` of an image whose stop
    signal is SIGINT) raised KeyboardInterrupt wherever the pass was: a traceback, exit 130, no summary. Now it
    stops the pass as SIGTERM does (the call in flight finishes, nothing more is started, the summary says
    stopped, exit 1); a second one leaves at once."""
    monkeypatch.setattr(runner, "_stop", None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # Python's own handler, as in a terminal; or ignored, as a background `cmd &` inherits it (the runner then leaves
    # SIGINT alone: the pass runs on). Set here: the test run itself may have been started either way.
    background = started == "in-the-background"
    signal.signal(signal.SIGINT, signal.SIG_IGN if background else signal.default_int_handler)

    class CtrlC(FakeBackend):
        n = 0

        def synthesize(self, jobs):
            self.n += 1
            if self.n == 1:
                os.kill(os.getpid(), signal.SIGINT)
            return super().synthesize(jobs)

    be = CtrlC()
    monkeypatch.setattr(runner, "build_backend", lambda args: be)
    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"},
                                   "prompts": [{"id": f"p{i}", "text": f"Prompt {i}."} for i in range(4)]}))
    try:
        code = catalog.main([str(cat), "--model", "m", "--out", f"file://{tmp_path / 'out'}", "--backend", FAKE,
                             "--runner", "local", "--no-progress", "--quiet", "--batch-size", "1"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    if background:
        assert code == 0 and summary["ok"] == 4 and be.n == 4, summary
        return
    assert code == 1 and summary["stopped"] is True and summary["rendered_before_stop"] == 1, summary
    assert be.n == 1 and not (tmp_path / "out" / catalog.MANIFEST_KEY).exists()


def test_an_every_too_long_to_wait_is_refused_before_the_first_pass(tmp_path, capsys, monkeypatch):
    """`--every 200000000d` (a typo) was taken: the first pass ran, then the wait for the next one raised
    OverflowError (beyond what threading can wait): a traceback after a pass that had succeeded. Now an interval
    longer than threading.TIMEOUT_MAX is an option error, exit 2, before anything is done."""
    monkeypatch.setattr(runner, "_stop", None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"}, "prompts": [{"id": "p0", "text": "Prompt."}]}))
    try:
        code = catalog.main([str(cat), "--model", "m", "--out", f"file://{tmp_path / 'out'}", "--backend", FAKE,
                             "--runner", "local", "--no-progress", "--quiet", "--every", "200000000d"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert code == 2 and "every" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_errors_ray_pushes_to_the_driver_never_follow_the_summary_on_stdout(monkeypatch, capsys):
    """Found by /tmp/h3/ray_stop.sh: after SIGTERM the Ray driver printed '(raylet) Task MapWorker(...).submit
    failed ... will be retried' (the tasks of the workers the stop killed) on stdout, before and after the JSON
    summary, which jobs/README.md promises as the last stdout line: Ray prints the errors its cluster pushes to a
    driver on stdout whatever log_to_driver says. A connected driver now prints them on stderr."""
    import ray
    from ray._private import worker

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)   # (put back after the test)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    runner.connect_ray(None)
    worker.print_to_stdstream({"lines": ["Task X.submit failed. There are 18 retries remaining"], "pid": "raylet",
                               "is_err": False}, ignore_prefix=False)
    got = capsys.readouterr()
    assert "submit failed" not in got.out and "submit failed" in got.err


def test_a_pass_that_loses_its_lease_while_deleting_deletes_and_writes_nothing_more(s3_bucket, tmp_path, capsys,
                                                                                    monkeypatch):
    """The fence covered the writes of rendering only: a --retire delete pass deleted retired objects through the
    plain sink, checking its lease once before all the deletes and only as it knew it (its renewals), never as the
    store had it. A pass paused mid-purge past its lease's TTL (SIGSTOP, a VM pause) and taken over resumed
    deleting behind the new owner's back (an object the new owner's manifest may list), then rewrote the manifest
    over the new owner's. Now each delete checks the lease in the store, and so does the pass before each manifest
    write: nothing is deleted or written after the takeover, exit 1 with lease_lost."""
    out = f"s3://{s3_bucket}/ivr"
    sink = S3Sink(s3_bucket, "ivr")
    cat = tmp_path / "ivr.yaml"

    def run(ids):
        cat.write_text(yaml.safe_dump({"name": "ivr", "defaults": {"voice": "ryan"},
                                       "prompts": [{"id": i, "text": f"Prompt {i}."} for i in ids]}))
        code = catalog.main([str(cat), "--model", "m", "--out", out, "--backend", FAKE, "--runner", "local",
                             "--no-progress", "--quiet", "--retire", "delete"])
        return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    monkeypatch.setattr(runner, "_stop", None)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert run(["a", "b", "c"])[0] == 0
        real, after = S3Sink.delete, []

        def delete(self, key):
            if after:
                after.append(key)
            real(self, key)
            if key.startswith("prompts/") and not after:   # the first retired object goes; then the takeover
                _take_lease(sink)
                after.append(sink.get(catalog.MANIFEST_KEY))

        monkeypatch.setattr(S3Sink, "delete", delete)
        code, summary = run(["a"])
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    manifest_at_takeover, deleted_after = after[0], after[1:]
    assert deleted_after == [], deleted_after
    assert sink.get(catalog.MANIFEST_KEY) == manifest_at_takeover      # the new owner's to write now
    assert code == 1 and "lost the catalog lease" in summary["lease_lost"], summary
    assert json.loads(sink.get(lease.LEASE_KEY))["token"] == "theirs"


def test_a_renewal_that_did_not_reach_the_store_is_tried_again_soon(s3_bucket, monkeypatch):
    """A lease renewal that failed (an S3 503 past botocore's retries, a network blip of a second) was tried again
    only a third of the TTL later, when the lease is two thirds old: the threshold at which every write's fence
    check refuses it (the store's clock has whole seconds), so one failed renewal cost the pass the rows written
    around that moment, or the whole pass if its own check fell there. Now it is tried again within a tenth of
    the interval: here (TTL 4.5 s, renewals every 1.5 s, failed once at 1.5 s) the lease is renewed well before
    it is 3 s old."""
    real, failed = lease._S3Lease._put, []

    def put(self, **cond):
        if "IfMatch" in cond and not failed:
            failed.append(time.monotonic())
            raise ConnectionError("Could not connect to the endpoint URL")
        return real(self, **cond)

    monkeypatch.setattr(lease._S3Lease, "_put", put)
    sink = S3Sink(s3_bucket, "ivr")
    with lease.hold(sink, ttl_s=4.5) as held:
        start = time.monotonic()
        time.sleep(2.6)
        assert failed and time.monotonic() - held.renewed_at < 1.0, (failed[0] - start, held.renewed_at - start)
        held.check()
        lease.check_writes(lease.fenced(S3Sink(s3_bucket, "ivr"), held.fence()))
