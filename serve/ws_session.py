"""One WebSocket session after its config: text in, audio out, every way it can end.

Three tasks share the socket:
* reader: client messages -> checks (shape, message count and rate) -> a bounded queue; a disconnect ends the
  session at once (disconnect == cancel: the replica frees the slot at its next step);
* forwarder: drains the queue and sends what arrived as ONE `feed(session, text, end)` call to the replica that
  holds the session (routed there by the session id; a flood of tiny messages costs one call per round trip, not
  one per message); the replica owns the text limits and answers RequestError / UnknownSession;
* writer: the replica's audio -> binary messages; `done` (finish_reason, num_frames) and close 1000 when the
  synthesis finished; `{"type": "error", "error": {...}}` and close 1011 (1008 when the client is at fault, 1013
  when the model is busy) when it failed or the replica died.

The session's last word is said once, by `run`, after the writer has stopped (`_stop_writer`): an `error` is the
last message before the close (no audio or `done` after it), and `done` is final: an error found after `done` was
sent (a bad message the client sent meanwhile) is not sent, the session ended well and closes 1000.

Text is text however the client cut it: a character outside the BMP cut between its UTF-16 surrogates (JavaScript's
`slice` cuts by code unit, and JSON.stringify then sends each half as a lone `\\ud83d` / `\\ude00` escape) is
forwarded as it came and joined where the replica takes the text (`SessionTable.take_text`, with the core's
`PieceJoiner`, the one owner of that rule); a surrogate with no partner is refused there, naming `text`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from qwen_tts_core.errors import RequestError, shown

from .routing import detached
from .schemas import ApiError, WSEnd, WSText, from_validation_error
from .sessions import UnknownSession
from .streaming import Pacer, ReplicaStream, end_error, replica_lost

log = logging.getLogger(__name__)

# messages read but not yet forwarded; beyond this the reader waits (no TCP back-pressure under Serve: its proxy
# pulls the client's messages into its own queue meanwhile, unseen by the rate limit until read)
QUEUE_MESSAGES = 256
LOST_GRACE_S = 10.0      # after UnknownSession, how long the writer may take to bring the session's own end
DISCONNECT = object()


class MessageLimiter:
    """Per-session message count and rate (token bucket: `burst` at once, `per_s` sustained)."""

    def __init__(self, max_messages: int, per_s: float, burst: int, clock=time.monotonic) -> None:
        self.max_messages, self.per_s, self.burst, self.clock = max_messages, per_s, burst, clock
        self.count, self.tokens, self.t = 0, float(burst), clock()

    def take(self) -> None:
        """Account one message; ApiError 429 naming `message` when over a limit."""
        if self.count >= self.max_messages:
            raise ApiError(429, f"message: more than {self.max_messages} messages in one session", "message")
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self.t) * self.per_s)
        self.t = now
        if self.tokens < 1:
            raise ApiError(429, f"message: more than {self.per_s:g} messages per second "
                                f"(bursts of {self.burst})", "message")
        self.tokens -= 1
        self.count += 1


def close_code(err: ApiError) -> int:
    """RFC 6455 close codes: 1013 Try Again Later (503: the model is full), 1008 the client's fault, 1011 ours."""
    return 1013 if err.status == 503 else 1008 if err.status < 500 else 1011


# HTTP API field -> the WebSocket's name for it. The replica and the shared checks name HTTP fields (text arrives
# in `input` there); every error a WebSocket client hears goes through `ws_error` (send_error), whatever raised it.
WS_FIELD = {"input": "text"}


def ws_error(err: ApiError) -> ApiError:
    """`err` naming the field as the WebSocket's messages call it."""
    param = WS_FIELD.get(err.param) if err.param else None
    if param is None:
        return err
    message = err.message
    if message.startswith(f"{err.param}: "):
        message = f"{param}: {message[len(err.param) + 2:]}"
    return ApiError(err.status, message, param, err.code, err.headers)


async def send_error(ws: WebSocket, err: ApiError, counter: Callable[[str], None] | None = None) -> None:
    """`{"type": "error", "error": {...}}` then close (`close_code`); quiet if the client left. The error names the
    WebSocket's fields (`ws_error`); a busy answer carries `retry_after_s` (HTTP's Retry-After)."""
    err = ws_error(err)
    if counter is not None:
        counter(f"ws_{err.status}")
    retry = err.headers.get("Retry-After", "")
    extra = {"retry_after_s": int(retry)} if retry.isdigit() else {}
    try:
        await ws.send_json({"type": "error", **err.body(), **extra})
        await ws.close(close_code(err))
    except Exception:  # noqa: BLE001 - the client is already gone
        pass


class WSSession:
    def __init__(self, ws: WebSocket, receive: Callable[[], Awaitable[dict]], handle, stream: ReplicaStream,
                 encoder, limiter: MessageLimiter, start: dict[str, Any],
                 count_error: Callable[[str], None] | None = None, pacer: Pacer | None = None) -> None:
        self.ws, self.receive, self.handle, self.stream = ws, receive, handle, stream
        self.encoder, self.limiter, self.start, self.count_error = encoder, limiter, start, count_error
        self.pacer = pacer               # stream_lead_s: audio at most that far ahead of real time (streaming.py)
        self.queue: asyncio.Queue = asyncio.Queue(QUEUE_MESSAGES)
        self._sending = asyncio.Lock()   # the writer's sends; `_stop_writer` takes it so no send is cut in half
        self.closing = False             # set by `_stop_writer`: the writer sends nothing more
        self.done_sent = False           # `done` reached the socket: the session ended well, whatever comes next

    async def run(self) -> None:
        tasks: set[asyncio.Task] = set()
        try:
            await self.ws.send_json({**self.start, "session": self.stream.sid})
            reader = asyncio.create_task(self._read())
            forwarder = asyncio.create_task(self._forward())
            writer = asyncio.create_task(self._write())
            tasks = {reader, forwarder, writer}
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if writer in done:
                    err = self._result(writer)
                    if err is DISCONNECT:
                        return
                    return await self._end(writer, err)
                if reader in done:
                    err = self._result(reader)
                    if err is DISCONNECT or err is None:
                        return   # the client left: the session is cancelled below
                    return await self._end(writer, err)
                if forwarder in done:
                    err = self._result(forwarder)
                    if err is None:
                        continue         # `end` delivered; the writer finishes the session
                    if err is DISCONNECT:
                        return
                    if getattr(err, "lost", False):
                        # The replica does not hold the session: it ended (EOS, max_new_tokens, a failure) before
                        # this text reached it, or the replica restarted. The writer has, or soon gets, the
                        # session's own end; that outcome is the one the client hears.
                        done, _ = await asyncio.wait({writer}, timeout=LOST_GRACE_S)
                        if done:
                            werr = self._result(writer)
                            if werr is DISCONNECT:
                                return
                            err = werr   # None: `done` was sent, a normal end
                    return await self._end(writer, err)
        except WebSocketDisconnect:
            return
        finally:
            for t in tasks:
                t.cancel()
            self.stream.close()

    async def _end(self, writer: asyncio.Task, err: ApiError | None) -> None:
        """The session's last word, once the writer has stopped: close 1000 when `done` was sent (an error found
        after it is not sent: `done` is final), else `err` and its close."""
        await self._stop_writer(writer)
        if self.done_sent or err is None:
            return await self._close(1000)
        await send_error(self.ws, err, self.count_error)

    async def _stop_writer(self, writer: asyncio.Task) -> None:
        """No writer message after this returns: a send in progress finishes (it holds `_sending`), then the writer
        is cancelled and awaited. Without it an error was sent while the writer still ran, and audio or `done`
        reached the client after the `error`."""
        async with self._sending:
            self.closing = True
        writer.cancel()
        await asyncio.wait({writer})

    async def _send(self, send: Callable[[Any], Awaitable[None]], data: Any, done: bool = False) -> None:
        """One writer message, unless the session is closing (then nothing); `done`: it is the `done` message, so
        the session ended well once it is sent (recorded under the lock, before `_stop_writer` can look)."""
        async with self._sending:
            if self.closing:
                return
            await send(data)
            self.done_sent = done

    @staticmethod
    def _result(task: asyncio.Task) -> Any:
        try:
            return task.result()
        except (WebSocketDisconnect, OSError) as e:   # sending to a closed socket
            log.debug("websocket closed under us: %s", e)
            return DISCONNECT
        except Exception:  # noqa: BLE001 - a bug here must still end the session visibly
            log.exception("websocket session task failed")
            return ApiError(500, "internal error in the WebSocket session")

    async def _close(self, code: int) -> None:
        with contextlib.suppress(Exception):  # the client is already gone
            await self.ws.close(code)

    async def _read(self) -> Any:
        """Client messages -> queue. Returns DISCONNECT, or the ApiError that ends the session."""
        ended = False
        while True:
            try:
                data = await self.receive()
            except WebSocketDisconnect:
                return DISCONNECT
            except ApiError as e:
                return e
            try:
                self.limiter.take()
                kind = data.get("type")
                if ended:
                    return ApiError(400, f"type: no message is allowed after end, got {shown(kind)}", "type")
                if kind == "text":
                    await self.queue.put((WSText.model_validate(data).text, False))
                elif kind == "end":
                    WSEnd.model_validate(data)
                    await self.queue.put(("", True))
                    ended = True
                else:
                    return ApiError(400, f"type: must be 'text' or 'end' after the config, got {shown(kind)}",
                                    "type")
            except ValidationError as e:
                return from_validation_error(e, whole="message")
            except ApiError as e:
                return e

    async def _forward(self) -> Any:
        """Queue -> `feed` on the owning replica, batching what is waiting. None once `end` is delivered."""
        sid = self.stream.sid
        routed = self.handle.options(session_id=sid)
        while True:
            text, end = await self.queue.get()
            parts = [text]
            while not end and not self.queue.empty():
                piece, end = self.queue.get_nowait()
                parts.append(piece)
            text = "".join(parts)
            try:
                await detached(routed.feed.remote, sid, text, end)
            except RequestError as e:
                return ApiError(400, f"text: {e.message}", "text")
            except UnknownSession:
                err = ApiError(502, "the session is no longer held by its model replica")
                err.lost = True
                return err
            except Exception as e:  # noqa: BLE001 - the replica died
                return replica_lost(e)
            if end:
                return None

    async def _write(self) -> Any:
        """Replica audio -> client. None after `done`; the ApiError when the session failed."""
        while True:
            try:
                item = await self.stream.next()
            except ApiError as e:
                return e
            if item["type"] == "audio":
                if self.pacer is not None:
                    await self.pacer.pace(len(item["pcm"]))
                data = self.encoder.push(item["pcm"])
                if data:
                    await self._send(self.ws.send_bytes, data)
            elif item["type"] == "end":
                err = end_error(item)
                if err is not None:
                    return err
                tail = self.encoder.finish()
                if tail:
                    await self._send(self.ws.send_bytes, tail)
                await self._send(self.ws.send_json, {
                    "type": "done", "finish_reason": item["finish_reason"], "num_frames": item["num_frames"],
                    "time_to_first_audio_s": item["ttfa_s"]}, done=True)
                return None
