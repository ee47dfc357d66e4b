"""ServeBackend against a fake deployment handle: the window per replica, typed back-pressure (Busy, Serve's
BackPressureError) waited out, bad input failing only its row, calls lost with their replica sent again and reported,
a reply from another checkpoint than the job started with failing its row (the app upgraded mid-job).
The exceptions are raised the way Ray delivers them (RayTaskError subclasses of the original). The real replicas
are in tests/fleet and test_ray_e2e."""

from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from jobs.serve_backend import ServeBackend
from jobs.synth import ChunkJob
from qwen_tts_core.errors import RequestError
from serve.scheduler import Busy


def as_ray_raises(exc: BaseException) -> BaseException:
    """What `DeploymentResponse.result()` raises for an exception raised in the replica."""
    return RayTaskError("synthesize", "Traceback (most recent call last): ...", exc).as_instanceof_cause()


class _Resp:
    def __init__(self, fn):
        self.fn = fn

    def result(self, timeout_s=None):
        return self.fn()


class FakeDeployment:
    """synthesize.remote(payload) -> a response; `script[text]` lists what successive calls for a text do ("ok", an
    exception to raise, or a dict of reply fields to change). `digest`: the reply's checkpoint_digest (None: no such
    field, a replica older than that contract)."""

    def __init__(self, script: dict[str, list] | None = None, delay_s: float = 0.0, digest: str | None = None,
                 pcm: np.ndarray | None = None):
        self.script, self.delay_s, self.digest = script or {}, delay_s, digest
        self.pcm = np.full(240, 0.1, np.float32) if pcm is None else pcm
        self.payloads: list[dict] = []
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        self.synthesize = self

    def remote(self, payload):
        with self.lock:
            self.payloads.append(dict(payload))
            step = (self.script.get(payload["input"]) or ["ok"]).pop(0) if self.script.get(payload["input"]) \
                else "ok"

        def run():
            with self.lock:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
            try:
                time.sleep(self.delay_s)
                if isinstance(step, BaseException):
                    raise step
                reply = {"pcm": self.pcm.copy(), "sample_rate": 24000, "finish_reason": "eos", "num_frames": 0}
                if self.digest is not None:
                    reply["checkpoint_digest"] = self.digest
                return {**reply, **(step if isinstance(step, dict) else {})}
            finally:
                with self.lock:
                    self.inflight -= 1

        return _Resp(run)


def backend(dep: FakeDeployment, replicas: int = 1, **kw) -> ServeBackend:
    be = ServeBackend("qtts", base_delay_s=0.001, max_delay_s=0.01, **kw)
    be._handles["m"] = dep
    be._replicas = (time.monotonic() + 1e9, {"m": replicas})  # no controller here
    return be


def job(text: str, **kw) -> ChunkJob:
    return ChunkJob(**{"text": text, "voice": "ryan", "language": "auto", "instruct": None, "seed": 3, "model": "m",
                       "sampling": {"max_new_tokens": 5}, **kw})


def test_window_is_a_share_of_the_per_replica_bound():
    dep = FakeDeployment(delay_s=0.05)
    be = backend(dep, replicas=2, max_inflight_per_replica=3, workers=2)
    res = be.synthesize([job(f"t{i}") for i in range(12)])
    assert all(r.error is None and r.pcm.size == 240 for r in res)
    assert be.window([job("x")] * 12) == 3 and 2 <= dep.max_inflight <= 3
    p = dep.payloads[0]
    assert p == {"input": "t0", "voice": "ryan", "language": "auto", "instructions": None, "seed": 3,
                 "non_streaming_mode": True, "priority": "bulk", "max_new_tokens": 5}


def test_busy_is_waited_out_and_bad_input_fails_only_its_row():
    dep = FakeDeployment({"busy": [as_ray_raises(Busy("full", retry_after_s=0)), BackPressureError(num_queued_requests=9,
                                                                                       max_queued_requests=8),
                                   "ok"],
                          "bad": [as_ray_raises(RequestError("voice", "'nobody' is not a stored voice"))]})
    be = backend(dep)
    ok, bad, busy = be.synthesize([job("ok"), job("bad"), job("busy")])
    assert ok.error is None and busy.error is None and busy.retries == ()  # back-pressure is routine
    assert be.busy_waits == 2 and sum(p["input"] == "busy" for p in dep.payloads) == 3
    assert bad.pcm is None and bad.error == "voice: 'nobody' is not a stored voice"
    assert sum(p["input"] == "bad" for p in dep.payloads) == 1  # never retried


def test_a_call_lost_with_its_replica_is_sent_again_and_reported():
    lost = ActorDiedError()
    dep = FakeDeployment({"a": [lost, "ok"], "b": [lost, lost, lost, lost, lost]})
    a, b = backend(dep, lost_retries=2).synthesize([job("a"), job("b")])
    assert a.error is None and a.retries == ("replica lost (ActorDiedError)",)
    assert b.pcm is None and "replica lost 3 times" in b.error and len(b.retries) == 3


def test_persistent_back_pressure_fails_the_row_not_the_batch():
    dep = FakeDeployment({"x": [as_ray_raises(Busy("full", 0))] * 10})
    x, y = backend(dep, busy_retries=3).synthesize([job("x"), job("y")])
    assert x.pcm is None and x.error.startswith("busy: the replicas stayed full for 4 tries")
    assert y.error is None


def test_other_replica_errors_fail_the_row_with_one_line():
    dep = FakeDeployment({"boom": [as_ray_raises(RuntimeError("engine exploded\nsecond line"))]})
    (r,) = backend(dep).synthesize([job("boom")])
    assert r.error == "RuntimeError: second line"


def test_bad_options():
    with pytest.raises(ValueError, match="max_inflight_per_replica"):
        ServeBackend("qtts", max_inflight_per_replica=0)


OLD, NEW = "sha256:00000000000000aa", "sha256:00000000000000bb"


def test_a_reply_from_another_checkpoint_fails_its_row_and_is_not_sent_again():
    dep = FakeDeployment({"b": [{"checkpoint_digest": NEW}]}, digest=OLD)
    a, b = backend(dep, digests={"m": OLD}).synthesize([job("a"), job("b")])
    assert a.error is None and a.pcm.size == 240
    assert b.pcm is None and b.retries == () and sum(p["input"] == "b" for p in dep.payloads) == 1
    assert b.error == (f"model: the served model 'm' changed during the job (checkpoint {NEW} answered, the job "
                       f"started with {OLD}); run again to render with the new model")


def test_a_reply_with_other_settings_fails_its_row_and_is_not_sent_again():
    """A redeploy that kept the checkpoint but changed its dtype (fp32 -> bf16) while the job ran: the rows it made
    were stored under keys naming fp32. Now the reply's settings are checked against those the job keyed on."""
    keyed = {"dtype": "float32", "device": "cpu", "default_max_new_tokens": 2048}
    dep = FakeDeployment({"b": [{"settings": {**keyed, "dtype": "bfloat16"}}],
                          "c": [{"settings": {"dtype": "float32"}}]}, digest=OLD)   # (c: a subset, the same)
    a, b, c = backend(dep, digests={"m": OLD}, settings={"m": keyed}).synthesize([job("a"), job("b"), job("c")])
    assert a.error is None and c.error is None and c.pcm.size == 240
    assert b.pcm is None and b.retries == () and sum(p["input"] == "b" for p in dep.payloads) == 1
    assert b.error == ("model: the served model 'm' changed during the job (dtype 'float32' -> 'bfloat16'); run "
                       "again to render with the new settings")


def test_the_job_passes_the_settings_it_keyed_on_to_the_serve_backend():
    from jobs.render import RenderConfig
    from jobs.runner import RunOptions

    audio = {"dtype": "bfloat16", "device": "cuda", "guard": None, "default_max_new_tokens": 4096}
    cfg = RenderConfig(model="m", models={"m": {"digest": OLD, "audio": audio}})
    args = RunOptions(output="file:///tmp/x", backend="serve", runner="local").backend_args("serve", cfg)
    assert args["serve_opts"]["settings"] == {"m": {"dtype": "bfloat16", "device": "cuda",
                                                    "default_max_new_tokens": 4096}}
    assert args["serve_opts"]["digests"] == {"m": OLD}


def test_a_reply_without_a_digest_is_taken_as_before_with_one_warning(caplog):
    dep = FakeDeployment()  # a replica older than the digest in the reply
    with caplog.at_level(logging.WARNING, logger="jobs.serve_backend"):
        res = backend(dep, digests={"m": OLD}).synthesize([job(f"t{i}") for i in range(4)])
    assert all(r.error is None and r.pcm.size == 240 for r in res)
    assert [r.message for r in caplog.records].count(
        "m: the replica's reply names no checkpoint_digest (a service older than this job); a model upgraded while "
        "the job runs cannot be noticed") == 1


def test_a_job_across_a_serve_upgrade_fails_the_rows_the_new_model_made(tmp_path, monkeypatch, capsys, caplog):
    """`--backend serve`: the job resolves the model's digest once (OLD), then the app is upgraded and some rows are
    answered by the new checkpoint. Before, they were written under keys and a manifest `revision` naming OLD and
    every later run with OLD reused them (the new model's audio under the old model's content key)."""
    import jobs.serve_backend as sb
    from jobs import narrate
    from jobs.manifest import from_parquet

    t = np.arange(24000, dtype=np.float32) / 24000
    dep = FakeDeployment({"Row two.": [{"checkpoint_digest": NEW}], "Row four.": [{"checkpoint_digest": NEW}]},
                         digest=OLD, pcm=(0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32))
    info = {"type": "custom_voice", "speakers": ["ryan"], "languages": ["auto", "english"], "checkpoint_digest": OLD,
            "dtype": "float32", "device": "cpu", "default_max_new_tokens": None}
    monkeypatch.setattr(sb, "served_models", lambda app: {"m": 1})
    monkeypatch.setattr(sb, "model_info", lambda app, model, timeout_s=120.0: dict(info))
    monkeypatch.setattr(sb.ServeBackend, "_handle", lambda self, model: dep)
    monkeypatch.setattr(sb.ServeBackend, "replicas", lambda self, model: 1)
    rows = tmp_path / "rows.jsonl"
    texts = ["Row one.", "Row two.", "Row three.", "Row four."]
    rows.write_text("".join(json.dumps({"id": f"r{i}", "text": x, "voice": "ryan", "seed": 1}) + "\n"
                            for i, x in enumerate(texts)))
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="jobs.runner"):
        code = narrate.main([str(rows), "--backend", "serve", "--runner", "local", "--model", "m",
                             "--out", f"file://{out}", "--quiet"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1 and summary["failed_ids"] == ["r1", "r3"] and summary["ok"] + summary["suspect"] == 2
    assert summary["model_changed"] == {"rows": 2, "ids": ["r1", "r3"]}
    recs = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    for rid in ("r1", "r3"):
        assert recs[rid].status == "failed" and recs[rid].retries == []
        assert recs[rid].error == (f"model: the served model 'm' changed during the job (checkpoint {NEW} answered, "
                                   f"the job started with {OLD}); run again to render with the new model")
        assert not (out / recs[rid].key).exists() and not (out / f"{recs[rid].key}.json").exists()
    for rid in ("r0", "r2"):
        assert recs[rid].status in ("ok", "suspect") and recs[rid].revision == OLD and (out / recs[rid].key).exists()
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted([recs["r0"].key, recs["r0"].key + ".json", recs["r2"].key, recs["r2"].key + ".json",
                              "manifest.parquet"])
    assert any("2 row(s) failed because the served model changed during the job" in r.message
               for r in caplog.records)
