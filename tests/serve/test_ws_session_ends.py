"""How a WebSocket session ends when its text and its audio race, without Ray: the replica finishes a session
(EOS, max_new_tokens) while the client's last text or `end` is still on its way, so `feed` answers UnknownSession.
The client must hear the session's own end (`done`, close 1000), never `done` followed by an error; only a session
whose audio never ends gets the 502."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi import WebSocketDisconnect

import serve.ws_session as wss
from serve.sessions import UnknownSession
from serve.ws_session import MessageLimiter, WSSession


class FakeSocket:
    def __init__(self, incoming: list[dict]) -> None:
        self.incoming = list(incoming)
        self.sent: list = []
        self.close_code: int | None = None

    async def receive(self) -> dict:
        if self.incoming:
            return self.incoming.pop(0)
        await asyncio.sleep(3600)       # a client that sends nothing more
        raise WebSocketDisconnect(1000)

    async def send_json(self, obj) -> None:
        if self.close_code is not None:
            raise RuntimeError("send after close")
        self.sent.append(json.loads(json.dumps(obj)))

    async def send_bytes(self, data: bytes) -> None:
        if self.close_code is not None:
            raise RuntimeError("send after close")
        self.sent.append(bytes(data))

    async def close(self, code: int) -> None:
        self.close_code = code


class EndedHandle:
    """A replica that no longer holds the session: every `feed` raises UnknownSession, after `feed_delay_s`."""

    def __init__(self, feed_delay_s: float = 0.0) -> None:
        self.feeds = 0
        self.feed_delay_s = feed_delay_s

    def options(self, **_):
        return self

    @property
    def feed(self):
        return self

    def remote(self, sid, text, end):
        self.feeds += 1

        async def call():
            await asyncio.sleep(self.feed_delay_s)
            raise UnknownSession(sid, "has ended")
        return call()


class FakeStream:
    """The replica's items: audio, then (after `end_after_s`) the end item; `None` never ends."""

    def __init__(self, end_after_s: float | None, end: dict) -> None:
        self.sid, self.end_after_s, self.end = "r1-abc", end_after_s, end
        self.items = [{"type": "audio", "pcm": b"\x01\x00" * 4}]
        self.closed = False

    async def next(self) -> dict:
        if self.items:
            return self.items.pop(0)
        if self.end_after_s is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.end_after_s)
        self.end_after_s = 3600.0
        return self.end

    def close(self) -> None:
        self.closed = True


class Passthrough:
    def push(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


DONE = {"type": "end", "status": None, "finish_reason": "max_new_tokens", "num_frames": 0, "ttfa_s": 0.01}


def _run(stream: FakeStream, handle: EndedHandle, incoming: list[dict]) -> FakeSocket:
    ws = FakeSocket(incoming)
    session = WSSession(ws, ws.receive, handle, stream, Passthrough(), MessageLimiter(100, 100, 100), {"type": "ready"})
    asyncio.run(asyncio.wait_for(session.run(), 20))
    return ws


@pytest.mark.parametrize("end_after_s", [0.0, 0.3], ids=["end-already-there", "end-arrives-later"])
def test_text_that_reaches_an_ended_session_still_ends_with_done(end_after_s):
    """Found by CI: `max_new_tokens: 1` ended the session at prefill while `end` was on its way; the client got
    `done` and then a 502 error. It must get `done` and close 1000."""
    handle = EndedHandle()
    stream = FakeStream(end_after_s, DONE)
    ws = _run(stream, handle, [{"type": "text", "text": "One token."}, {"type": "end"}])
    msgs = [m for m in ws.sent if isinstance(m, dict)]
    assert handle.feeds >= 1
    assert msgs[-1]["type"] == "done" and msgs[-1]["finish_reason"] == "max_new_tokens", msgs
    assert not [m for m in msgs if m["type"] == "error"], msgs
    assert ws.close_code == 1000 and stream.closed


def test_a_failed_end_is_what_the_client_hears():
    failed = {"type": "end", "status": 408, "message": "no text for 3 s", "param": "text", "finish_reason": "error",
              "num_frames": 0, "ttfa_s": None}
    ws = _run(FakeStream(0.1, failed), EndedHandle(), [{"type": "text", "text": "hi"}])
    msgs = [m for m in ws.sent if isinstance(m, dict)]
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"]["code"] == "408", msgs
    assert ws.close_code == 1008


def test_a_session_whose_audio_never_ends_gets_502(monkeypatch):
    monkeypatch.setattr(wss, "LOST_GRACE_S", 0.2)
    stream = FakeStream(None, DONE)
    ws = _run(stream, EndedHandle(), [{"type": "text", "text": "hi"}])
    msgs = [m for m in ws.sent if isinstance(m, dict)]
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"]["code"] == "502", msgs
    assert ws.close_code == 1011 and stream.closed


ICL = "input: incremental text is not available with ICL voice clone prompts"


@pytest.mark.parametrize("path", ["opening", "streaming"])
def test_errors_name_the_websockets_text_field_not_input(path):
    """Review finding: an error the replica raised while the session opened named `input`, a field the WebSocket
    does not have (only the writer's errors were renamed). Both paths go through one map: `text`."""
    from serve.schemas import ApiError
    from serve.ws_session import send_error

    if path == "opening":                       # as the ingress answers a refused ReplicaStream.open
        ws = FakeSocket([])
        asyncio.run(send_error(ws, ApiError(400, ICL, "input")))
    else:                                       # the session's end item names the failed field
        failed = {"type": "end", "status": 400, "message": ICL, "param": "input", "finish_reason": "error",
                  "num_frames": 0, "ttfa_s": None}
        ws = _run(FakeStream(0.1, failed), EndedHandle(), [{"type": "text", "text": "hi"}])
    err = [m for m in ws.sent if isinstance(m, dict)][-1]["error"]
    assert err["param"] == "text" and err["message"].startswith("text: incremental text is not available"), err
    assert ws.close_code == 1008


# ---- the last word: nothing after `error`, nothing but the close after `done` ---------------------------------------

class YieldingSocket(FakeSocket):
    """Each send yields to the loop once, as a real transport's write does; once `bad_when(sent)` holds after a
    send, the client sends a message of an unknown type (a 400 that ends the session)."""

    def __init__(self, bad_when) -> None:
        super().__init__([])
        self.bad_when = bad_when
        self.bad = asyncio.Event()

    async def receive(self) -> dict:
        if not self.bad.is_set():
            await self.bad.wait()
            return {"type": "bogus"}
        await asyncio.sleep(3600)
        raise WebSocketDisconnect(1000)

    async def _sent(self) -> None:
        if self.bad_when(self.sent):
            self.bad.set()
        await asyncio.sleep(0)

    async def send_bytes(self, data: bytes) -> None:
        await super().send_bytes(data)
        await self._sent()

    async def send_json(self, obj) -> None:
        await super().send_json(obj)
        await self._sent()


class AudioStream(FakeStream):
    """`frames` audio items (None: forever), already waiting (no item waits for the loop), then the end item."""

    def __init__(self, frames: int | None) -> None:
        super().__init__(None, DONE)
        self.frames = frames

    async def next(self) -> dict:
        if self.frames is None or self.frames > 0:
            if self.frames:
                self.frames -= 1
            return {"type": "audio", "pcm": b"\x01\x00" * 4}
        if self.frames == 0:
            self.frames = -1
            return self.end
        await asyncio.sleep(3600)      # nothing comes after the end
        raise AssertionError("unreachable")


def _kinds_of(sent: list) -> list[str]:
    return ["bin" if isinstance(m, bytes) else m["type"] for m in sent]


def _kinds(ws: FakeSocket) -> list[str]:
    return _kinds_of(ws.sent)


def _session(ws: YieldingSocket, stream: AudioStream) -> None:
    session = WSSession(ws, ws.receive, EndedHandle(), stream, Passthrough(), MessageLimiter(100, 100, 100),
                        {"type": "ready"})
    asyncio.run(asyncio.wait_for(session.run(), 20))


def test_error_is_the_last_message_before_the_close():
    """Review finding: the error was sent while the writer still ran, so audio reached the client after `error`
    (start, 6 audio, error, audio, close 1008). The writer is stopped first now."""
    ws, stream = YieldingSocket(lambda sent: len(sent) == 6), AudioStream(None)
    _session(ws, stream)
    kinds = _kinds(ws)
    assert kinds[-1] == "error" and kinds.count("error") == 1, kinds
    assert ws.sent[-1]["error"]["param"] == "type" and ws.close_code == 1008 and stream.closed


@pytest.mark.parametrize("bad_after", [3, 4, 5, "done"])
def test_one_last_word_done_or_error_never_both(bad_after):
    """Review finding: a bad client message read while the session finished gave `done`, then `error`, then close
    1008. The client now hears exactly one of them, last: `error` (close 1008) when the error came first, `done`
    (close 1000) when it had been sent already (an error found after `done` is not sent: `done` is final)."""
    def bad_when(sent):
        kinds = _kinds_of(sent)
        return kinds[-1] == "done" if bad_after == "done" else kinds.count("bin") == bad_after
    ws, stream = YieldingSocket(bad_when), AudioStream(5)
    _session(ws, stream)
    kinds = _kinds(ws)
    last = [k for k in kinds if k in ("done", "error")]
    assert len(last) == 1 and kinds[-1] == last[0], kinds
    assert ws.close_code == (1000 if last == ["done"] else 1008) and stream.closed
