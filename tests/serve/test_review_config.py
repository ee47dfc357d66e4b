"""Review of the operator's side (configuration, start-up, secrets, manifests): each test is a defect found by
probing `ServiceConfig.from_dict`, `qtts serve`'s YAML reading and cluster/local.sh (scripts in /tmp/h6/). A config
that cannot work is refused at start with a ValueError naming the field, instead of failing in a replica (a restart
loop), inside Serve's own validation (a traceback naming Serve's fields) or mid-traffic; an error never echoes a key."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

from serve.cli import read_serve_yaml
from serve.config import RANGES, ModelConfig, ServiceConfig

ROOT = Path(__file__).resolve().parents[2]


def _model(**kw) -> dict:
    return {"models": [{"name": "m", **kw}]}


# --- secrets ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [
    {"api_keys": ["sk-SECRET-1", 5]},                # one entry of the wrong type: the others were echoed
    {"admin_api_keys": "sk-SECRET-1"},               # a string where a list goes
    {"api_keys": ["sk-SECRET-1", None]},
    {"env_admin_api_keys": {"sk-SECRET-1": 1}},
])
def test_a_malformed_key_list_is_refused_without_echoing_the_keys(d):
    """The type error printed the whole list: keys in stderr, in logs, and (serve run) in `serve status`."""
    with pytest.raises(ValueError, match=r"api_keys must be") as e:
        ServiceConfig.from_dict(d)
    assert "SECRET" not in str(e.value)


# --- numbers ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,field", [
    ({"session_deadline_s": float("nan")}, "session_deadline_s"),    # Serve's pydantic error at build, not ours
    ({"session_deadline_s": float("inf")}, "session_deadline_s"),    # drain time inf: a replica never stopped
    ({"body_timeout_s": float("nan")}, "body_timeout_s"),
    ({"ws_max_messages_per_s": float("nan")}, "ws_max_messages_per_s"),
    ({"session_lease_s": float("inf")}, "session_lease_s"),
    ({"retry_after_s": -1}, "retry_after_s"),
    ({"ingress_num_cpus": -1}, "ingress_num_cpus"),
    ({"ingress_num_cpus": float("nan")}, "ingress_num_cpus"),
    ({"ingress_replicas": 0}, "ingress_replicas"),
    (_model(num_gpus=-1), "num_gpus"),
    (_model(num_gpus=float("nan")), "num_gpus"),
    (_model(num_cpus=-0.5), "num_cpus"),
    (_model(num_replicas=0), "num_replicas"),
    (_model(max_new_tokens=0), "max_new_tokens"),
    (_model(default_max_new_tokens=0), "default_max_new_tokens"),
    (_model(max_input_chars=0), "max_input_chars"),
    (_model(seed=-1), "seed"),
    (_model(seed=2 ** 70), "seed"),
])
def test_numbers_out_of_range_or_not_finite_are_refused_naming_the_field(d, field):
    with pytest.raises(ValueError, match=field):
        ServiceConfig.from_dict(d)


def test_default_max_new_tokens_cannot_raise_the_hard_cap():
    """A request that does not say was capped at default_max_new_tokens only: 100 > max_new_tokens 10 gave 100."""
    with pytest.raises(ValueError, match=r"default_max_new_tokens"):
        ServiceConfig.from_dict(_model(max_new_tokens=10, default_max_new_tokens=100))
    assert ServiceConfig.from_dict(_model(max_new_tokens=10, default_max_new_tokens=10)).models[0].max_new_tokens == 10


# --- names, paths, model options ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a#b", "a\nb", "a\x1b[31m", "..", ".", " a", "a ", "x" * 200])
def test_a_model_name_serve_or_a_url_cannot_carry_is_refused(name):
    """'#' failed inside Serve's deployment validation (deployment ids are app#deployment#replica); control
    characters (log lines), '.' / '..' (path steps in /v1/models/{id}) and surrounding spaces were accepted."""
    with pytest.raises(ValueError, match=r"models\[.*\]\.name"):
        ServiceConfig.from_dict({"models": [{"name": name}]})


def test_the_names_in_use_are_still_accepted():
    for name in ["tiny-custom-voice", "tiny-base", "qwen3-tts-1.7b-customvoice", "cv", "m_1", "Qwen3.TTS", "a b",
                 'my "fast" \\ model', "a:b", "x" * 128, "ü", "..a"]:
        assert ServiceConfig.from_dict({"models": [{"name": name}]}).models[0].name == name


@pytest.mark.parametrize("d,field", [
    ({"cache_dir": ""}, "cache_dir"),
    ({"cache_dir": "cache"}, "cache_dir"),                 # relative: each Ray worker's own folder
    ({"cache_dir": "s3://b/cache"}, "cache_dir"),          # a local folder named "s3:"
    ({"voices_uri": ""}, "voices_uri"),
    ({"voices_uri": "voices"}, "voices_uri"),
    ({"voices_uri": "file://voices"}, "voices_uri"),
    ({"voices_uri": "gs://bucket/p"}, "voices_uri"),       # failed in the ingress and every replica at start
    ({"voices_uri": "S3://bucket/p"}, "voices_uri"),
    ({"voices_uri": "s3://"}, "voices_uri"),
    ({"voices_uri": "s3:///prefix"}, "voices_uri"),
])
def test_store_paths_that_mean_nothing_on_a_worker_are_refused(d, field):
    with pytest.raises(ValueError, match=field):
        ServiceConfig.from_dict(d)


def test_store_paths_in_use_are_still_accepted(tmp_path):
    for d in [{}, {"cache_dir": "~/c", "voices_uri": "~/v"}, {"cache_dir": str(tmp_path), "voices_uri": str(tmp_path)},
              {"voices_uri": f"file://{tmp_path}"}, {"voices_uri": "s3://bucket"}, {"voices_uri": "s3://b/p/q/"}]:
        ServiceConfig.from_dict(d)


@pytest.mark.parametrize("d,field", [
    (_model(dtype="float64x"), "dtype"),          # failed at replica start (from_pretrained), each replica in turn
    (_model(dtype="int8"), "dtype"),
    (_model(device="gpu"), "device"),
    (_model(device="cuda:x"), "device"),
    (_model(autoscaling={"min_replicas": -5}), "autoscaling"),   # Serve's pydantic traceback in `qtts serve`
    (_model(autoscaling={"min_replicas": 2, "max_replicas": 1}), "autoscaling"),
    (_model(autoscaling={"bogus": 1}), "autoscaling"),
    (_model(batch_buckets=[1, 4096]), "batch_buckets"),   # a batch no model's max_sessions allows: captured at start
    (_model(batch_buckets=[0]), "batch_buckets"),
    (_model(batch_buckets=[]), "batch_buckets"),
])
def test_model_options_are_checked_at_start(d, field):
    with pytest.raises(ValueError, match=rf"models\[.*\]\.{field}"):
        ServiceConfig.from_dict(d)


def test_model_options_in_use_are_still_accepted():
    for kw in [{"dtype": "bfloat16"}, {"dtype": "auto"}, {"dtype": "fp16"}, {"device": "cpu"}, {"device": "cuda:1"},
               {"device": "cuda", "num_gpus": 1}, {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                   "target_ongoing_requests": 6}}]:
        ServiceConfig.from_dict(_model(**kw))


def test_an_empty_models_key_is_refused_not_replaced_by_the_tiny_model():
    """`models:` with every entry commented out is YAML null: the service silently served a tiny random model."""
    doc = yaml.safe_load("models:\n  # - name: cv\n  #   checkpoint: /models/cv\n")
    with pytest.raises(ValueError, match=r"models"):
        ServiceConfig.from_dict(doc)
    assert ServiceConfig.from_dict({}).models[0].name == "tiny-custom-voice"   # no key: the documented default


# --- qtts serve's YAML --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("http,match", [
    ("port: abc", "http_options.port"),          # int("abc") was a traceback after Ray had started
    ("port: 70000", "http_options.port"),
    ("port: true", "http_options.port"),
    ("host: 5", "http_options.host"),
])
def test_http_options_are_checked_when_the_file_is_read(tmp_path, http, match):
    f = tmp_path / "s.yaml"
    f.write_text(f"http_options:\n  {http}\napplications:\n  - name: qtts\n    args: {{}}\n")
    with pytest.raises(SystemExit, match=match):
        read_serve_yaml(f)


def test_an_unknown_proxy_location_is_refused_when_the_file_is_read(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("proxy_location: Headonly\napplications:\n  - name: qtts\n    args: {}\n")
    with pytest.raises(SystemExit, match="proxy_location"):
        read_serve_yaml(f)
    f.write_text("proxy_location: EveryNode\napplications:\n  - name: qtts\n    args: {}\n")
    assert read_serve_yaml(f)[2] == "EveryNode"


def test_qtts_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("applications:\n  - name: qtts\n    args:\n      models: [{name: m, autoscaling: {min_replicas: -1}}]\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "-m", "qwen_tts_core.cli", "serve", "--config", str(f), "--address", "local"],
                       cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "autoscaling" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "starting a local Ray" not in r.stderr


# --- manifests ----------------------------------------------------------------------------------------------------

def test_the_crontab_example_runs_a_command_the_catalog_cli_accepts():
    from jobs import catalog

    (line,) = [x for x in (ROOT / "cluster/cron/crontab.example").read_text().splitlines()
               if x.strip() and not x.startswith("#")]
    argv = shlex.split(line.split(None, 5)[5])
    cmd = argv[argv.index("-m") - 1:]
    assert cmd[1:3] == ["-m", "jobs.catalog"], cmd
    args = catalog.build_parser().parse_args(cmd[3:cmd.index(">>")] if ">>" in cmd else cmd[3:])
    assert args.retire in catalog.RETIRE_MODES and args.output.startswith("s3://")
    assert (ROOT / args.catalog).is_file() if hasattr(args, "catalog") else True


def test_the_shipped_serve_configs_are_valid():
    from tests.jobs.test_cluster_manifests import _service

    ServiceConfig.from_dict(yaml.safe_load((ROOT / "configs/serve.yaml").read_text())["applications"][0]["args"])
    ServiceConfig.from_dict(_service()[1]["args"])


# --- cluster/local.sh ---------------------------------------------------------------------------------------------

def test_stop_with_a_stale_pgid_file_kills_nothing_else(tmp_path):
    """A head that died (reboot, OOM) leaves qtts-head.pgid behind; once its id is reused, `stop` killed that
    process group (any process of the user's). Here: a process group this test made, named in the file."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        temp = tmp_path / "ray"
        temp.mkdir()
        (temp / "qtts-head.pgid").write_text(f"{other.pid}\n")
        from tests.conftest import free_port

        env = dict(os.environ, QTTS_RAY_TEMP_DIR=str(temp), QTTS_RAY_PORT=str(free_port()))
        r = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "stop"], env=env, capture_output=True,
                           text=True, timeout=30)
        time.sleep(0.2)
        assert other.poll() is None, "stop killed a process group that is not its Ray head"
        assert r.returncode == 0 and "nothing stopped" in r.stdout, r.stdout + r.stderr
        assert not (temp / "qtts-head.pgid").exists()
    finally:
        if other.poll() is None:
            os.killpg(other.pid, signal.SIGKILL)
        other.wait()


def test_the_config_repr_shows_no_key():
    """ServiceConfig is a dataclass: its repr (a log line, a traceback's locals, a test's failure output) listed every
    key, and with_env_keys copies the environment's keys into it."""
    cfg = ServiceConfig.from_dict({"api_keys": ["sk-SECRET-a"], "admin_api_keys": ["sk-SECRET-b"]}).with_env_keys(
        {"QTTS_API_KEYS": "sk-SECRET-c", "QTTS_ADMIN_API_KEYS": "sk-SECRET-d"})
    assert cfg.effective_api_keys() >= {"sk-SECRET-a", "sk-SECRET-c"}
    assert "SECRET" not in repr(cfg) and "SECRET" not in str(cfg)


@pytest.mark.parametrize("kw", [{"compile": "fast"}, {"compile": "step", "cuda_graphs": True}])
def test_an_engine_option_the_engine_refuses_is_refused_at_start(kw):
    """compile: fast passed the config and failed in every replica's Engine (a restart loop)."""
    with pytest.raises(ValueError, match=r"models\[m\]\.compile"):
        ServiceConfig.from_dict(_model(**kw))
    for ok in (True, False, "ops", "step"):
        ServiceConfig.from_dict(_model(compile=ok))


def test_start_on_a_port_another_program_holds_is_an_error_not_already_running(tmp_path):
    """`start` took any listener on QTTS_RAY_PORT for its head ("already running", exit 0): drivers then failed to
    join whatever it was. Here: a plain socket this test holds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        env = dict(os.environ, QTTS_RAY_TEMP_DIR=str(tmp_path), QTTS_RAY_PORT=str(s.getsockname()[1]))
        r = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "start"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert r.returncode == 1 and "did not start" in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "qtts-head.pgid").exists()


def test_a_relative_checkpoint_folder_is_made_absolute_by_the_cli_and_refused_in_a_config(tmp_path, monkeypatch):
    """`qtts serve --model ./cv` (the --help example) passed "./cv" to replicas, which resolve it in their own working
    folder (a joined head's), not the operator's; in a YAML, "./cv" is refused (it is no hub id either)."""
    from qwen_tts_core.cli import build_parser
    from serve.cli import models_from_args

    (tmp_path / "cv").mkdir()
    monkeypatch.chdir(tmp_path)
    (m,) = models_from_args(build_parser().parse_args(["serve", "--model", "./cv"]))
    assert m == {"name": "cv", "checkpoint": str(tmp_path / "cv")}
    (m,) = models_from_args(build_parser().parse_args(["serve", "--model", "Qwen/Qwen3-TTS-12Hz-0.6B-Base"]))
    assert m["checkpoint"] == "Qwen/Qwen3-TTS-12Hz-0.6B-Base"     # not a folder here: a hub id, as given
    for bad in ("./cv", "../cv", ".", ".."):
        with pytest.raises(ValueError, match=r"models\[m\]\.checkpoint"):
            ServiceConfig.from_dict(_model(checkpoint=bad))
    ServiceConfig.from_dict(_model(checkpoint="/abs/cv"))
    ServiceConfig.from_dict(_model(checkpoint="~/cv"))


def test_a_yaml_syntax_error_names_the_line_without_showing_it(tmp_path):
    """PyYAML's message quotes the lines around the error: a missing ']' after api_keys printed the keys."""
    f = tmp_path / "s.yaml"
    f.write_text('applications:\n  - name: qtts\n    args:\n      api_keys: ["sk-SECRET-1", "sk-SECRET-2"\n'
                 '      admin_api_keys: []\n')
    with pytest.raises(SystemExit, match="not valid YAML") as e:
        read_serve_yaml(f)
    assert "SECRET" not in str(e.value) and "line 4" in str(e.value), str(e.value)


def test_status_without_a_head_answers_at_once(tmp_path):
    """`status` ran `ray status` against a port nobody serves, which waits ~40 s for a GCS before failing."""
    from tests.conftest import free_port

    env = dict(os.environ, QTTS_RAY_TEMP_DIR=str(tmp_path), QTTS_RAY_PORT=str(free_port()))
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "status"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert time.monotonic() - t0 < 10 and r.returncode == 1 and "no ray head" in r.stderr, r.stdout + r.stderr


@pytest.mark.parametrize("key", ["env_api_keys", "env_admin_api_keys"])
def test_the_fields_that_record_environment_keys_are_refused_in_a_config_file(tmp_path, key):
    """They are 'not for the YAML' (config.py, serve/README.md): keys put there pass as the build's environment keys
    and vanish silently wherever QTTS_API_KEYS is set."""
    f = tmp_path / "s.yaml"
    f.write_text(f"applications:\n  - name: qtts\n    args:\n      {key}: [sk-SECRET-1]\n")
    with pytest.raises(SystemExit, match=key) as e:
        read_serve_yaml(f)
    assert "SECRET" not in str(e.value)
    # and where `serve run` / a RayService builds the app from the same args (serve.app.app_builder)
    from serve.app import app_builder

    with pytest.raises(ValueError, match=key) as e:
        app_builder({key: ["sk-SECRET-1"]})
    assert "SECRET" not in str(e.value)


@pytest.mark.parametrize("body,match", [
    ("applications: 5\n", "applications must be a list"),           # was a TypeError traceback
    ("applications:\n  - name: qtts\n  - name: qtts\n    args: {api_keys: [k]}\n", "2 applications named 'qtts'"),
])
def test_the_applications_list_is_checked(tmp_path, body, match):
    """Two applications named qtts: the first was served and the second (here the one with keys) dropped silently;
    `serve run` refuses duplicate names."""
    f = tmp_path / "s.yaml"
    f.write_text(body)
    with pytest.raises(SystemExit, match=match):
        read_serve_yaml(f)


def test_an_s3_voice_store_that_cannot_work_fails_the_ingress_start_naming_voices_uri(monkeypatch, moto_s3, tmp_path):
    """voices_uri s3:// with no such bucket, no credentials or no region started normally, then every voice call
    was a 500 under traffic (operator review, /tmp/h6/probe_s3_no_endpoint.py). An endpoint that does not answer at
    start is only logged, quickly: speech without stored voices must not go down with the store."""
    import time

    import boto3

    from tests.conftest import free_port
    from tests.serve.inproc import ingress_app

    def start(uri):
        return ingress_app(monkeypatch, {"models": [{"name": "cv", "model_type": "custom_voice"}], "voices_uri": uri},
                           {"cv": object()})

    boto3.client("s3").create_bucket(Bucket="voices-ok")
    start("s3://voices-ok/v")                                   # a store that works starts
    with pytest.raises(ValueError, match=r"^voices_uri: .*does not exist"):
        start("s3://no-such-bucket/v")
    with monkeypatch.context() as m:
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            m.delenv(k, raising=False)
        m.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        m.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        m.setenv("AWS_EC2_METADATA_DISABLED", "true")
        m.setattr(boto3, "DEFAULT_SESSION", None)   # (it keeps the credentials it found first)
        with pytest.raises(ValueError, match=r"^voices_uri: .*credentials"):
            start("s3://voices-ok/v")
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")   # nothing listens there
        t0 = time.monotonic()
        start("s3://voices-ok/v")
        assert time.monotonic() - t0 < 60


def _set(name: str, value) -> dict:
    """A config that sets `name` (a model's field, or the service's) to `value`, all else default."""
    return _model(**{name: value}) if name in {f.name for f in fields(ModelConfig)} else {name: value}


def _is_int(name: str) -> bool:
    """Whether the field `name` (a model's or the service's) holds an integer."""
    cls = ModelConfig if name in {f.name for f in fields(ModelConfig)} else ServiceConfig
    hint = typing.get_type_hints(cls)[name]
    return hint is int or int in typing.get_args(hint)


@pytest.mark.parametrize("name", sorted(RANGES))
def test_every_number_is_taken_at_both_ends_of_its_range_and_refused_past_them_naming_the_field(name):
    """One table (serve/config.py RANGES) holds every number's range. Each end is taken; past either end, NaN, inf,
    a bool and numbers no float holds are refused when the config is read, before Ray starts, with the field named.
    A typo (an extra 000) or a hostile file is not taken to a deployment that fails or never drains."""
    span = RANGES[name]
    as_model = name in {f.name for f in fields(ModelConfig)}
    extra = {"interactive_reserve": 0} if name == "max_sessions" else {}   # must stay below max_sessions
    for end in ([span.high] if span.low_open else [span.low, span.high]):
        v = int(end) if _is_int(name) else float(end)
        taken = ServiceConfig.from_dict(_model(**{name: v}, **extra) if as_model else {name: v})
        assert getattr(taken.models[0] if as_model else taken, name) == v
    past = [span.high + 1 if _is_int(name) else span.high * 1.001, 10 ** 30, 10 ** 400, True,
            span.low if span.low_open else span.low - 1]
    if not _is_int(name):
        past += [float("nan"), float("inf"), -float("inf")]
    for v in past:
        says = "" if v is True else rf" an? (integer|number) in {re.escape(str(span))}"  # True: not a number
        with pytest.raises(ValueError, match=rf"{name} must be{says}"):
            ServiceConfig.from_dict(_set(name, v))
        # built in code, where from_dict's type check does not run: the same rule holds
        with pytest.raises(ValueError, match=rf"{name} must be"):
            ModelConfig(**{name: v}, **extra) if as_model else ServiceConfig(**{name: v})


def test_every_number_of_the_config_has_a_range():
    """RANGES names real fields, and every number field is in it but the two bounded by another field."""
    names = {f.name for cls in (ModelConfig, ServiceConfig) for f in fields(cls)}
    assert set(RANGES) <= names, set(RANGES) - names
    numbers = {name for cls in (ModelConfig, ServiceConfig) for name, hint in typing.get_type_hints(cls).items()
               if {int, float} & {hint, *typing.get_args(hint)}}
    assert numbers - set(RANGES) == {"interactive_reserve", "default_max_new_tokens"}
