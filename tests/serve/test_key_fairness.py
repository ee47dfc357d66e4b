"""Fair shares between API keys, through the real app in-process (tests/serve/inproc.py, no Ray): one key may hold at
most `max_streams_per_key` open streams (HTTP speech and WebSocket sessions together), refused with 429 before any
replica work, and every ending gives its place back."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from ray import serve
from starlette.websockets import WebSocketDisconnect

from tests.serve.inproc import ingress_app

A, B, ADMIN = ({"Authorization": f"Bearer {k}"} for k in ("key-a", "key-b", "key-admin"))


class Replica:
    """A model replica: incremental (WebSocket) sessions stay open until cancelled; whole text ends at once, or
    fails before any audio when the text is "fail"; everything is refused while `refuse` is set."""

    def __init__(self) -> None:
        self.opened = 0
        self.refuse = False

    def info(self) -> dict:
        return {"id": "cv", "type": "custom_voice", "speakers": ["ryan"]}

    async def stream(self, payload, incremental=False, lease=False, consumer=None):
        if self.refuse:
            yield {"type": "error", "status": 503, "message": "replica busy", "param": None, "retry_after": 1}
            return
        self.opened += 1
        yield {"type": "start", "session": f"r1-{self.opened}"}
        if incremental:
            await asyncio.Event().wait()
        if payload.get("input") == "fail":
            yield {"type": "end", "status": 500, "message": "boom", "param": None, "finish_reason": "error",
                   "num_frames": 0, "ttfa_s": None}
            return
        yield {"type": "audio", "pcm": np.zeros(480, np.float32)}
        yield {"type": "end", "status": None, "finish_reason": "eos", "num_frames": 1, "ttfa_s": 0.0}

    def renew(self, sessions):
        return []

    def feed(self, session, text="", end=False):
        return {"chars": len(text)}


def _app(monkeypatch, **cfg):
    rep = Replica()
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "api_keys": ["key-a", "key-b"],
                                          "admin_api_keys": ["key-admin"], **cfg}, {"cv": rep})
    return client, serve.get_replica_context().servable_object, rep


def _speech(client, headers, text="Hello.") -> tuple[int, dict | None]:
    r = client.post("/v1/audio/speech", headers=headers, json={"input": text, "voice": "ryan",
                                                               "response_format": "pcm"})
    return r.status_code, (r.json() if r.headers.get("content-type", "").startswith("application/json") else None)


def _until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_one_key_cannot_hold_more_than_its_share(monkeypatch):
    """Review finding (tenancy 1): one key could take every slot and queue place with idle WebSockets, and every
    other key got 503. Now its third stream (HTTP or WebSocket) gets 429 at the ingress, other keys and admin keys
    are served, and each ending (client gone, refused, failed, finished) gives the place back."""
    client, ing, rep = _app(monkeypatch, max_streams_per_key=2)
    config = {"type": "config", "voice": "ryan"}
    with client:
        with client.websocket_connect("/v1/audio/speech/stream", headers=A) as ws1, \
                client.websocket_connect("/v1/audio/speech/stream", headers=A) as ws2:
            for ws in (ws1, ws2):
                ws.send_json(config)
                assert ws.receive_json()["type"] == "start"
            opened = rep.opened
            with client.websocket_connect("/v1/audio/speech/stream", headers=A) as ws3:
                ws3.send_json(config)
                err = ws3.receive_json()
                assert err["type"] == "error" and err["error"]["code"] == "429", err
                assert "at most 2" in err["error"]["message"]
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws3.receive_json()
                assert closed.value.code == 1008
            status, body = _speech(client, A)
            assert status == 429 and body["error"]["param"] is None and "API key" in body["error"]["message"], body
            assert rep.opened == opened, "a refused stream must not reach a replica"
            assert _speech(client, B)[0] == 200 and _speech(client, ADMIN)[0] == 200
            ws1.close()
            _until(lambda: ing.quota.held.get(ing.keys.check(b"key-a").owner) == 1)
            assert _speech(client, A)[0] == 200            # its place is free again
            assert _speech(client, A, "fail")[0] == 500    # failed before any audio: given back
            rep.refuse = True
            assert _speech(client, A)[0] == 503            # refused by the replica: given back
            with client.websocket_connect("/v1/audio/speech/stream", headers=A) as ws4:
                ws4.send_json(config)                      # on the WebSocket: "try again later", and when
                err = ws4.receive_json()
                assert err["error"]["code"] == "503" and err["retry_after_s"] == 1, err
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws4.receive_json()
                assert closed.value.code == 1013
            rep.refuse = False
            assert _speech(client, A)[0] == 200
        _until(lambda: not ing.quota.held)
        assert ing.client_streams.count == 0


def test_without_keys_nobody_is_limited(monkeypatch):
    """Without API keys every caller is the anonymous admin caller, not a tenant: no per-key count applies."""
    rep = Replica()
    client, _ = ingress_app(monkeypatch, {"models": [{"name": "cv"}], "max_streams_per_key": 1}, {"cv": rep})
    ing = serve.get_replica_context().servable_object
    with client:
        with client.websocket_connect("/v1/audio/speech/stream") as ws:
            ws.send_json({"type": "config", "voice": "ryan"})
            assert ws.receive_json()["type"] == "start"
            assert _speech(client, {})[0] == 200
        assert not ing.quota.held


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "4"])
@pytest.mark.parametrize("key", ["max_streams_per_key", "max_voices_per_key", "max_uploads_per_key"])
def test_per_key_limits_are_checked(key, value):
    from serve.config import ServiceConfig

    with pytest.raises(ValueError, match=key):
        ServiceConfig.from_dict({key: value})
    assert getattr(ServiceConfig.from_dict({key: None}), key) is None
