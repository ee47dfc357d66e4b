"""Review of WS /v1/audio/speech/stream as an attacker, a careless client and a crash: the real ingress in-process
(tests/serve/inproc.py, no Ray) over a real `ReplicaCore` (tiny random CustomVoice model, the real scheduler and
engine on this event loop) behind a Ray-like boundary (test_review_http._RemoteHandle: a replica stream is cancelled
only when the ingress closes it, as a Ray call is). The client is driven at the ASGI level, so it can send what a
real client library would not (lone surrogate escapes, frames after `end`).

Found by this review (both failed before their fix in serve/ws_session.py): a character outside the BMP sent as two
messages, one UTF-16 surrogate each, was refused as two lone surrogates and the session lost; a message after `end`
was echoed whole in its error (a 100 KB `type`, a 100 KB message).

Pinned here (each not already covered elsewhere):
* a text cut anywhere, by code point or by UTF-16 code unit (JavaScript's `slice` splits a character outside the BMP
  into a lone high and a lone low surrogate escape, one per message), is spoken exactly as the whole text (same audio);
  a surrogate that is really lone is still refused naming `text`;
* a message after `end`, a second config, a binary frame, a text of another type or a text that names a session
  ends the session with an error naming the field (close 1008), and its engine slot is freed at once."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from serve.config import ModelConfig
from serve.replica import ReplicaCore
from serve.sessions import SessionLimits
from tests.serve.inproc import ingress_app
from tests.serve.test_review_http import _RemoteHandle

CV = {"name": "cv", "model_type": "custom_voice"}
PATH = "/v1/audio/speech/stream"
SCOPE = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws", "path": PATH,
         "raw_path": PATH.encode(), "query_string": b"", "root_path": "", "headers": [(b"host", b"testserver")],
         "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "subprotocols": []}


@pytest.fixture(scope="module")
def core(model_factory):
    """A real replica core: 4 slots, a 64-frame cap; sessions of at most 400 characters, 3 s without text."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=4, max_queue=4, interactive_reserve=0,
                      max_new_tokens=64, default_max_new_tokens=16)
    return ReplicaCore(model_factory("custom_voice"), cfg, None,
                       limits=SessionLimits(max_text_chars=400, idle_text_timeout_s=3.0))


class Client:
    """One WebSocket client at the ASGI level. Frames are queued (`text`, `raw`, `binary`, `vanish`) before or while
    the session runs; `out` records what the server sent."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.inbox.put_nowait({"type": "websocket.connect"})
        self.out: list[dict] = []

    def text(self, obj) -> None:
        """A JSON message; json.dumps escapes lone surrogates (`"\\ud83d"`), as JavaScript's JSON.stringify does."""
        self.raw(json.dumps(obj))

    def raw(self, text: str) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "text": text})

    def binary(self, data: bytes) -> None:
        self.inbox.put_nowait({"type": "websocket.receive", "bytes": data})

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send(self, message: dict) -> None:
        self.out.append(message)

    @property
    def messages(self) -> list:
        """JSON messages as dicts, audio as bytes, in order."""
        return [json.loads(m["text"]) if m.get("text") is not None else m["bytes"]
                for m in self.out if m["type"] == "websocket.send"]

    @property
    def close_code(self) -> int | None:
        return next((m.get("code", 1000) for m in self.out if m["type"] == "websocket.close"), None)

    def result(self) -> tuple[bytes, list[dict], int | None]:
        msgs = self.messages
        return (b"".join(m for m in msgs if isinstance(m, bytes)), [m for m in msgs if isinstance(m, dict)],
                self.close_code)


def _run(monkeypatch, tmp_path, core, fn):
    """`fn(app)` on one event loop with the ingress in front of `core` (started on that loop, stopped after)."""
    from ray import serve

    _, app = ingress_app(monkeypatch, {"models": [CV], "voices_uri": str(tmp_path / "voices")}, {"cv": core})
    serve.get_replica_context().servable_object.replicas = {"cv": _RemoteHandle(core)}

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            return await fn(app)
        finally:
            core.stop()
    return asyncio.run(main())


async def _session(app, client: Client, timeout_s: float = 60) -> tuple[bytes, list[dict], int | None]:
    await asyncio.wait_for(app(SCOPE, client.receive, client.send), timeout_s)
    return client.result()


async def _freed(core, within_s: float = 1.0) -> bool:
    """Whether the replica holds no session (engine slot, queue, session table) within `within_s`."""
    t = time.monotonic()
    while (core.scheduler.active_sessions or len(core.sessions)) and time.monotonic() - t < within_s:
        await asyncio.sleep(0.01)
    return not core.scheduler.active_sessions and not len(core.sessions)


def _config(core, **kw) -> dict:
    return {"type": "config", "model": "cv", "voice": core.model.get_supported_speakers()[0], "seed": 1,
            "max_new_tokens": 24, **kw}


# --- a text cut anywhere is the text ----------------------------------------------------------------------------
TEXT = "Cafe\u0301 au lait \U0001F600, \U0001F468\u200d\U0001F469\u200d\U0001F467 and \U00020000\u4e00.\r\nEnd"


def _by_code_point(text: str) -> list[str]:
    return list(text)


def _by_utf16_unit(text: str) -> list[str]:
    """One UTF-16 code unit per piece, as `s.slice(i, i + 1)` cuts a JavaScript string: a character outside the
    BMP (emoji, CJK extension B) becomes a high and a low surrogate in two messages."""
    units = text.encode("utf-16-le", "surrogatepass")
    return [units[i:i + 2].decode("utf-16-le", "surrogatepass") for i in range(0, len(units), 2)]


@pytest.mark.parametrize("cut", [_by_code_point, _by_utf16_unit], ids=["code-points", "utf16-units"])
def test_a_text_cut_anywhere_is_spoken_as_the_whole_text(core, monkeypatch, tmp_path, cut):
    """Careless client: the text in one-character pieces (a combining accent apart from its letter, a ZWJ emoji
    family apart, CR apart from LF), or in UTF-16 code units as JavaScript's `slice` cuts it, gives the audio of the
    whole text in one message (same seed). Found by this review: each half of a surrogate pair was refused as a lone
    surrogate (400 naming `text`, the session lost), though together they are one valid character."""
    pieces = cut(TEXT)
    assert "".join(pieces).encode("utf-16-le", "surrogatepass").decode("utf-16-le") == TEXT

    async def fn(app):
        whole = Client()
        whole.text(_config(core))
        whole.text({"type": "text", "text": TEXT})
        whole.text({"type": "end"})
        alone = await _session(app, whole)
        c = Client()
        c.text(_config(core))
        session = asyncio.create_task(_session(app, c))
        for p in pieces:   # one message at a time, so that each is its own `feed` (not joined while queued)
            c.text({"type": "text", "text": p})
            await asyncio.sleep(0.005)
        c.text({"type": "end"})
        return alone, await session, await _freed(core)
    (audio0, msgs0, code0), (audio, msgs, code), freed = _run(monkeypatch, tmp_path, core, fn)
    assert msgs0[-1]["type"] == "done" and code0 == 1000, msgs0[-1]
    assert msgs[-1]["type"] == "done" and code == 1000, (len(pieces), msgs[-1])
    assert msgs[-1]["num_frames"] == msgs0[-1]["num_frames"] and len(audio) == len(audio0) > 0
    got, own = np.frombuffer(audio, "<i2").astype(int), np.frombuffer(audio0, "<i2").astype(int)
    assert np.abs(got - own).max() <= 1, "not the whole text's audio"
    assert freed


@pytest.mark.parametrize("pieces", [
    pytest.param(["Hello \ud83d"], id="high-surrogate-last"),
    pytest.param(["Hello \ud83d", "x"], id="high-then-letter"),
    pytest.param(["Hello ", "\ude00 there"], id="low-surrogate-first"),
    pytest.param(["Hello \ude00", "\ud83d there"], id="low-then-high"),
])
def test_a_surrogate_that_is_really_lone_is_refused_naming_text(core, monkeypatch, tmp_path, pieces):
    """A surrogate with no partner across the pieces (nor at `end`) is still invalid text: 400 naming `text`, close
    1008, the session freed."""
    async def fn(app):
        c = Client()
        c.text(_config(core))
        for p in pieces:
            c.text({"type": "text", "text": p})
        c.text({"type": "end"})
        return await _session(app, c), await _freed(core)
    (_, msgs, code), freed = _run(monkeypatch, tmp_path, core, fn)
    err = msgs[-1]
    assert err["type"] == "error" and err["error"]["param"] == "text" and err["error"]["code"] == "400", err
    assert "surrogate" in err["error"]["message"] and code == 1008 and freed


# --- protocol violations end the session, visibly, and free its slot --------------------------------------------
@pytest.mark.parametrize("after,param", [
    pytest.param([{"type": "end"}], "type", id="end-twice"),
    pytest.param([{"type": "text", "text": "More."}], "type", id="text-after-end"),
    pytest.param(["CONFIG"], "type", id="config-twice"),
    pytest.param([b"\x00\x01audio"], "message", id="binary-frame"),
    pytest.param([{"type": "text", "text": 5}], "text", id="text-not-a-string"),
    pytest.param([{"type": "text", "text": ["a"]}], "text", id="text-a-list"),
    pytest.param([{"type": "text", "text": "x", "session": "r1-0123"}], "session", id="text-naming-a-session"),
    pytest.param([{"type": "x" * 100_000}], "type", id="huge-type-after-end"),
])
def test_a_protocol_violation_is_an_error_and_frees_the_slot(core, monkeypatch, tmp_path, after, param):
    """Careless or hostile frames after some text: the session ends with one `error` naming the field, last, then
    close 1008, and the replica holds nothing of it within a second (slot, queue place, session table). A text
    message cannot name a session (no way to feed another's). The cases naming `type` but "config-twice" send `end`
    first. The error echoes at most ECHO_CHARS of what the client sent: found by this review, a message after `end`
    was repeated in full (`{kind!r}`), a 100 KB `type` as a 100 KB error message."""
    async def fn(app):
        c = Client()
        c.text(_config(core, max_new_tokens=64))
        c.text({"type": "text", "text": "A long answer that goes on for a while."})
        if param == "type" and after != ["CONFIG"]:   # after `end`
            c.text({"type": "end"})
        for m in after:
            if m == "CONFIG":
                c.text(_config(core))
            elif isinstance(m, bytes):
                c.binary(m)
            else:
                c.text(m)
        return await _session(app, c), await _freed(core)
    (_, msgs, code), freed = _run(monkeypatch, tmp_path, core, fn)
    assert msgs[0]["type"] == "start", msgs[:1]
    ends = [m for m in msgs if m["type"] in ("done", "error")]
    assert len(ends) == 1 and msgs[-1] is ends[0] and ends[0]["type"] == "error", msgs
    assert ends[0]["error"]["param"] == param and ends[0]["error"]["code"] == "400", str(ends[0])[:300]
    assert len(ends[0]["error"]["message"]) < 200, ends[0]["error"]["message"][:300]
    assert code == 1008 and freed
