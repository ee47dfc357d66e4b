"""Build the Serve application: one replica deployment per configured model plus the FastAPI ingress.

    serve run --address $RAY_ADDRESS_HOSTPORT configs/serve.yaml   # import_path: serve.app:app_builder, args: ServiceConfig
    from serve.app import build_app; serve.run(build_app(cfg), name="qtts", route_prefix="/")
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from .config import ModelConfig, ServiceConfig, file_args_error
from .ingress import Ingress
from .replica import TTSReplica

APP_NAME = "qtts"
INGRESS_MAX_ONGOING = 1000   # requests one ingress replica handles at once (streams, uploads, /health)
DRAIN_MARGIN_S = 30.0        # a stopping replica's wait beyond the session deadline (queue wait, the last chunks)
DRAIN_POLL_S = 2.0           # how often a stopping replica looks whether its requests are done
INGRESS_MAX_SURGE_PERCENT = 100   # a new ingress replica starts before the old one stops (it holds no GPU)


def drain_s(cfg: ServiceConfig) -> float:
    """How long Serve lets a stopping replica finish its open requests before killing it (rolling restart, scale
    down, `serve.delete`): a session may run `session_deadline_s`, so Serve's default 20 s cut streams mid-sentence.
    The one place this is computed (the RayService's rayClusterDeletionDelaySeconds is checked against it)."""
    return cfg.session_deadline_s + DRAIN_MARGIN_S


def _drain_options(cfg: ServiceConfig) -> dict[str, Any]:
    """Serve options of every deployment: a stopping replica (model or ingress) drains its streams first; an idle
    one stops after one `DRAIN_POLL_S` poll."""
    return {"graceful_shutdown_timeout_s": drain_s(cfg), "graceful_shutdown_wait_loop_s": DRAIN_POLL_S}


def _replica_options(m: ModelConfig, cfg: ServiceConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": f"tts-{m.name}",
        "ray_actor_options": {"num_cpus": m.num_cpus, "num_gpus": m.num_gpus},
        "max_ongoing_requests": m.max_ongoing_requests,
        # Calls waiting in a caller's router to be routed (bursts of session opens and text feeds pass through
        # here even when every replica has room); the replica's own admission answers 503 when it is full.
        "max_queued_requests": max(256, m.max_ongoing_requests),
        "health_check_period_s": 10,
        # Calls about a session go to the replica that holds it (routing.py); the rest by power of two choices.
        "request_router_config": RequestRouterConfig(request_router_class="serve.routing.SessionRouter"),
        **_drain_options(cfg),
    }
    if m.autoscaling:
        opts["autoscaling_config"] = dict(m.autoscaling)
    else:
        opts["num_replicas"] = m.num_replicas
    return opts


def _overflow_answer(cfg: ServiceConfig) -> dict[str, Any]:
    """The proxy's answer past the Ingress queue: 503 with Retry-After `retry_after_s`, as the replicas' own 503s
    say (Ray Serve >= 2.60's BackpressureConfig; before it, a bare 503)."""
    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:
        return {}
    return {"backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)}


def build_app(config: ServiceConfig | dict[str, Any] | None = None) -> Application:
    cfg = config if isinstance(config, ServiceConfig) else ServiceConfig.from_dict(config)
    # env keys travel in the ingress's config (a local cluster's workers never see this environment); an ingress
    # whose own environment sets QTTS_API_KEYS / QTTS_ADMIN_API_KEYS uses those instead (config.py with_env_keys)
    cfg = cfg.with_env_keys()
    replicas = {m.name: TTSReplica.options(**_replica_options(m, cfg)).bind(
        {k: getattr(m, k) for k in m.__dataclass_fields__}, cfg.cache_dir, cfg.voices_uri, cfg.retry_after_s,
        cfg.session_limits())
        for m in cfg.models}
    ingress = Ingress.options(num_replicas=cfg.ingress_replicas,
                              ray_actor_options={"num_cpus": cfg.ingress_num_cpus},
                              max_ongoing_requests=INGRESS_MAX_ONGOING,
                              # Bounded: past it the proxy answers 503 at once (Serve's default queue is unbounded,
                              # so requests piled up behind held connections and /health went unanswered).
                              max_queued_requests=cfg.ingress_max_queued_requests,
                              # Any change of the app's args restarts every replica: without surge the only
                              # ingress stops first and the service answers nothing until its successor is up.
                              max_surge_percent=INGRESS_MAX_SURGE_PERCENT,
                              **_drain_options(cfg), **_overflow_answer(cfg))
    return ingress.bind(cfg.to_dict(), replicas)


def app_builder(args: dict[str, Any]) -> Application:
    """Entry for `serve run` / Serve config files (`args:` is the ServiceConfig as a mapping)."""
    problem = file_args_error(args)
    if problem:
        raise ValueError(f"serve config: {problem}")
    return build_app(ServiceConfig.from_dict(args))
