"""Load on the speech service: N concurrent streaming clients over HTTP (errors, time to first audio p50/p95/p99,
real-time factor), then early disconnects (HTTP clients that leave after the first chunk, WebSocket clients that
vanish mid-session) and a check that nothing leaked (engine sessions and open client streams back to 0). The last
stdout line is JSON; first-audio percentiles are also given as ratios to the single-client run of the same process.

    python benchmarks/serve_load.py --deploy 2                       # own local Ray + 2 replicas of a tiny model
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model tiny-custom-voice --clients 1 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import httpx


async def one(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    first, nbytes = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/audio/speech", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": r.status_code}
            async for chunk in r.aiter_raw():
                if chunk and first is None:
                    first = time.perf_counter() - t0
                nbytes += len(chunk)
    except httpx.HTTPError as e:
        return {"error": type(e).__name__}
    wall = time.perf_counter() - t0
    audio_s = nbytes / 2 / 24000
    return {"ttfa": first, "rtf": wall / audio_s if audio_s else None}


async def warm(url: str, body: dict) -> None:
    """One request first (first-call costs of the path stay out of the numbers)."""
    async with httpx.AsyncClient(timeout=600) as client:
        await one(client, url, body)


def q(xs: list[float], p: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    return round(xs[min(len(xs) - 1, int(p * len(xs)))], 4) if xs else None


async def level(url: str, n: int, per: int, body: dict, bulk: int) -> dict:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + bulk + 4)) as client:
        stop = asyncio.Event()

        async def bulk_loop():
            while not stop.is_set():
                await one(client, url, {**body, "priority": "bulk"})

        bulks = [asyncio.create_task(bulk_loop()) for _ in range(bulk)]

        async def worker():
            return [await one(client, url, body) for _ in range(per)]

        res = [r for rs in await asyncio.gather(*[worker() for _ in range(n)]) for r in rs]
        stop.set()
        for b in bulks:
            b.cancel()
    ttfa = [r["ttfa"] for r in res if "ttfa" in r]
    rtf = [r["rtf"] for r in res if "rtf" in r]
    errors: dict[str, int] = {}
    for r in res:
        if "error" in r:
            errors[str(r["error"])] = errors.get(str(r["error"]), 0) + 1
    return {"clients": n, "bulk_clients": bulk, "requests": len(res), "errors": sum(errors.values()),
            "error_kinds": errors, "ttfa_p50_s": q(ttfa, .5), "ttfa_p95_s": q(ttfa, .95), "ttfa_p99_s": q(ttfa, .99),
            "rtf_p50": q(rtf, .5)}


def _metric(text: str, name: str) -> float | None:
    """Sum of a metric's series in Prometheus text; None when it has no sample (absent, or no replica answered: a
    missing gauge is not a zero)."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.split()[-1])
            seen = True
    return total if seen else None


async def disconnects(url: str, n: int, body: dict, model: str, voice: str) -> dict:
    """n//2 HTTP clients leave after their first chunk; n - n//2 WebSocket clients vanish (no close frame, no end)
    after config + text. Then waits for engine sessions and open client streams to drain to 0 (both gauges must be
    in /metrics, which must answer 200: else `leak_check` says "no data" and main exits 1 after its JSON)."""
    import websockets

    ws_url = url.replace("http", "ws", 1) + "/v1/audio/speech/stream"
    long_body = {**body, "max_new_tokens": max(body["max_new_tokens"], 200)}

    async def http_leave(client):
        try:
            async with client.stream("POST", f"{url}/v1/audio/speech", json=long_body) as r:
                if r.status_code != 200:
                    return f"http {r.status_code}"
                async for chunk in r.aiter_raw():
                    if chunk:
                        return "ok"          # leaving the block closes the connection mid-stream
        except httpx.HTTPError as e:
            return type(e).__name__
        return "no audio"

    async def ws_vanish():
        try:
            ws = await websockets.connect(ws_url)
            await ws.send(json.dumps({"type": "config", "model": model, "voice": voice, "max_new_tokens": 200}))
            await ws.recv()
            await ws.send(json.dumps({"type": "text", "text": "This client will vanish in the middle of"}))
            await asyncio.sleep(0.2)
            ws.transport.abort()
            return "ok"
        except Exception as e:  # noqa: BLE001 - counted as an error
            return type(e).__name__

    async with httpx.AsyncClient(timeout=120) as client:
        outcomes = await asyncio.gather(*[http_leave(client) for _ in range(n // 2)],
                                        *[ws_vanish() for _ in range(n - n // 2)])
        t0 = time.perf_counter()
        sessions = streams = None
        problem = None
        while time.perf_counter() - t0 < 30:
            try:
                r = await client.get(f"{url}/metrics")
                r.raise_for_status()
            except httpx.HTTPError as e:
                problem = f"/metrics: {type(e).__name__}: {e}"[:300]
                sessions = streams = None
            else:
                text = r.text
                sessions, streams = _metric(text, "qtts_active_sessions"), _metric(text, "qtts_open_client_streams")
                missing = [k for k, v in (("qtts_active_sessions", sessions), ("qtts_open_client_streams", streams))
                           if v is None]
                problem = f"/metrics has no sample of {', '.join(missing)}" if missing else None
                if sessions == 0 and streams == 0:
                    break
            await asyncio.sleep(0.2)
        drained = time.perf_counter() - t0
        after = await one(client, url, body)
    if problem:
        check = f"no data: {problem}"
    else:
        check = "ok" if sessions == 0 and streams == 0 else "leaked"
    return {"disconnects": n, "errors": sum(o != "ok" for o in outcomes), "leak_check": check,
            "leaked_engine_sessions": sessions, "leaked_client_streams": streams, "drain_s": round(drained, 3),
            "request_after_ok": "ttfa" in after}


def deploy(replicas: int, max_sessions: int, tmp: str):
    """A local Ray (its temp dir under `tmp`, loopback) with Serve on a free port and `replicas` replicas of a tiny
    model (cache and voices under `tmp` too). The caller shuts both down and removes `tmp`."""
    import socket

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    from serve.app import build_app

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TMPDIR"] = tmp  # the address file too
    ray.init(address="local", include_dashboard=False, log_to_driver=False, _temp_dir=os.path.join(tmp, "ray"),
             runtime_env={"env_vars": {"PYTHONPATH": root, "OMP_NUM_THREADS": "1"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cache = os.path.join(tmp, "cache")
    cfg = {"models": [{"name": "tiny", "model_type": "custom_voice", "num_cpus": 0.5, "num_replicas": replicas,
                       "max_sessions": max_sessions, "max_queue": 64, "max_new_tokens": 2048}],
           "cache_dir": cache, "voices_uri": os.path.join(cache, "voices")}
    serve.run(build_app(cfg), name="qtts", route_prefix="/")
    return f"http://127.0.0.1:{port}", "tiny"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--deploy", type=int, default=0, metavar="REPLICAS",
                   help="start a local Ray and serve a tiny model on this many replicas (ignores --url/--model)")
    p.add_argument("--max-sessions", type=int, default=16, help="with --deploy: engine slots per replica")
    p.add_argument("--model", default="tiny-custom-voice")
    p.add_argument("--voice", default="vivian")
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 32])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--bulk", type=int, default=0, help="concurrent bulk-priority clients running meanwhile")
    p.add_argument("--disconnects", type=int, default=50, help="early disconnects after the load (0: skip)")
    a = p.parse_args()
    if not a.deploy:
        return report(run(a, a.url, a.model))
    tmp = tempfile.mkdtemp(prefix="qload-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        url, model = deploy(a.deploy, a.max_sessions, tmp)
        result = run(a, url, model)
    finally:
        import ray

        if ray.is_initialized():  # only deploy() starts one in this process (address="local": never joins one)
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return report(result)  # after the shutdown, whose raylet messages go to stdout too: the JSON stays last


def report(result: dict) -> int:
    print(json.dumps(result), flush=True)
    leak = result["early_disconnects"]
    return 1 if leak and leak["leak_check"] != "ok" else 0


def run(a, url: str, model: str) -> dict:
    body = {"model": model, "voice": a.voice, "input": a.text, "response_format": "pcm",
            "max_new_tokens": a.max_new_tokens}
    asyncio.run(warm(url, body))
    results = []
    for n in a.clients:
        r = asyncio.run(level(url, n, a.requests_per_client, body, a.bulk))
        print(f"clients={n} bulk={a.bulk}: {r}", flush=True)
        results.append(r)
    base = next((r for r in results if r["clients"] == 1), None)
    for r in results:
        for k in ("ttfa_p50_s", "ttfa_p95_s"):
            if base and base[k] and r[k]:
                r[k.replace("_s", "_vs_1_client")] = round(r[k] / base[k], 2)
    leak = asyncio.run(disconnects(url, a.disconnects, body, model, a.voice)) if a.disconnects else None
    if leak:
        print(f"early disconnects: {leak}", flush=True)
    return {"url": url, "model": model, "replicas": a.deploy or None, "max_new_tokens": a.max_new_tokens,
            "results": results, "early_disconnects": leak}


if __name__ == "__main__":
    sys.exit(main())
