"""Narration throughput: audio seconds produced per wall second for a sample book.

Compares, on the same rows and the same engine settings:
  * plain_loop   - one process, the engine fed one chunk at a time (no batching, no Ray);
  * local_batch  - one process, all chunks of the book in one engine batch (continuous batching, no Ray);
  * ray_actors_N - Ray Data `map_batches` with N engine actors (N = 1, 2, 4), each loading the model once.
Ray timings include actor start-up and model loading (what a job pays); `load_s` reports the one-process
model load separately. Every run writes to a fresh folder, so nothing is reused. The last stdout line is JSON.
The Ray runs start their own local Ray (its own temp dir, RAY_ADDRESS ignored) and stop it at the end; the temp
folder (checkpoint, outputs, Ray's session) is removed.

With --fleet it runs on a simulated 3-node cluster instead (a head plus two worker nodes declaring one logical GPU
each; torch stays on CPU here) through the Serve app's model replicas (`num_gpus: 1`, so one per node):
  * serve_nodes_N - the narration job (Ray Data workers calling the model deployment) with N = 1, 2 replica nodes:
                    one untimed warm-up job first, then --rounds rounds alternating the two (1,2 then 2,1, ...;
                    redeployed when the count changes); each keeps its best round (`rounds_wall_s` lists them all);
  * hops          - the same chunk requests sent one hop (job -> model deployment) and two hops (job -> ingress ->
                    model deployment: the ingress's `synthesize_bulk`, or HTTP when it has none): seconds and the
                    bytes each path moves between processes, measured: the size of each answer as Ray serializes
                    it (HTTP: the response body's length) at every boundary it crosses. The inner hop of the two-hop
                    path (replica -> ingress) is not visible from here: it is counted as the replica's answer to the
                    same (seeded) payload measured on the one-hop path.

    python benchmarks/narrate_throughput.py                      # tiny random checkpoint, CPU
    python benchmarks/narrate_throughput.py --model CKPT --device cuda --actors 1 2 4
    python benchmarks/narrate_throughput.py --fleet [--rounds 2] # the simulated fleet
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def book_rows(chapters: int, voice: str):
    """The sample book's chapters, repeated with new ids until there are `chapters` rows."""
    from jobs.inputs import RowDefaults, read_inputs

    base = read_inputs(ROOT / "examples" / "book", RowDefaults(voice=voice))
    rows = []
    for i in range(chapters):
        r = base[i % len(base)]
        rows.append(type(r)(**{**r.__dict__, "id": f"{r.id}-{i}", "seed": i}))
    return rows


def plain_loop(rows, render, opts) -> tuple[float, float, float]:
    """One process, one chunk at a time. Returns (load_s, wall_s, audio_s)."""
    from jobs.audio import join_chunks
    from jobs.render import _chunk_jobs
    from jobs.split import split_text
    from jobs.synth import EngineBackend

    t0 = time.perf_counter()
    be = EngineBackend(opts.engine)
    be._engine(render.model)  # load once, outside the timed loop
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    audio = 0.0
    for row in rows:
        pcm = []
        for job in _chunk_jobs(row, render, split_text(row.text, render.max_chars), 0):
            (res,) = be.synthesize([job])
            pcm.append(res.pcm)
        audio += len(join_chunks(pcm, 24000, render.pause_s)) / 24000
    return load, time.perf_counter() - t0, audio


def run_mode(rows, render, opts, out: Path) -> tuple[float, float, int]:
    """run_rows end to end into a fresh folder. Returns (wall_s, audio_s, failed)."""
    from jobs.runner import run_rows

    t0 = time.perf_counter()
    recs = run_rows(rows, render, opts)
    wall = time.perf_counter() - t0
    return wall, sum(r.duration_s for r in recs), sum(r.status == "failed" for r in recs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random custom_voice one)")
    p.add_argument("--chapters", type=int, default=6)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-sessions", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-cpus", type=float, default=0.25, help="CPUs reserved per actor")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (e.g. 0.25 to share one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--voice", default="vivian")
    p.add_argument("--batch-size", type=int, default=0,
                   help="rows per map_batches batch (default: rows spread evenly over the actors)")
    p.add_argument("--fleet", action="store_true", help="the simulated 3-node cluster through Serve replicas")
    p.add_argument("--hop-requests", type=int, default=16, help="--fleet: requests per hop measurement")
    p.add_argument("--rounds", type=int, default=2,
                   help="--fleet: rounds of the 1- and 2-replica jobs, alternated; the best of each is kept")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for k, v in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                 ("RAY_AUTH_MODE", "disabled"), ("RAY_SERVE_ENABLE_HA_PROXY", "0")):
        os.environ.setdefault(k, v)
    if a.fleet:
        return run_fleet(a)

    from jobs.models import engine_spec
    from jobs.render import RenderConfig
    from jobs.runner import RunOptions
    from jobs.synth import EngineOptions

    tmp = Path(tempfile.mkdtemp(prefix="qtts-bench-", dir="/tmp"))  # short: Ray's socket paths live under it
    ray_started = False
    try:
        model = a.model
        if model is None:
            from qwen_tts_core import make_checkpoint

            model = str(tmp / "tiny")
            make_checkpoint(model, model_type="custom_voice", size="tiny", seed=0)
        eng = EngineOptions(device=a.device, dtype=a.dtype, max_sessions=a.max_sessions, torch_threads=a.threads)
        render = RenderConfig(model=model, max_chars=200, pause_s=0.4,
                              sampling={"max_new_tokens": a.max_new_tokens}, retry_on=("guard",),
                              models={model: engine_spec(model, eng).to_dict()})
        rows = book_rows(a.chapters, a.voice)
        results = []

        load, wall, audio = plain_loop(rows, render, RunOptions(engine=eng, runner="local"))
        results.append({"mode": "plain_loop", "actors": 0, "wall_s": round(wall, 2), "audio_s": round(audio, 2),
                        "audio_s_per_wall_s": round(audio / wall, 3), "load_s": round(load, 2)})
        opts = RunOptions(output=f"file://{tmp / 'local'}", backend="engine", runner="local", progress=False,
                          batch_size=len(rows), engine=eng)
        wall, audio, failed = run_mode(rows, render, opts, tmp / "local")
        results.append({"mode": "local_batch", "actors": 0, "wall_s": round(wall, 2), "audio_s": round(audio, 2),
                        "audio_s_per_wall_s": round(audio / wall, 3), "failed": failed, "includes_load": True})
        ray_started = _start_local_ray(tmp)  # run_rows' connect_ray then finds it ("existing")
        for n in a.actors:
            opts = RunOptions(output=f"file://{tmp / f'ray{n}'}", backend="engine", runner="ray", progress=False,
                              actors=n, num_cpus=a.num_cpus, num_gpus=a.num_gpus, engine=eng,
                              batch_size=a.batch_size or max(1, -(-len(rows) // n)))
            wall, audio, failed = run_mode(rows, render, opts, tmp / f"ray{n}")
            results.append({"mode": f"ray_actors_{n}", "actors": n, "wall_s": round(wall, 2),
                            "audio_s": round(audio, 2), "audio_s_per_wall_s": round(audio / wall, 3),
                            "failed": failed, "includes_load": True})
    finally:
        if ray_started:  # the Ray this run started (it never joins one: _start_local_ray starts its own)
            import ray

            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        logging.getLogger("bench").warning("%s", r)
    print(json.dumps({"benchmark": "narrate_throughput", "model": "tiny-random" if a.model is None else a.model,
                      "device": a.device, "chapters": len(rows), "max_new_tokens": a.max_new_tokens,
                      "cpu_count": os.cpu_count(), "machine": platform.machine(), "results": results}))


def _start_local_ray(tmp: Path) -> bool:
    """A local Ray of this run's own (never an exported RAY_ADDRESS's cluster), its session under `tmp`."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = str(tmp)  # the address file too
    ray.init(address="local", _temp_dir=str(tmp / "ray"), include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, object_store_memory=256 * 1024 * 1024)
    return True


# --- the simulated fleet -------------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_fleet(tmp: Path):
    """Head (2 CPUs) + two worker nodes with 1 CPU and 1 logical GPU each; own temp dir and ports."""
    import ray
    from ray.cluster_utils import Cluster

    (tmp / "ray").mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(tmp)  # the cluster's address file stays in our temp dir
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "temp_dir": str(tmp), "gcs_server_port": _free_port(), "include_dashboard": False,
        "object_store_memory": 128 << 20, "dashboard_agent_listen_port": _free_port(),
        "ray_client_server_port": _free_port()})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1, object_store_memory=96 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    return cluster


def _deploy(ckpt: str, replicas: int, a, tmp: Path) -> float:
    from ray import serve

    from serve.app import build_app

    cfg = {"models": [{"name": "tiny", "checkpoint": ckpt, "num_gpus": 1, "device": "cpu", "num_cpus": 0.5, "num_replicas": replicas,
                       "max_sessions": a.max_sessions, "max_queue": 32, "interactive_reserve": 1,
                       "max_new_tokens": max(512, a.max_new_tokens), "warmup": True}],
           "voices_uri": str(tmp / "voices"), "cache_dir": str(tmp / "cache")}
    t = time.perf_counter()
    serve.run(build_app(cfg), name="qtts", route_prefix="/")
    from jobs.serve_backend import served_models

    while served_models("qtts").get("tiny", 0) != replicas:
        time.sleep(0.5)
    return time.perf_counter() - t


def wire_bytes(obj) -> int:
    """The bytes `obj` takes crossing a Ray process boundary: its size as Ray's serializer writes it (in band and
    out of band buffers together), or its pickle (protocol 5) size outside a Ray driver."""
    try:
        from ray._private.worker import global_worker

        return int(global_worker.get_serialization_context().serialize(obj).total_bytes)
    except Exception:  # noqa: BLE001 - not connected, or the private API moved: the pickle is what Ray falls back on
        import pickle

        return len(pickle.dumps(obj, protocol=5))


def _hops(a, n: int) -> list[dict]:
    """The same `n` chunk requests one hop (model deployment) and two hops (through the ingress)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from ray import serve

    payloads = [{"input": f"Sentence number {i} of the hop benchmark, read aloud.", "voice": a.voice, "seed": i,
                 "max_new_tokens": a.max_new_tokens, "priority": "bulk", "non_streaming_mode": True}
                for i in range(n)]
    direct = serve.get_deployment_handle("tts-tiny", "qtts")
    ingress = serve.get_app_handle("qtts")
    out = []

    # each returns (pcm bytes, [bytes it moved across each process boundary it crossed, as measured here])
    def one_hop(p: dict) -> tuple[int, list[int]]:
        res = direct.synthesize.remote(p).result()
        return int(np.asarray(res["pcm"]).nbytes), [wire_bytes(res)]

    def two_hops(p: dict) -> tuple[int, list[int]]:
        res = ingress.synthesize_bulk.remote({**p, "model": "tiny"}).result()
        return int(np.asarray(res["pcm"]).nbytes), [wire_bytes(res)]

    paths = [("one_hop", one_hop)]
    try:
        two_hops(payloads[0])
        paths.append(("two_hops_via_ingress", two_hops))
    except Exception as e:  # noqa: BLE001 - the ingress no longer relays bulk audio
        logging.getLogger("bench").warning("no ingress bulk entry (%s); two hops measured over HTTP", e)
        paths.append(("two_hops_via_http", _http_two_hops()))
    replica_answer: list[int] = []  # the one-hop answers' sizes, per payload
    for name, fn in paths:
        fn(payloads[0])  # warm
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            got = list(pool.map(fn, payloads))
        wall = time.perf_counter() - t
        pcm = sum(g[0] for g in got)
        seen = [sum(g[1]) for g in got]  # the boundary into this driver
        if name == "one_hop":
            replica_answer = seen
            moved, hops = sum(seen), 1
        else:  # + replica -> ingress: the replica's answer to the same payload (one-hop path)
            moved, hops = sum(seen) + sum(replica_answer), 2
        out.append({"mode": name, "requests": n, "wall_s": round(wall, 2), "audio_bytes": pcm,
                    "bytes_into_driver": sum(seen), "bytes_moved": moved, "hops": hops,
                    "ms_per_request": round(1000 * wall / n, 1)})
    return out


def _http_two_hops():
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    port = int(ray.get(client._controller.get_http_config.remote()).port)

    def call(p: dict) -> tuple[int, list[int]]:
        import httpx

        body = {k: v for k, v in p.items() if k not in ("priority", "non_streaming_mode")}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/audio/speech",
                       json={**body, "model": "tiny", "response_format": "pcm"}, timeout=300)
        r.raise_for_status()
        return len(r.content) * 2, [len(r.content)]  # int16 on the wire (audio_bytes: as float32, like the others)

    return call


def run_fleet(a) -> None:
    import ray
    from ray import serve

    from jobs import narrate
    from jobs.runner import run_rows
    from qwen_tts_core import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="qtts-fleet-", dir="/tmp"))
    cluster = None
    results: list[dict] = []
    try:
        ckpt = a.model or str(make_checkpoint(str(tmp / "tiny"), model_type="custom_voice", size="tiny", seed=0))
        rows = book_rows(a.chapters, a.voice)
        cluster = _start_fleet(tmp)
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, proxy_location="HeadOnly")
        deployed = {"n": 0}
        runs = 0

        def job(n: int) -> tuple[float, list]:
            """The narration job against `n` replicas (deployed first when the count changes): (wall_s, records)."""
            nonlocal runs
            if deployed["n"] != n:
                deploy_s[n].append(round(_deploy(ckpt, n, a, tmp), 1))
                deployed["n"] = n
            runs += 1
            args = narrate.build_parser().parse_args(
                ["-", "--model", "tiny", "--backend", "serve", "--serve-app", "qtts", "--out",
                 f"file://{tmp / f'serve{n}-{runs}'}", "--actors", "2", "--num-cpus", "0.25", "--batch-size", "1",
                 "--max-inflight-per-replica", str(a.max_sessions), "--max-new-tokens", str(a.max_new_tokens),
                 "--no-progress"])
            defaults, render, opts, _ = narrate.build_options(args, "audio")
            todo, render, opts, backend = narrate.prepare(rows, defaults, render, opts)
            t = time.perf_counter()
            recs = run_rows(todo, render, opts, backend=backend)
            return time.perf_counter() - t, recs

        deploy_s: dict[int, list] = {1: [], 2: []}
        warm_wall, _ = job(1)  # untimed warm-up: Ray Data's first job, the replicas' first requests, imports
        walls: dict[int, list] = {1: [], 2: []}
        best: dict[int, tuple] = {}
        for r in range(max(1, a.rounds)):
            for n in ((1, 2) if r % 2 == 0 else (2, 1)):  # 1,2 then 2,1: neither always runs first
                wall, recs = job(n)
                walls[n].append(round(wall, 2))
                if n not in best or wall < best[n][0]:
                    best[n] = (wall, recs)
        for n in (1, 2):
            wall, recs = best[n]
            audio = sum(r.duration_s for r in recs)
            results.append({"mode": f"serve_nodes_{n}", "replicas": n, "wall_s": round(wall, 2),
                            "audio_s": round(audio, 2), "audio_s_per_wall_s": round(audio / wall, 3),
                            "failed": sum(r.status == "failed" for r in recs), "rounds_wall_s": walls[n],
                            "deploy_s": deploy_s[n], "best_of": len(walls[n])})
        results[0]["warm_up_wall_s"] = round(warm_wall, 2)
        results += _hops(a, a.hop_requests)
    finally:
        if cluster is not None:  # the cluster this run started, and only that
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    by = {r["mode"]: r for r in results}
    summary = {"two_nodes_vs_one": round(by["serve_nodes_2"]["audio_s_per_wall_s"]
                                         / by["serve_nodes_1"]["audio_s_per_wall_s"], 3)}
    two = next(r for r in results if r["mode"].startswith("two_hops"))
    summary.update(two_hops_vs_one_seconds=round(two["wall_s"] / by["one_hop"]["wall_s"], 3),
                   two_hops_vs_one_bytes_measured=round(two["bytes_moved"] / by["one_hop"]["bytes_moved"], 3))
    for r in results:
        logging.getLogger("bench").warning("%s", r)
    print(json.dumps({"benchmark": "narrate_throughput", "setup": "fleet: head + 2 nodes x 1 logical GPU (CPU torch)",
                      "model": "tiny-random" if a.model is None else a.model, "chapters": len(rows),
                      "max_new_tokens": a.max_new_tokens, "cpu_count": os.cpu_count(),
                      "machine": platform.machine(), "results": results, "ratios": summary}))


if __name__ == "__main__":
    main()
