"""Review findings (compat): /metrics counters that never go down, mid-stream failures counted with their status,
/health and /metrics asking models at once, label values escaped. The real ingress in-process (inproc.py), over
small fake replicas; no Ray."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import http_errors
from tests.serve.inproc import asgi_call, ingress_app

CFG = {"model_type": "custom_voice", "max_sessions": 3, "max_queue": 1, "interactive_reserve": 1}


def _ingress_cls():
    from serve import ingress

    return next(k for k in ingress.Ingress.func_or_class.__mro__
                if "__init__" in k.__dict__ and not inspect.iscoroutinefunction(k.__dict__["__init__"]))


def _app(monkeypatch, tmp_path, targets: dict, replica_ids: dict[str, list[str]] | None = None):
    """(client, app, ingress instance); `_replica_ids` answers from `replica_ids` instead of asking Ray."""
    from ray import serve

    monkeypatch.setattr(_ingress_cls(), "_replica_ids", lambda self, name: (replica_ids or {}).get(name, []))
    client, app = ingress_app(monkeypatch, {"models": [{"name": n, **CFG} for n in targets],
                                            "voices_uri": str(tmp_path / "voices")}, targets)
    return client, app, serve.get_replica_context().servable_object


def _samples(text: str, family: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples}


class TwoReplicas:
    """One model with replicas r1 and r2 (asked in turn); r2 can miss a scrape."""

    def __init__(self) -> None:
        self.n, self.r2_down = 0, False

    def info(self):
        return {"id": "m", "object": "model", "type": "custom_voice", "speakers": ["x"]}

    async def stats(self):
        self.n += 1
        rid = "r1" if self.n % 2 else "r2"
        if rid == "r2" and self.r2_down:
            raise RuntimeError("r2 timed out")
        return {"replica": rid, "requests": 1000, "errors": 10, "completed": 990, "steps": 5000, "cancelled": 3,
                "expired_idle": 2, "active_sessions": 1, "queue_length": 0, "ttfa_recent_s": [0.1], "rtf_p50": 0.5}


def test_counters_never_go_down_when_a_replica_misses_a_scrape(monkeypatch, tmp_path):
    """Finding 1: counters were summed over the replicas that answered, so one replica missing a scrape made
    `qtts_requests_total` fall 2000 -> 1000 -> 2000 (Prometheus reads a reset: increase() adds ~2000 phantom
    requests). Now each counter series is one replica's (`replica` label) and never falls; gauges stay per model."""
    fake = TwoReplicas()
    client, _, _ = _app(monkeypatch, tmp_path, {"m": fake}, {"m": ["r1", "r2"]})
    scrapes = []
    for down in (False, True, False):
        fake.r2_down, fake.n = down, 0
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        scrapes.append(r.text)
    counters = [f.name for f in text_string_to_metric_families(scrapes[0]) if f.type == "counter"]
    assert {"qtts_requests", "qtts_engine_steps", "qtts_errors", "qtts_sessions_expired"} <= set(counters)
    for family in counters:
        seen: dict[tuple, float] = {}
        for text in scrapes:
            for labels, value in _samples(text, family).items():
                assert value >= seen.get(labels, 0), (family, labels, value, seen)
                seen[labels] = value
    assert _samples(scrapes[0], "qtts_requests") == {(("model", "m"), ("replica", "r1")): 1000.0,
                                                     (("model", "m"), ("replica", "r2")): 1000.0}
    assert _samples(scrapes[1], "qtts_requests") == {(("model", "m"), ("replica", "r1")): 1000.0}
    assert _samples(scrapes[1], "qtts_replicas") == {(("model", "m"),): 1.0}      # gauges: per model


def test_a_model_name_with_quotes_keeps_metrics_parseable(monkeypatch, tmp_path):
    """Finding 9: label values were written unescaped, so a model named `my "fast" model` (the config accepts it)
    made the whole /metrics text unparseable (Prometheus drops the scrape). prometheus_client writes it now."""
    name = 'my "fast" \\ model'
    client, _, _ = _app(monkeypatch, tmp_path, {name: TwoReplicas()}, {name: ["r1"]})
    text = client.get("/metrics").text
    assert _samples(text, "qtts_replicas") == {(("model", name),): 1.0}


class FailsMidStream:
    """Sends one piece of audio, then the session fails: an error end item (`status`), or the replica dies."""

    def __init__(self, status: int | None) -> None:
        self.status = status

    def info(self):
        return {"id": "f", "object": "model", "type": "custom_voice", "speakers": ["x"]}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        yield {"type": "start", "session": "r1-abc"}
        yield {"type": "audio", "pcm": np.zeros(1920, np.float32)}
        if self.status is None:
            raise RuntimeError("replica process died")
        yield {"type": "end", "status": self.status, "message": "synthesis failed", "param": None,
               "finish_reason": "error", "num_frames": 1, "ttfa_s": 0.0}

    def renew(self, sids):
        return []

    async def stats(self):
        return {"replica": "r1"}


@pytest.mark.parametrize("status", [500, 504, None], ids=["engine-500", "deadline-504", "replica-died-502"])
def test_a_stream_failing_after_its_first_audio_is_counted_with_its_status(monkeypatch, tmp_path, caplog, status):
    """Finding 3: a raw audio stream failing after its first byte was logged as an "unhandled error" with a
    traceback and counted as status 500 whatever its real status; the same failure over SSE was not counted.
    Now both are counted as `stream_<status>` in qtts_http_errors_total, with one warning and no ERROR."""
    want = f"stream_{status or 502}"
    client, app, _ = _app(monkeypatch, tmp_path, {"f": FailsMidStream(status)})
    body = {"model": "f", "voice": "x", "input": "Hi.", "response_format": "pcm"}
    before = http_errors()
    with caplog.at_level(logging.WARNING):
        with pytest.raises(Exception) as aborted:   # the raw body is aborted: the app raises, the server drops it
            asyncio.run(asgi_call(app, "POST", "/v1/audio/speech", {"content-type": "application/json"},
                                  [json.dumps(body).encode()]))
        assert type(aborted.value).__name__ == "StreamAborted"
        r = client.post("/v1/audio/speech", json={**body, "stream_format": "sse"})
    assert r.status_code == 200
    last = json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))
    assert last["type"] == "error" and last["error"]["code"] == str(status or 502), last
    after = http_errors()
    assert after.get(want, 0) - before.get(want, 0) == 2, (before, after)          # raw + SSE
    assert after.get("500", 0) == before.get("500", 0), (before, after)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "unhandled error" not in caplog.text
    fails = [r for r in caplog.records if "failed after its first audio" in r.getMessage()]
    assert len(fails) == 2 and all(r.levelno == logging.WARNING for r in fails)
    assert _samples(client.get("/metrics").text, "qtts_http_errors")[(("ingress", ""), ("status", want))] >= 2


def test_websocket_errors_reach_metrics(monkeypatch, tmp_path):
    """Errors a WebSocket session sends were counted (`ws_<code>`) into a copy of ingress.py's Counter (Serve
    pickles the ingress class by value), so in-process /metrics never showed them. The count lives in metrics.py."""
    client, _, _ = _app(monkeypatch, tmp_path, {"f": FailsMidStream(500)})
    before = http_errors()
    with client.websocket_connect("/v1/audio/speech/stream") as ws:
        ws.send_text(json.dumps({"type": "config", "model": "f", "voice": "x", "bogus": 1}))
        assert ws.receive_json()["type"] == "error"
    after = http_errors()
    grown = {k for k in after if after[k] > before.get(k, 0)}
    assert grown and all(k.startswith("ws_") for k in grown), (before, after)
    text = client.get("/metrics").text
    assert any(s == ("status", k) for k in grown for labels in _samples(text, "qtts_http_errors") for s in labels)


class Hangs:
    def info(self):
        return {"id": "h", "object": "model", "type": "custom_voice", "speakers": ["x"]}

    async def stats(self):
        await asyncio.sleep(30)


def test_health_and_metrics_ask_every_model_at_once(monkeypatch, tmp_path):
    """Finding 4: /health asked the models one after another, so N models that do not answer took N timeouts
    (2 models: 10 s); a probe with a shorter timeout saw no `degraded` body naming them. Now one timeout."""
    client, _, ing = _app(monkeypatch, tmp_path, {"a": Hangs(), "b": Hangs(), "c": Hangs()})
    ing.stats_timeout_s = 0.5
    t = time.monotonic()
    r = client.get("/health")
    took = time.monotonic() - t
    assert r.status_code == 503 and set(r.json()["models"]) == {"a", "b", "c"}, r.text
    assert all(v["status"] == "error" for v in r.json()["models"].values())
    assert took < 1.2, took
    t = time.monotonic()
    assert client.get("/metrics").status_code == 200
    assert time.monotonic() - t < 1.2


def test_health_sums_with_the_same_rule_as_metrics(monkeypatch, tmp_path):
    """/health summed `s["active_sessions"]` itself: a stats answer without it (seen with a fake in the review's
    obs5.py) made /health a 500. It uses merge_stats, the one summing rule of /metrics."""
    client, _, _ = _app(monkeypatch, tmp_path, {"f": FailsMidStream(500)})    # stats: {"replica": "r1"}
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["models"]["f"] == {"status": "ok", "replicas": 1,
                                                                "active_sessions": 0}, r.text


def test_health_answers_head(monkeypatch, tmp_path):
    """Load-balancer probes send HEAD: /health took GET only, so `HEAD /health` was a 405. The same answer now."""
    client, _, _ = _app(monkeypatch, tmp_path, {"f": FailsMidStream(500)})
    r = client.head("/health")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json", r.headers
    r = client.post("/health")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD", r.headers


class CountsStats:
    """One model whose replica counts the `stats` calls it answers (slowly: 0.2 s each)."""

    def __init__(self) -> None:
        self.calls = 0

    def info(self):
        return {"id": "c", "object": "model", "type": "custom_voice", "speakers": ["x"]}

    async def stats(self):
        self.calls += 1
        await asyncio.sleep(0.2)
        return {"replica": "r1", "active_sessions": 0}


def test_a_flood_of_health_probes_costs_one_round_of_replica_calls(monkeypatch, tmp_path):
    """/health needs no key, and each answer listed Ray's named actors and asked every replica for `stats`: anyone
    could make the ingress and every replica answer a call per probe. Probes made while a round runs, or within
    `health_cache_s` of it, share it; a probe after that starts a fresh round (a change is seen within a second)."""
    target = CountsStats()
    _, app, ing = _app(monkeypatch, tmp_path, {"c": target})

    async def probes(n):
        return await asyncio.gather(*(asgi_call(app, "GET", "/health", {}, []) for _ in range(n)))

    answers = asyncio.run(probes(50))
    assert [status for status, _, _ in answers] == [200] * 50
    assert json.loads(answers[0][1])["models"]["c"] == {"status": "ok", "replicas": 1, "active_sessions": 0}
    assert target.calls == 1, target.calls
    asyncio.run(probes(5))                       # within the second: the same round
    assert target.calls == 1, target.calls
    ing.health_cache_s = 0.0                     # past it: a new round
    asyncio.run(probes(1))
    assert target.calls == 2, target.calls
