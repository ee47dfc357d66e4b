"""Service metrics, in two places:

* Ray's Prometheus endpoint (next to Ray's and Serve's own series), through `ray.serve.metrics`, exported by each
  replica. Ray prefixes every custom metric with its namespace, so they are scraped as
  `ray_qtts_time_to_first_audio_seconds`, `ray_qtts_real_time_factor`, `ray_qtts_active_sessions`,
  `ray_qtts_queue_length`, `ray_qtts_errors_total`, `ray_qtts_requests_total` (tagged with `model`, and by Serve
  with the replica) and the ingress's `ray_qtts_open_client_streams`.
* `GET /metrics` on the ingress: the same kind of numbers read from every replica right now (Prometheus text,
  `qtts_*` without Ray's prefix), which needs no scrape interval (tests and quick looks). Gauges and recent
  quantiles are per model; counters are per model AND replica (`replica` label), so that a replica missing one
  scrape or restarting never makes a counter go down; `qtts_http_errors_total` is per ingress (`ingress` label).

Two gauges answer different questions: `qtts_active_sessions` counts sessions inside the replicas' engines (a
session can finish in the engine while its client is still reading buffered audio), `qtts_open_client_streams`
counts client connections the ingress is serving (HTTP streams being sent, WebSocket sessions).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

log = logging.getLogger(__name__)

# This process's error answers by status (`qtts_http_errors_total`). Here, not in ingress.py: Serve pickles the
# ingress class and its app by value, so a global of ingress.py is copied into each of them, while a function of
# this module is pickled by reference and so every copy counts into this one Counter.
_HTTP_ERRORS: Counter[str] = Counter()


def count_http_error(status: str) -> None:
    """Count one error answer: an HTTP status, `ws_<close code>` or `stream_<status>` (a stream that failed after
    its first audio)."""
    _HTTP_ERRORS[status] += 1


def http_errors() -> dict[str, int]:
    return dict(_HTTP_ERRORS)


TTFA_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0]
RTF_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0]


class ReplicaMetrics:
    """Ray-exported metrics of one replica (no-ops when Ray's metrics are unavailable, e.g. unit tests)."""

    def __init__(self, model_name: str) -> None:
        self.tags = {"model": model_name}
        try:
            from ray.serve import metrics as m

            self.ttfa = m.Histogram("qtts_time_to_first_audio_seconds", "time from request to first audio",
                                    boundaries=TTFA_BUCKETS, tag_keys=("model",))
            self.rtf = m.Histogram("qtts_real_time_factor", "synthesis wall time / audio duration per request",
                                   boundaries=RTF_BUCKETS, tag_keys=("model",))
            self.active = m.Gauge("qtts_active_sessions", "requests being served", tag_keys=("model",))
            self.queue = m.Gauge("qtts_queue_length", "requests waiting for an engine slot", tag_keys=("model",))
            self.errors = m.Counter("qtts_errors_total", "failed requests", tag_keys=("model", "kind"))
            self.requests = m.Counter("qtts_requests_total", "requests", tag_keys=("model", "priority"))
            for x in (self.ttfa, self.rtf, self.active, self.queue):
                x.set_default_tags(self.tags)
        except Exception as e:  # noqa: BLE001 - outside a Ray worker
            log.debug("Ray metrics unavailable: %s", e)
            self.ttfa = None

    def request(self, priority: str) -> None:
        if self.ttfa is not None:
            self.requests.inc(tags={**self.tags, "priority": priority})

    def error(self, kind: str) -> None:
        if self.ttfa is not None:
            self.errors.inc(tags={**self.tags, "kind": kind})

    def finished(self, ttfa_s: float | None, rtf: float | None) -> None:
        if self.ttfa is None:
            return
        if ttfa_s is not None:
            self.ttfa.observe(ttfa_s)
        if rtf is not None:
            self.rtf.observe(rtf)

    def gauges(self, active: int, queued: int) -> None:
        if self.ttfa is not None:
            self.active.set(active)
            self.queue.set(queued)


class ClientStreams:
    """Open client streams of this ingress process (HTTP responses being streamed + WebSocket sessions), also
    exported as the Ray gauge `qtts_open_client_streams` (Serve tags it with the ingress replica)."""

    def __init__(self) -> None:
        self.count = 0
        try:
            from ray.serve import metrics as m

            self._gauge = m.Gauge("qtts_open_client_streams", "client streams the ingress is serving")
        except Exception as e:  # noqa: BLE001 - outside a Ray worker
            log.debug("Ray metrics unavailable: %s", e)
            self._gauge = None

    def opened(self) -> None:
        self.count += 1
        self._set()

    def closed(self) -> None:
        self.count -= 1
        self._set()

    def _set(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.count)


def merge_stats(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Stats of every replica of one model -> one row: counters and gauges summed, TTFA quantiles over the
    replicas' recent samples pooled, RTF p50 the median of the replicas'."""
    out: dict[str, Any] = {"replicas": len(replicas)}
    for key in ("requests", "errors", "rejected_busy", "cancelled", "completed", "steps", "idle_waits",
                "active_sessions", "queue_length", "open_sessions", "engine_active", "engine_queued",
                "expired_idle", "expired_deadline", "expired_lease", "expired_lease_late"):
        out[key] = sum(int(r.get(key) or 0) for r in replicas)
    ttfa = [x for r in replicas for x in r.get("ttfa_recent_s") or ()]
    out["ttfa_p50_s"], out["ttfa_p95_s"] = _quantile(ttfa, 0.5), _quantile(ttfa, 0.95)
    out["rtf_p50"] = _quantile([r["rtf_p50"] for r in replicas if r.get("rtf_p50") is not None], 0.5)
    return out


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def summarize(stats) -> dict[str, Any]:
    """A scheduler's SchedulerStats -> plain numbers."""
    ttfa, rtf = list(stats.ttfa_s), list(stats.rtf)
    return {"requests": stats.requests, "errors": stats.errors, "rejected_busy": stats.rejected_busy,
            "cancelled": stats.cancelled, "completed": stats.completed, "steps": stats.steps,
            "ttfa_p50_s": _quantile(ttfa, 0.5), "ttfa_p95_s": _quantile(ttfa, 0.95),
            "rtf_p50": _quantile(rtf, 0.5)}


# /metrics families: (name, stats key, help). Gauges and recent quantiles are per model (over the replicas that
# answered); counters are per replica (`replica`: Serve's replica id), so a replica that misses a scrape or restarts
# never makes a summed counter go down (Prometheus would read that as a reset): `sum by (model) (rate(...))`.
MODEL_GAUGES = [
    ("qtts_replicas", "replicas", "replicas that answered"),
    ("qtts_active_sessions", "active_sessions", "sessions open in the replicas' engines"),
    ("qtts_queue_length", "queue_length", "requests waiting for an engine slot"),
    ("qtts_time_to_first_audio_p50_seconds", "ttfa_p50_s", "recent interactive TTFA p50"),
    ("qtts_time_to_first_audio_p95_seconds", "ttfa_p95_s", "recent interactive TTFA p95"),
    ("qtts_real_time_factor_p50", "rtf_p50", "recent wall time / audio time p50"),
]
REPLICA_COUNTERS = [
    ("qtts_requests", "requests", "requests seen by the replica"),
    ("qtts_errors", "errors", "failed requests in the replica"),
    ("qtts_rejected_busy", "rejected_busy", "requests refused with 503"),
    ("qtts_cancelled", "cancelled", "requests cancelled (client gone)"),
    ("qtts_leases_late", "expired_lease_late", "lapsed leases extended: renewals were late, the consumer lives"),
    ("qtts_engine_steps", "steps", "engine steps run"),
]
EXPIRY_REASONS = ("idle", "deadline", "lease")


class _Snapshot:
    """A prometheus_client collector over families built for one scrape (exposition and escaping are the library's)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


def prometheus_text(per_model: dict[str, dict[str, dict[str, Any]]], http_errors: dict[str, int],
                    open_client_streams: int | None = None, ingress: str = "") -> bytes:
    """Replica stats by model and replica id (`TTSReplica.stats` of the replicas that answered), this ingress's
    error counts (`ingress`: its Serve replica id) and open client streams -> Prometheus exposition text."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.exposition import generate_latest

    fams: list = []
    merged = {m: merge_stats(list(rows.values())) for m, rows in per_model.items() if rows}
    for name, key, help_ in MODEL_GAUGES:
        g = GaugeMetricFamily(name, help_, labels=["model"])
        for m, s in merged.items():
            if s.get(key) is not None:
                g.add_metric([m], float(s[key]))
        fams.append(g)
    for name, key, help_ in REPLICA_COUNTERS:
        c = CounterMetricFamily(name, help_, labels=["model", "replica"])
        for m, rows in per_model.items():
            for rid, r in rows.items():
                c.add_metric([m, rid], float(r.get(key) or 0))
        fams.append(c)
    c = CounterMetricFamily("qtts_sessions_expired", "sessions ended by the replica's watchdog, by reason",
                            labels=["model", "replica", "reason"])
    for m, rows in per_model.items():
        for rid, r in rows.items():
            for k in EXPIRY_REASONS:
                c.add_metric([m, rid, k], float(r.get(f"expired_{k}") or 0))
    fams.append(c)
    if open_client_streams is not None:
        fams.append(GaugeMetricFamily("qtts_open_client_streams", "client streams this ingress is serving",
                                      value=float(open_client_streams)))
    c = CounterMetricFamily("qtts_http_errors", "error responses of this ingress, by status",
                            labels=["status", "ingress"])
    for k, v in sorted(http_errors.items()):
        c.add_metric([k, ingress], float(v))
    fams.append(c)
    return generate_latest(_Snapshot(fams))
