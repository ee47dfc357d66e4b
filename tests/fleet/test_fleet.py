"""The fleet on one machine (see conftest.py): placement, shared voices, batch jobs on the replicas, a lost node, a
killed replica, autoscaling. Tests run in file order on one module-scoped cluster; the autoscaling test, which
changes the deployment, is last. Timings are printed (pytest -s) and kept in `fleet.events`."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from tests.fleet.conftest import APP, MODEL, cpu_seconds, replicas, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def on_node(node_id: str, fn, *args, timeout: float = 120):
    """Run fn(*args) in a task pinned to `node_id` (its Serve handles prefer that node's replica)."""
    import sys

    import ray
    from ray import cloudpickle
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])  # test modules are not importable on workers
    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    return ray.get(task.remote(*args), timeout=timeout)


def _local_handle():
    from ray import serve

    h = serve.get_deployment_handle(f"tts-{MODEL}", APP)  # cached per worker process
    if not h.is_initialized:
        h._init(_prefer_local_routing=True)  # this node's replica first (Serve's locality routing)
    return h


def _create_voice(audio: bytes) -> dict:
    return _local_handle().create_voice.remote(audio, None, True, "fleet-voice").result()


def _speak(voice: str, text: str) -> dict:
    r = _local_handle().synthesize.remote({"input": text, "voice": voice, "seed": 1, "max_new_tokens": 8,
                                           "priority": "bulk", "non_streaming_mode": True}).result()
    return {"samples": int(len(r["pcm"])), "finish_reason": r["finish_reason"]}


def _speak_error(voice: str) -> str:
    try:
        _speak(voice, "Are you still there?")
    except ValueError as e:  # RequestError('voice') is a ValueError; Ray re-raises it as a subclass
        cause = getattr(e, "cause", e)
        return f"{getattr(cause, 'field', '')}|{cause}"
    return "no error"


def _by_node() -> dict[str, dict]:
    return {r["node_id"]: r for r in replicas()}


def _engine_load(replica_id: str) -> int:
    """Sessions the replica's engine holds (active + queued), asked of that replica itself (routed by its id)."""
    from ray import serve

    from serve.routing import route_key

    h = serve.get_deployment_handle(f"tts-{MODEL}", APP).options(session_id=route_key(replica_id))
    s = h.stats.remote().result(timeout_s=5)
    assert s["replica"] == replica_id, (s["replica"], replica_id)  # answered by that replica, not another
    return int(s["engine_active"]) + int(s["engine_queued"])


def test_gpu_replicas_land_one_per_worker_node(fleet):
    reps = replicas()
    assert len(reps) == 2, reps
    assert sorted(r["node_id"] for r in reps) == sorted(fleet.worker_node_ids())
    print(f"\nfleet: 2 replicas (num_gpus=1) on the 2 GPU nodes, app deployed in {fleet.events['deploy_s']} s")


def test_voice_created_on_one_node_is_listed_used_and_deleted_through_the_other(fleet, ref_wav_path):
    import httpx

    node_a, node_b = fleet.worker_node_ids()
    reps = _by_node()
    info = on_node(node_a, _create_voice, Path(ref_wav_path).read_bytes())
    vid = info["id"]
    listed = httpx.get(f"{fleet.http}/v1/audio/voices", timeout=30).json()["data"]
    assert vid in [v["id"] for v in listed]
    cpu = {n: cpu_seconds(r["pid"]) for n, r in reps.items()}
    out = on_node(node_b, _speak, vid, "Hello from the other node.")
    used = {n: cpu_seconds(r["pid"]) - cpu[n] for n, r in reps.items()}
    assert out["samples"] > 0
    assert used[node_b] > used[node_a], used  # node B's replica did the work, with node A's voice
    assert httpx.delete(f"{fleet.http}/v1/audio/voices/{vid}", timeout=30).status_code == 200
    for node in (node_a, node_b):  # both replicas, even the one that has it cached, now refuse it
        err = on_node(node, _speak_error, vid)
        assert err.startswith("voice") or "voice" in err.split("|", 1)[1], err
    assert vid not in [v["id"] for v in httpx.get(f"{fleet.http}/v1/audio/voices", timeout=30).json()["data"]]


@pytest.fixture(scope="module")
def voice_id(fleet, ref_wav_path) -> str:
    """A stored voice (x-vector only) for the narration rows."""
    from ray import serve

    h = serve.get_deployment_handle(f"tts-{MODEL}", APP)
    return h.create_voice.remote(Path(ref_wav_path).read_bytes(), None, True, "narrator").result()["id"]


def _write_rows(path: Path, n: int, prefix: str) -> Path:
    path.write_text("\n".join(json.dumps({"id": f"{prefix}{i:02d}", "seed": i,
                                          "text": f"Row {i} of the fleet test. It has a second sentence."})
                              for i in range(n)))
    return path


def _narrate(rows: Path, out: str, voice: str, *extra: str) -> list[str]:
    return [str(rows), "--model", MODEL, "--serve-app", APP, "--backend", "serve", "--voice", voice, "--out", out,
            "--actors", "2", "--num-cpus", "0.25", "--batch-size", "2", "--max-inflight-per-replica", "2",
            "--max-new-tokens", "12", "--retry-on", "guard", "--max-chars", "40", "--no-progress", "--quiet",
            *extra]


def _objects(bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    return sorted(k for k in keys if k.endswith(".wav")), sorted(k for k in keys if k.endswith(".wav.json"))


def _manifest(bucket: str, key: str):
    import boto3

    from jobs.manifest import from_parquet

    return from_parquet(boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def test_narration_through_the_replicas_uses_both_nodes_one_object_per_row(fleet, voice_id, tmp_path, capsys):
    from jobs import narrate

    n = 12
    rows = _write_rows(tmp_path / "rows.jsonl", n, "a")
    reps = _by_node()
    cpu = {node: cpu_seconds(r["pid"]) for node, r in reps.items()}
    t = time.monotonic()
    code = narrate.main(_narrate(rows, f"s3://{fleet.bucket}/run1", voice_id))
    wall = time.monotonic() - t
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    used = {node: round(cpu_seconds(r["pid"]) - cpu[node], 2) for node, r in reps.items()}
    assert code == 0 and s["total"] == n and s["failed"] == 0, s
    audio, sidecars = _objects(fleet.bucket, "run1/audio/")
    man = _manifest(fleet.bucket, "run1/manifest.parquet")
    assert len(audio) == n and len(sidecars) == n
    assert sorted(f"run1/{r.key}" for r in man) == audio  # exactly one object per row, nothing else
    assert all(r.revision.startswith("sha256:") and r.voice == voice_id for r in man)
    total = sum(used.values())
    assert all(u >= 0.2 * total for u in used.values()), used  # both nodes' replicas did a share
    print(f"\nnarration: {n} rows, {s['audio_seconds']} s audio in {wall:.1f} s; replica CPU s by node {used}")


def test_worker_node_removed_mid_narration_completes_exactly_once(fleet, voice_id, tmp_path, capsys):
    from jobs import narrate

    n = 16
    rows = _write_rows(tmp_path / "rows.jsonl", n, "b")
    victim = fleet.workers[-1]
    victim_rid = _by_node()[victim.node_id]["replica_id"]
    removed: dict[str, float] = {}

    def remove_while_busy() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_objects(fleet.bucket, "run2/audio/")[1]) < 2:
            time.sleep(0.1)
        while time.monotonic() < deadline and _engine_load(victim_rid) == 0:  # the victim is serving rows right now
            time.sleep(0.02)
        removed["at_rows"] = len(_objects(fleet.bucket, "run2/audio/")[1])
        t = time.monotonic()
        fleet.remove_worker(victim)
        removed["remove_s"] = round(time.monotonic() - t, 2)

    th = threading.Thread(target=remove_while_busy)
    th.start()
    try:
        # rows of 48 frames keep each call in flight long enough for the removal to land inside one
        code = narrate.main(_narrate(rows, f"s3://{fleet.bucket}/run2", voice_id, "--max-new-tokens", "48"))
        th.join()
        s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert removed and removed["at_rows"] < n, removed  # the node went away while rows were still running
        assert code == 0 and s["total"] == n and s["failed"] == 0, s
        audio, sidecars = _objects(fleet.bucket, "run2/audio/")
        man = _manifest(fleet.bucket, "run2/manifest.parquet")
        assert len(audio) == n and len(sidecars) == n
        assert sorted(r.id for r in man) == [f"b{i:02d}" for i in range(n)]
        assert sorted(f"run2/{r.key}" for r in man) == audio
        assert s.get("retried", {}).get("rows", 0) >= 1, s  # it says what it had to retry
        print(f"\nnode removed after {removed['at_rows']} rows: job completed, retried {s['retried']}")
    finally:
        th.join()
        if victim not in fleet.workers:  # give the fleet its second GPU node back; Serve restarts the replica there
            t = time.monotonic()
            fleet.add_worker()
            wait_for(lambda: len(replicas()) == 2, 180, "the replacement replica on the new node")
            fleet.events["replica_back_s"] = round(time.monotonic() - t, 1)
            print(f"new node added: second replica RUNNING again after {fleet.events['replica_back_s']} s")


def test_replica_killed_mid_stream_fails_visibly_and_is_replaced(fleet, voice_id):
    import httpx

    body = {"model": MODEL, "input": "This story goes on and on. " * 20, "voice": voice_id,
            "response_format": "pcm", "max_new_tokens": 3000, "seed": 3}
    got: dict[str, object] = {"bytes": 0}

    def client() -> None:
        try:
            with httpx.stream("POST", f"{fleet.http}/v1/audio/speech", json=body, timeout=120) as r:
                got["status"] = r.status_code
                for chunk in r.iter_raw():
                    got["bytes"] = int(got["bytes"]) + len(chunk)
            got["outcome"] = "complete"  # the body ended as if the audio were whole
        except httpx.HTTPError as e:
            got["outcome"] = f"error: {type(e).__name__}: {e}"

    # the previous test removed a node: start from two replicas whose processes are alive
    wait_for(lambda: len([r for r in replicas() if Path(f"/proc/{r['pid']}").exists()]) == 2 == len(replicas()),
             180, "two live replicas")
    before = {r["replica_id"] for r in replicas()}
    th = threading.Thread(target=client)
    th.start()
    wait_for(lambda: int(got["bytes"]) > 0, 60, "the first audio bytes")
    reps = _by_node()
    cpu = {n: cpu_seconds(r["pid"]) for n, r in reps.items()}
    time.sleep(1.0)
    busy = max(reps, key=lambda n: cpu_seconds(reps[n]["pid"]) - cpu[n])  # the replica streaming to us
    t_kill = time.monotonic()
    os.kill(reps[busy]["pid"], signal.SIGKILL)
    th.join(120)
    assert got.get("status") == 200 and got.get("outcome", "").startswith("error"), got  # never a clean end
    # the next request succeeds at once: if Serve's router still sends it to the dead replica, the ingress takes it
    # to the other one before any audio went out (failover_retries)
    r = httpx.post(f"{fleet.http}/v1/audio/speech", json={**body, "input": "Back again.", "max_new_tokens": 8,
                                                          "response_format": "wav"}, timeout=60)
    ok_after = time.monotonic() - t_kill
    assert r.status_code == 200 and len(r.content) > 44, (r.status_code, r.content[:300])
    wait_for(lambda: len(replicas()) == 2 and {r["replica_id"] for r in replicas()} != before, 180,
             "Serve to replace the killed replica")
    replaced = time.monotonic() - t_kill
    fleet.events.update(next_ok_after_kill_s=round(ok_after, 2), replica_replaced_s=round(replaced, 1))
    print(f"\nkilled replica mid-stream after {got['bytes']} bytes: client saw {str(got['outcome'])[:90]}; "
          f"next request ok after {ok_after:.2f} s; replacement RUNNING after {replaced:.1f} s")


def test_autoscaling_from_1_to_2_under_queued_load_and_back(fleet, voice_id):
    from ray import serve

    autoscaling = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 1,
                   "upscale_delay_s": 1, "downscale_delay_s": 3, "metrics_interval_s": 0.5,
                   "look_back_period_s": 2}
    t_deploy = time.monotonic()
    fleet.deploy(autoscaling=autoscaling)
    wait_for(lambda: len(replicas()) == 1, 120, "the deployment to settle at 1")
    settle = time.monotonic() - t_deploy
    h = serve.get_deployment_handle(f"tts-{MODEL}", APP)
    stop, errors, done = threading.Event(), [], [0]

    def load() -> None:
        while not stop.is_set():
            try:
                h.synthesize.remote({"input": "Queued load for the autoscaler.", "voice": voice_id, "seed": 2,
                                     "max_new_tokens": 40, "priority": "bulk",
                                     "non_streaming_mode": True}).result(timeout_s=120)
                done[0] += 1
            except Exception as e:  # noqa: BLE001 - counted and shown
                errors.append(repr(e)[:200])

    t_load = time.monotonic()
    clients = [threading.Thread(target=load) for _ in range(6)]
    for c in clients:
        c.start()
    try:
        wait_for(lambda: len(replicas()) == 2, 180, "the second replica under load")
        up = time.monotonic() - t_load
        nodes = {r["node_id"] for r in replicas()}
        assert len(nodes) == 2  # the new replica took the other GPU node
    finally:
        stop.set()
        for c in clients:
            c.join(180)
    t_idle = time.monotonic()
    wait_for(lambda: len(replicas()) == 1, 180, "scaling back to 1 when idle")
    down = time.monotonic() - t_idle
    assert not errors, errors[:3]
    fleet.events.update(upscale_s=round(up, 1), downscale_s=round(down, 1))
    print(f"\nautoscaling: redeployed and settled at 1 replica in {settle:.0f} s; "
          f"1 -> 2 after {up:.1f} s of queued load ({done[0]} requests served, 0 errors); "
          f"2 -> 1 {down:.1f} s after the load stopped; config {autoscaling}")
