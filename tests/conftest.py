"""Shared fixtures: tiny checkpoints, the oracle, the local Ray head and the S3 endpoint (all on loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Same Ray settings in every process (see ../shared/reference/ray-and-s3-on-one-machine.md).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models on a 2-core machine shared with Ray and the oracle: one intra-op thread. With more, OpenMP barriers
# spin against the other processes and a tiny forward pass gets ~50x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_devices(monkeypatch) -> list[str]:
    """The device type of every tensor torch's Linear/Conv initialisation (kaiming_uniform_) runs on from now on
    (until the monkeypatch is undone): a loader that builds on the meta device initialises nothing real."""
    import torch

    calls: list[str] = []
    real_init = torch.nn.init.kaiming_uniform_

    def init(tensor, *args, **kwargs):
        calls.append(tensor.device.type)
        return real_init(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", init)
    return calls


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # A test that uses the session's Ray head is marked `ray` here (tests that start a cluster of their own carry the
    # mark): `make test` runs every `ray` test in one lane, one at a time (tests/lanes.py), and `-m ray` / `-m "not
    # ray"` select them. This runs before pytest's own -m selection and the lanes plugin (tryfirst).
    for item in items:
        if "ray_cluster" in item.fixturenames and item.get_closest_marker("ray") is None:
            item.add_marker(pytest.mark.ray)


# What to show from the cluster's own logs when a test failed (CI keeps only pytest's output): why streams ended,
# leases lapsed or replicas died.
RAY_LOG_SIGNS = ("lease expired", "lease renewal", "renewals late", "queue length from", "replica stream failed",
                 "websocket session task failed", "failed after its first audio", "engine step failed",
                 "audio decode failed", "failed to start",
                 "died", "unhealthy", "health check", "killed", "OOM", "Segmentation", "Fatal Python")
RAY_LOG_NOISE = ("Failed to look up actor", "started successfully", "INTENDED_SYSTEM_EXIT",
                 "Force kill actor request")


def ray_log_digest(temp_dir: str, limit: int = 40) -> list[str]:
    """The last `limit` lines of the Serve and worker logs under `temp_dir` that carry one of RAY_LOG_SIGNS."""
    hits = []
    for path in sorted(Path(temp_dir).glob("session_*/logs/**/*")):
        if not path.is_file() or path.suffix not in (".log", ".err", ".out"):
            continue
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        hits += [f"{path.name}: {line[:240]}" for line in lines
                 if any(k in line for k in RAY_LOG_SIGNS) and not any(k in line for k in RAY_LOG_NOISE)]
    return hits[-limit:]


_RAY_TEMP_DIR: list[str] = []                      # the test session's Ray head, while it runs
_FAILED_DIGESTS: list[tuple[str, list[str]]] = []  # (test id, Ray log lines of note when it failed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed and _RAY_TEMP_DIR and "ray_cluster" in getattr(item, "fixturenames", ()):
        _FAILED_DIGESTS.append((item.nodeid, [x[:200] for x in ray_log_digest(_RAY_TEMP_DIR[0], limit=6)]))


def pytest_unconfigure(config):
    """Each failed cluster test's Ray log lines of note, printed last: CI shows only the tail of the output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    for nodeid, lines in _FAILED_DIGESTS:
        reporter.write_line(f"---- Ray log lines of note when {nodeid.split('::')[-1]} failed ----")
        for line in lines or ["(none)"]:
            reporter.write_line(line)


@pytest.fixture(scope="session")
def ray_cluster(request):
    """A local Ray head on 127.0.0.1 (cluster/local.sh), shared by the whole test session; yields its address."""
    port, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="qtts-ray-")  # short: Ray's socket paths must fit in 107 bytes
    env = dict(os.environ, QTTS_RAY_PORT=str(port), QTTS_DASHBOARD_PORT=str(dash),
               QTTS_RAY_CLIENT_PORT=str(free_port()), QTTS_DASHBOARD_AGENT_PORT=str(free_port()),
               QTTS_RAY_TEMP_DIR=temp_dir,
               RAY=str(ROOT / ".venv" / "bin" / "ray") if (ROOT / ".venv/bin/ray").exists() else "ray",
               RAY_ADDRESS=f"127.0.0.1:{port}")
    subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "start"], check=True, env=env)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["QTTS_DASHBOARD_URL"] = f"http://127.0.0.1:{dash}"
    _RAY_TEMP_DIR.append(temp_dir)
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        _RAY_TEMP_DIR.clear()
        if request.session.testsfailed:
            report = request.config.pluginmanager.get_plugin("terminalreporter")
            if report is not None:
                report.write_line(f"\n---- Ray log lines of note ({temp_dir}) ----")
                for line in ray_log_digest(temp_dir) or ["(none)"]:
                    report.write_line(line)
        subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "stop"], env=env)  # this head only
        if os.environ.get("QTTS_KEEP_RAY_LOGS"):
            print(f"\nRay logs kept in {temp_dir}")
        else:
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """A real HTTP S3 endpoint (moto_server) on 127.0.0.1; yields its endpoint URL. Sets AWS_* env for clients."""
    exe = shutil.which("moto_server") or str(ROOT / ".venv/bin/moto_server")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=url)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_CHECKPOINTS: dict[tuple, Path] = {}


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(model_type="custom_voice", size="tiny", seed=0) -> folder of a random-weight checkpoint (cached)."""
    from qwen_tts_core import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")

    def make(model_type: str = "custom_voice", size: str = "tiny", seed: int = 0) -> Path:
        key = (model_type, size, seed)
        if key not in _CHECKPOINTS:
            _CHECKPOINTS[key] = make_checkpoint(root / f"{model_type}-{size}-{seed}", model_type=model_type,
                                                size=size, seed=seed)
        return _CHECKPOINTS[key]

    return make


_MODELS: dict[tuple, object] = {}


@pytest.fixture(scope="session")
def model_factory(checkpoint_factory):
    """load(model_type="custom_voice", size="tiny", seed=0) -> Qwen3TTSModel on CPU fp32 (cached)."""
    from qwen_tts_core import Qwen3TTSModel

    def load(model_type: str = "custom_voice", size: str = "tiny", seed: int = 0):
        key = (model_type, size, seed)
        if key not in _MODELS:
            _MODELS[key] = Qwen3TTSModel.from_pretrained(checkpoint_factory(model_type, size, seed),
                                                         device_map="cpu", dtype="float32")
        return _MODELS[key]

    return load


@pytest.fixture(scope="session")
def ref_wav_path(tmp_path_factory) -> Path:
    """A 2.5 s 16 kHz reference recording (a voiced, pitch-gliding synthetic vowel with noise)."""
    import numpy as np
    import soundfile as sf

    sr, n = 16000, 40000
    t = np.arange(n) / sr
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    wav = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    wav = 0.3 * wav / np.abs(wav).max() + 0.01 * np.random.default_rng(0).standard_normal(n)
    path = tmp_path_factory.mktemp("audio") / "ref16k.wav"
    sf.write(path, wav.astype(np.float32), sr)
    return path
