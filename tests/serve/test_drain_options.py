"""Rolling restarts and scale-down drain their streams: every deployment the app builds lets a stopping replica
finish sessions up to the session deadline (Serve's default killed it after 20 s, mid-stream), and the ingress is
replaced surge-first. No cluster: the deployment options are read from the built application."""

from __future__ import annotations

import pytest

from serve.app import DRAIN_MARGIN_S, DRAIN_POLL_S, build_app, drain_s
from serve.config import ServiceConfig


def _deployment_configs(config: dict) -> dict[str, object]:
    """name -> Serve DeploymentConfig of the ingress and of each model deployment `build_app(config)` binds."""
    app = build_app(config)._bound_deployment
    models = app.init_args[1]
    return {"ingress": app._deployment_config,
            **{name: m._bound_deployment._deployment_config for name, m in models.items()}}


@pytest.mark.parametrize("deadline_s", [600.0, 45.0])
def test_every_deployment_drains_for_the_session_deadline(deadline_s):
    config = {"session_deadline_s": deadline_s,
              "models": [{"name": "a"}, {"name": "b", "autoscaling": {"min_replicas": 1, "max_replicas": 2}}]}
    want = deadline_s + DRAIN_MARGIN_S
    assert drain_s(ServiceConfig.from_dict(config)) == want
    configs = _deployment_configs(config)
    assert set(configs) == {"ingress", "a", "b"}
    for name, dc in configs.items():
        assert dc.graceful_shutdown_timeout_s == want, name
        assert dc.graceful_shutdown_wait_loop_s == DRAIN_POLL_S, name


def test_the_ingress_is_replaced_surge_first_and_gpu_replicas_are_not():
    configs = _deployment_configs({})
    assert configs["ingress"].max_surge_percent == 100
    assert configs["tiny-custom-voice"].max_surge_percent == 0   # a surge replica would need a spare GPU
