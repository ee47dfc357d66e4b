"""Fixtures for the service tests: one `qtts` Serve app (three tiny models) deployed once per test session on the
session's local Ray head (tests/conftest.py::ray_cluster)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Small limits so overload and caps are reachable in a test; three model types side by side.
TEST_MODELS = [
    {"name": "cv", "model_type": "custom_voice", "num_cpus": 0.25, "max_sessions": 4, "max_queue": 2,
     "interactive_reserve": 1, "max_new_tokens": 64, "default_max_new_tokens": 16},
    {"name": "base", "model_type": "base", "num_cpus": 0.25, "max_sessions": 4, "max_queue": 4,
     "max_new_tokens": 64, "default_max_new_tokens": 12},
    {"name": "vd", "model_type": "voice_design", "num_cpus": 0.25, "max_sessions": 2, "max_queue": 4,
     "interactive_reserve": 0, "max_new_tokens": 64, "default_max_new_tokens": 12, "warmup": False},
]


def serve_http_port() -> int:
    """The HTTP port of the cluster's running Serve proxy."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    return int(ray.get(client._controller.get_http_config.remote()).port)


@pytest.fixture(scope="session")
def serve_app(ray_cluster, tmp_path_factory):
    """Deploys the service as app "qtts" at route "/"; yields {"url", "port", "config", "voices_dir"}."""
    import ray
    from ray import serve

    from serve.app import APP_NAME, build_app
    from tests.conftest import free_port

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    with contextlib.suppress(Exception):  # Serve may already run on this cluster (another module started it)
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    tmp = tmp_path_factory.mktemp("serve")
    config = {"models": TEST_MODELS, "cache_dir": str(tmp / "cache"), "voices_uri": str(tmp / "voices"),
              "max_input_chars": 500, "max_body_bytes": 64 * 1024, "max_upload_bytes": 512 * 1024,
              "ws_idle_timeout_s": 3}
    t = time.time()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    port = serve_http_port()
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "config": config, "voices_dir": tmp / "voices",
           "deploy_s": time.time() - t}
    serve.delete(APP_NAME)

