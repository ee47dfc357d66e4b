"""`qtts serve` as an operator meets it (issue 8, Found 10): models from flags with no YAML, a stale cluster file,
a missing config, --port on a running Serve, GPUs that are not there, and what Ctrl-C stops."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from qwen_tts_core.cli import build_parser
from serve.cli import find_cluster, models_from_args, read_serve_yaml, start_http, wait_for_http

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(ROOT), **extra)
    return env


def _qtts(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen_tts_core.cli", "serve", *args], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


def _stale_tmpdir() -> tuple[str, str]:
    """A Ray temp root whose cluster file points at a port where nothing listens (a head that died)."""
    root = tempfile.mkdtemp(prefix="qc-", dir="/tmp")   # short: Ray's socket paths must fit in 107 bytes
    os.makedirs(f"{root}/ray")
    dead = f"127.0.0.1:{_free_port()}"
    Path(f"{root}/ray/ray_current_cluster").write_text(dead)
    return root, dead


def test_missing_or_broken_config_is_a_clear_error(tmp_path):
    r = _qtts("--config", str(tmp_path / "nope.yaml"))
    assert r.returncode != 0 and "nope.yaml: no such file" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [name: qtts\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        read_serve_yaml(bad)
    bad.write_text("applications:\n  - name: other\n")
    with pytest.raises(SystemExit, match="no application named 'qtts'"):
        read_serve_yaml(bad)


def test_the_shipped_serve_yaml_is_read_whole(tmp_path):
    http, args, proxy = read_serve_yaml(Path(__file__).resolve().parents[2] / "configs/serve.yaml")
    assert http == {"host": "127.0.0.1", "port": 8000} and proxy == "HeadOnly" and "models" in args


@pytest.mark.parametrize("extra,named", [
    ({"runtime_env": {"env_vars": {"QTTS_API_KEYS": "k1"}}}, "applications[qtts].runtime_env"),
    ({"deployments": [{"name": "tts-cv", "num_replicas": 4}]}, "applications[qtts].deployments"),
    ({"route_prefix": "/tts"}, "applications[qtts].route_prefix: '/tts'"),
    ({"import_path": "other.app:build"}, "applications[qtts].import_path"),
])
def test_what_qtts_serve_would_not_apply_is_refused_not_dropped(tmp_path, extra, named):
    """Review: `qtts serve --config` read only http_options and args: a runtime_env holding QTTS_API_KEYS (where
    serve/README says keys may go for `serve run`) was dropped, and the service started with no keys."""
    import yaml

    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"http_options": {"host": "127.0.0.1", "port": 8000},
                                 "applications": [{"name": "qtts", "route_prefix": "/", "args": {}, **extra}]}))
    with pytest.raises(SystemExit, match=re.escape(named) + ".*use `serve run`"):
        read_serve_yaml(f)
    f.write_text(yaml.safe_dump({"logging_config": {"encoding": "JSON"}, "http_options": {"request_timeout_s": 5},
                                 "applications": [{"name": "qtts"}]}))
    with pytest.raises(SystemExit, match=r"logging_config, http_options\.request_timeout_s"):
        read_serve_yaml(f)
    f.write_text(yaml.safe_dump({"applications": [{"name": "qtts", "runtime_env": {}, "deployments": []}]}))
    assert read_serve_yaml(f) == ({}, {}, None)   # empty: nothing left unapplied


def test_model_flags_build_the_models_without_yaml():
    p = build_parser()
    a = p.parse_args(["serve", "--model", "/ckpts/cv/", "--model", "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
                      "--num-gpus", "0.5", "--dtype", "bfloat16", "--num-replicas", "1", "--num-replicas", "2"])
    assert models_from_args(a) == [
        {"name": "cv", "checkpoint": "/ckpts/cv/", "num_gpus": 0.5, "dtype": "bfloat16", "num_replicas": 1},
        {"name": "Qwen3-TTS-12Hz-0.6B-CustomVoice", "checkpoint": "Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice",
         "num_gpus": 0.5, "dtype": "bfloat16", "num_replicas": 2}]
    a = p.parse_args(["serve", "--model", "a", "--name", "x", "--model", "b", "--name", "y"])
    assert [m["name"] for m in models_from_args(a)] == ["x", "y"]
    with pytest.raises(SystemExit, match="--name was given 1 times for 2"):
        models_from_args(p.parse_args(["serve", "--model", "a", "--model", "b", "--name", "x"]))
    with pytest.raises(SystemExit, match="--dtype was given 2 times for 3"):
        models_from_args(p.parse_args(["serve", "--model", "a", "--model", "b", "--model", "c",
                                       "--dtype", "float32", "--dtype", "bfloat16"]))


@pytest.mark.parametrize("flags, named", [(["--num-gpus", "1"], "--num-gpus"), (["--dtype", "bfloat16"], "--dtype"),
                                           (["--name", "x", "--num-replicas", "2"], "--name, --num-replicas")])
def test_model_flags_without_model_are_refused_not_dropped(flags, named):
    """--name/--num-gpus/--dtype/--num-replicas describe the models given with --model. Without one they were
    dropped: `qtts serve --num-gpus 1` on a CPU host served the default model on the CPU, past the GPU check (found
    by the new-user review). Refused before any Ray starts, naming them."""
    from serve.cli import _serve

    with pytest.raises(SystemExit, match=re.escape(named) + " apply to the models given with --model"):
        _serve(build_parser().parse_args(["serve", *flags]))
    with pytest.raises(SystemExit, match="apply to the models given with --model"):
        _serve(build_parser().parse_args(["serve", "--config", "configs/serve.yaml", *flags]))


def test_stale_cluster_file_is_reported_within_seconds(monkeypatch, caplog):
    root, dead = _stale_tmpdir()
    try:
        monkeypatch.setenv("RAY_TMPDIR", root)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        t = time.perf_counter()
        with caplog.at_level(logging.WARNING, logger="serve.cli"):
            assert find_cluster(None) is None          # start a local Ray instead of waiting for a dead GCS
        assert time.perf_counter() - t < 3
        assert "stale Ray cluster file" in caplog.text and dead in caplog.text
        with pytest.raises(SystemExit, match="no Ray GCS answers"):
            find_cluster(dead)                         # an explicit --address is not silently replaced
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.ray
def test_a_proxy_that_missed_its_readiness_check_is_waited_for(monkeypatch):
    """Found under load on 2 cores: Serve's proxy missed its 5 s readiness check, Serve killed and replaced it, and
    `serve.start` raised ActorDiedError, failing `qtts serve`. With the controller up that is not fatal; the command
    then waits for the HTTP health route before it says it serves. Without a controller the error stands."""
    import http.server
    import threading

    from ray import serve
    from ray.exceptions import ActorDiedError
    from ray.serve import context

    clients = [None, object()]         # no controller before serve.start; one after it
    monkeypatch.setattr(context, "_get_global_client", lambda **_: clients.pop(0) if clients else None)
    monkeypatch.setattr(serve, "start", lambda **_: (_ for _ in ()).throw(ActorDiedError()))
    assert start_http("127.0.0.1", 8123, True) == ("127.0.0.1", 8123)
    with pytest.raises(ActorDiedError):   # no controller came up: a real failure
        start_http("127.0.0.1", 8123, True)

    answers = [503, 503, 200]

    class Health(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            code = answers.pop(0) if len(answers) > 1 else answers[0]
            self.send_response(code if self.path == "/-/healthz" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
    for var in ("http_proxy", "HTTP_PROXY"):       # a user's proxy must not carry the loopback probe
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        waited = wait_for_http(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=30)
    finally:
        server.shutdown()
        server.server_close()
    assert 0.9 <= waited < 30 and answers == [200]        # two refusals 0.5 s apart, then ready
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(SystemExit, match=f"{url} did not answer within 1.5 s"):
        wait_for_http(url, timeout_s=1.5)


def test_port_or_host_change_on_a_running_serve_is_refused(serve_app):
    running = serve_app["port"]
    other = _free_port()
    with pytest.raises(SystemExit, match=f"already runs .* on 127.0.0.1:{running}"):
        start_http("127.0.0.1", other, explicit=True)
    with pytest.raises(SystemExit, match="cannot change"):
        start_http("0.0.0.0", running, explicit=True)
    assert start_http("127.0.0.1", other, explicit=False) == ("127.0.0.1", running)   # not asked: use the running
    r = _qtts("--address", os.environ["RAY_ADDRESS"], "--port", str(other), "--detach")
    assert r.returncode != 0 and f"127.0.0.1:{running}" in r.stderr, r.stderr[-2000:]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{other}/health", timeout=2)


@pytest.mark.ray
def test_gpus_the_cluster_does_not_have_are_a_clear_error(serve_app):
    from serve.cli import check_gpus
    from serve.config import ServiceConfig

    with pytest.raises(SystemExit, match=r"ask for 2 GPU\(s\) but this Ray cluster has 0"):
        check_gpus(ServiceConfig.from_dict({"models": [{"name": "a", "num_gpus": 1, "num_replicas": 2}]}))
    check_gpus(ServiceConfig.from_dict({}))


# `qtts ...` with SIGINT's default disposition, as a terminal's Ctrl-C finds it: a test run started in the
# background inherits SIGINT ignored (a shell's background job), and Python then never raises KeyboardInterrupt
_CLI_WITH_CTRL_C = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "from qwen_tts_core.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.ray
@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_qtts_serve_model_flag_on_a_fresh_ray_then_ctrl_c_stops_what_it_started(checkpoint_factory, sig, said):
    """No YAML, a stale cluster file in Ray's temp dir, no RAY_ADDRESS: `qtts serve --model DIR` reports the stale
    file, starts its own Ray, serves the model; Ctrl-C says it stops the service and that Ray, and does. SIGTERM
    (docker stop, systemd) does the same."""
    ckpt = checkpoint_factory("custom_voice")
    root, dead = _stale_tmpdir()
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _CLI_WITH_CTRL_C, "serve", "--model", str(ckpt),
                             "--name", "tiny", "--port", str(port)], cwd=ROOT,
                            env=_env(RAY_TMPDIR=root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        t0 = time.time()
        while time.time() - t0 < 240:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if "qtts serving" in line:
                break
        out = "".join(lines)
        assert "qtts serving ['tiny'] on http://127.0.0.1:" in out, out[-3000:]
        assert "stale Ray cluster file" in out and dead in out
        if sig == signal.SIGINT:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech", timeout=120,
                           json={"model": "tiny", "input": "From the command line.", "response_format": "pcm",
                                 "max_new_tokens": 8})
            assert r.status_code == 200 and len(r.content) > 0
        # SIGTERM at once: the handler must be in place when "qtts serving" is printed (Ray's own aborts the driver)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
        assert f"{said}: stopping the service and the local Ray this command started" in rest, rest[-3000:]
        assert proc.returncode == 0
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=3)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
