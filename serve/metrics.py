"""Service metrics, in two places:

* Ray's Prometheus endpoint (next to Ray's and Serve's own series), through `ray.serve.metrics`, exported by each
  replica: `qtts_time_to_first_audio_seconds`, `qtts_real_time_factor`, `qtts_active_sessions`, `qtts_queue_length`,
  `qtts_errors_total`, `qtts_requests_total`, tagged with `model`.
* `GET /metrics` on the ingress: the same numbers read from the replicas right now (Prometheus text format), which
  needs no scrape interval (tests and quick looks).
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


def prometheus_text(per_model: dict[str, dict[str, Any]], http_errors: dict[str, int]) -> str:
    """Replica stats by model (from `TTSReplica.stats`) and ingress error counts -> Prometheus exposition text."""
    lines = []

    def metric(name: str, kind: str, help_: str, rows: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in rows:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}")

    def rows(key: str) -> list[tuple[dict[str, str], float]]:
        return [({"model": m}, float(s[key])) for m, s in per_model.items() if s.get(key) is not None]

    metric("qtts_active_sessions", "gauge", "requests being served", rows("active_sessions"))
    metric("qtts_queue_length", "gauge", "requests waiting for an engine slot", rows("queue_length"))
    metric("qtts_requests_total", "counter", "requests seen by the replica", rows("requests"))
    metric("qtts_errors_total", "counter", "failed requests in the replica", rows("errors"))
    metric("qtts_rejected_busy_total", "counter", "requests refused with 503", rows("rejected_busy"))
    metric("qtts_cancelled_total", "counter", "requests cancelled (client gone)", rows("cancelled"))
    metric("qtts_time_to_first_audio_p50_seconds", "gauge", "recent interactive TTFA p50", rows("ttfa_p50_s"))
    metric("qtts_time_to_first_audio_p95_seconds", "gauge", "recent interactive TTFA p95", rows("ttfa_p95_s"))
    metric("qtts_real_time_factor_p50", "gauge", "recent wall time / audio time p50", rows("rtf_p50"))
    metric("qtts_http_errors_total", "counter", "error responses by status",
           [({"status": k}, float(v)) for k, v in sorted(http_errors.items())])
    return "\n".join(lines) + "\n"
