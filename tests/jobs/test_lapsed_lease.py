"""A catalog pass whose S3 lease lapses while it renders writes nothing more: the pass that took the output over
must never find an object written behind its back (after it journalled, reconciled or deleted what it saw). Real
HTTP S3 (moto_server); the lease's TTL is shrunk through its `ttl_s` parameter."""

from __future__ import annotations

import contextlib
import json
import pickle
import threading
import time

import pytest
import yaml

from jobs import catalog, lease, runner
from jobs.storage import S3Sink
from tests.jobs.fakes import FakeBackend

# renewals every 1.5 s; the pass counts its lease lost at 3 s; another pass takes it over at 4.5 s (the store
# stamps whole seconds: a shorter TTL would read a healthy lease as two thirds old)
TTL = 4.5


def _keys(sink: S3Sink) -> list[str]:
    return sink.list()


def test_a_pass_whose_lease_lapses_mid_render_writes_nothing_more_and_exits_1(tmp_path, capsys, monkeypatch,
                                                                               s3_bucket):
    """Review suspicion, reproduced: run_rows never looked at the lease. A pass whose renewals stopped reaching the
    store (a partition, a paused process) kept rendering after another pass had taken the output over, writing
    every later row's object and sidecar behind that pass's back (one it had reconciled and deleted from its
    journal would stay listed by no manifest), then exited 2 ("did nothing"). Now every write checks the lease: no
    object after the takeover, no backend call after it, no manifest, no delete, the journal and the other pass's
    lease left alone, exit 1 with `lease_lost`."""
    cat = tmp_path / "ivr.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"},
                                   "prompts": [{"id": f"p{i}", "text": f"Prompt number {i}."} for i in range(4)]}))
    real_hold, real_put = lease.hold, lease._S3Lease._put
    leases, stalled, theirs = [], threading.Event(), contextlib.ExitStack()

    def hold(sink, **kw):
        return real_hold(sink, **{**kw, "ttl_s": TTL})

    def put(self, **cond):   # the pass's own lease (the first one made) stops reaching the store once stalled
        if not leases:
            leases.append(self)
        if stalled.is_set() and self is leases[0]:
            raise ConnectionError("Could not connect to the endpoint URL")
        return real_put(self, **cond)

    class TakenOverDuringTheSecondCall(FakeBackend):
        def __init__(self):
            self.n, self.other = 0, None

        def synthesize(self, jobs):
            self.n += 1
            if self.n == 2:   # the lease lapses during this call, and another pass takes the output over
                stalled.set()
                deadline = time.monotonic() + 20
                while self.other is None:
                    try:
                        self.other = theirs.enter_context(real_hold(S3Sink(s3_bucket, "ivr"), ttl_s=TTL))
                    except lease.LeaseHeld:
                        assert time.monotonic() < deadline, "the stalled lease was never taken over"
                        time.sleep(0.2)
            return super().synthesize(jobs)

    backend = TakenOverDuringTheSecondCall()
    monkeypatch.setattr(lease, "hold", hold)
    monkeypatch.setattr(lease._S3Lease, "_put", put)
    monkeypatch.setattr(runner, "build_backend", lambda args: backend)
    sink = S3Sink(s3_bucket, "ivr")
    with theirs:
        code = catalog.main([str(cat), "--model", "fake", "--out", f"s3://{s3_bucket}/ivr", "--backend",
                             "tests.jobs.fakes:FakeBackend", "--runner", "local", "--no-progress", "--quiet",
                             "--batch-size", "1", "--retire", "delete"])
        out = capsys.readouterr().out.strip().splitlines()
        summary = json.loads(out[-1]) if out else {}
        keys = _keys(sink)
        assert backend.other is not None
        assert json.loads(sink.get(lease.LEASE_KEY))["token"] == backend.other.token   # the other pass's, kept
    assert backend.n == 2                                      # no backend call after the takeover
    audio = [k for k in keys if k.startswith("prompts/")]
    assert len(audio) == 2 and all(k.startswith("prompts/p0-") for k in audio), audio   # p0 and its sidecar only
    assert code == 1 and "lost the catalog lease" in summary["lease_lost"], summary
    assert summary["rendered_before_loss"] == 1 and summary["total"] == 4
    assert catalog.MANIFEST_KEY not in keys                   # never reconciled
    journal = [k for k in keys if k.startswith("catalog-manifest.pending-")]
    assert len(journal) == 1 and len(json.loads(sink.get(journal[0]))["objects"]) == 4   # left for the next pass


def test_what_a_worker_is_given_refuses_its_writes_once_the_lease_is_another_runs(s3_bucket):
    """The fence travels to Ray workers (pickled, with the sink it guards): each write and delete reads the lease
    back first and is refused, nothing written, once another run holds it."""
    sink = S3Sink(s3_bucket, "ivr")
    with lease.hold(sink) as held:
        worker = pickle.loads(pickle.dumps(lease.fenced(S3Sink(s3_bucket, "ivr"), pickle.loads(pickle.dumps(
            held.fence())))))
        worker.put("prompts/a.wav", b"a")
        sink.client.put_object(Bucket=s3_bucket, Key=f"ivr/{lease.LEASE_KEY}",
                               Body=json.dumps({"host": "other", "pid": 2, "token": "theirs"}).encode())
        with pytest.raises(lease.LeaseLost, match="another run holds it now"):
            worker.put("prompts/b.wav", b"b")
        with pytest.raises(lease.LeaseLost):
            worker.delete("prompts/a.wav")
        sink.client.delete_object(Bucket=s3_bucket, Key=f"ivr/{lease.LEASE_KEY}")
        with pytest.raises(lease.LeaseLost, match="it is gone"):
            worker.put("prompts/b.wav", b"b")
    assert sink.size("prompts/b.wav") is None and sink.get("prompts/a.wav") == b"a"
    assert lease.fenced(sink, None) is sink
