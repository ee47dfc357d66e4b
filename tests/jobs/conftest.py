"""Fixtures for the jobs tests: a tiny real checkpoint and a driver connection to the session's Ray head."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A tiny random-weight custom_voice checkpoint in the official layout (real engine, real codec)."""
    from qwen_tts_core import make_checkpoint

    path = tmp_path_factory.mktemp("jobs_ckpt") / "tiny-custom-voice"
    make_checkpoint(str(path), model_type="custom_voice", size="tiny", seed=0)
    return str(path)


@pytest.fixture(scope="session")
def ray_driver(ray_cluster):
    """This process joined to the session's Ray head (no progress bars, quiet logs)."""
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    return ray_cluster


@pytest.fixture()
def s3_bucket(moto_s3, request):
    """A fresh bucket on the moto endpoint; yields its name."""
    import boto3

    name = "qtts-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture()
def review_server():
    """start(uri, **serve kwargs) -> the base URL of a `qtts review` server (jobs/review.py) of that output on
    loopback; every server started is shut down after the test."""
    import threading

    from jobs import review

    started = []

    def start(uri, **kw):
        srv = review.serve(str(uri), port=0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        started.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()
