"""`qtts serve`: run the speech service (joins a running Ray cluster, or starts a local one when none runs).

    qtts serve                                   # one tiny CustomVoice model on 127.0.0.1:8000
    qtts serve --config configs/serve.yaml       # the same file `serve run` takes
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_serve_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Serve config file -> (http_options, args of the `qtts` application)."""
    import yaml

    doc = yaml.safe_load(Path(path).read_text()) or {}
    apps = [a for a in doc.get("applications", []) if a.get("name", "qtts") == "qtts"]
    if not apps:
        raise SystemExit(f"{path}: no application named 'qtts' under applications:")
    return dict(doc.get("http_options") or {}), dict(apps[0].get("args") or {})


def _connect(address: str | None) -> None:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a new local cluster on loopback
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()),
                                                                     os.environ.get("PYTHONPATH")]))}}
    try:
        ray.init(address=address or "auto", runtime_env=env, log_to_driver=True)
        log.info("joined the running Ray cluster")
    except ConnectionError:
        if address not in (None, "auto"):
            raise
        log.info("no Ray cluster running: starting a local one")
        ray.init(runtime_env=env, include_dashboard=False)


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from .app import APP_NAME, build_app
    from .config import ServiceConfig

    http, app_args = read_serve_yaml(args.config) if args.config else ({}, {})
    cfg = ServiceConfig.from_dict(app_args).with_env_keys()  # the same resolved keys the ingress will enforce
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    if host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_keys or cfg.admin_api_keys):
        log.warning("serving on %s without API keys (set api_keys or QTTS_API_KEYS)", host)
    _connect(args.address)
    serve.start(http_options={"host": host, "port": port})
    log.info("qtts serving on http://%s:%d (playground at /)", host, port)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=not args.detach)
    return 0


def register(subparsers) -> None:
    """Entry point for the `qtts.commands` group: adds `qtts serve`."""
    p = subparsers.add_parser("serve", help="run the streaming speech service (Ray Serve)")
    p.add_argument("--config", default=None, help="Serve config YAML (configs/serve.yaml); default: one tiny model")
    p.add_argument("--host", default=None, help="HTTP host (default from the YAML, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default from the YAML, else 8000)")
    p.add_argument("--address", default=None, help="Ray address (default: a running cluster, else a local one)")
    p.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
    p.set_defaults(func=_serve)
