"""The service's real FastAPI app in this process, without Ray: an `Ingress` whose replica handles call plain objects
(a `ReplicaCore`, or a fake with its methods). For tests of parsing, bounds and error mapping that need no cluster.

    client, app = ingress_app(monkeypatch, {"models": [...], "voices_uri": ...}, {"base": core_or_fake})
    client.post("/v1/audio/voices", ...)            # starlette's TestClient
    await asgi_call(app, "POST", path, headers, chunks)   # raw ASGI: a streamed body, bytes read counted

Handles support `.remote` calls that return a value (info, create_voice, ...) and, through
`handle.options(stream=True)`, calls of async generator methods (`stream`) as Serve's streaming responses are used:
`await gen.__anext__()` and `gen.cancel()`."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any


class StreamResponse:
    """What a streaming handle call returns: an async iterator with `cancel()` (recorded in `cancelled`)."""

    def __init__(self, agen) -> None:
        self.agen, self.cancelled = agen, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled:
            raise StopAsyncIteration
        return await self.agen.__anext__()

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, fn, stream: bool = False) -> None:
        self.fn, self.stream = fn, stream

    def remote(self, *args, **kwargs):
        if self.stream:
            return StreamResponse(self.fn(*args, **kwargs))

        async def call():
            out = self.fn(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out
        return call()


class Handle:
    """A deployment handle over `target`: `handle.method.remote(...)` awaits `target.method(...)`."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self.target, self._streaming = target, stream   # (not `.stream`: that is the replica's method)

    def options(self, stream: bool = False, **_) -> Handle:
        return Handle(self.target, stream)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self.target, name), self._streaming)


def ingress_app(monkeypatch, config: dict, targets: dict[str, Any]):
    """(TestClient, ASGI app) of an Ingress built from `config` over `targets` (model name -> object)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from serve import ingress

    # Serve wraps the class (async __init__/__del__ that run the ASGI app in a replica); the service's own class,
    # with a plain __init__, is under the wrapper
    cls = next(k for k in ingress.Ingress.func_or_class.__mro__
               if "__init__" in k.__dict__ and not inspect.iscoroutinefunction(k.__dict__["__init__"]))
    ing = cls.__new__(cls)
    ctx = SimpleNamespace(servable_object=ing, app_name="qtts-inproc")   # how Serve's class-based view finds it
    monkeypatch.setattr(serve, "get_replica_context", lambda: ctx)
    cls.__init__(ing, config, {name: Handle(t) for name, t in targets.items()})
    return TestClient(ingress.app, raise_server_exceptions=False), ingress.app


async def asgi_call(app, method: str, path: str, headers: dict[str, str], chunks: Iterable[bytes],
                    then: str = "end"):
    """One HTTP request whose body streams as `chunks` (no Content-Length unless `headers` has one), after which
    the client `then` ends the body ("end"), stops sending and waits ("stall"), or leaves ("disconnect").
    Returns (status, body bytes, request bytes the app read)."""
    import asyncio

    it, read, sent, state = iter(chunks), [0], [], {"done": False}

    async def receive():
        if state["done"]:
            await asyncio.sleep(3600)          # a client that waits for the answer
        try:
            chunk = next(it)
        except StopIteration:
            state["done"] = True
            if then == "stall":
                await asyncio.sleep(3600)
            if then == "disconnect":
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": b"", "more_body": False}
        read[0] += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    await asyncio.wait_for(app(scope, receive, send), 60)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"), read[0]
