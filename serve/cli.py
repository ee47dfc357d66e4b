"""`qtts serve`: run the speech service (joins a running Ray cluster, or starts a local one when none runs).

    qtts serve                                   # one tiny CustomVoice model on 127.0.0.1:8000
    qtts serve --model Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice --num-gpus 1 --dtype bfloat16
    qtts serve --model ./cv --name cv --model ./base --name clone      # several models, no YAML
    qtts serve --config configs/serve.yaml       # the file `serve run` takes (--model replaces its models); read:
                                                 # proxy_location, http_options host/port, the qtts app's args

Which Ray: `--address`, else RAY_ADDRESS, else the address in Ray's cluster file (`ray_current_cluster` in Ray's
temp dir) -- each only if its GCS answers within a second (a stale file left by a stopped head is reported, not
waited on) -- else a new local Ray that lives as long as this command. HTTP options are fixed for the life of a
Serve instance: on a running Serve a different `--host/--port` is a clear error, not a silent no-op. "qtts serving
..." is printed once the proxy answers its health route (a proxy that Serve replaced on a busy host is waited for).
Ctrl-C or SIGTERM stops the service and the local Ray when this command started that Ray; a joined cluster keeps it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
HTTP_READY_TIMEOUT_S = 120.0   # Serve replaces a proxy that misses its readiness check; wait this long for HTTP


PROXY_LOCATIONS = ("HeadOnly", "EveryNode", "Disabled")   # Serve's ProxyLocation values
_APPLIED = {"top": {"proxy_location", "http_options", "applications"}, "http_options": {"host", "port"},
            "app": {"name", "route_prefix", "import_path", "args"}}


def read_serve_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, Any], str | None]:
    """A Serve config file -> (http_options, args of the `qtts` application, proxy_location). SystemExit with a
    clear message, also for what `serve run` would apply and this command does not (an application's
    `runtime_env`, where API keys may be, or `deployments:` overrides): ignored, they changed the service silently."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"qtts serve: --config {path}: no such file")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SystemExit(f"qtts serve: --config {path}: not valid YAML ({_yaml_error(e)})") from None
    if not isinstance(doc, dict):
        raise SystemExit(f"qtts serve: --config {path}: expected a mapping with applications:")
    listed = doc.get("applications") or []
    if not isinstance(listed, list):
        raise SystemExit(f"qtts serve: --config {path}: applications must be a list of applications")
    apps = [a for a in listed if isinstance(a, dict) and a.get("name", "qtts") == "qtts"]
    if not apps:
        raise SystemExit(f"qtts serve: --config {path}: no application named 'qtts' under applications:")
    if len(apps) > 1:  # serve run refuses duplicate names; taking the first dropped the other's args silently
        raise SystemExit(f"qtts serve: --config {path}: {len(apps)} applications named 'qtts'; keep one")
    http = doc.get("http_options") or {}
    if not isinstance(http, dict):
        raise SystemExit(f"qtts serve: --config {path}: http_options must be a mapping")
    for key, ok, want in (("host", lambda v: isinstance(v, str) and v.strip() != "", "a host name or address"),
                          ("port", lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65535,
                           "an integer port 1-65535")):
        if key in http and not ok(http[key]):
            raise SystemExit(f"qtts serve: --config {path}: http_options.{key} must be {want}, got {http[key]!r}")
    location = doc.get("proxy_location")
    if location is not None and location not in PROXY_LOCATIONS:
        raise SystemExit(f"qtts serve: --config {path}: proxy_location must be one of {list(PROXY_LOCATIONS)}, "
                         f"got {location!r}")
    app = apps[0]
    def unused(d: dict, applied: str, label: str) -> list[str]:  # keys with a value this command would not apply
        return [f"{label}{k}" for k, v in d.items() if k not in _APPLIED[applied] and v not in (None, {}, [], "")]

    unapplied = unused(doc, "top", "") + unused(http, "http_options", "http_options.") + unused(
        app, "app", "applications[qtts].")
    if app.get("route_prefix", "/") != "/":
        unapplied.append(f"applications[qtts].route_prefix: {app['route_prefix']!r} (qtts serve serves at /)")
    if app.get("import_path", "serve.app:app_builder") != "serve.app:app_builder":
        unapplied.append(f"applications[qtts].import_path: {app['import_path']!r}")
    if unapplied:
        raise SystemExit(f"qtts serve: --config {path}: qtts serve does not apply {', '.join(map(str, unapplied))}; "
                         "use `serve run` for those (API keys: args.api_keys or QTTS_API_KEYS in this command's "
                         "environment)")
    args = app.get("args") or {}
    if not isinstance(args, dict):
        raise SystemExit(f"qtts serve: --config {path}: applications[qtts].args must be a mapping")
    from .config import file_args_error

    problem = file_args_error(args)
    if problem:
        raise SystemExit(f"qtts serve: --config {path}: {problem}")
    return dict(http), dict(args), doc.get("proxy_location")


def _yaml_error(e: Exception) -> str:
    """What is wrong and where, without PyYAML's quote of the lines around it (they may hold API keys)."""
    parts = []
    for what, mark in ((getattr(e, "context", None), getattr(e, "context_mark", None)),
                       (getattr(e, "problem", None), getattr(e, "problem_mark", None))):
        if what or mark:
            parts.append(f"{what or 'error'}" + (f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""))
    return "; ".join(parts) if parts else str(e) if isinstance(e, UnicodeDecodeError) else type(e).__name__


def _per_model(values: list | None, n: int, flag: str) -> list:
    """A flag given once applies to every --model; given several times, once per --model in order."""
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise SystemExit(f"qtts serve: {flag} was given {len(values)} times for {n} --model; give it once "
                         "(for all) or once per --model")
    return values


def models_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--model ID_OR_DIR ... [--name] [--num-gpus] [--dtype] [--num-replicas]` -> `models:` entries."""
    n = len(args.model)
    if args.name and len(args.name) != n:
        raise SystemExit(f"qtts serve: --name was given {len(args.name)} times for {n} --model; give one per --model")
    names = args.name or [None] * n
    out = []
    for i, (ckpt, gpus, dtype, replicas) in enumerate(zip(
            args.model, _per_model(args.num_gpus, n, "--num-gpus"), _per_model(args.dtype, n, "--dtype"),
            _per_model(args.num_replicas, n, "--num-replicas"))):
        if not Path(ckpt).expanduser().is_absolute() and Path(ckpt).exists():
            ckpt = str(Path(ckpt).absolute())  # a replica resolves a relative folder in its own working folder
        # named after the folder itself: `--model .` is the working folder's name, not model0
        name = names[i] or re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(os.path.normpath(ckpt)).name).strip("-.")
        m: dict[str, Any] = {"name": name or f"model{i}", "checkpoint": ckpt}
        if gpus is not None:
            m["num_gpus"] = gpus
        if dtype is not None:
            m["dtype"] = dtype
        if replicas is not None:
            m["num_replicas"] = replicas
        out.append(m)
    return out


def gcs_answers(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether something accepts TCP connections at a Ray address (`host:port`, optionally with a scheme)."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def find_cluster(address: str | None) -> str | None:
    """The Ray address to join, or None to start a local Ray. SystemExit when `--address` names a dead GCS."""
    from ray._private.utils import get_ray_address_file, read_ray_address

    if address and address not in ("auto", "local"):
        if not gcs_answers(address):
            raise SystemExit(f"qtts serve: --address {address}: no Ray GCS answers there")
        return address
    if address == "local":
        return None
    env = os.environ.get("RAY_ADDRESS")
    if env:
        if gcs_answers(env):
            return env
        log.warning("RAY_ADDRESS=%s: no Ray GCS answers there; starting a local Ray instead", env)
        return None
    found = read_ray_address()
    if found:
        if gcs_answers(found):
            return found
        log.warning("stale Ray cluster file %s points at %s where nothing answers (a head stopped uncleanly); "
                    "starting a local Ray instead", get_ray_address_file(None), found)
    return None


def _connect(address: str | None) -> bool:
    """Join the cluster `find_cluster` names or start a local one; True when this process started it."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a new local cluster on loopback
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()),
                                                                     os.environ.get("PYTHONPATH")]))}}
    target = find_cluster(address)
    if target is not None:
        ray.init(address=target, runtime_env=env, log_to_driver=True)
        log.info("joined the Ray cluster at %s", target)
        return False
    os.environ.pop("RAY_ADDRESS", None)
    log.info("starting a local Ray (it stops when this command ends)")
    ray.init(address="local", runtime_env=env, include_dashboard=False)
    return True


def check_gpus(cfg) -> None:
    """A clear error before deploying when the cluster cannot give the models the GPUs they ask for."""
    import ray

    want = sum(m.num_gpus * (m.num_replicas if not m.autoscaling else m.autoscaling.get("min_replicas", 1))
               for m in cfg.models)
    have = ray.cluster_resources().get("GPU", 0)
    if want > have:
        raise SystemExit(f"qtts serve: the models ask for {want:g} GPU(s) but this Ray cluster has {have:g} "
                         "(no CUDA device found?); set --num-gpus 0 / num_gpus: 0 to run on CPU")


def port_taken(host: str, port: int) -> bool:
    """Whether another program holds host:port (a bind as Serve's proxy makes it, SO_REUSEADDR as uvicorn sets)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                   flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as e:
        return e.errno == errno.EADDRINUSE
    return False


def _on_head_node() -> bool:
    """Whether this driver runs on the Ray head's machine (where Serve starts its first proxy); with no Ray
    connected yet, `serve.start` starts one here (asking Ray's runtime context would start it now)."""
    import ray

    if not ray.is_initialized():
        return True
    me = ray.get_runtime_context().get_node_id()
    return any(n.get("NodeID") == me and "node:__internal_head__" in n.get("Resources", {}) for n in ray.nodes())


def start_http(host: str, port: int, explicit: bool, proxy_location: str | None = None,
               command: str = "qtts serve", flag: str = "--port") -> tuple[str, int]:
    """Start Serve's HTTP proxy on host:port, or check a running Serve listens there; returns where it listens.
    A port another program holds is a one-line SystemExit naming `flag` (Serve's own failure is a traceback after
    its proxy's retries). A proxy that misses Serve's 5 s readiness check (a busy host) is replaced by Serve: not an
    error here; `wait_for_http` waits for it."""
    from ray import serve
    from ray.exceptions import ActorDiedError, GetTimeoutError
    from ray.serve.context import _get_global_client

    running = _get_global_client(raise_if_no_controller_running=False)
    if running is None:
        if _on_head_node() and port_taken(host, port):  # the proxy starts on the head (Serve's HeadOnly default)
            raise SystemExit(f"{command}: {host}:{port} is in use by another program; choose another port with "
                             f"{flag}")
        try:
            serve.start(http_options={"host": host, "port": port},
                        **({"proxy_location": proxy_location} if proxy_location else {}))
        except (ActorDiedError, GetTimeoutError) as e:
            if _get_global_client(raise_if_no_controller_running=False) is None:
                raise
            log.warning("Serve's HTTP proxy was not ready in time (%s); Serve starts another", type(e).__name__)
        return host, port
    cur = running.http_config
    if explicit and (cur.host, int(cur.port)) != (host, port):
        raise SystemExit(f"qtts serve: Serve already runs in this Ray cluster on {cur.host}:{cur.port}; its HTTP "
                         f"host and port cannot change while it runs. Use --host {cur.host} --port {cur.port}, or "
                         "stop it first (`serve shutdown`, which stops every Serve app of the cluster)")
    return cur.host, int(cur.port)


def _local_url(host: str, port: int) -> str:
    """Where this machine reaches a proxy bound to host:port (a wildcard bind is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def wait_for_http(url: str, timeout_s: float = HTTP_READY_TIMEOUT_S) -> float:
    """Wait until Serve's proxy at `url` answers its health route (200); returns the seconds waited. SystemExit
    with a clear message when it never does."""
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))   # our own proxy: never via http_proxy
    t0 = time.monotonic()
    last = "no answer"
    while True:
        try:
            with opener.open(f"{url}/-/healthz", timeout=PROBE_TIMEOUT_S * 5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, ValueError) as e:
            last = type(e).__name__
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"qtts serve: the application is deployed but Serve's HTTP proxy at {url} did not "
                             f"answer within {timeout_s:g} s ({last})")
        time.sleep(0.5)


def _serve(args: argparse.Namespace) -> int:
    from ray import serve

    from .app import APP_NAME, build_app
    from .config import ServiceConfig

    model_only = [flag for flag, v in (("--name", args.name), ("--num-gpus", args.num_gpus), ("--dtype", args.dtype),
                                       ("--num-replicas", args.num_replicas)) if v is not None]
    if model_only and not args.model:  # they describe --model's models: dropped, --num-gpus 1 served on the CPU
        raise SystemExit(f"qtts serve: {', '.join(model_only)} apply to the models given with --model, and none "
                         "was; without --model, set them in the config's models")
    http, app_args, proxy_location = read_serve_yaml(args.config) if args.config else ({}, {}, None)
    if args.model:
        app_args["models"] = models_from_args(args)
    if args.port is not None and not 1 <= args.port <= 65535:
        raise SystemExit(f"qtts serve: --port must be 1-65535, got {args.port}")
    try:
        cfg = ServiceConfig.from_dict(app_args).with_env_keys()  # the same resolved keys the ingress will enforce
        application = build_app(cfg)  # Serve's own checks of the deployments' options, before any Ray starts
    except (TypeError, ValueError) as e:
        raise SystemExit(f"qtts serve: {e}") from None
    explicit = args.host is not None or args.port is not None
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port if args.port is not None else http.get("port", 8000)
    if host not in ("127.0.0.1", "localhost", "::1") and not (cfg.api_keys or cfg.admin_api_keys):
        log.warning("serving on %s without API keys (set api_keys or QTTS_API_KEYS)", host)
    started = _connect(args.address)
    check_gpus(cfg)
    host, port = start_http(host, port, explicit, proxy_location)
    serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _sigterm_as_ctrl_c()  # before "qtts serving" is printed: a SIGTERM right after it must find this handler
    try:
        wait_for_http(_local_url(host, port))
        print(f"qtts serving {[m.name for m in cfg.models]} on {url} (playground at /)", flush=True)
        if args.detach:
            if started:
                print("--detach with a Ray this command started: the service stops as this command exits; start a "
                      "head first (cluster/local.sh start) to keep it running", flush=True)
            return 0
        while True:
            time.sleep(1)
    except KeyboardInterrupt as e:
        why = "SIGTERM" if str(e) == "SIGTERM" else "Ctrl-C"
        if started:
            print(f"\n{why}: stopping the service and the local Ray this command started", flush=True)
            serve.shutdown()
        else:
            import ray

            gcs = ray.get_runtime_context().gcs_address
            print(f"\n{why}: the service keeps running on {url} in the Ray cluster this command joined; stop it "
                  f"with `python -c \"import ray; from ray import serve; ray.init(address='{gcs}'); "
                  f"serve.delete('{APP_NAME}')\"`", flush=True)
    return 0


def _on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt("SIGTERM")


def _sigterm_as_ctrl_c() -> None:
    """SIGTERM (docker stop, systemd, kill, a Kubernetes pod ending) stops the command as Ctrl-C does, instead of
    Ray's driver handler, which exits with a stack dump and no `serve.shutdown()`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def register(subparsers) -> None:
    """Entry point for the `qtts.commands` group: adds `qtts serve`."""
    p = subparsers.add_parser("serve", help="run the streaming speech service (Ray Serve)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="Serve config YAML (configs/serve.yaml); default: one tiny model")
    p.add_argument("--model", action="append", default=None, metavar="ID_OR_DIR",
                   help="serve this checkpoint (hub id or folder); repeat for several models (replaces the "
                        "config's models)")
    p.add_argument("--name", action="append", default=None,
                   help="served model name (no '/', '#' or control characters), once per --model (default: the "
                        "folder's or id's last part); only with --model")
    p.add_argument("--num-gpus", action="append", type=float, default=None,
                   help="GPUs per replica (0.5 packs two on one GPU); once for all models or once per --model; only "
                        "with --model (without it, set num_gpus in the config)")
    p.add_argument("--dtype", action="append", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights dtype; once for all models or once per --model; only with --model")
    p.add_argument("--num-replicas", action="append", type=int, default=None,
                   help="replicas per model; once for all models or once per --model; only with --model")
    p.add_argument("--host", default=None, help="HTTP host (default from the YAML, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default from the YAML, else 8000)")
    p.add_argument("--address", default=None,
                   help="Ray address to join (default: RAY_ADDRESS or Ray's cluster file when its GCS answers, "
                        "else a new local Ray; 'local' always starts one)")
    p.add_argument("--detach", action="store_true", help="deploy and return instead of blocking")
    p.set_defaults(func=_serve)
