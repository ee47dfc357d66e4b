"""The ingress side of a replica stream: open it, hold its lease, turn it into HTTP bytes, SSE events or WebSocket
messages, and make every failure visible to the client.

    stream = await ReplicaStream.open(name, handle, payload, leases)   # ApiError before anything is sent
    first = await stream.first_output()        # first audio (or a clean end); a failed end -> ApiError (4xx/5xx JSON)
    StreamingResponse(audio_body(stream, first, encoder))   # failure later: the body is ABORTED (no clean end)
    StreamingResponse(sse_body(stream, first, encoder))     # failure later: an `error` event
    audio_body(..., pacer=Pacer(cfg.stream_lead_s, speed))  # opt-in: at most stream_lead_s ahead of real time

Failure after the first byte (the replica's, or any other error such as an encoder's, as a 500): raw audio -> the
connection is dropped without the chunked terminator (clients see a protocol error, never a short success); SSE -> `{"type": "error", "error": {...}}` event; WebSocket (ws_session.py)
-> `{"type": "error", ...}` then close 1011 (1008 when the client is at fault, 1013 when busy). `finish_reason`
reaches SSE clients in `speech.audio.done` and WebSocket clients in `done`; a raw audio stream ends cleanly only when
the synthesis finished (eos, max_new_tokens or the runaway guard): its finish reason is not carried (see
serve/README.md).

Leases: every stream this ingress consumes is renewed on its replica every `lease_s / 3` (one call per replica, on
schedule even when a replica is slow to answer); if this ingress dies, its sessions stop being renewed and their
replicas cancel them (orphans never run to full length). Each stream names its consumer (this ingress's actor): a
replica cancels a lapsed session only once Ray reports that actor dead (liveness.py), so renewals that a loaded host
delays never cut a live stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import logging
import time
import weakref
from collections.abc import Awaitable
from typing import Any

from ray.exceptions import ActorDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from qwen_tts_core.types import SAMPLE_RATE

from .metrics import ClientStreams
from .routing import detached, owner_of
from .schemas import ApiError

log = logging.getLogger(__name__)


class StreamAborted(RuntimeError):
    """Raised inside a raw audio body to drop the connection (the client must not see a clean end)."""


class ReplicaLost(ApiError):
    """The 502 of a replica that died (Ray's `ActorDiedError`): before the client has any audio, its request may go
    to another replica (the ingress's `failover_retries`). Not one that could not be reached for a while
    (`ActorUnavailableError`): Serve's router keeps it in rotation, the retry may go back to it, and being alive it
    may still run the first call, which would then run twice."""


def replica_lost(e: BaseException) -> ApiError:
    """The 502 of a replica call that failed (`ReplicaLost` when the replica died); logged as a warning unless it
    was cancelled on purpose (this ingress closed the stream, or Serve cancelled the request
    because its client left)."""
    level = logging.INFO if isinstance(e, RequestCancelledError) else logging.WARNING
    log.log(level, "replica stream failed: %s: %s", type(e).__name__, str(e).strip().splitlines()[-1:] or "")
    cls = ReplicaLost if isinstance(e, ActorDiedError) else ApiError
    return cls(502, "the model replica serving this request failed; retry the request")


async def replica_answer(call: Awaitable[Any], retry_after_s: int = 1) -> Any:
    """The answer of a one-shot replica call (create_voice, info): 503 with Retry-After when the replica's queue is
    full, 502 (`replica_lost`) when the replica died or cannot be reached (these were 500 "internal error"); the
    replica's own errors (a RequestError, ...) come through as raised."""
    try:
        return await call
    except BackPressureError:
        raise ApiError(503, "service busy; retry later", None, headers={"Retry-After": str(retry_after_s)}) from None
    except RayActorError as e:   # died, or unavailable (ActorUnavailableError)
        raise replica_lost(e) from None


def end_error(item: dict) -> ApiError | None:
    """The error of a stream's end item, or None when the synthesis finished."""
    if item.get("status") is None:
        return None
    headers = {"Retry-After": str(item["retry_after"])} if item.get("retry_after") else None
    return ApiError(int(item["status"]), item.get("message") or "synthesis failed", item.get("param"),
                    headers=headers)


class Leases:
    """Sessions this ingress consumes, renewed on their replicas: one call per (model, replica) every `period_s`.

    Rounds keep their schedule whatever a replica answers: the calls of a round run concurrently, a slow replica's
    renewal stays in flight (and still counts when it lands) while the next rounds go on, and no second call to it
    piles up behind the first."""

    def __init__(self, lease_s: float, consumer: dict[str, Any] | None = None) -> None:
        self.lease_s, self.consumer = lease_s, consumer   # consumer: this process's actor (liveness.this_actor)
        self.period_s = max(0.1, lease_s / 3)
        self._open: dict[str, tuple[str, Any]] = {}   # session -> (model name, replica handle)
        self._task: asyncio.Task | None = None
        self._in_flight: dict[tuple[str, str], asyncio.Task] = {}   # (model, owner) -> its renewal call

    def add(self, sid: str, name: str, handle) -> None:
        self._open[sid] = (name, handle)
        if self._task is None or self._task.done():
            # Its own context: renewals must not carry the request id of the request that happened to start it.
            self._task = asyncio.get_running_loop().create_task(self._renew_forever(), context=contextvars.Context())

    def drop(self, sid: str) -> None:
        self._open.pop(sid, None)

    def __len__(self) -> int:
        return len(self._open)

    async def _renew_forever(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while self._open:
            due = max(due + self.period_s, loop.time())   # after a stall: one round now, no burst of catch-ups
            await asyncio.sleep(due - loop.time())
            groups: dict[tuple[str, str], list[str]] = {}
            handles = {}
            for sid, (name, handle) in list(self._open.items()):
                groups.setdefault((name, owner_of(sid) or ""), []).append(sid)
                handles[name] = handle
            for key, sids in groups.items():
                if key in self._in_flight:
                    continue          # that replica has not answered the last round yet
                self._in_flight[key] = loop.create_task(self._renew(key, handles[key[0]], sids))

    async def _renew(self, key: tuple[str, str], handle, sids: list[str]) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            await asyncio.wait_for(detached(handle.options(session_id=sids[0]).renew.remote, sids), self.lease_s)
            if loop.time() - t0 > self.period_s:
                log.warning("lease renewal of %d session(s) on %s took %.2f s (a renewal is due every %.2f s)",
                            len(sids), key[1] or key[0], loop.time() - t0, self.period_s)
        except Exception as e:  # noqa: BLE001 - a dead replica: its streams fail on their own
            log.warning("lease renewal of %d session(s) on %s failed: %s: %s", len(sids), key[1] or key[0],
                        type(e).__name__, e)
        finally:
            self._in_flight.pop(key, None)


class ReplicaStream:
    """One `TTSReplica.stream` call as the ingress consumes it."""

    def __init__(self, gen, sid: str, name: str, leases: Leases | None, counter: ClientStreams | None) -> None:
        self.gen, self.sid, self.name, self.leases, self.counter = gen, sid, name, leases, counter
        self.closed = False
        if counter is not None:
            counter.opened()

    @classmethod
    async def open(cls, name: str, handle, payload: dict, leases: Leases | None, incremental: bool = False,
                   retry_after_s: int = 1, counter: ClientStreams | None = None) -> ReplicaStream:
        """Start the stream; ApiError when the replica refuses (400/503) or cannot be reached. `counter` counts it
        as an open client stream until `close()`."""
        gen = handle.options(stream=True).stream.remote(payload, incremental, leases is not None,
                                                        leases.consumer if leases is not None else None)
        try:
            first = await gen.__anext__()
        except BackPressureError:
            raise ApiError(503, "service busy; retry later", None,
                           headers={"Retry-After": str(retry_after_s)}) from None
        except StopAsyncIteration:
            raise replica_lost(RuntimeError("empty stream")) from None
        except Exception as e:  # noqa: BLE001 - the replica died or could not be reached
            # cancelled too: a replica unreachable for a while (ActorUnavailableError) may still run the call, and
            # its session, leased to this live ingress, would run to its full length with nobody reading it
            gen.cancel()
            raise replica_lost(e) from None
        except BaseException:  # cancelled (the client left, a failover's wait ran out): the call goes too
            gen.cancel()
            raise
        if first["type"] == "error":
            headers = {"Retry-After": str(first["retry_after"])} if first.get("retry_after") else {}
            err = ApiError(first["status"], first["message"], first.get("param"), headers=headers)
            err.full_replica = first.get("replica") if first["status"] == 503 else None   # see Ingress._stream
            raise err
        stream = cls(gen, first["session"], name, leases, counter)
        if leases is not None:
            leases.add(stream.sid, name, handle)
        return stream

    async def next(self) -> dict:
        """The next item (audio or end); ApiError(502) when the replica failed mid-stream."""
        try:
            return await self.gen.__anext__()
        except StopAsyncIteration:
            raise replica_lost(RuntimeError("stream ended without an end item")) from None
        except Exception as e:  # noqa: BLE001 - the replica died mid-stream
            raise replica_lost(e) from None

    async def first_output(self) -> dict:
        """The first audio item, or the end item when there is no audio; a failed end raises its ApiError."""
        try:
            item = await self.next()
        except ApiError:
            self.close()
            raise
        if item["type"] == "end":
            err = end_error(item)
            if err is not None:
                self.close()
                raise err
        return item

    def close(self) -> None:
        """Done with it: cancels the replica's session unless it already ended; stops its lease."""
        if self.closed:
            return
        self.closed = True
        if self.leases is not None:
            self.leases.drop(self.sid)
        if self.counter is not None:
            self.counter.closed()
        self.gen.cancel()

    def close_with(self, body) -> Any:
        """`body` (a response body generator) closes this stream when it ends or is dropped unstarted."""
        weakref.finalize(body, self.close)
        return body


class Pacer:
    """Holds a stream's audio to at most `lead_s` seconds (plus the piece going out) ahead of real time
    (`stream_lead_s`; 0: off): before each piece goes out, it sleeps until the audio already sent is at most `lead_s`
    ahead of the time since the first piece (which goes at once: the time to first audio is unchanged). So a client
    playing along still holds `lead_s` when a piece arrives, however long the pieces are (counting the piece in
    before waiting ran a client dry when a piece outlasted the lead: 4 frames at speed 0.25 are 1.28 s). Audio
    seconds are counted at the request's `speed` (0.5: each model second is two).

    Why: Serve's proxy takes a response body as fast as the ingress yields it, whatever the client reads, so a client
    that stops reading had its whole answer piled up in the proxy and its key's stream place given back as soon as
    the synthesis finished (serve/README.md, "Slow clients"). Paced, the ingress holds the stream (its place and
    `open_client_streams`) for about the audio's duration and lets it out no faster than real time: a client that
    stops reading still has the rest pile up in the proxy, spread over that duration, and it stays counted."""

    def __init__(self, lead_s: float, speed: float = 1.0, clock=time.monotonic, sleep=asyncio.sleep) -> None:
        self.lead_s, self.speed, self.clock, self.sleep = lead_s, speed, clock, sleep
        self.t0: float | None = None
        self.sent_s = 0.0   # audio seconds let out so far

    async def pace(self, samples: int) -> None:
        """Before `samples` (model samples at SAMPLE_RATE) go out: sleep while the audio already out is more than
        `lead_s` ahead of real time; then count them."""
        if self.lead_s <= 0:
            return
        now = self.clock()
        if self.t0 is None:
            self.t0 = now
        else:
            wait = self.sent_s - self.lead_s - (now - self.t0)   # the audio already out, not this piece
            if wait > 0:
                await self.sleep(wait)
        self.sent_s += samples / (SAMPLE_RATE * self.speed)


async def encoded(stream: ReplicaStream, first: dict, encoder, pacer: Pacer | None = None):
    """The stream's audio through `encoder`: `(bytes, None)` per piece, then `(tail, end item)` once; an `ApiError`
    when the stream fails or ends with an error. The one loop both response bodies share; `pacer` (stream_lead_s)
    holds each piece until it is due."""
    item = first
    while True:
        if item["type"] == "audio":
            if pacer is not None:
                await pacer.pace(len(item["pcm"]))
            data = encoder.push(item["pcm"])
            if data:
                yield data, None
        elif item["type"] == "end":
            err = end_error(item)
            if err is not None:
                raise err
            yield encoder.finish(), item
            return
        item = await stream.next()


def failed_midway(stream: ReplicaStream, e: Exception, kind: str, count_error) -> ApiError:
    """A stream that failed after its first audio (its client saw 200): its ApiError, logged once and counted as
    `stream_<status>` (its real status) through `count_error`. Anything else (an encoder's RuntimeError from
    PyAV, libsndfile or the speed stretcher, a bug) is a 500, logged as an error with its traceback."""
    if isinstance(e, ApiError):
        err = e
        log.warning("%s stream %s of %s failed after its first audio: %d %s", kind, stream.sid, stream.name,
                    e.status, e.message)
    else:
        err = ApiError(500, f"internal error ({type(e).__name__})")
        log.error("%s stream %s of %s failed after its first audio", kind, stream.sid, stream.name, exc_info=e)
    if count_error is not None:
        count_error(f"stream_{err.status}")
    return err


async def audio_body(stream: ReplicaStream, first: dict, encoder, count_error=None, pacer: Pacer | None = None):
    """Raw audio bytes; a failure after the first byte (the stream's, or the encoder's) aborts the response
    (`StreamAborted`, which the app's handler lets through unlogged: it is logged and counted here)."""
    try:
        async for data, _ in encoded(stream, first, encoder, pacer):
            if data:
                yield data
    except Exception as e:  # noqa: BLE001 - ApiError, or an encoder failure: never a clean end
        err = failed_midway(stream, e, "audio", count_error)
        raise StreamAborted(f"{stream.name}: {err.message}") from None
    finally:
        stream.close()


def done_event(end: dict) -> dict:
    """`speech.audio.done` from a clean end item, with OpenAI's `usage` (input tokens: the text's, as the replica
    counted them in `text_tokens`; output tokens: codec frames). An end item without the count (a replica of an
    older version) gets no `usage` rather than an invented one: the ingress has no tokenizer."""
    out = {"type": "speech.audio.done", "finish_reason": end["finish_reason"], "num_frames": end["num_frames"],
           "time_to_first_audio_s": end["ttfa_s"]}
    if isinstance(end.get("text_tokens"), int):
        out["usage"] = {"input_tokens": end["text_tokens"], "output_tokens": end["num_frames"],
                        "total_tokens": end["text_tokens"] + end["num_frames"]}
    return out


def sse_event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def sse_body(stream: ReplicaStream, first: dict, encoder, count_error=None, pacer: Pacer | None = None):
    """`speech.audio.delta` events, then `speech.audio.done` with the finish reason, or an `error` event (an
    encoder failure too: a 500 `error` event)."""
    try:
        async for data, end in encoded(stream, first, encoder, pacer):
            if data:
                yield sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
            if end is not None:
                yield sse_event(done_event(end))
    except Exception as e:  # noqa: BLE001 - ApiError, or an encoder failure: the client hears an `error` event
        err = failed_midway(stream, e, "sse", count_error)
        yield sse_event({"type": "error", **err.body()})
    finally:
        stream.close()
