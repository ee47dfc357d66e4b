"""Shared fixtures: tiny checkpoints, the oracle, the local Ray head and the S3 endpoint (all on loopback)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
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


def pytest_configure(config):
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray head on 127.0.0.1 (cluster/local.sh), shared by the whole test session; yields its address."""
    port, dash = free_port(), free_port()
    env = dict(os.environ, QTTS_RAY_PORT=str(port), QTTS_DASHBOARD_PORT=str(dash),
               RAY=str(ROOT / ".venv" / "bin" / "ray") if (ROOT / ".venv/bin/ray").exists() else "ray",
               RAY_ADDRESS=f"127.0.0.1:{port}")
    subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "start"], check=True, env=env)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    os.environ["QTTS_DASHBOARD_URL"] = f"http://127.0.0.1:{dash}"
    try:
        yield {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        subprocess.run(["bash", str(ROOT / "cluster/local.sh"), "stop"], env=env)


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
