"""Behaviour of `qtts serve` (serve/cli.py: options, the config file, which Ray it joins, the HTTP proxy, Ctrl-C and
SIGTERM), serve/liveness.py, serve/jsonlimits.py and serve/routing.py that the suite did not pin, found by hand
mutation testing: each test here was seen failing on the mutant(s) named in its docstring and passing on the real
code. No Ray: where `qtts serve` would join or start one, its steps are stand-ins that record what they were asked
(`fake_ray`); sockets and HTTP servers are on loopback."""

from __future__ import annotations

import contextvars
import http.server
import logging
import re
import signal
import socket
import time
from types import SimpleNamespace

import pytest
from ray.actor import ActorHandle

from qwen_tts_core.cli import build_parser
from serve import cli, liveness
from serve.cli import (
    find_cluster,
    gcs_answers,
    models_from_args,
    port_taken,
    read_serve_yaml,
    start_http,
    wait_for_http,
)
from serve.config import ServiceConfig
from serve.jsonlimits import JsonLimits, JsonRejected, JsonTooLarge, loads_bounded, max_depth
from serve.routing import detached, new_session_id, owner_of, route_key
from tests.serve.helpers import loopback_http


def _yaml(tmp_path, text: str):
    f = tmp_path / "s.yaml"
    f.write_text(text)
    return f


@pytest.fixture
def listener():
    """A loopback TCP port something accepts connections on (a live GCS, as far as a probe can tell)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def _free_port() -> int:
    from tests.conftest import free_port

    return free_port()


# ---- the config file ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,match", [
    pytest.param(b"applications:\n  - name: qtts\n    args: {}\n# \xff\xfe\n", r"not valid YAML \(.*position 44",
                 id="not-utf8"),
    pytest.param(b"- qtts\n", "expected a mapping with applications:", id="a-list"),
    pytest.param(b"http_options: 5\napplications:\n  - name: qtts\n", "http_options must be a mapping",
                 id="http-options-not-a-mapping"),
    pytest.param(b"applications:\n  - name: qtts\n    args: [1]\n", r"applications\[qtts\]\.args must be a mapping",
                 id="args-not-a-mapping"),
    pytest.param(b"http_options:\n  host: '  '\napplications:\n  - name: qtts\n", "http_options.host must be",
                 id="blank-host"),
    pytest.param(b"http_options:\n  port: 0\napplications:\n  - name: qtts\n", "http_options.port must be",
                 id="port-0"),
    pytest.param(b"applications:\n  - name: qtts\n    args: {max_sessions: 4}\n  bad: [\n", r"line 4, column 3",
                 id="syntax-error-column"),
])
def test_a_config_file_that_cannot_be_served_is_a_one_line_error(tmp_path, body, match):
    """(mutants C03 C24: a file that is not UTF-8 was a UnicodeDecodeError traceback, or lost where the bad byte is;
    C04 C08 C19: a list where a mapping goes was an AttributeError traceback; C09 C10: a blank host or port 0 taken;
    C22 C23: the line or column of a YAML error off by one). Each is a SystemExit whose message names the file and what is wrong, before any Ray starts."""
    f = tmp_path / "s.yaml"
    f.write_bytes(body)
    with pytest.raises(SystemExit, match=match) as e:
        read_serve_yaml(f)
    assert str(e.value).startswith(f"qtts serve: --config {f}: ")


def test_a_config_path_that_is_a_folder_is_no_such_file(tmp_path):
    """(mutant C01: a folder passed the file check and failed reading it with an IsADirectoryError traceback)"""
    with pytest.raises(SystemExit, match="no such file"):
        read_serve_yaml(tmp_path)


def test_an_unnamed_application_is_the_qtts_one_and_port_65535_is_a_port(tmp_path):
    """An application without `name:` is taken as qtts (mutant C06: 'no application named qtts'); 65535 is the
    highest port, taken (mutant C11: refused)."""
    f = _yaml(tmp_path, "http_options: {port: 65535}\napplications:\n  - args: {max_sessions: 4}\n")
    assert read_serve_yaml(f) == ({"port": 65535}, {"max_sessions": 4}, None)


# ---- models from flags ----------------------------------------------------------------------------------------------

def test_a_default_model_name_is_the_folders_name_made_safe(tmp_path, monkeypatch):
    """The name of `--model DIR` without `--name` is the folder's last part with each run of other characters one
    '-' and no '-' or '.' at its ends (mutants C29: 'my-model-v2-'; C30: 'my-model--v2'); a checkpoint whose last
    part leaves nothing ('@@', '/') is named by its place, model0, model1, ... (mutant C31: every such model
    'model', two deployments of one name)."""
    monkeypatch.chdir(tmp_path)
    (m,) = models_from_args(build_parser().parse_args(["serve", "--model", "/ckpts/my model (v2)/"]))
    assert m["name"] == "my-model-v2"
    a, b = models_from_args(build_parser().parse_args(["serve", "--model", "@@", "--model", "/"]))
    assert (a["name"], b["name"]) == ("model0", "model1")


def test_a_model_served_from_the_working_folder_is_named_after_that_folder(tmp_path, monkeypatch):
    """DEFECT (fixed in fix.diff): `qtts serve --model .` in /models/cv served a model named 'model0' (the name was
    taken from '.' itself, which has no last part), so clients had to guess it; the --help says the default name is
    the folder's last part. Named after the folder it is, as `--model ./cv` is."""
    (tmp_path / "cv").mkdir()
    monkeypatch.chdir(tmp_path / "cv")
    for given in (".", "./"):
        (m,) = models_from_args(build_parser().parse_args(["serve", "--model", given]))
        assert m == {"name": "cv", "checkpoint": str(tmp_path / "cv")}, given


def test_model_flag_types_are_checked_by_the_parser():
    """--dtype float16 is one of the dtypes (mutant C92: refused); --num-replicas is a whole number (mutant C93:
    2.5 taken); --port is a number (mutant C91: a string, compared with 1..65535 in a TypeError traceback)."""
    p = build_parser()
    (m,) = models_from_args(p.parse_args(["serve", "--model", "/c", "--dtype", "float16"]))
    assert m["dtype"] == "float16"
    for bad in (["--model", "/c", "--num-replicas", "2.5"], ["--port", "80a"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["serve", *bad])
        assert e.value.code == 2
    assert p.parse_args(["serve", "--port", "8123"]).port == 8123


# ---- which Ray ------------------------------------------------------------------------------------------------------

def test_a_ray_address_is_probed_at_its_host_and_port(listener):
    """`host:port`, with a scheme, a trailing '/' or no host (loopback) (mutants C36 C37 C38: read as no answer,
    C40: a live GCS read as dead); something that is no address is no answer, not a ValueError traceback (C39)."""
    for address in (f"127.0.0.1:{listener}", f"ray://127.0.0.1:{listener}", f"ray://127.0.0.1:{listener}/",
                    f":{listener}"):
        assert gcs_answers(address), address
    assert not gcs_answers(f"127.0.0.1:{_free_port()}")
    assert not gcs_answers("nonsense") and not gcs_answers("host:port")


@pytest.fixture
def no_cluster_file(tmp_path, monkeypatch):
    """A Ray temp dir with no cluster file, and no RAY_ADDRESS."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_address_auto_and_local_and_ray_address(no_cluster_file, listener, monkeypatch, caplog):
    """--address auto looks for a cluster as no --address does (mutant C41: probed as a host named 'auto', then
    'no Ray GCS answers there'); --address local always starts a new Ray, even with a live RAY_ADDRESS (mutant
    C42: joined it); a RAY_ADDRESS where nothing answers is reported and a local Ray started (mutant C43: joined,
    ray.init then waits for a dead GCS)."""
    assert find_cluster("auto") is None
    live = f"127.0.0.1:{listener}"
    monkeypatch.setenv("RAY_ADDRESS", live)
    assert find_cluster(None) == live and find_cluster("auto") == live
    assert find_cluster("local") is None
    dead = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with caplog.at_level(logging.WARNING, logger="serve.cli"):
        assert find_cluster(None) is None
    assert f"RAY_ADDRESS={dead}: no Ray GCS answers there" in caplog.text


# ---- the HTTP port --------------------------------------------------------------------------------------------------

def test_only_a_port_another_program_holds_is_taken(listener):
    """A listener holds it: taken. A free port, a host not on this machine (bind fails with EADDRNOTAVAIL) and a
    port whose last connection is in TIME_WAIT (a restart right after a stop; the proxy sets SO_REUSEADDR and binds
    it) are not 'in use by another program' (mutants C48: a free port taken; C46: any bind error taken; C47: no
    SO_REUSEADDR, TIME_WAIT taken)."""
    assert port_taken("127.0.0.1", listener)
    assert not port_taken("127.0.0.1", _free_port())
    assert not port_taken("192.0.2.1", _free_port())          # TEST-NET-1: no address of this machine
    with socket.socket() as srv:                             # the previous proxy (uvicorn sets SO_REUSEADDR)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()                                         # the server side closes first: its port in TIME_WAIT
        client.recv(1)
        client.close()
    assert not port_taken("127.0.0.1", port)


@pytest.fixture
def fake_serve(monkeypatch):
    """Serve's controller lookup and serve.start as stand-ins: `state.client` is what the lookup answers (None: no
    Serve runs), `state.started` what serve.start was called with, `state.start_error` what it raises."""
    from ray import serve
    from ray.serve import context

    state = SimpleNamespace(client=None, started=[], start_error=None, after_start=None)

    def start(**kw):
        state.started.append(kw)
        if state.start_error is not None:
            state.client = state.after_start
            raise state.start_error
    monkeypatch.setattr(context, "_get_global_client", lambda **_: state.client)
    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(cli, "_on_head_node", lambda: True)
    return state


def test_a_taken_port_names_the_command_and_its_flag(fake_serve, listener):
    """(mutants C49: not checked, Serve's proxy failed after its retries with a traceback; C50: `qtts demo` was told
    to use --port, which it does not have)"""
    with pytest.raises(SystemExit, match=rf"^qtts demo: 127.0.0.1:{listener} is in use .* with --http-port$"):
        start_http("127.0.0.1", listener, explicit=False, command="qtts demo", flag="--http-port")
    assert fake_serve.started == []


def test_serve_start_gets_the_proxy_location_and_a_slow_proxy_is_not_fatal(fake_serve):
    """The config's proxy_location reaches serve.start (mutant C51: dropped, EveryNode served from the head only).
    A proxy that missed its readiness check (ActorDiedError or GetTimeoutError from serve.start) while Serve's
    controller came up is waited for, not fatal (mutant C53: GetTimeoutError fatal); with no controller it is
    (mutant C52: swallowed, then 'qtts serving' never came)."""
    from ray.exceptions import ActorDiedError, GetTimeoutError

    port = _free_port()
    assert start_http("127.0.0.1", port, True, "EveryNode") == ("127.0.0.1", port)
    assert fake_serve.started == [{"http_options": {"host": "127.0.0.1", "port": port},
                                   "proxy_location": "EveryNode"}]
    start_http("127.0.0.1", port, True)
    assert "proxy_location" not in fake_serve.started[-1]
    for err in (ActorDiedError(), GetTimeoutError("slow")):
        fake_serve.client, fake_serve.start_error, fake_serve.after_start = None, err, object()
        assert start_http("127.0.0.1", port, True) == ("127.0.0.1", port)
    fake_serve.client, fake_serve.start_error, fake_serve.after_start = None, ActorDiedError(), None
    with pytest.raises(ActorDiedError):
        start_http("127.0.0.1", port, True)


def test_a_running_serve_keeps_its_host_and_port(fake_serve):
    """On a running Serve, an asked host (mutant C54: only the port compared) or port that differs is refused; not
    asked, the running one's host and port are used and returned, so 'qtts serving' prints where it really listens
    (mutants C55: refused; C56: the defaults returned)."""
    fake_serve.client = SimpleNamespace(http_config=SimpleNamespace(host="0.0.0.0", port="8100"))
    with pytest.raises(SystemExit, match=r"already runs .* on 0.0.0.0:8100"):
        start_http("127.0.0.1", 8100, explicit=True)
    assert start_http("127.0.0.1", 8000, explicit=False) == ("0.0.0.0", 8100)
    assert start_http("0.0.0.0", 8100, explicit=True) == ("0.0.0.0", 8100)
    assert fake_serve.started == []


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers /-/healthz with the next of `answers` (the last one repeats), every other path 404; records paths."""

    answers: list[int] = []
    seen: list[str] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.seen.append(self.path)
        code = 404
        if self.path == "/-/healthz":
            code = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _health(answers: list[int]) -> type[_Health]:
    return type("Health", (_Health,), {"answers": list(answers), "seen": []})


def test_ready_means_a_200_from_the_proxys_health_route_reached_directly(monkeypatch):
    """Serve's proxy is ready when GET /-/healthz answers 200: a 503 (mutant C61) or a 204 (C65) is not ready, the
    app's own /health is not the proxy's route (C63), and the probe never goes through the user's http_proxy
    (mutant C60: the proxy at port 9 refused it, and the wait ran out)."""
    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    handler = _health([503, 204, 200])
    with loopback_http(handler) as url:
        wait_for_http(url, timeout_s=30)
    assert handler.seen == ["/-/healthz"] * 3


def test_a_proxy_that_never_answers_is_an_error_saying_what_came_back():
    """(mutants C62: the message lost the last answer; C64: a refused connection escaped as a URLError traceback)"""
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(SystemExit, match=re.escape(f"{url} did not answer within 0.2 s (URLError)")):
        wait_for_http(url, timeout_s=0.2)
    with loopback_http(_health([503])) as url, pytest.raises(SystemExit, match=re.escape("within 0.2 s (HTTP 503)")):
        wait_for_http(url, timeout_s=0.2)


# ---- GPUs -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("models,gpus,want", [
    pytest.param([{"name": "a", "num_gpus": 1, "num_replicas": 2}], 2, None, id="exactly-enough"),
    pytest.param([{"name": "a", "num_gpus": 1, "autoscaling": {"min_replicas": 3, "max_replicas": 4}}], 2, "3",
                 id="autoscaling-min"),
    pytest.param([{"name": "a", "num_gpus": 1, "autoscaling": {"max_replicas": 4}}], 0, "1",
                 id="autoscaling-default-min-1"),
])
def test_the_gpu_check_counts_what_the_models_start_with(monkeypatch, models, gpus, want):
    """The GPUs asked are num_gpus x the replicas a model starts with (autoscaling: min_replicas, default 1),
    against the cluster's total GPUs (not the ones free now: a redeploy of the running app holds them). Exactly
    enough is enough (mutant C87: refused); autoscaling's min_replicas counts (C88: num_replicas counted, 1 GPU
    asked for 3 replicas) with Serve's default 1 (C89: 0, a CPU cluster passed); the total, not the free (C90)."""
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(gpus)})
    monkeypatch.setattr(ray, "available_resources", lambda: {"CPU": 8.0})
    cfg = ServiceConfig.from_dict({"models": models})
    if want is None:
        cli.check_gpus(cfg)
    else:
        with pytest.raises(SystemExit, match=rf"ask for {want} GPU\(s\) but this Ray cluster has {gpus}"):
            cli.check_gpus(cfg)


# ---- qtts serve, end to end with Ray's steps as stand-ins -----------------------------------------------------------

@pytest.fixture
def fake_ray(monkeypatch):
    """`qtts serve`'s steps that need Ray, recorded instead of run: which Ray (`state.started` says whether this
    command started it), start_http, serve.run / serve.shutdown, the wait for HTTP; the GPU check is the real one
    on a cluster of `state.gpus` GPUs. The blocking loop's sleep runs `state.on_sleep` (default: Ctrl-C). The
    SIGTERM handler in place before is restored afterwards; SIGTERM reaching it fails the test."""
    import ray
    from ray import serve

    state = SimpleNamespace(started=True, gpus=0, connected=[], http=[], runs=[], shutdowns=0, probed=[],
                            on_sleep=None, slept=0)

    def connect(address):
        state.connected.append(address)
        return state.started

    def http(host, port, explicit, proxy_location=None):
        state.http.append((host, port, explicit, proxy_location))
        return host, port

    def shutdown():
        state.shutdowns += 1

    def sleep(_s):
        state.slept += 1
        if state.on_sleep is None:
            raise KeyboardInterrupt
        state.on_sleep()

    monkeypatch.setattr(cli, "_connect", connect)
    monkeypatch.setattr(cli, "start_http", http)
    monkeypatch.setattr(cli, "wait_for_http", lambda url: state.probed.append(url) or 0.0)
    monkeypatch.setattr(cli, "time", SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": float(state.gpus)})
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="10.0.0.5:6379"))
    monkeypatch.setattr(serve, "run", lambda app, **kw: state.runs.append(kw))
    monkeypatch.setattr(serve, "shutdown", shutdown)
    for var in ("QTTS_API_KEYS", "QTTS_ADMIN_API_KEYS"):
        monkeypatch.delenv(var, raising=False)

    def unexpected(signum, frame):
        raise AssertionError("SIGTERM reached the handler qtts serve should have replaced")
    before = signal.signal(signal.SIGTERM, unexpected)
    try:
        yield state
    finally:
        signal.signal(signal.SIGTERM, before)


def _serve(*argv: str) -> int:
    return cli._serve(build_parser().parse_args(["serve", *argv]))


@pytest.mark.parametrize("port", ["0", "65536"])
def test_a_port_outside_1_to_65535_is_refused_before_ray(fake_ray, port):
    """(mutant C66: --port 0 taken, Serve then bound a random port and 'qtts serving' printed port 0)"""
    with pytest.raises(SystemExit, match=f"--port must be 1-65535, got {port}"):
        _serve("--port", port)
    assert fake_ray.connected == []


def test_host_and_port_come_from_the_flags_then_the_file_then_the_defaults(fake_ray, tmp_path):
    """Defaults 127.0.0.1:8000, not asked (mutant C71: every interface by default); the file's port is used
    (C72: 8000); --host wins over the file's host (C73) and alone makes the address asked for, so a running Serve
    elsewhere is an error, not silently used (C70); --port 65535 is a port (C67: refused)."""
    assert _serve() == 0
    f = _yaml(tmp_path, "http_options: {host: 127.0.0.2, port: 9123}\napplications:\n  - name: qtts\n")
    _serve("--config", str(f))
    _serve("--config", str(f), "--host", "localhost")
    _serve("--port", "65535")
    assert fake_ray.http == [("127.0.0.1", 8000, False, None), ("127.0.0.2", 9123, False, None),
                             ("localhost", 9123, True, None), ("127.0.0.1", 65535, True, None)]


def test_zero_replicas_from_the_flag_is_refused_not_replaced_by_one(fake_ray):
    """(mutant C34: --num-replicas 0 was dropped and the model served with the default one replica)"""
    with pytest.raises(SystemExit, match=r"num_replicas must be"):
        _serve("--model", "/ckpts/cv", "--num-replicas", "0")
    assert fake_ray.connected == []


def test_a_public_host_without_keys_is_warned_about_and_environment_keys_count(fake_ray, monkeypatch, caplog):
    """(mutants C74: no warning for 0.0.0.0 without keys; C69: keys in QTTS_API_KEYS, which the ingress enforces,
    not counted, and the operator told the service has none)"""
    with caplog.at_level(logging.WARNING, logger="serve.cli"):
        _serve("--host", "0.0.0.0")
    assert "serving on 0.0.0.0 without API keys" in caplog.text
    caplog.clear()
    monkeypatch.setenv("QTTS_API_KEYS", "sk-test-1")
    with caplog.at_level(logging.WARNING, logger="serve.cli"):
        _serve("--host", "0.0.0.0")
    assert "without API keys" not in caplog.text


def test_models_asking_gpus_the_cluster_lacks_stop_before_deploying(fake_ray):
    """(mutant C75: no GPU check, the replicas waited for GPUs forever)"""
    with pytest.raises(SystemExit, match=r"ask for 1 GPU\(s\) but this Ray cluster has 0"):
        _serve("--model", "/ckpts/cv", "--num-gpus", "1")
    assert fake_ray.runs == [] and fake_ray.http == []


@pytest.mark.parametrize("host,probe", [("0.0.0.0", "http://127.0.0.1:8123"), ("::", "http://[::1]:8123"),
                                        ("::1", "http://[::1]:8123"), ("10.1.2.3", "http://10.1.2.3:8123")])
def test_the_app_is_served_at_slash_and_a_wildcard_bind_is_probed_on_loopback(fake_ray, capsys, host, probe):
    """serve.run gets the app named qtts at route prefix / (mutant C76: none); the readiness probe of a wildcard bind
    goes to loopback, IPv6 in brackets (mutants C57 C58 C59 C77: 0.0.0.0, '[::]' or an unbracketed IPv6 URL, which
    urllib cannot open: no 'qtts serving' after 120 s); 'qtts serving' names the models (C86)."""
    _serve("--host", host, "--port", "8123")
    assert fake_ray.runs == [{"name": "qtts", "route_prefix": "/", "blocking": False}]
    assert fake_ray.probed == [probe]
    assert f"qtts serving ['tiny-custom-voice'] on http://{host}:8123" in capsys.readouterr().out


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_stops_the_service_and_the_ray_this_command_started(fake_ray, capsys, how):
    """SIGTERM (docker stop, systemd) while serving is Ctrl-C: the service and the local Ray this command started
    are stopped, it says which signal, and the exit status is 0 (mutants C78 C79: Ray's handler, or none, got
    SIGTERM; C80: reported as Ctrl-C; C81: serve.shutdown not called, the service left running; C85: exit 1)."""
    if how == "sigterm":
        fake_ray.on_sleep = lambda: signal.raise_signal(signal.SIGTERM)
    assert _serve() == 0
    said = "SIGTERM" if how == "sigterm" else "Ctrl-C"
    assert f"{said}: stopping the service and the local Ray this command started" in capsys.readouterr().out
    assert fake_ray.shutdowns == 1


def test_ctrl_c_in_a_joined_cluster_keeps_the_service_and_says_how_to_stop_only_it(fake_ray, capsys):
    """(mutant C82: the printed stop command was serve.shutdown(), which stops every Serve app of the cluster)"""
    fake_ray.started = False
    assert _serve() == 0
    out = capsys.readouterr().out
    assert "Ctrl-C: the service keeps running on http://127.0.0.1:8000" in out
    assert "ray.init(address='10.0.0.5:6379'); serve.delete('qtts')" in out
    assert fake_ray.shutdowns == 0


def test_detach_returns_at_once_and_warns_when_its_ray_dies_with_it(fake_ray, capsys):
    """(mutants C83: --detach blocked like the plain command; C84: with a Ray this command started, no word that
    the service stops as the command exits)"""
    assert _serve("--detach") == 0
    assert fake_ray.slept == 0 and fake_ray.shutdowns == 0
    assert "--detach with a Ray this command started" in capsys.readouterr().out
    fake_ray.started = False
    assert _serve("--detach") == 0
    assert "--detach with" not in capsys.readouterr().out


# ---- liveness -------------------------------------------------------------------------------------------------------

class _Handle(ActorHandle):
    """An ActorHandle for isinstance only (no Ray behind it)."""

    def __init__(self):
        pass

    def __del__(self):
        pass


def test_a_consumer_identity_is_an_actor_id_of_1_to_64_characters_and_a_handle():
    """(mutants L02: an empty id taken; L03: a 64-character id refused; L04: any length taken; L06: other keys of
    what arrived carried along; L12: RAY_ACTORS.identity did not check at all)"""
    h = _Handle()
    assert liveness.consumer_of({"id": "x" * 64, "handle": h, "extra": 1}) == {"id": "x" * 64, "handle": h}
    for bad in ("", "x" * 65):
        assert liveness.consumer_of({"id": bad, "handle": h}) is None
    assert liveness.RAY_ACTORS.identity({"id": "", "handle": h}) is None
    assert liveness.RAY_ACTORS.identity("abc") is None


def test_a_ping_of_the_consumer_waits_seconds_not_minutes(monkeypatch):
    """(mutant L11: a default ping timeout of 500 s held the replica's check of a lapsed session that long)"""
    import ray

    seen = []
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: seen.append(timeout))
    ping = SimpleNamespace(remote=lambda: "ref")
    assert liveness.actor_alive({"id": "a", "handle": SimpleNamespace(__ray_ready__=ping)})
    assert seen and 0 < seen[0] <= 10


# ---- JSON bounds ----------------------------------------------------------------------------------------------------

def test_the_byte_limit_counts_utf8_bytes_of_text_and_bytearrays_are_bodies():
    """A str (a WebSocket text message) is measured in UTF-8 bytes, not characters (mutant J02: 'éééé' taken as 6 of
    10 bytes); a bytearray is decoded as bytes are (J03: TypeError); the default limit is 1 MiB (J25: 1 GiB)."""
    text = '"' + "é" * 4 + '"'                           # 6 characters, 10 bytes
    with pytest.raises(JsonTooLarge, match="message: larger than 9 bytes"):
        loads_bounded(text, JsonLimits(max_bytes=9), what="message")
    assert loads_bounded(text, JsonLimits(max_bytes=10)) == "é" * 4
    assert loads_bounded(bytearray(b'{"a": 1}')) == {"a": 1}
    with pytest.raises(JsonTooLarge):
        loads_bounded(b"1" + b" " * (1 << 20))


def test_too_large_is_413_and_the_rest_400():
    """(mutant J20: a body over the limit answered 400, not 413 Payload Too Large)"""
    assert JsonTooLarge.status == 413 and JsonRejected.status == 400


def test_numbers_of_exactly_max_number_chars_are_read_and_ints_stay_ints():
    """40 characters (the default) are read, 41 refused, naming `what` (mutants J07 J08: 40 refused; J22: default
    400; J10: 'body' named for a WebSocket message); an integer stays an int (J09: 7 read as 7.0, a float where
    the schema wants an integer)."""
    big = "-" + "9" * 39
    assert loads_bounded(f"[{big}, 0.{'1' * 38}]") == [int(big), float("0." + "1" * 38)]
    for n in ("9" * 41, "0." + "1" * 39):
        with pytest.raises(JsonRejected, match=r"^message: a number of 41 characters; at most 40$"):
            loads_bounded(f'{{"n": {n}}}', what="message")
    v = loads_bounded('{"seed": 7}')["seed"]
    assert v == 7 and type(v) is int


def test_an_integer_python_cannot_read_is_a_rejection_not_a_traceback():
    """With a number limit above Python's own 4,300-digit int() limit, int() raises ValueError: an 'unreadable
    JSON' rejection (mutant J13: the ValueError escaped, a 500)."""
    with pytest.raises(JsonRejected, match="unreadable JSON"):
        loads_bounded("1" * 4500, JsonLimits(max_number_chars=5000))


def test_malformed_json_says_where_and_bad_utf8_which_byte():
    """(mutants J12: the line and column dropped; J04: the byte after the bad one named)"""
    with pytest.raises(JsonRejected, match=r"^body: malformed JSON \(Expecting ',' delimiter: line 1 column 8\)$"):
        loads_bounded('{"t": 1')
    with pytest.raises(JsonRejected, match=r"not UTF-8 \(byte 7\)"):
        loads_bounded(b'{"t": "\xff"}')


def test_depth_counts_brackets_outside_strings_only():
    """A single bracket is depth 1 (mutant J15: 0, so max_depth 0 let '[1]' in); brackets only inside strings are
    depth 0 (J16: an empty max, a ValueError traceback) and do not count towards the two-bracket shortcut (J14:
    '["["]' was depth 2); an unterminated string hides its brackets too, so the parser reports it malformed
    (J19: 'nested 40 deep'); the default depth is 32 (J21: 64)."""
    assert max_depth("[1]") == 1 and max_depth('{"a": 1}') == 1
    with pytest.raises(JsonRejected, match="nested 1 deep"):
        loads_bounded("[1]", JsonLimits(max_depth=0))
    assert loads_bounded('"[[{"') == "[[{"
    assert loads_bounded('["["]', JsonLimits(max_depth=1)) == ["["]
    with pytest.raises(JsonRejected, match="malformed JSON"):
        loads_bounded('["' + "[" * 40)
    assert loads_bounded("[" * 32 + "]" * 32) is not None
    with pytest.raises(JsonRejected, match="nested 33 deep"):
        loads_bounded("[" * 33 + "]" * 33)


# ---- routing --------------------------------------------------------------------------------------------------------

def test_a_session_id_names_its_owner_and_nothing_else_does():
    """The owner is everything before the last '-' (mutant R01: an owner id with a '-' cut at its first); a key with
    nothing after the '-' (R02) or that is no string (R03: TypeError; Serve's metadata carries None for an unkeyed
    call) names no owner; route_key(owner) names its owner (R04)."""
    assert owner_of(new_session_id("rep-1")) == "rep-1"
    assert owner_of("abc-") is None and owner_of(None) is None and owner_of(5) is None
    assert owner_of(route_key("abc")) == "abc" and route_key("abc") != new_session_id("abc")


def test_session_ids_are_unique_uuid4s():
    """(mutants R05: 4 hex digits, ids collide after a few hundred sessions; R06: one id for every session)"""
    ids = {new_session_id("r") for _ in range(2000)}
    assert len(ids) == 2000 and all(re.fullmatch(r"r-[0-9a-f]{32}", i) for i in ids)


def test_a_detached_call_does_not_see_the_callers_context():
    """Each handle call made with `detached` runs in a fresh context, so Serve's request id of the caller's request
    does not reach it (mutant R07: the call ran in the caller's context)."""
    var = contextvars.ContextVar("request_id", default=None)
    var.set("req-1")
    assert detached(var.get) is None
    assert detached(lambda a, b=0: (a, b, var.get()), 1, b=2) == (1, 2, None)
