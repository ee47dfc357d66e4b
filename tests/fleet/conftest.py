"""A simulated fleet on one machine: a Ray head plus two worker nodes that each declare one logical GPU
(`ray.cluster_utils.Cluster`; torch stays on CPU), the real S3 endpoint (moto_server) holding the voice store, and the
project's Serve app with a tiny Base model whose `num_gpus: 1` replicas land one per worker node.

One cluster for the whole module: its own temp dir and ports, stopped at the end (only it). The driver connection of
the session (tests/conftest.py::ray_cluster) is put back afterwards when there was one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
APP = "qtts-fleet"
MODEL = "tiny-base"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_config(checkpoint: str, **extra) -> dict:
    # device: cpu - a logical GPU is only a resource here (torch stays on the CPU); "auto" would refuse to start
    return {"name": MODEL, "checkpoint": checkpoint, "num_gpus": 1, "device": "cpu", "num_cpus": 0.5, "num_replicas": 2,
            "max_sessions": 4, "max_queue": 8, "interactive_reserve": 1, "max_new_tokens": 4096,
            "default_max_new_tokens": 24, "warmup": False, **extra}


def serve_details() -> dict:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def replicas(app: str = APP, model: str = MODEL, state: str = "RUNNING") -> list[dict]:
    """[{replica_id, node_id, pid, state, ...}] of the model's deployment."""
    dep = serve_details()["applications"][app]["deployments"][f"tts-{model}"]
    return [r for r in dep["replicas"] if str(r["state"]).endswith(state)]


def wait_for(cond, timeout: float, what: str, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc); 0 for a process that is gone (a replica Serve has not yet marked
    dead after its node was removed)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Fleet:
    def __init__(self, cluster, workers, voices_uri: str, http: str, checkpoint: str, bucket: str) -> None:
        self.cluster, self.workers, self.voices_uri, self.http = cluster, list(workers), voices_uri, http
        self.checkpoint, self.bucket = checkpoint, bucket
        self.events: dict[str, object] = {}  # measurements the tests report

    def worker_node_ids(self) -> list[str]:
        return [n.node_id for n in self.workers]

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=96 * 1024 * 1024)
        self.workers.append(node)
        return node

    def remove_worker(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def deploy(self, **model_extra) -> float:
        from ray import serve

        from serve.app import build_app

        cfg = {"models": [replica_config(self.checkpoint, **model_extra)], "voices_uri": self.voices_uri,
               "cache_dir": str(Path(tempfile.gettempdir()) / "qtts-fleet-cache")}
        t = time.monotonic()
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        return time.monotonic() - t


def _restore_session_driver(prev_address: str | None) -> None:
    import ray

    if prev_address:
        ray.init(address=prev_address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})


@pytest.fixture(scope="module")
def fleet(moto_s3, checkpoint_factory):
    """Yields a Fleet: the cluster (head + 2 GPU worker nodes), the Serve app APP running MODEL on both."""
    import boto3
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.serve.context import _set_global_client

    checkpoint = str(checkpoint_factory("base"))
    bucket = "qtts-fleet-voices"
    boto3.client("s3").create_bucket(Bucket=bucket)
    prev = None
    if ray.is_initialized():
        prev = os.environ.get("RAY_ADDRESS")
        ray.shutdown()
        _set_global_client(None)
    tmp = tempfile.mkdtemp(prefix="qtts-fleet-")  # short: Ray's socket paths must fit in 107 bytes
    os.makedirs(f"{tmp}/ray")
    saved_env = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_ADDRESS")}
    os.environ["RAY_TMPDIR"] = tmp  # Cluster writes its address file under RAY_TMPDIR/ray, not the shared /tmp/ray
    os.environ.pop("RAY_ADDRESS", None)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": tmp, "gcs_server_port": free_port(), "include_dashboard": False,
        "object_store_memory": 128 * 1024 * 1024, "dashboard_agent_listen_port": free_port(),
        "ray_client_server_port": free_port()})
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=96 * 1024 * 1024) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        fl = Fleet(cluster, workers, f"s3://{bucket}/voices", f"http://127.0.0.1:{port}", checkpoint, bucket)
        fl.events["deploy_s"] = round(fl.deploy(), 1)
        yield fl
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        with contextlib.suppress(Exception):
            ray.shutdown()
        _set_global_client(None)
        cluster.shutdown()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
        _restore_session_driver(prev)
