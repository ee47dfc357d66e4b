"""The Serve backend: batch jobs call the model deployments of the running Serve app directly (one hop).

    handle = serve.get_deployment_handle(f"tts-{model}", app)
    handle.synthesize.remote({"input", "voice", "language", "instructions", "seed", "non_streaming_mode": True,
                              "priority": "bulk", **sampling})
        -> {"pcm": float32 [N], "sample_rate": 24000, "finish_reason": str, "num_frames": int,
            "checkpoint_digest": str, "settings": {"dtype", "device", "default_max_new_tokens"}}
        or raises RequestError (bad input: this row fails, naming the field) or Busy (back-pressure: wait, retry)

`checkpoint_digest` names the checkpoint that made the audio (what the replica's `info()` reports), `settings` the
replica's other audio settings. The job resolved each model's digest and settings ONCE at start (models.serve_spec)
and every key names them, so a reply from another checkpoint or with other settings (the app upgraded or
reconfigured, e.g. fp32 to bf16, by a rolling `serve deploy` while the job runs) fails its chunk, and so its row,
with an error saying so (MODEL_CHANGED): nothing is written under a key naming a checkpoint that did not
make the audio, the call is not sent again, and the next run renders the row with the new model. A reply without
the field (a replica older than this contract) is taken as before, with one warning per model.

Audio goes replica -> job worker, never through the ingress. Each worker keeps at most
`max_inflight_per_replica * replicas / workers` calls outstanding, so all workers together stay within a bound
per replica; `Busy` from a replica and Serve's own `BackPressureError` are waited out with exponential backoff
(honouring `retry_after_s`), and a call lost with its replica (process killed, node gone) is sent again, at most
`lost_retries` times, and reported in the row's `retries`.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .synth import SAMPLE_RATE, ChunkJob, ChunkResult, error_text

log = logging.getLogger(__name__)
DEPLOYMENT_PREFIX = "tts-"  # serve/app.py names each model's deployment f"tts-{name}"
MODEL_CHANGED = "changed during the job"  # in the error of a row whose reply came from another checkpoint
REPLY_SETTINGS = ("dtype", "device", "default_max_new_tokens")  # a reply's `settings` (serve.requests.render_settings)


def deployment_name(model: str) -> str:
    return f"{DEPLOYMENT_PREFIX}{model}"


def _busy_types() -> tuple[type[BaseException], ...]:
    from ray.serve.exceptions import BackPressureError

    types: list[type[BaseException]] = [BackPressureError]
    try:
        from serve.scheduler import Busy

        types.append(Busy)
    except ImportError:  # the jobs extra without the serve package
        pass
    return tuple(types)


def _lost_types() -> tuple[type[BaseException], ...]:
    """The call's replica went away (killed, node removed, restarting): the request may be sent again."""
    import ray.exceptions as rex
    import ray.serve.exceptions as sex

    names = ("RayActorError", "NodeDiedError", "WorkerCrashedError", "LocalRayletDiedError", "ObjectLostError",
             "ActorUnschedulableError")
    serve_names = ("DeploymentUnavailableError", "ReplicaUnavailableError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n)) + \
        tuple(getattr(sex, n) for n in serve_names if hasattr(sex, n))


def _request_error_type() -> type[BaseException]:
    from qwen_tts_core.errors import RequestError

    return RequestError


def serve_app_running(app_name: str = "qtts") -> bool:
    """True when Ray is connected and the Serve app `app_name` is RUNNING."""
    try:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return False
        app = serve.status().applications.get(app_name)
        return app is not None and str(app.status).endswith("RUNNING")
    except Exception:  # noqa: BLE001 - no Serve at all
        return False


def served_models(app_name: str) -> dict[str, int]:
    """{served model name: RUNNING replicas} of the app (ValueError when the app is not running)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None or not str(app.status).endswith("RUNNING"):
        state = "not deployed" if app is None else str(app.status).rsplit(".", 1)[-1]
        raise ValueError(f"serve_app: the Serve app {app_name!r} is {state} on this cluster "
                         "(start the service, or use --backend engine)")
    out = {}
    for name, dep in app.deployments.items():
        if name.startswith(DEPLOYMENT_PREFIX):
            states = {str(k).rsplit(".", 1)[-1]: v for k, v in (dep.replica_states or {}).items()}
            out[name[len(DEPLOYMENT_PREFIX):]] = int(states.get("RUNNING", 0))
    return out


def model_changed(error: str | None) -> bool:
    """Whether a row's error says its served model changed during the job (a reply from another checkpoint)."""
    return error is not None and MODEL_CHANGED in error


def model_info(app_name: str, model: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """The replica's `info()` (type, speakers, languages, checkpoint digest, dtype, device, caps)."""
    from ray import serve

    return serve.get_deployment_handle(deployment_name(model), app_name).info.remote().result(timeout_s=timeout_s)


class ServeBackend:
    """`digests`: {served model name: the checkpoint digest the job resolved for it at start}; every reply must
    carry the same one (a model without an entry is not checked). `settings`: {model: the settings the job keyed
    on (dtype, device, default_max_new_tokens)}; a reply's `settings` must agree on each of them it carries."""

    def __init__(self, app_name: str = "qtts", max_inflight_per_replica: int = 4, workers: int = 1,
                 busy_retries: int = 60, lost_retries: int = 3, base_delay_s: float = 0.25,
                 max_delay_s: float = 10.0, digests: dict[str, str] | None = None,
                 settings: dict[str, dict[str, Any]] | None = None) -> None:
        if max_inflight_per_replica < 1:
            raise ValueError(f"max_inflight_per_replica must be >= 1, got {max_inflight_per_replica!r}")
        self.app_name, self.per_replica, self.workers = app_name, max_inflight_per_replica, max(1, workers)
        self.busy_retries, self.lost_retries = busy_retries, lost_retries
        self.base_delay_s, self.max_delay_s = base_delay_s, max_delay_s
        self._handles: dict[str, Any] = {}
        self._replicas: tuple[float, dict[str, int]] = (0.0, {})
        self._lock = threading.Lock()
        self._busy, self._lost, self._bad = _busy_types(), _lost_types(), _request_error_type()
        self.busy_waits = 0  # back-pressure waits so far (all calls)
        self.digests = dict(digests or {})
        self.settings = {m: dict(v) for m, v in (settings or {}).items()}
        self._unreported: set[str] = set()  # models whose replies carry no digest (warned once)

    def _handle(self, model: str) -> Any:
        with self._lock:
            if model not in self._handles:
                from ray import serve

                self._handles[model] = serve.get_deployment_handle(deployment_name(model), self.app_name)
            return self._handles[model]

    def replicas(self, model: str) -> int:
        """RUNNING replicas of the model (refreshed at most every 5 s; at least 1)."""
        t, counts = self._replicas
        if time.monotonic() - t > 5.0:
            try:
                counts = served_models(self.app_name)
            except Exception as e:  # noqa: BLE001 - keep the last count when the controller is slow
                log.debug("replica count unavailable: %s", e)
            self._replicas = (time.monotonic(), counts)
        return max(1, counts.get(model, 1))

    def window(self, jobs: list[ChunkJob]) -> int:
        """Calls this worker keeps in flight: its share of `max_inflight_per_replica` on every replica."""
        reps = max(self.replicas(m) for m in {j.model for j in jobs})
        return max(1, min(len(jobs), math.ceil(self.per_replica * reps / self.workers)))

    @staticmethod
    def payload(job: ChunkJob) -> dict[str, Any]:
        return {"input": job.text, "voice": job.voice, "language": job.language, "instructions": job.instruct,
                "seed": job.seed, "non_streaming_mode": True, "priority": "bulk", **job.sampling}

    def changed(self, model: str, reply: dict[str, Any]) -> str | None:
        """The row's error when the reply came from another checkpoint than the job's keys name, else None."""
        expected, answered = self.digests.get(model), reply.get("checkpoint_digest")
        if answered is None:
            with self._lock:
                first = model not in self._unreported
                self._unreported.add(model)
            if first:
                log.warning("%s: the replica's reply names no checkpoint_digest (a service older than this job); "
                            "a model upgraded while the job runs cannot be noticed", model)
            return None
        if expected is not None and answered != expected:
            return (f"model: the served model {model!r} {MODEL_CHANGED} (checkpoint {answered} answered, the job "
                    f"started with {expected}); run again to render with the new model")
        keyed, now = self.settings.get(model, {}), reply.get("settings") or {}
        moved = {k: (keyed[k], now[k]) for k in keyed.keys() & now.keys() if keyed[k] != now[k]}
        if moved:
            what = ", ".join(f"{k} {was!r} -> {got!r}" for k, (was, got) in sorted(moved.items()))
            return (f"model: the served model {model!r} {MODEL_CHANGED} ({what}); run again to render with the new "
                    "settings")
        return None

    def _delay(self, n: int, hint: float = 0.0) -> float:
        return max(hint, min(self.max_delay_s, self.base_delay_s * 2 ** min(n, 10))) * random.uniform(0.8, 1.2)

    def call(self, job: ChunkJob) -> ChunkResult:
        """One chunk, waiting out back-pressure and re-sending a call whose replica was lost."""
        retries: list[str] = []
        busy = lost = 0
        while True:
            try:
                r = self._handle(job.model).synthesize.remote(self.payload(job)).result()
                changed = self.changed(job.model, r)
                if changed is not None:  # no audio under a key naming another checkpoint; not sent again
                    return ChunkResult(None, "error", changed, retries=tuple(retries))
                return ChunkResult(np.asarray(r["pcm"], dtype=np.float32), r.get("finish_reason"), None,
                                   int(r.get("sample_rate", SAMPLE_RATE)), tuple(retries))
            except self._bad as e:  # RequestError: this row's input, not the service
                return ChunkResult(None, "error", error_text(e), retries=tuple(retries))
            except self._busy as e:
                busy += 1
                self.busy_waits += 1
                if busy > self.busy_retries:
                    return ChunkResult(None, "error", f"busy: the replicas stayed full for {busy} tries "
                                       f"({error_text(e)})", retries=tuple(retries))
                time.sleep(self._delay(busy, float(getattr(e, "retry_after_s", 0) or 0)))
            except self._lost as e:
                lost += 1
                retries.append(f"replica lost ({type(getattr(e, 'cause', None) or e).__name__})")
                if lost > self.lost_retries:
                    return ChunkResult(None, "error", f"replica lost {lost} times: {error_text(e)}",
                                       retries=tuple(retries))
                log.warning("%s: call lost with its replica (%s); sending it again", job.model, error_text(e))
                time.sleep(self._delay(lost))
            except ValueError as e:  # a deployment that raises plain ValueError for bad input
                return ChunkResult(None, "error", error_text(e), retries=tuple(retries))
            except Exception as e:  # noqa: BLE001 - anything else fails this chunk, not the job
                return ChunkResult(None, "error", error_text(e), retries=tuple(retries))

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        if not jobs:
            return []
        with ThreadPoolExecutor(max_workers=self.window(jobs), thread_name_prefix="qtts-serve-call") as pool:
            return list(pool.map(self.call, jobs))
