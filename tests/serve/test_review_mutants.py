"""Behaviour the suite did not pin, found by hand mutation testing of serve/ (each test here was seen failing on the
mutant named in its docstring and passing on the real code). No Ray: plain objects and the in-process app."""

from __future__ import annotations

import asyncio

import pytest
import torch

from qwen_tts_core import SynthesisRequest
from qwen_tts_core.errors import RequestError
from qwen_tts_core.voice_prompt import VoiceClonePromptItem
from serve import voices as voices_mod
from serve.auth import Caller, bearer_token, cross_site
from serve.metrics import ClientStreams
from serve.quotas import StreamQuota
from serve.scheduler import Busy, Scheduler, SchedulerLimits
from serve.schemas import ApiError
from serve.streaming import ReplicaStream
from serve.uploads import bounded, declared_length, form_body_limit, read_form
from serve.voices import ANYONE, VoiceStore
from serve.ws_session import MessageLimiter
from tests.serve.fakes import FakeEngine

ALICE, BOB = "a" * 32, "b" * 32


def _item() -> VoiceClonePromptItem:
    g = torch.Generator().manual_seed(0)
    return VoiceClonePromptItem(ref_code=torch.randint(0, 2048, (8, 16), generator=g),
                                ref_spk_embedding=torch.randn(64, generator=g), x_vector_only_mode=False,
                                icl_mode=True, ref_text="A reference.")


def test_the_bearer_scheme_is_matched_without_regard_to_case_and_spaces():
    """RFC 9110 11.1: the auth scheme is case-insensitive; spaces around the token are not part of it
    (mutants: a case-sensitive 'Bearer ', the token not stripped)."""
    assert bearer_token({"authorization": "bearer k1"}) == b"k1"
    assert bearer_token({"authorization": "BEARER  k1 "}) == b"k1"
    assert bearer_token({"authorization": "Basic k1"}) is None


def test_a_page_of_another_port_or_a_sibling_site_is_cross_site():
    """Sec-Fetch-Site `same-site` is another port or subdomain: not this origin (mutant: only `cross-site`
    refused). An Origin's port is dropped only when it is its own scheme's default: a plain-http page on port 443
    is not this service on port 80 (mutant: either default port dropped from every Origin)."""
    local = {"host": "127.0.0.1:8000"}
    assert cross_site({**local, "sec-fetch-site": "same-site"})
    assert cross_site({"origin": "http://127.0.0.1:443", "host": "127.0.0.1"})
    assert not cross_site({"origin": "http://127.0.0.1", "host": "127.0.0.1:80"})


def test_only_localhost_and_its_subdomains_count_as_a_name_dns_cannot_repoint():
    """`evil-localhost` or `notlocalhost` are DNS names like any other (mutant: any name ENDING in "localhost"
    taken as loopback, so a rebinding page at such a name passed as same-origin)."""
    for host in ("notlocalhost:8000", "evil-localhost"):
        assert cross_site({"host": host, "sec-fetch-site": "same-origin"})
    assert not cross_site({"host": "app.localhost:8000", "sec-fetch-site": "same-origin"})


def test_of_several_forwarded_hosts_the_first_is_the_one_the_browser_asked_for():
    """X-Forwarded-Host gets one value per proxy, the client's first (mutant: the last one read, so a proxy's own
    name decided, and a rebinding name that a proxy forwarded as the first was hidden behind an IP)."""
    assert not cross_site({"x-forwarded-host": "127.0.0.1:8000, proxy.internal", "origin": "http://127.0.0.1:8000"})
    assert cross_site({"x-forwarded-host": "evil.example, 127.0.0.1", "sec-fetch-site": "same-origin"})


def test_a_stream_place_counts_once_in_the_open_streams_and_gives_everything_back():
    """`Place` has ClientStreams' interface and may be handed `opened()` by more than one holder: it counts once
    (mutant: counted again on each call, the open-stream gauge never returned to 0)."""
    total = ClientStreams()
    quota = StreamQuota(1, total)
    place = quota.take(Caller(owner="k1", admin=False))
    place.opened()
    place.opened()
    assert total.count == 1
    place.closed()
    place.closed()
    assert total.count == 0 and not quota.held
    quota.take(Caller(owner="k1", admin=False)).closed()   # the key's place is free again


def test_a_voice_loaded_once_by_its_owner_stays_out_of_reach_of_another_key(tmp_path):
    """The per-process prompt cache is no way around ownership: after ALICE's request loaded her voice on this
    replica, BOB's request naming its id gets "not a stored voice" (mutant: the cached item served to any scope)."""
    store = VoiceStore(tmp_path)
    vid = store.create(_item(), name="alice", model="base", owner=ALICE)["id"]
    assert store.load(vid, ALICE) is store.load(vid, ALICE)      # cached
    with pytest.raises(KeyError):
        store.load(vid, BOB)
    assert store.load(vid, ANYONE) is not None


def test_voices_made_before_keys_were_set_are_no_key_s_but_the_admins(tmp_path):
    """A voice stored by a keyless service has owner "": once keys are configured, no API key sees it (only an
    admin key does); mutant: owner "" visible to every key."""
    store = VoiceStore(tmp_path)
    vid = store.create(_item(), name="old", model="base", owner="")["id"]
    assert store.list(ALICE) == [] and [v["id"] for v in store.list(ANYONE)] == [vid]
    for call in (store.info, store.load, store.delete):
        with pytest.raises(KeyError):
            call(vid, ALICE)


def test_max_bulk_waiting_bulk_requests_wait_and_the_next_is_busy():
    """`max_bulk_waiting` is how many bulk requests may be parked, not one fewer nor one more (mutant: `>` let
    max_bulk_waiting + 1 wait)."""
    async def main():
        sched = Scheduler(FakeEngine(max_sessions=2), SchedulerLimits(interactive_reserve=2, max_bulk_waiting=2))
        bulk = SynthesisRequest(kind="custom_voice", text="hi", speaker="vivian", priority="bulk")
        parked = [await sched.submit(bulk) for _ in range(2)]   # not started: they stay parked
        with pytest.raises(Busy):
            await sched.submit(bulk)
        assert sched.queue_length == 2 and len(parked) == 2
    asyncio.run(main())


def _bulk() -> SynthesisRequest:
    return SynthesisRequest(kind="custom_voice", text="hi", speaker="vivian", priority="bulk")


def test_a_consumer_that_stops_reading_cancels_its_session_in_the_engine():
    """Leaving `Scheduler.chunks` early (the client went away, the generator closed) frees the engine slot
    (mutant: the session ran on to its full length with nobody reading)."""
    async def main():
        eng = FakeEngine(max_sessions=2, frames=10_000)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            ticket = await sched.submit(SynthesisRequest(kind="custom_voice", text="hi", speaker="vivian"))
            chunks = sched.chunks(ticket)
            await chunks.__anext__()
            await chunks.aclose()
            assert ticket.cancelled and ticket.session.cancelled
        finally:
            sched.stop()
    asyncio.run(main())


def test_text_after_end_is_refused_while_a_bulk_session_is_parked():
    """A parked bulk session keeps its incremental text until it enters the engine, with the engine's rules:
    nothing after `end` (mutant: text after end kept, and replayed after the end)."""
    async def main():
        sched = Scheduler(FakeEngine(max_sessions=2), SchedulerLimits(interactive_reserve=2))
        ticket = await sched.submit(_bulk())
        sched.append_text(ticket, "more")
        sched.end_text(ticket)
        with pytest.raises(RequestError) as e:
            sched.append_text(ticket, "again")
        assert e.value.field == "text" and ticket.parked_text == ["more", None]
    asyncio.run(main())


def test_an_engine_step_that_fails_cancels_its_sessions_in_the_engine():
    """A step that raises ends every running session with an error AND gives their engine slots back (mutant:
    the sessions' tickets ended but the engine kept running them)."""
    async def main():
        eng = FakeEngine(max_sessions=2, frames=10_000, fail_at_step=3)
        sched = Scheduler(eng)
        sched.start(asyncio.get_running_loop())
        try:
            ticket = await sched.submit(SynthesisRequest(kind="custom_voice", text="hi", speaker="vivian"))
            last = [c async for c in sched.chunks(ticket)][-1]
        finally:
            sched.stop()
        assert last.finish_reason == "error" and ticket.session.cancelled
    asyncio.run(main())


def test_parked_text_the_engine_refuses_on_entry_fails_the_session_and_frees_its_slot():
    """Text a parked bulk session got is replayed when it enters the engine; if the engine refuses it there, the
    session fails 400 naming `text` and is cancelled in the engine (mutant: failed, but left running)."""
    class Refusing(FakeEngine):
        def add(self, req):
            s = super().add(req)
            s.append_text = lambda piece: (_ for _ in ()).throw(ValueError("refused"))
            s.end_text = lambda: None
            return s

    async def main():
        eng = Refusing(max_sessions=4, frames=10_000)
        sched = Scheduler(eng, SchedulerLimits(interactive_reserve=1))
        ticket = await sched.submit(_bulk())
        sched.append_text(ticket, "more")
        sched.start(asyncio.get_running_loop())
        try:
            last = [c async for c in sched.chunks(ticket)][-1]
        finally:
            sched.stop()
        assert ticket.failure is not None and ticket.failure.status == 400 and ticket.failure.field == "text"
        assert ticket.session.cancelled and last.is_last
    asyncio.run(main())


def test_a_second_failure_does_not_replace_the_first():
    """`fail` on a ticket that already failed is a no-op: the consumer reports the first cause (mutant: a later
    watchdog's 504 replaced the 408 the client was owed)."""
    async def main():
        sched = Scheduler(FakeEngine(max_sessions=2), SchedulerLimits(interactive_reserve=2))
        # in the engine, its last chunk not yet out (the step loop is not started)
        ticket = await sched.submit(SynthesisRequest(kind="custom_voice", text="hi", speaker="vivian"))
        sched.fail(ticket, 408, "no text for 30 s", "text")
        sched.fail(ticket, 504, "session deadline")
        assert (ticket.failure.status, ticket.failure.field) == (408, "text") and ticket.session.cancelled
    asyncio.run(main())


def test_the_decoded_prompt_cache_holds_at_most_cache_items(monkeypatch, tmp_path):
    """Decoded prompts kept per process are bounded, least recently used first out (mutant: no bound, a replica's
    memory grew with every voice ever used)."""
    monkeypatch.setattr(voices_mod, "CACHE_ITEMS", 2)
    store = VoiceStore(tmp_path)
    ids = [store.create(_item(), name=f"v{i}", model="base", owner=ALICE)["id"] for i in range(3)]
    for vid in ids:
        store.load(vid, ALICE)
    assert list(store._items) == ids[1:]


def test_a_form_body_may_have_exactly_its_bound_and_not_one_byte_more():
    """The streamed form bound (`form_body_limit`) counts every byte (mutant: one byte past it passed)."""
    limit = form_body_limit(10)

    async def read(sizes):
        async def chunks():
            for n in sizes:
                yield b"x" * n
        return [len(c) async for c in bounded(chunks(), 10)]

    assert asyncio.run(read([limit - 1, 1])) == [limit - 1, 1]
    with pytest.raises(ApiError) as e:
        asyncio.run(read([limit, 1]))
    assert (e.value.status, e.value.param) == (413, "body")


def test_a_declared_content_length_past_the_bound_is_refused_before_any_byte_is_read():
    """A Content-Length over the form's bound is a 413 naming `body` at once, the body unread (mutant: the
    declared length ignored, the body read up to the bound first)."""
    from starlette.requests import Request

    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 1024, "more_body": True}

    limit = form_body_limit(10)
    scope = {"type": "http", "method": "POST", "path": "/v1/audio/voices", "query_string": b"",
             "headers": [(b"content-type", b"application/x-www-form-urlencoded"),
                         (b"content-length", str(limit + 1).encode())]}
    with pytest.raises(ApiError) as e:
        asyncio.run(read_form(Request(scope, receive), 10))
    assert (e.value.status, e.value.param, reads) == (413, "body", [])


def test_a_content_length_that_is_no_number_is_a_400_naming_it():
    """(mutant: taken as absent, the body read as if none was declared)"""
    from starlette.requests import Request

    request = Request({"type": "http", "headers": [(b"content-length", b"12abc")]})
    with pytest.raises(ApiError) as e:
        declared_length(request)
    assert (e.value.status, e.value.param) == (400, "content-length")


def test_speech_loads_stored_voices_with_the_callers_scope_and_defaults_to_interactive(model_factory, tmp_path):
    """`build_request` loads a stored voice as the API key that sent the request sees it: another key's voice id
    is "not a stored voice" (mutant: every voice loaded with scope ANYONE, so any key could speak with any
    other key's cloned voice). A request without `priority` is interactive (mutant: bulk)."""
    from serve.config import ModelConfig
    from serve.requests import CALLER, build_request

    model = model_factory("base")
    cfg = ModelConfig(name="b", model_type="base", max_new_tokens=8)
    store = VoiceStore(tmp_path)
    vid = store.create(_item(), name="alice", model="b", owner=ALICE)["id"]
    mine = build_request(model, cfg, {"input": "Hi.", "voice": vid, CALLER: ALICE}, store)
    assert mine.priority == "interactive"
    with pytest.raises(RequestError) as e:
        build_request(model, cfg, {"input": "Hi.", "voice": vid, CALLER: BOB}, store)
    assert e.value.field in ("voice", "voice_clone_prompt")


class _Gen:
    """A replica stream call as the ingress sees it: its items, then `fail` raised; `cancel()` recorded."""

    def __init__(self, items, fail: BaseException) -> None:
        self.items, self.fail, self.cancelled = list(items), fail, False

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        raise self.fail

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    def __init__(self, gen) -> None:
        self.gen = gen

    def options(self, **kw):
        return self

    @property
    def stream(self):
        return self

    def remote(self, *args):
        return self.gen


def test_a_stream_whose_replica_fails_before_its_first_audio_gives_its_count_back():
    """`first_output` failing (the replica died after the start item) closes the stream: the open-stream count
    and the key's place are given back (mutant: only a failed END item closed it; a lost replica leaked both)."""
    total = ClientStreams()
    gen = _Gen([{"type": "start", "session": "r1-1"}], RuntimeError("replica died"))
    stream = asyncio.run(ReplicaStream.open("cv", _Handle(gen), {}, None, counter=total))
    assert total.count == 1
    with pytest.raises(ApiError) as e:
        asyncio.run(stream.first_output())
    assert e.value.status == 502 and stream.closed and total.count == 0 and gen.cancelled


def test_an_open_cancelled_while_waiting_for_the_replica_cancels_the_replica_call():
    """The client left (or a failover's wait ran out) while the stream was opening: the replica call is cancelled
    too (mutant: it ran on, its session leased to this live ingress and played to nobody)."""
    gen = _Gen([], asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(ReplicaStream.open("cv", _Handle(gen), {}, None))
    assert gen.cancelled


def test_a_websocket_that_was_quiet_for_long_still_gets_only_one_burst():
    """The message rate's bucket holds at most `burst` tokens however long the session was quiet (mutant: tokens
    piled up while idle, so a minute of silence bought a flood of per_s x 60 messages at once)."""
    now = [0.0]
    limiter = MessageLimiter(max_messages=10_000, per_s=10, burst=3, clock=lambda: now[0])
    now[0] = 100.0
    for _ in range(3):
        limiter.take()
    with pytest.raises(ApiError) as e:
        limiter.take()
    assert (e.value.status, e.value.param) == (429, "message")


def test_a_json_body_may_have_exactly_max_bytes():
    """(mutant: one byte more passed)"""
    from serve.jsonlimits import JsonLimits, JsonTooLarge, loads_bounded

    body = b'"' + b"a" * 8 + b'"'
    assert loads_bounded(body, JsonLimits(max_bytes=10)) == "a" * 8
    with pytest.raises(JsonTooLarge, match="body: larger than 9 bytes"):
        loads_bounded(body, JsonLimits(max_bytes=9))


def test_json_nesting_of_exactly_max_depth_is_read_and_a_utf8_bom_is_skipped():
    """(mutants: one level more passed; a body starting with a UTF-8 byte order mark, as some Windows tools write
    it, refused as malformed)"""
    from serve.jsonlimits import JsonLimits, JsonRejected, loads_bounded

    assert loads_bounded(b"[[[1]]]", JsonLimits(max_depth=3)) == [[[1]]]
    with pytest.raises(JsonRejected, match="nested 4 deep"):
        loads_bounded(b"[[[[1]]]]", JsonLimits(max_depth=3))
    assert loads_bounded('\ufeff{"input": "Hi."}'.encode()) == {"input": "Hi."}


def test_brackets_inside_json_strings_are_text_not_nesting():
    """A text of forty "[" is one string at depth 1 (mutant: strings not blanked before counting, refused as
    nested 41 deep)."""
    import json

    from serve.jsonlimits import loads_bounded

    assert loads_bounded(json.dumps({"input": "[" * 40 + "{" * 40}).encode()) == {"input": "[" * 40 + "{" * 40}


def test_a_missing_field_is_named_with_is_required():
    """(mutant: pydantic's own "Field required" reached the client)"""
    from pydantic import ValidationError

    from serve.schemas import SpeechRequest, from_validation_error

    with pytest.raises(ValidationError) as e:
        SpeechRequest.model_validate({"voice": "ryan"})
    err = from_validation_error(e.value)
    assert (err.status, err.param, err.message) == (400, "input", "input: is required")


def test_errors_name_the_api_field_and_say_whose_fault_they_are():
    """A core field maps to what the client sent (`instruct` -> `instructions`), a server-side setting to no field;
    every 4xx is an `invalid_request_error` and 5xx a `server_error`, as OpenAI's clients read it (mutants: the
    core name leaked, a server setting named as if the client sent it, a 4xx typed server_error)."""
    from serve.schemas import api_field

    assert api_field("instruct") == "instructions" and api_field("chunk_frames") is None
    assert ApiError(404, "x").body()["error"]["type"] == "invalid_request_error"
    assert ApiError(429, "x").body()["error"]["type"] == "invalid_request_error"
    assert ApiError(502, "x").body()["error"]["type"] == "server_error"


def test_the_streaming_wav_header_says_its_byte_rate():
    """fmt chunk: PCM, mono, the rate, byte rate = rate x 2, block align 2, 16 bits (mutant: byte rate = the
    sample rate, which players use to compute durations and seek)."""
    import struct

    from serve.audio_format import streaming_wav_header

    h = streaming_wav_header(24000)
    assert len(h) == 44 and struct.unpack("<HHIIHH", h[20:36]) == (1, 1, 24000, 48000, 2, 16)
