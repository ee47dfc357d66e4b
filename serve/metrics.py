"""Service metrics, in two places:

* Ray's Prometheus endpoint (next to Ray's and Serve's own series), through `ray.serve.metrics`, exported by each
  replica: `qtts_time_to_first_audio_seconds`, `qtts_real_time_factor`, `qtts_active_sessions`, `qtts_queue_length`,
  `qtts_errors_total`, `qtts_requests_total`, tagged with `model`.
* `GET /metrics` on the ingress: the same numbers read from every replica right now (summed per model; Prometheus
  text format), which needs no scrape interval (tests and quick looks), plus this ingress's open client streams.

Two gauges answer different questions: `qtts_active_sessions` counts sessions inside the replicas' engines (a
session can finish in the engine while its client is still reading buffered audio), `qtts_open_client_streams`
counts client connections the ingress is serving (HTTP streams being sent, WebSocket sessions).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

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


def prometheus_text(per_model: dict[str, dict[str, Any]], http_errors: dict[str, int],
                    open_client_streams: int | None = None) -> str:
    """Replica stats by model (`merge_stats` of `TTSReplica.stats`), ingress error counts and open client streams
    -> Prometheus exposition text."""
    lines = []

    def metric(name: str, kind: str, help_: str, rows: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    def rows(key: str) -> list[tuple[dict[str, str], float]]:
        return [({"model": m}, float(s[key])) for m, s in per_model.items() if s.get(key) is not None]

    metric("qtts_replicas", "gauge", "replicas that answered", rows("replicas"))
    metric("qtts_active_sessions", "gauge", "sessions open in the replicas' engines", rows("active_sessions"))
    metric("qtts_queue_length", "gauge", "requests waiting for an engine slot", rows("queue_length"))
    metric("qtts_requests_total", "counter", "requests seen by the replica", rows("requests"))
    metric("qtts_errors_total", "counter", "failed requests in the replica", rows("errors"))
    metric("qtts_rejected_busy_total", "counter", "requests refused with 503", rows("rejected_busy"))
    metric("qtts_cancelled_total", "counter", "requests cancelled (client gone)", rows("cancelled"))
    metric("qtts_time_to_first_audio_p50_seconds", "gauge", "recent interactive TTFA p50", rows("ttfa_p50_s"))
    metric("qtts_time_to_first_audio_p95_seconds", "gauge", "recent interactive TTFA p95", rows("ttfa_p95_s"))
    metric("qtts_real_time_factor_p50", "gauge", "recent wall time / audio time p50", rows("rtf_p50"))
    metric("qtts_sessions_expired_total", "counter", "sessions ended by the replica's watchdog, by reason",
           [({"model": m, "reason": k}, float(s.get(f"expired_{k}") or 0)) for m, s in per_model.items()
            for k in ("idle", "deadline", "lease")])
    metric("qtts_leases_late_total", "counter", "lapsed leases extended: renewals were late, the consumer lives",
           rows("expired_lease_late"))
    metric("qtts_engine_steps_total", "counter", "engine steps run", rows("steps"))
    if open_client_streams is not None:
        metric("qtts_open_client_streams", "gauge", "client streams this ingress is serving",
               [({}, float(open_client_streams))])
    metric("qtts_http_errors_total", "counter", "error responses by status",
           [({"status": k}, float(v)) for k, v in sorted(http_errors.items())])
    return "\n".join(lines) + "\n"
