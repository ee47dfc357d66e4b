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
     "interactive_reserve": 1, "max_new_tokens": 64, "default_max_new_tokens": 16, "max_bulk_queue": 2},
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
              "ws_idle_timeout_s": 3, "ws_max_messages": 3000, "ws_max_messages_per_s": 500, "ws_message_burst": 2000,
              "session_lease_s": 6, "session_deadline_s": 60}
    t = time.time()
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    port = serve_http_port()
    yield {"url": f"http://127.0.0.1:{port}", "port": port, "config": config, "voices_dir": tmp / "voices",
           "deploy_s": time.time() - t}
    serve.delete(APP_NAME)



# ---- a second app with API keys (env + config) and an audio_url allow-list: tests of keys, tenancy and fetching ------

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567", "admin": "admin-key-89ab"}


@pytest.fixture(scope="session")
def audio_server(ref_wav_path):
    """A loopback HTTP server for audio_url tests; records every path requested (`seen`).

    /ok/ref.wav and /private/x.wav: a real reference; /ok/redirect-out -> /private/x.wav (outside the allow-list);
    /ok/redirect-in -> /ok/ref.wav; /ok/loop -> itself; /ok/big.wav: 600 KiB (over keys_app's upload limit)."""
    import http.server
    import threading

    wav = ref_wav_path.read_bytes()
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            seen.append(self.path)
            base = f"http://127.0.0.1:{self.server.server_address[1]}"
            redirects = {"/ok/redirect-out": f"{base}/private/x.wav", "/ok/redirect-in": "/ok/ref.wav",
                         "/ok/loop": "/ok/loop"}
            bodies = {"/ok/ref.wav": wav, "/private/x.wav": wav, "/ok/big.wav": b"\0" * (600 * 1024)}
            if self.path in redirects:
                self.send_response(302)
                self.send_header("Location", redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path in bodies:
                self.send_response(200)
                self.send_header("Content-Type", "audio/wav")
                self.send_header("Content-Length", str(len(bodies[self.path])))
                self.end_headers()
                self.wfile.write(bodies[self.path])
            else:
                self.send_error(404)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}", "seen": seen}
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def keys_app(serve_app, audio_server, tmp_path_factory):
    """App "qtts-keys" at /keys: one Base model; user keys ONLY in the driver's environment while the app is built
    (QTTS_API_KEYS: the ingress worker never sees it), the admin key in the config; audio_url allowed under
    the loopback server's /ok/. Yields {"url", "keys", "voices_dir"}."""
    from ray import serve

    from serve.app import build_app

    tmp = tmp_path_factory.mktemp("serve-keys")
    config = {"models": [{"name": "base", "model_type": "base", "num_cpus": 0.25, "max_sessions": 2,
                          "max_queue": 2, "interactive_reserve": 0, "max_new_tokens": 32, "default_max_new_tokens": 6,
                          "warmup": False}],
              "cache_dir": serve_app["config"]["cache_dir"], "voices_uri": str(tmp / "voices"),
              "admin_api_keys": [KEYS["admin"]], "allowed_audio_url_prefixes": [f"{audio_server['url']}/ok/"],
              "max_upload_bytes": 512 * 1024, "max_body_bytes": 1024 * 1024, "ws_idle_timeout_s": 3}
    saved = os.environ.get("QTTS_API_KEYS")
    os.environ["QTTS_API_KEYS"] = f"{KEYS['alice']}, {KEYS['bob']}"
    try:
        app = build_app(config)
    finally:
        if saved is None:
            os.environ.pop("QTTS_API_KEYS", None)
        else:
            os.environ["QTTS_API_KEYS"] = saved
    serve.run(app, name="qtts-keys", route_prefix="/keys")
    yield {"url": f"http://127.0.0.1:{serve_http_port()}/keys", "keys": dict(KEYS), "voices_dir": tmp / "voices"}
    serve.delete("qtts-keys")


# A second app of one model on THREE replicas (session routing, kills); cheap: tiny model, short answers.
MULTI = {"name": "cv3", "model_type": "custom_voice", "num_cpus": 0.2, "num_replicas": 3, "max_sessions": 8,
         "max_queue": 8, "interactive_reserve": 1, "max_new_tokens": 2000, "default_max_new_tokens": 12}


@pytest.fixture(scope="session")
def multi_app(serve_app, tmp_path_factory):
    """App "multi" at "/multi": model `cv3` on three replicas; yields {"url", "config", "app"}."""
    from ray import serve

    from serve.app import build_app

    tmp = tmp_path_factory.mktemp("multi")
    config = {"models": [MULTI], "cache_dir": str(tmp / "cache"), "voices_uri": str(tmp / "voices"),
              "max_input_chars": 500, "ws_idle_timeout_s": 20, "session_lease_s": 3, "session_deadline_s": 120}
    serve.run(build_app(config), name="multi", route_prefix="/multi")
    yield {"url": f"{serve_app['url']}/multi", "config": config, "app": "multi"}
    serve.delete("multi")
