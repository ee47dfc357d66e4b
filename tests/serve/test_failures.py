"""Failure is visible (issue 8, Found 5): errors before the first byte are JSON 4xx/5xx; after it, raw audio is
aborted, SSE sends an error event, WebSocket sends an error and closes 1011; a killed replica or ingress never looks
like a short success, the next request succeeds, and sessions orphaned by a dead ingress are cancelled."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from serve.schemas import ApiError
from serve.streaming import ReplicaStream, StreamAborted, audio_body, end_error, sse_body
from tests.serve.helpers import FakeReplicaGen
from tests.serve.test_sessions import _stats, _wait, _ws_url

LONG = {"model": "cv3", "voice": "ryan", "max_new_tokens": 1500, "response_format": "pcm",
        "input": "A long answer that keeps going, sentence after sentence, for quite a while. " * 3}


# --- the transport's rules, on a stand-in replica stream (no Ray) ------------------------------------------------
def _audio(n=1920):
    return {"type": "audio", "pcm": np.full(n, 0.1, np.float32)}


def _end(status=None, reason="eos"):
    return {"type": "end", "finish_reason": "error" if status else reason, "num_frames": 1, "ttfa_s": 0.1,
            "status": status, "message": "boom" if status else None, "param": None}


class _Pcm:
    media_type = "audio/pcm"

    def push(self, pcm):
        return b"x" * len(pcm)

    def finish(self):
        return b""


async def _drain(body):
    out = []
    async for part in body:
        out.append(part)
    return out


def test_failure_before_the_first_byte_is_an_error_answer():
    async def main():
        s = ReplicaStream(FakeReplicaGen([_end(500)]), "r-1", "cv", None, None)
        with pytest.raises(ApiError) as e:
            await s.first_output()
        return s, e.value
    s, err = asyncio.run(main())
    assert err.status == 500 and s.gen.cancelled and s.closed
    assert end_error(_end()) is None and end_error(_end(408)).status == 408


def test_failure_after_the_first_byte_aborts_raw_audio_and_sends_an_sse_error():
    async def raw(items):
        s = ReplicaStream(FakeReplicaGen(items), "r-1", "cv", None, None)
        return await _drain(audio_body(s, await s.first_output(), _Pcm())), s

    with pytest.raises(StreamAborted):
        asyncio.run(raw([_audio(), _end(500)]))
    with pytest.raises(StreamAborted):   # the replica died: its generator raised
        asyncio.run(raw([_audio(), RuntimeError("actor died")]))
    parts, s = asyncio.run(raw([_audio(), _end()]))
    assert parts == [b"x" * 1920] and s.gen.cancelled   # a clean end; the finished stream is released

    async def sse(items):
        s = ReplicaStream(FakeReplicaGen(items), "r-1", "cv", None, None)
        return [json.loads(e[6:]) for e in await _drain(sse_body(s, await s.first_output(), _Pcm()))]
    events = asyncio.run(sse([_audio(), RuntimeError("actor died")]))
    assert events[0]["type"] == "speech.audio.delta" and events[-1]["type"] == "error"
    assert events[-1]["error"]["code"] == "502"
    events = asyncio.run(sse([_audio(), _end(reason="max_new_tokens")]))
    assert events[-1] == {"type": "speech.audio.done", "finish_reason": "max_new_tokens", "num_frames": 1,
                          "time_to_first_audio_s": 0.1}


# --- on the real service --------------------------------------------------------------------------------------------
@pytest.mark.ray
def test_lone_surrogate_is_a_400_over_http_and_an_error_over_websocket(serve_app):
    import websockets

    url = serve_app["url"]
    body = '{"model": "cv", "voice": "ryan", "input": "ab\\ud800cd", "response_format": "wav"}'
    r = httpx.post(f"{url}/v1/audio/speech", content=body, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "input", r.text

    async def ws():
        async with websockets.connect(_ws_url(url)) as c:
            await c.send(json.dumps({"type": "config", "model": "cv", "voice": "ryan"}))
            await c.recv()
            await c.send('{"type": "text", "text": "ab\\ud800cd"}')
            msgs = []
            try:
                while True:
                    m = await asyncio.wait_for(c.recv(), 20)
                    if isinstance(m, str):
                        msgs.append(json.loads(m))
            except websockets.ConnectionClosed:
                pass
            return msgs, c.close_code
    msgs, code = asyncio.run(ws())
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"]["param"] == "text" and code == 1008, msgs


async def _ws_open(url: str, model: str, **config):
    import websockets

    ws = await websockets.connect(_ws_url(url), max_size=None)
    await ws.send(json.dumps({"type": "config", "model": model, "response_format": "pcm", **config}))
    start = json.loads(await ws.recv())
    return ws, start["session"]


async def _talk(ws):
    """Keep a WebSocket session alive (a piece of text every 0.3 s) until the socket closes."""
    import websockets

    try:
        while True:
            await ws.send(json.dumps({"type": "text", "text": " and then some more words"}))
            await asyncio.sleep(0.3)
    except websockets.ConnectionClosed:
        pass


async def _ws_rest(ws, timeout_s=30):
    import websockets

    msgs = []
    try:
        while True:
            m = await asyncio.wait_for(ws.recv(), timeout_s)
            if isinstance(m, str):
                msgs.append(json.loads(m))
    except websockets.ConnectionClosed:
        pass
    return msgs, ws.close_code


def _owner(sid: str) -> str:
    return sid.rsplit("-", 1)[0]


@pytest.mark.ray
def test_health_and_metrics_ask_every_replica(multi_app):
    """/health and /metrics read each of the three replicas (calls made at once, each routed to its replica)."""
    from tests.serve.helpers import metric

    url = multi_app["url"]
    assert _wait(lambda: httpx.get(f"{url}/health", timeout=30).json()["models"]["cv3"].get("replicas") == 3, 60)
    t = time.perf_counter()
    h = httpx.get(f"{url}/health", timeout=30).json()
    assert h["models"]["cv3"]["replicas"] == 3 and time.perf_counter() - t < 3, h
    assert metric(httpx.get(f"{url}/metrics", timeout=30).text, "qtts_replicas", model="cv3") == 3


@pytest.mark.ray
def test_live_streams_outlast_their_leases(multi_app):
    """The ingress renews what it consumes: four streams (over several replicas, so renewals go to several owners
    at once) read slowly for 2.5 leases are neither aborted nor expired. The random tiny model may choose EOS early
    (a clean end, which tells nothing here): a round with fewer than two long streams is run again, other seeds."""
    url, app, lease = multi_app["url"], multi_app["app"], multi_app["config"]["session_lease_s"]
    before = _stats(app, "cv3")["expired_lease"]

    async def one(c, seed):
        async with c.stream("POST", f"{url}/v1/audio/speech", json={**LONG, "seed": seed}) as r:
            t0, n = time.perf_counter(), 0
            async for chunk in r.aiter_raw():      # an abort (a cancelled session) raises here
                n += len(chunk)
                await asyncio.sleep(0.05)
                if time.perf_counter() - t0 > 2.5 * lease:
                    return r.headers["x-session-id"], True
            return r.headers["x-session-id"], False   # a clean end (the model chose to stop): not an abort

    async def main(round_):
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*[one(c, 4 * round_ + i) for i in range(4)])
    rounds = []
    for round_ in range(4):
        rounds.append(asyncio.run(main(round_)))
        if sum(outlasted for _, outlasted in rounds[-1]) >= 2:
            break
    results = rounds[-1]
    assert len({_owner(sid) for sid, _ in results}) >= 2, results
    assert sum(outlasted for _, outlasted in results) >= 2, f"too few long streams to tell: {rounds}"
    expired = _stats(app, "cv3")["expired_lease"] - before
    assert expired == 0, f"{expired} live stream(s) expired their lease: {rounds}"


@pytest.mark.ray
def test_a_lapsed_session_is_cancelled_only_once_its_consumer_actor_is_dead(multi_app):
    """Real Ray, no renewal at all: a named actor stands in for the ingress (`this_actor()` gives its identity, as in
    the ingress). While it lives, its session on a replica outlasts 2.5 leases; once it is killed, the replica pings
    it, gets ActorDiedError, and cancels the session within about a lease."""
    import uuid

    import ray
    from ray import serve

    from serve.liveness import this_actor

    app, lease = multi_app["app"], multi_app["config"]["session_lease_s"]

    @ray.remote(num_cpus=0)
    class Consumer:
        async def identity(self):              # async, like the ingress
            return this_actor()
    consumer = Consumer.options(name=f"test-consumer-{uuid.uuid4().hex[:8]}", namespace="serve").remote()
    who = ray.get(consumer.identity.remote())
    assert who["id"] == consumer._actor_id.hex(), who
    before = _stats(app, "cv3")
    h = serve.get_deployment_handle("tts-cv3", app)

    async def main():
        payload = {"model": "cv3", "voice": "ryan", "seed": 1, "max_new_tokens": 400}
        gen = h.options(stream=True).stream.remote(payload, True, True, who)
        sid = (await gen.__anext__())["session"]
        await h.options(session_id=sid).feed.remote(sid, "Words that wait for more words.")   # no end: it waits
        last = asyncio.create_task(_last_item(gen))
        # the fixture's idle-text timeout (20 s) must outlast 2.5 leases and the cancel after the kill (up to 4
        # leases): at 10 s it won the race on a loaded CI host (408 "no text"). Empty feeds no longer reset it (they
        # held a slot past the timeout), and more words would let the random model choose EOS.
        await asyncio.sleep(2.5 * lease)
        alive_through = not last.done() or last.result()
        ray.kill(consumer)
        t = time.perf_counter()
        end = await asyncio.wait_for(last, 4 * lease)
        waited = time.perf_counter() - t
        return alive_through, end, waited
    alive_through, end, waited = asyncio.run(main())
    after = _stats(app, "cv3")
    assert alive_through is True, f"a session whose consumer lives must outlast its lapsed leases: {alive_through}"
    assert end["finish_reason"] == "cancelled", end
    assert waited < 2 * lease + 2, waited
    assert after["expired_lease_late"] > before["expired_lease_late"], (before, after)
    assert after["expired_lease"] >= before["expired_lease"] + 1, (before, after)


async def _last_item(gen):
    items = [x async for x in gen]
    return items[-1] if items else None


@pytest.mark.ray
def test_killed_replica_mid_stream_fails_every_stream_it_held(multi_app):
    """A replica killed mid-stream: its raw HTTP stream ends in a protocol error (never a clean end), its SSE stream
    ends with an error event, its WebSocket session gets an error and close 1011; the next request succeeds."""
    import ray

    url = multi_app["url"]

    async def main():
        ws, sid = await _ws_open(url, "cv3", voice="ryan", max_new_tokens=1500)
        target = _owner(sid)
        talker = asyncio.create_task(_talk(ws))
        client = httpx.AsyncClient(timeout=60)
        held, on_target = [], {}
        for _ in range(40):   # open streams (keeping them, so load stays even) until the target holds both kinds
            kind = "raw" if "raw" not in on_target else "sse"
            body = {**LONG, **({"stream_format": "sse"} if kind == "sse" else {})}
            r = await client.send(client.build_request("POST", f"{url}/v1/audio/speech", json=body), stream=True)
            assert r.status_code == 200, (await r.aread())[:300]
            it = r.aiter_raw()
            await it.__anext__()
            held.append((r, it))
            if _owner(r.headers["x-session-id"]) == target:
                on_target[kind] = (r, it)
                if len(on_target) == 2:
                    break
        assert len(on_target) == 2, "could not place an HTTP and an SSE stream on the WebSocket's replica"
        ray.kill(ray.get_actor(f"SERVE_REPLICA::{multi_app['app']}#tts-cv3#{target}", namespace="serve"))
        outcome = {}
        for kind, (_r, it) in on_target.items():
            data = b""
            try:
                async for c in it:
                    data += c
                outcome[kind] = ("clean end", data)
            except httpx.HTTPError as e:
                outcome[kind] = (type(e).__name__, data)
        msgs, code = await _ws_rest(ws)
        talker.cancel()
        for r, _ in held:
            await r.aclose()
        nxt = await client.post(f"{url}/v1/audio/speech", json={**LONG, "max_new_tokens": 8})
        await client.aclose()
        return outcome, msgs, code, nxt
    for _ in range(4):
        outcome, msgs, code, nxt = asyncio.run(main())
        if not (msgs and msgs[-1].get("type") == "done" and code == 1000) and outcome["raw"][0] != "clean end":
            break
        # The random tiny model chose EOS before its replica died (the socket's `done`, or the raw stream's clean
        # end: it samples without a seed while the other streams are placed), so that part tested nothing: once
        # more. A service that reported a clean end for a killed session would do so on every try and fail below.
    assert outcome["raw"][0] in ("RemoteProtocolError", "ReadError"), outcome["raw"][0]
    sse_events = [json.loads(x[6:]) for x in outcome["sse"][1].decode().splitlines() if x.startswith("data: ")]
    assert outcome["sse"][0] != "clean end" or sse_events[-1]["type"] == "error", sse_events[-1:]
    assert msgs[-1]["type"] == "error" and code == 1011, (msgs[-1:], code)
    assert nxt.status_code == 200 and len(nxt.content) > 0


async def _streams_through_a_kill(url: str, kill, text: str, max_new_tokens: int):
    """A WebSocket session (some text, no `end`) and a raw HTTP stream are open, audio flowing, when `kill()` runs.
    Returns how the raw stream ended ("clean end" or the httpx error), the socket's remaining messages, its close
    code; None when `kill()` returned False (it found nothing to test: both streams closed, and killed nothing)."""
    ws, _ = await _ws_open(url, "cv3", voice="ryan", max_new_tokens=max_new_tokens)
    await ws.send(json.dumps({"type": "text", "text": text}))
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.send(client.build_request("POST", f"{url}/v1/audio/speech", json=LONG), stream=True)
        it = r.aiter_raw()
        await it.__anext__()
        if not await kill():
            await r.aclose()
            await ws.close()
            return None
        try:
            async for _ in it:
                pass
            raw = "clean end"
        except httpx.HTTPError as e:
            raw = type(e).__name__
        msgs, code = await _ws_rest(ws)
    return raw, msgs, code


@pytest.mark.ray
def test_dead_ingress_orphans_are_cancelled_and_the_service_recovers(multi_app):
    """The ingress dies mid-stream: clients see a failure (no clean end, no close 1000), the replicas cancel the
    orphaned sessions once their lease lapses (instead of generating to full length), and the service answers
    again once Serve has restarted the ingress."""
    import ray

    url, app = multi_app["url"], multi_app["app"]
    lease = multi_app["config"]["session_lease_s"]
    before = _stats(app, "cv3")

    async def kill_ingress():
        ingress = [a for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{app}#Ingress#")]
        ray.kill(ray.get_actor(ingress[0]["name"], namespace="serve"))
        return True
    # the WebSocket session sends no `end`: it waits for more text (its idle timeout is longer than the lease)
    raw, msgs, code = asyncio.run(_streams_through_a_kill(
        url, kill_ingress, "Speaking into a socket whose server is about to die.", max_new_tokens=400))
    assert raw != "clean end"
    assert code != 1000 and not any(m.get("type") == "done" for m in msgs)
    t0 = time.time()
    after = _wait(lambda: (lambda s: s if s["open_sessions"] == 0 else None)(_stats(app, "cv3")), lease + 15)
    assert after, "orphaned sessions must be cancelled"
    assert after["expired_lease"] > before["expired_lease"], (before, after)
    assert time.time() - t0 < lease + 15
    ok = _wait(lambda: _try_speech(url), 60, every_s=1.0)
    assert ok, "the service must answer again once the ingress is back"


def _try_speech(url: str) -> bool:
    try:
        r = httpx.post(f"{url}/v1/audio/speech", json={**LONG, "max_new_tokens": 8}, timeout=20)
        return r.status_code == 200 and len(r.content) > 0
    except httpx.HTTPError:
        return False


@pytest.mark.ray
def test_dead_proxy_fails_its_clients_and_frees_their_sessions(multi_app, serve_app):
    """The HTTP proxy dies mid-stream: clients see a failure, the sessions it carried end at once (Serve cancels
    the ingress handlers, which cancel their replica calls), and both apps answer again once Serve restarts it."""
    import ray

    url, app = multi_app["url"], multi_app["app"]

    async def kill_proxy() -> bool:
        open_now = lambda: _stats(app, "cv3")["open_sessions"] >= 1  # noqa: E731
        if not await asyncio.to_thread(_wait, open_now, 10, 0.5):
            # both streams already ended (the random tiny model samples EOS, unseeded) or no replica answered its
            # stats: killing the proxy now would test nothing
            return False
        proxy = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith("SERVE_PROXY_ACTOR")]
        ray.kill(ray.get_actor(proxy[0]["name"], namespace="serve"))
        return True
    for _ in range(4):
        got = asyncio.run(_streams_through_a_kill(
            url, kill_proxy, "A session whose proxy is about to die.", max_new_tokens=1500))
        if got is not None:
            break
    assert got is not None, "no session was open when the proxy was to be killed, in 4 tries"
    raw, msgs, code = got
    assert raw != "clean end" and code != 1000 and not any(m.get("type") == "done" for m in msgs)
    assert _wait(lambda: _stats(app, "cv3")["open_sessions"] == 0, multi_app["config"]["session_lease_s"] + 10)
    assert _wait(lambda: _try_speech(url), 90, every_s=1.0), "the service must answer again after the proxy restarts"
    assert _wait(lambda: httpx.get(f"{serve_app['url']}/health", timeout=10).status_code == 200, 30)
