"""`max_voices_per_key` across ingress replicas. Two `Ingress` objects of the real app in this process
(tests/serve/inproc.py), each with its own per-key lock, its own VoiceStore and its own Base replica, as two ingress
replicas in two processes have them, over ONE voice folder; each request is routed to one of them."""

from __future__ import annotations

import asyncio
import base64
import contextvars

import httpx

from serve.voices import ANYONE, VoiceStore
from tests.serve.inproc import ingress_app
from tests.serve.test_voice_quota import Base
from tests.serve.test_voices import _item

A = {"Authorization": "Bearer key-a"}
BODY = {"name": "v", "x_vector_only": True, "audio_base64": base64.b64encode(b"RIFF").decode()}
ALICE = "a" * 32


def _two_ingresses(monkeypatch, uri: str, limit: int):
    """(ASGI app, route) where `route.set(i)` sends this task's requests to ingress replica i (0 or 1)."""
    from ray import serve

    config = {"models": [{"name": "base", "model_type": "base"}], "voices_uri": uri, "api_keys": ["key-a"],
              "max_voices_per_key": limit}
    ingresses = []
    for _ in range(2):
        _, app = ingress_app(monkeypatch, config, {"base": Base(uri)})
        ingresses.append(serve.get_replica_context().servable_object)
    route = contextvars.ContextVar("ingress_replica", default=0)

    class Context:   # what Serve's class-based view asks for each request: the replica that serves it
        app_name = "qtts-inproc"

        @property
        def servable_object(self):
            return ingresses[route.get()]

    context = Context()
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return app, route


def test_uploads_of_one_key_through_two_ingress_replicas_store_at_most_the_limit(monkeypatch, tmp_path):
    """Review suspicion (voices 1), reproduced: each ingress replica took the count under ITS OWN lock, so two
    uploads of one key at its last free place, one through each replica, both passed and the key stored 2 voices
    with max_voices_per_key 1. Now the count that decides is taken in the store after the write and an upload over
    the limit is undone (429 naming `name`, Retry-After); several rounds, so several interleavings."""
    uri = str(tmp_path / "voices")
    app, route = _two_ingresses(monkeypatch, uri, limit=1)
    store = VoiceStore.from_uri(uri)

    async def post(replica: int) -> httpx.Response:
        route.set(replica)   # (this task's context only)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/v1/audio/voices", headers=A, json=BODY)

    async def rounds():
        for _ in range(4):
            rs = await asyncio.gather(post(0), post(1))
            stored = sorted(v["id"] for v in store.list(ANYONE))
            assert len(stored) <= 1, f"one key stores {len(stored)} voices, max_voices_per_key 1: {rs}"
            assert sorted(r.json()["id"] for r in rs if r.status_code == 201) == stored
            for r in rs:
                if r.status_code != 201:
                    err = r.json()["error"]
                    assert (r.status_code, err["param"]) == (429, "name") and "at most 1" in err["message"], r.text
            if not stored:   # both undone (each counted the other): a retry passes
                assert (await post(1)).status_code == 201
            r = await post(0)
            assert (r.status_code, r.json()["error"]["param"]) == (429, "name")
            for vid in (v["id"] for v in store.list(ANYONE)):
                store.delete(vid, ANYONE)
    asyncio.run(rounds())


def test_keep_within_counts_what_the_store_holds(tmp_path):
    """Two stores over one folder (two processes): both voices written before either is counted; the first count
    sees 2 and undoes its own voice, the second then sees 1 and keeps its."""
    a, b = VoiceStore.from_uri(str(tmp_path / "v")), VoiceStore.from_uri(str(tmp_path / "v"))
    x = a.create(_item(1), name="x", model="base", owner=ALICE)["id"]
    y = b.create(_item(2), name="y", model="base", owner=ALICE)["id"]
    a.create(_item(3), name="other", model="base", owner="b" * 32)   # another key's voice is not counted
    assert a.keep_within(x, ALICE, 1) == 2
    assert b.keep_within(y, ALICE, 1) == 1
    assert [v["id"] for v in b.list(ALICE)] == [y] and a.count(ALICE) == 1
