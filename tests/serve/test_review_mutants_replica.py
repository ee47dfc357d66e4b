"""Behaviour of serve/metrics.py (the /metrics text of replica stats, merging several replicas' stats, quantiles,
counters per replica) and of serve/replica.py's ReplicaCore (the handle protocol's items, the end item of a failed
session, feed/renew, synthesize's errors and reply, warm-up, stats/info) that the suite did not pin, found by hand
mutation testing: each test here was seen failing on the mutant named in its docstring and passing on the real code.
No Ray: the metrics functions called directly, ReplicaCore on the tiny checkpoint in-process."""

from __future__ import annotations

import asyncio
import random
import threading
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qwen_tts_core.errors import RequestError
from serve import replica
from serve.config import ModelConfig
from serve.metrics import merge_stats, prometheus_text, summarize
from serve.replica import ReplicaCore, _api_named, as_request_error, engine_kwargs
from serve.scheduler import SchedulerStats
from serve.sessions import SessionLimits


def _samples(text: bytes | str, family: str) -> dict[tuple, float]:
    text = text.decode() if isinstance(text, bytes) else text
    return {tuple(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text)
            if f.name == family for s in f.samples}


# --- metrics.py -------------------------------------------------------------------------------------------------


def test_merged_stats_sum_every_replica_and_pool_their_recent_samples():
    """M03 M04 M05 M06 M07 M08 M09 M10 M11: one model's row sums each counter and gauge over all its replicas (not
    the largest, none left out), counts the replicas, takes TTFA p50/p95 over the samples of every replica pooled
    and sorted (index int(q * n), the last for p95), and RTF p50 as the median of the replicas that report one (a
    replica with none is not a 0)."""
    ttfa = [round(0.01 * i, 2) for i in range(1, 21)]          # 20 samples: p50 = 0.11, p95 = 0.20
    random.Random(4).shuffle(ttfa)
    rtf = [0.3, 0.9, None, 0.5, "absent"]
    rows = []
    for i in range(5):
        r = {"replica": f"r{i}", "requests": 10 + i, "errors": 1, "active_sessions": i, "queue_length": 2,
             "ttfa_recent_s": ttfa[4 * i:4 * i + 4]}
        if rtf[i] != "absent":
            r["rtf_p50"] = rtf[i]
        rows.append(r)
    out = merge_stats(rows)
    assert out["replicas"] == 5
    assert (out["requests"], out["errors"], out["active_sessions"], out["queue_length"]) == (60, 5, 10, 10)
    assert (out["ttfa_p50_s"], out["ttfa_p95_s"]) == (0.11, 0.2)
    assert out["rtf_p50"] == 0.5
    assert merge_stats([{"replica": "a"}])["ttfa_p50_s"] is None


def test_summarize_reports_each_counter_and_quantile_from_its_own_source():
    """M13 M14 M15: a replica's summary gives p95 (not p50) of its TTFA samples, `cancelled` from the cancelled
    count (not the completed one) and RTF p50 from the RTF samples."""
    st = SchedulerStats(requests=9, errors=1, rejected_busy=2, cancelled=3, completed=5, steps=70)
    st.ttfa_s.extend([0.1 * i for i in range(1, 11)])
    st.rtf.extend([2.0, 3.0, 4.0])
    s = summarize(st)
    assert (s["requests"], s["errors"], s["rejected_busy"], s["cancelled"], s["completed"], s["steps"]) == \
        (9, 1, 2, 3, 5, 70)
    assert s["ttfa_p50_s"] == pytest.approx(0.6) and s["ttfa_p95_s"] == pytest.approx(1.0)
    assert s["rtf_p50"] == 3.0


def _row(rid: str, **kw) -> dict:
    return {"replica": rid, "requests": 0, "errors": 0, "cancelled": 0, "steps": 0, "active_sessions": 0,
            "queue_length": 0, "expired_idle": 0, "expired_deadline": 0, "expired_lease": 0,
            "expired_lease_late": 0, **kw}


def test_metrics_text_gives_each_counter_from_its_own_key_per_replica():
    """M18 M19 M20 M21 M22 M24 M27: every replica counter is exported under its own name from its own stats key,
    one series per replica even at 0 (a series that appears later reads as a new counter): qtts_cancelled_total,
    qtts_errors_total (failed, not completed), qtts_leases_late_total (late renewals, not cancelled leases), and
    qtts_sessions_expired_total with each reason (idle, deadline, lease) its own count; this ingress's error
    counts carry its `ingress` label."""
    rows = {"r1": _row("r1", requests=7, errors=2, completed=5, cancelled=3, expired_idle=1, expired_deadline=4,
                       expired_lease=6, expired_lease_late=8),
            "r2": _row("r2")}
    text = prometheus_text({"m": rows}, {"503": 4}, 0, ingress="ing-1")
    key = (("model", "m"), ("replica", "r1"))
    zero = (("model", "m"), ("replica", "r2"))
    assert _samples(text, "qtts_cancelled")[key] == 3.0
    assert _samples(text, "qtts_errors")[key] == 2.0
    assert _samples(text, "qtts_leases_late")[key] == 8.0
    for family in ("qtts_requests", "qtts_errors", "qtts_cancelled", "qtts_engine_steps", "qtts_leases_late"):
        assert _samples(text, family)[zero] == 0.0, family
    expired = _samples(text, "qtts_sessions_expired")
    assert {dict(k)["reason"]: v for k, v in expired.items() if dict(k)["replica"] == "r1"} == \
        {"idle": 1.0, "deadline": 4.0, "lease": 6.0}
    assert _samples(text, "qtts_http_errors") == {(("ingress", "ing-1"), ("status", "503")): 4.0}


def test_metrics_text_gives_zero_gauges_and_omits_unknown_ones():
    """M12 M16 M23 M25: a gauge at 0 (no active session, no open client stream) is written as 0, not left out (a
    dashboard would show "no data" for an idle service); a quantile with no samples is left out (0 would read as
    instant first audio), and a model none of whose replicas answered has no gauges (unknown is not 0)."""
    text = prometheus_text({"m": {"r1": _row("r1")}, "down": {}}, {}, 0)
    assert _samples(text, "qtts_active_sessions") == {(("model", "m"),): 0.0}
    assert _samples(text, "qtts_queue_length") == {(("model", "m"),): 0.0}
    assert _samples(text, "qtts_replicas") == {(("model", "m"),): 1.0}
    assert _samples(text, "qtts_open_client_streams") == {(): 0.0}
    assert _samples(text, "qtts_time_to_first_audio_p50_seconds") == {}
    assert _samples(text, "qtts_real_time_factor_p50") == {}


# --- replica.py: pure helpers -----------------------------------------------------------------------------------


def test_api_named_names_a_core_field_as_the_api_does():
    """R01 R02 R03: a failure the core reports about `text` reads `input: ...` with param `input` over HTTP (its
    core prefix replaced, once), keeps `text` for an incremental (WebSocket) session, and a message without the
    prefix keeps its words but still names the API's field."""
    assert _api_named("text", "text: too long") == ("input: too long", "input")
    assert _api_named("text", "text: too long", incremental=True) == ("text: too long", "text")
    assert _api_named("text", "no room left") == ("no room left", "input")
    assert _api_named("speaker", "speaker: unknown") == ("voice: unknown", "voice")
    assert _api_named(None, "engine failed") == ("engine failed", None)


def test_a_plain_value_error_becomes_a_request_error_naming_request():
    """R04 R05: a ValueError that is not the core's RequestError is still the caller's 400: a RequestError naming
    `request` with the original words; a RequestError passes through unchanged."""
    e = as_request_error(ValueError("odd value"))
    assert isinstance(e, RequestError) and e.field == "request" and "odd value" in str(e)
    orig = RequestError("speaker", "unknown")
    assert as_request_error(orig) is orig


def test_engine_options_set_to_false_reach_the_engine_and_unknown_ones_are_refused(monkeypatch):
    """R06 R07: an engine option set to False in the model config (cuda_graphs: false, compile: false) is passed
    to the engine, not dropped as unset (the engine default, graphs on, would apply); an option this engine does not
    take is refused naming the model."""
    cfg = ModelConfig(name="m", cuda_graphs=False, compile=False, batch_buckets=(1, 2))
    assert engine_kwargs(cfg) == {"cuda_graphs": False, "compile": False, "batch_buckets": (1, 2)}
    monkeypatch.setattr(replica, "ENGINE_OPTIONS", (*replica.ENGINE_OPTIONS, "turbo"))
    fake = SimpleNamespace(**{k: None for k in replica.ENGINE_OPTIONS}, name="m")
    fake.turbo = True
    with pytest.raises(ValueError, match=r"models\[m\].*turbo"):
        engine_kwargs(fake)


# --- replica.py: ReplicaCore on the tiny checkpoint -------------------------------------------------------------


def _core(model_factory, limits: SessionLimits | None = None, owner: str = "local", liveness=None, **cfg):
    cfg = {"max_sessions": 2, "max_queue": 2, "interactive_reserve": 1, "max_new_tokens": 32,
           "default_max_new_tokens": 6, **cfg}
    return ReplicaCore(model_factory("custom_voice"), ModelConfig(name="cv", model_type="custom_voice", **cfg),
                       None, limits=limits, owner=owner, liveness=liveness)


def _run(core: ReplicaCore, body):
    async def main():
        core.start(asyncio.get_running_loop())
        try:
            return await asyncio.wait_for(body(), 60)
        finally:
            core.stop()
    return asyncio.run(main())


async def _drain(gen) -> list[dict]:
    return [x async for x in gen]


def test_an_idle_session_fails_with_408_naming_text_and_is_counted(model_factory, monkeypatch):
    """R15 R17 R45 R49: an incremental session sent no text for its idle timeout FAILS (not a plain cancel): its end
    item says finish_reason `error`, status 408 and names `text` (field and param); the replica's stats count it
    under `expired_idle`, which /metrics exports."""
    monkeypatch.setattr(replica, "WATCH_PERIOD_S", 0.05)
    core = _core(model_factory, SessionLimits(idle_text_timeout_s=0.1), owner="rep-9")

    async def body():
        gen = core.stream({"voice": "ryan", "seed": 1}, incremental=True)
        assert (await gen.__anext__())["type"] == "start"
        return (await _drain(gen))[-1], core.stats()
    end, stats = _run(core, body)
    assert (end["type"], end["finish_reason"], end["status"], end["field"], end["param"]) == \
        ("end", "error", 408, "text", "text"), end
    assert stats["expired_idle"] == 1 and stats["expired_deadline"] == stats["expired_lease"] == 0, stats


def test_a_503_failure_tells_when_to_retry(model_factory):
    """R16: a session the replica fails with 503 (a leased bulk stream that never got a slot) ends with the
    replica's `retry_after`, which the ingress sends as Retry-After."""
    core = ReplicaCore(model_factory("custom_voice"), ModelConfig(name="cv", model_type="custom_voice",
                                                                  max_new_tokens=32), None, retry_after_s=7)

    async def body():
        gen = core.stream({"voice": "ryan", "seed": 1}, incremental=True)
        sid = (await gen.__anext__())["session"]
        core.scheduler.fail(core.sessions.get(sid).ticket, 503, "replica busy: retry later")
        return (await _drain(gen))[-1]
    end = _run(core, body)
    assert (end["status"], end["retry_after"], end["finish_reason"]) == (503, 7, "error"), end


def test_stats_name_the_replica_and_count_what_it_holds(model_factory):
    """R42 R43 R44: `stats` carries the replica's own id (the ingress keys each counter series on it: without it a
    replica missing a scrape shifts the others' series), queue_length (requests waiting, not all open ones) and the
    most recent 256 TTFA samples (not the oldest)."""
    core = _core(model_factory, owner="rep-3", max_sessions=1, interactive_reserve=0)
    core.scheduler.stats.ttfa_s.extend(float(i) for i in range(300))

    async def body():
        gens = [core.stream({"voice": "ryan", "seed": 1}, incremental=True) for _ in range(2)]
        sid = (await gens[0].__anext__())["session"]
        core.feed(sid, "Words that wait for more words.")      # no `end`: it holds the one slot
        await gens[1].__anext__()                                # waits in the queue
        for _ in range(1000):    # up to 20 s on a loaded host
            if core.engine.num_active == 1:
                break
            await asyncio.sleep(0.02)
        st = core.stats()
        for g in gens:
            await g.aclose()
        return st
    st = _run(core, body)
    assert st["replica"] == "rep-3"
    assert (st["active_sessions"], st["queue_length"], st["open_sessions"]) == (2, 1, 2), st
    assert st["ttfa_recent_s"] == [float(i) for i in range(44, 300)]


def test_a_payload_that_is_not_an_object_is_a_400(model_factory):
    """R12: a stream whose payload is not a dict of fields is refused as the caller's 400 naming `payload` (not an
    exception the ingress reports as a failed replica)."""
    core = _core(model_factory)
    items = _run(core, lambda: _drain(core.stream(["input", "hi"])))
    assert [(x["type"], x["status"], x["param"]) for x in items] == [("error", 400, "payload")], items


def test_feed_refusals_fail_only_the_session_they_are_about(model_factory, monkeypatch):
    """R30 R32 R33 R35: text fed to a session opened with its full text is refused (RequestError `text`) and the
    session goes on to a normal end; text past the session's limit is refused AND fails that session with a 400
    naming `text`; renew answers the ids this replica does not hold."""
    monkeypatch.setattr(replica, "WATCH_PERIOD_S", 0.05)     # a session left waiting ends (408) in a second
    core = _core(model_factory, SessionLimits(max_text_chars=20, idle_text_timeout_s=1.0))

    async def body():
        full = core.stream({"input": "Hello there.", "voice": "ryan", "seed": 1})
        full_sid = (await full.__anext__())["session"]
        with pytest.raises(RequestError) as refused:
            core.feed(full_sid, "more words")
        inc = core.stream({"voice": "ryan", "seed": 1}, incremental=True)
        inc_sid = (await inc.__anext__())["session"]
        assert core.renew([inc_sid, "nope-1"]) == ["nope-1"]
        with pytest.raises(RequestError) as too_long:
            core.feed(inc_sid, "x" * 21)
        return refused.value, (await _drain(full))[-1], too_long.value, (await _drain(inc))[-1]
    refused, full_end, too_long, inc_end = _run(core, body)
    assert refused.field == "text" and "full text" in str(refused)
    assert full_end["status"] is None and full_end["finish_reason"] in ("eos", "max_new_tokens"), full_end
    assert too_long.field == "text"
    assert (inc_end["status"], inc_end["field"], inc_end["param"]) == (400, "text", "text"), inc_end


def test_synthesize_keeps_the_callers_priority_and_names_its_checkpoint(model_factory):
    """R36 R41: synthesize runs at bulk priority unless the payload names another (an interactive one counts
    toward the TTFA quantiles, a bulk one does not), and its reply names the checkpoint that made the audio, the
    digest `info()` reports (batch jobs key their outputs on it)."""
    core = _core(model_factory)

    async def body():
        before = len(core.stats()["ttfa_recent_s"])
        bulk = await core.synthesize({"input": "Bulk line.", "voice": "ryan", "seed": 1})
        mid = len(core.stats()["ttfa_recent_s"])
        await core.synthesize({"input": "Quick line.", "voice": "ryan", "seed": 1, "priority": "interactive"})
        return bulk, before, mid, len(core.stats()["ttfa_recent_s"])
    bulk, before, mid, after = _run(core, body)
    assert (mid - before, after - mid) == (0, 1)
    digest = core.info()["checkpoint_digest"]
    assert isinstance(digest, str) and len(digest) >= 16 and bulk["checkpoint_digest"] == digest


@pytest.mark.parametrize("kind", ["custom_voice", "voice_design"])
def test_warm_up_runs_one_short_request_for_a_model_with_its_own_voice(model_factory, kind):
    """R10 R11: after the engine's own warm-up, a model with a voice of its own pays the request path's first-call
    costs with one short synthesis (a voice-design one with an instruction, which it needs)."""
    core = ReplicaCore(model_factory(kind), ModelConfig(name="w", model_type=kind, max_new_tokens=16), None)
    seen = []
    real = core.engine.run_all
    core.engine.run_all = lambda reqs: seen.extend(reqs) or real(reqs)
    assert core.warm_up() > 0
    assert len(seen) == 1 and seen[0].kind == kind and seen[0].sampling.max_new_tokens == 6
    assert bool(seen[0].instruct) == (kind == "voice_design")


def test_a_liveness_answer_slower_than_a_lease_counts_as_alive(model_factory):
    """R46: asking whether a leased session's consumer lives may be slow (a loaded cluster); an answer slower than
    a lease counts as alive (the session deadline bounds it), so a slow answer never cancels a live client."""
    release = threading.Event()

    class Slow:
        @staticmethod
        def alive(consumer):
            release.wait(10)
            return False
    core = _core(model_factory, SessionLimits(lease_s=0.05), liveness=Slow())

    async def ask():
        try:
            return await core._consumer_alive({"id": "ingress-1"})
        finally:
            release.set()      # the question's thread ends (asyncio.run waits for it)
    assert asyncio.run(ask()) is True


def test_a_burst_fills_every_slot_and_queue_place_before_a_503_naming_the_replica(model_factory):
    """R08 R22 R23: requests arriving together (before the engine's next step admits any) take every slot and every
    queue place the model config grants (max_sessions + max_queue): the engine's own queue must hold them all; the
    next one is a 503 that names this replica (the ingress then asks the others) and says when to retry."""
    core = ReplicaCore(model_factory("custom_voice"),
                       ModelConfig(name="cv", model_type="custom_voice", max_sessions=2, max_queue=2,
                                   interactive_reserve=1, max_new_tokens=16), None, retry_after_s=3, owner="rep-5")

    async def main():            # the step loop is not started: nothing leaves the engine's queue
        gens, firsts = [], []
        for _ in range(5):
            g = core.stream({"input": "Hello there.", "voice": "ryan", "seed": 1})
            gens.append(g)
            firsts.append(await g.__anext__())
        for g in gens:
            await g.aclose()
        return firsts
    firsts = asyncio.run(main())
    assert [x["type"] for x in firsts] == ["start"] * 4 + ["error"], firsts
    assert (firsts[-1]["status"], firsts[-1]["replica"], firsts[-1]["retry_after"]) == (503, "rep-5", 3), firsts[-1]


def test_synthesize_raises_the_status_its_session_failed_with(model_factory):
    """R38: a synthesize call whose session the replica fails (here a 504 while it waits for a bulk slot) raises
    SynthesisFailed with that status, not a generic 500 (a batch job tells a deadline from an engine error)."""
    from serve.scheduler import SynthesisFailed

    core = _core(model_factory)

    async def body():
        holder = core.stream({"voice": "ryan", "seed": 1, "priority": "bulk"}, incremental=True)
        held = core.sessions.get((await holder.__anext__())["session"]).ticket   # the one bulk slot, no text yet
        task = asyncio.create_task(core.synthesize({"input": "Bulk line.", "voice": "ryan", "seed": 1}))
        for _ in range(2000):    # up to 20 s on a loaded host
            parked = [t for t in core.scheduler.open_tickets() if t is not held]
            if parked and held.session is not None:
                break
            await asyncio.sleep(0.01)
        assert parked[0].session is None                  # still waiting for the bulk slot
        core.scheduler.fail(parked[0], 504, "session deadline: not finished after 1 s")
        with pytest.raises(SynthesisFailed) as failed:
            await task
        await holder.aclose()
        return failed.value
    failed = _run(core, body)
    assert (failed.status, failed.finish_reason) == (504, "error") and "deadline" in failed.message
