"""N concurrent streaming clients over HTTP against a running service: time to first audio (p50/p95/p99),
real-time factor and errors; optionally with a concurrent bulk load. The last stdout line is JSON.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model tiny-custom-voice --voice vivian \
        --clients 1 8 32 --requests-per-client 3 [--bulk 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
    return {"clients": n, "bulk_clients": bulk, "requests": len(res),
            "errors": sum("error" in r for r in res), "ttfa_p50_s": q(ttfa, .5), "ttfa_p95_s": q(ttfa, .95),
            "ttfa_p99_s": q(ttfa, .99), "rtf_p50": q(rtf, .5)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="tiny-custom-voice")
    p.add_argument("--voice", default="vivian")
    p.add_argument("--text", default="The quick brown fox jumps over the lazy dog.")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests-per-client", type=int, default=3)
    p.add_argument("--bulk", type=int, default=0, help="concurrent bulk-priority clients running meanwhile")
    a = p.parse_args()
    body = {"model": a.model, "voice": a.voice, "input": a.text, "response_format": "pcm",
            "max_new_tokens": a.max_new_tokens}
    results = []
    for n in a.clients:
        r = asyncio.run(level(a.url, n, a.requests_per_client, body, a.bulk))
        print(f"clients={n} bulk={a.bulk}: {r}", flush=True)
        results.append(r)
    print(json.dumps({"url": a.url, "model": a.model, "max_new_tokens": a.max_new_tokens, "results": results}))


if __name__ == "__main__":
    main()
