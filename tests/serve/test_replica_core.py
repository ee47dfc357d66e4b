"""ReplicaCore on the real engine and a tiny checkpoint, in-process (no Ray): request mapping, streaming, bulk,
errors naming the field, voice store round trip."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from qwen_tts_core.errors import RequestError
from serve.config import ModelConfig, ServiceConfig
from serve.replica import ReplicaCore
from serve.sessions import SessionLimits
from serve.voices import ANYONE, VoiceStore


@pytest.fixture(scope="module")
def cv_core(model_factory):
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=4, max_queue=2, max_new_tokens=32,
                      default_max_new_tokens=10)
    return ReplicaCore(model_factory("custom_voice"), cfg, None)


async def _items(core: ReplicaCore, payload: dict, **kw) -> list[dict]:
    core.start(asyncio.get_running_loop())
    try:
        return [x async for x in core.stream(payload, **kw)]
    finally:
        core.scheduler.stop()


def test_stream_protocol_and_default_length_cap(cv_core):
    items = asyncio.run(_items(cv_core, {"input": "Hello there.", "voice": "Vivian", "seed": 3}))
    assert items[0]["type"] == "start" and items[-1]["type"] == "end"
    audio = [x["pcm"] for x in items if x["type"] == "audio"]
    assert audio and all(a.dtype == np.float32 for a in audio)
    assert items[-1]["num_frames"] <= 10 and items[-1]["ttfa_s"] > 0   # default_max_new_tokens applied
    # the text's token count, for OpenAI's `usage` in the SSE done event (the ingress has no tokenizer)
    want = len(cv_core.model.tokenizer.target("Hello there.").text)
    assert items[-1]["text_tokens"] == want > 0
    info = cv_core.info()  # a /v1/models entry: OpenAI's fields (the openai client reads `created`)
    assert info["object"] == "model" and info["id"] == "cv" and isinstance(info["created"], int) and info["created"] > 0


def test_seeded_requests_repeat_and_differ_by_seed(cv_core):
    def run(seed):
        items = asyncio.run(_items(cv_core, {"input": "Same text.", "voice": "ryan", "seed": seed}))
        return np.concatenate([x["pcm"] for x in items if x["type"] == "audio"])
    a, b, c = run(5), run(5), run(6)
    assert np.array_equal(a, b)
    assert not (len(a) == len(c) and np.array_equal(a, c))


@pytest.mark.parametrize("payload,param", [
    pytest.param({"input": "hi", "voice": "alloy"}, "voice", id="unknown-voice"),
    pytest.param({"input": "hi", "language": "klingon"}, "language", id="unknown-language"),
    pytest.param({"input": "hi", "max_new_tokens": 33}, "max_new_tokens", id="over-cap"),
    pytest.param({"input": "hi", "top_p": 1.5}, "top_p", id="bad-top-p"),
    pytest.param({"input": "   "}, "input", id="empty-input"),
])
def test_bad_input_is_400_naming_the_field(cv_core, payload, param):
    items = asyncio.run(_items(cv_core, payload))
    assert len(items) == 1 and items[0]["type"] == "error" and items[0]["status"] == 400
    assert items[0]["param"] == param, items[0]


def test_synthesize_bulk_returns_whole_audio(cv_core):
    async def main():
        cv_core.start(asyncio.get_running_loop())
        try:
            out = await cv_core.synthesize({"input": "Bulk line.", "voice": "eric", "seed": 1})
            with pytest.raises(RequestError) as e:
                await cv_core.synthesize({"input": "Bulk line.", "voice": "nobody"})
            assert e.value.field == "speaker"
            return out
        finally:
            cv_core.scheduler.stop()
    out = asyncio.run(main())
    assert out["sample_rate"] == 24000 and out["pcm"].dtype == np.float32
    assert out["num_frames"] == len(out["pcm"]) // 1920 > 0 and out["finish_reason"] in ("eos", "max_new_tokens")


def test_an_unexpected_engine_add_error_is_a_500_end_item(cv_core, monkeypatch):
    """A stream whose request cannot enter the engine (device memory while a stored voice moves) ends with the
    engine's 500, interactive as bulk: the exception escaped stream() and the ingress answered 502 'replica failed'
    for a replica that is fine."""
    def add(req):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(cv_core.engine, "add", add)
    for priority in ["interactive", "bulk"]:
        items = asyncio.run(_items(cv_core, {"input": "Hello there.", "voice": "ryan", "priority": priority}))
        assert [x["type"] for x in items] == ["start", "end"], (priority, items)
        assert (items[-1]["status"], items[-1]["message"]) == (500, "synthesis failed in the engine"), priority


def _synthesize_error_and_stream_end(core, payload: dict):
    """The RequestError `synthesize(payload)` raises and the last item `stream(payload)` gives, on a started core."""
    async def main():
        core.start(asyncio.get_running_loop())
        try:
            with pytest.raises(RequestError) as e:
                await core.synthesize(payload)
            return e.value, [x async for x in core.stream(payload)][-1]
        finally:
            core.scheduler.stop()
    return asyncio.run(main())


def test_a_text_the_engine_refuses_names_text_to_batch_callers(model_factory):
    """The handle contract gives batch callers the core's argument name, wherever the problem is found: a text
    past max_len (found at the engine's prefill, not at submit; the core names `text`) is RequestError('text') from
    synthesize, as an empty text is (synthesize raised it with the API's `input`). The stream's end item keeps
    `input` as its `param` for the HTTP/WS error and `text` as its `field`, and its message starts `input: ` like
    every other input error's (it read `text: ...`, the core's prefix, under `param` input)."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_len=16, max_new_tokens=16, default_max_new_tokens=4)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None)
    payload = {"input": "A sentence that is far too long for a prompt of sixteen positions.", "voice": "ryan",
               "instructions": "Calm."}

    err, end = _synthesize_error_and_stream_end(core, payload)
    assert err.field == "text" and "max_len" in err.message, err
    assert (end["type"], end["status"], end["param"], end["field"]) == ("end", 400, "input", "text"), end
    assert end["message"].startswith("input: ") and "text:" not in end["message"], end
    assert not err.message.startswith(("input:", "text:")), err   # batch callers: the core's message, one prefix
    # instructions that alone leave no room for any text are what is too long: the core names `instruct`
    # (tests/core/test_review_text.py), the API `instructions`
    payload = {"input": "A sentence.", "voice": "ryan",
               "instructions": "Speak slowly and very calmly, like a narrator reading a long bedtime story."}
    err, end = _synthesize_error_and_stream_end(core, payload)
    assert err.field == "instruct" and "max_len" in err.message, err
    assert (end["type"], end["status"], end["param"], end["field"]) == ("end", 400, "instructions", "instruct"), end


def test_a_bad_field_found_as_bulk_enters_the_engine_names_both_names(cv_core, monkeypatch):
    """A bulk request refused by engine.add (a RequestError the up-front check missed) fails with the core's name for
    batch callers and the API's for the HTTP error: its end item's `param` was the core's (`speaker`, not `voice`)."""
    def add(req):
        raise RequestError("speaker", "speaker 'ryan' is not loaded")
    monkeypatch.setattr(cv_core.engine, "add", add)
    payload = {"input": "Hello there.", "voice": "ryan", "priority": "bulk"}

    err, end = _synthesize_error_and_stream_end(cv_core, payload)
    assert err.field == "speaker"
    assert (end["status"], end["param"], end["field"]) == (400, "voice", "speaker"), end
    assert end["message"] == "voice: speaker 'ryan' is not loaded", end


def test_voice_clone_prompt_is_encoded_once_and_reused(model_factory, ref_wav_path, tmp_path):
    store = VoiceStore(tmp_path / "voices")
    core = ReplicaCore(model_factory("base"), ModelConfig(name="b", model_type="base", max_new_tokens=16,
                                                          default_max_new_tokens=6), store)

    async def main():
        info = await core.create_voice(ref_wav_path.read_bytes(), "A reference sentence.", False, "alice")
        calls = []
        original = core.model.create_voice_clone_prompt
        core.model.create_voice_clone_prompt = lambda *a, **k: calls.append(1) or original(*a, **k)
        items = await _items(core, {"input": "Cloned speech.", "voice": info["id"], "seed": 0})
        return info, items, calls
    info, items, calls = asyncio.run(main())
    assert info["name"] == "alice" and info["model"] == "b" and store.list(ANYONE)[0]["id"] == info["id"]
    assert items[-1]["type"] == "end" and any(x["type"] == "audio" for x in items)
    assert calls == [], "a stored voice must not be re-encoded"
    with pytest.raises(ValueError, match="ref_audio"):
        asyncio.run(core.create_voice(b"not audio at all" * 10, "x", False, "bad"))


def test_a_stored_voice_of_another_model_size_is_a_400_naming_voice(model_factory, tmp_path):
    """One voice store shared by Base replicas of two sizes: a voice made by the wider model reaches this one as a 400
    naming `voice` (not a 500 from inside a step, nor a device-side assert on a GPU), and the replica serves on."""
    from qwen_tts_core.voice_prompt import VoiceClonePromptItem

    base = model_factory("base")
    store = VoiceStore(tmp_path / "voices")
    core = ReplicaCore(base, ModelConfig(name="b", model_type="base", max_new_tokens=16, default_max_new_tokens=4),
                       store)
    width = base.cfg.talker.hidden_size
    wide = store.create(VoiceClonePromptItem(None, torch.randn(2 * width), True, False), name="wide",
                        model="base-1.7b", owner="")
    fits = store.create(VoiceClonePromptItem(None, torch.randn(width), True, False), name="fits", model="b", owner="")

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            bad = [x async for x in core.stream({"input": "Cloned speech.", "voice": wide["id"]})]
            good = [x async for x in core.stream({"input": "Cloned speech.", "voice": fits["id"], "seed": 0})]
            return bad, good
        finally:
            core.scheduler.stop()
    bad, good = asyncio.run(main())
    assert len(bad) == 1 and bad[0]["type"] == "error" and bad[0]["status"] == 400 and bad[0]["param"] == "voice"
    assert "another model size" in bad[0]["message"], bad[0]
    assert good[-1]["type"] == "end" and any(x["type"] == "audio" for x in good)


def test_a_lapsed_lease_cancels_only_once_its_consumer_is_gone(model_factory):
    """The replica's watchdog with no renewal at all (0.6 s leases): a session whose consumer lives goes on for
    several leases (its lease is extended at each lapse); once the consumer is gone it is cancelled within about a
    lease; a leased session naming no consumer is cancelled as its lease lapses."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=4, max_queue=2, max_new_tokens=64,
                      default_max_new_tokens=64)
    living, asked = {"ingress-1": True}, []

    class Liveness:                                   # liveness.RAY_ACTORS' contract, without Ray
        @staticmethod
        def identity(value):
            return value if isinstance(value, dict) else None

        @staticmethod
        def alive(consumer):
            asked.append(consumer["id"])
            return living.get(consumer["id"], False)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None, limits=SessionLimits(lease_s=0.6),
                       liveness=Liveness())

    async def session(consumer):
        gen = core.stream({"voice": "ryan", "seed": 1}, incremental=True, lease=True, consumer=consumer)
        start = await gen.__anext__()
        core.feed(start["session"], "Words that wait for more words.")   # no `end`: it waits for more text

        async def last():
            return [x async for x in gen][-1]
        return asyncio.create_task(last())

    async def main():
        loop = asyncio.get_running_loop()
        core.start(loop)
        try:
            kept = await session({"id": "ingress-1"})
            bare = await session(None)
            await asyncio.sleep(2.5)                      # four leases without a renewal
            bare_end = bare.result() if bare.done() else None
            kept_open, counts = not kept.done(), dict(core.sessions.expired_counts)
            living["ingress-1"] = False
            t = loop.time()
            kept_end = await asyncio.wait_for(kept, 10)
            return bare_end, kept_open, counts, kept_end, loop.time() - t, dict(core.sessions.expired_counts)
        finally:
            core.stop()
    bare_end, kept_open, counts, kept_end, dt, final = asyncio.run(main())
    assert bare_end is not None and bare_end["finish_reason"] == "cancelled", bare_end
    assert kept_open, "a live consumer's session must outlast its lapsed leases"
    assert counts["lease"] == 1 and counts["lease_late"] >= 2, counts
    assert kept_end["type"] == "end" and kept_end["finish_reason"] == "cancelled" and kept_end["status"] == 500
    assert dt < 1.6 and final["lease"] == 2, (dt, final)
    assert set(asked) == {"ingress-1"}                    # the bare session has no consumer to ask about


def test_service_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown key"):
        ServiceConfig.from_dict({"modles": []})
    with pytest.raises(ValueError, match="model_type"):
        ServiceConfig.from_dict({"models": [{"name": "x", "model_type": "nope"}]})
    with pytest.raises(ValueError, match="duplicate"):
        ServiceConfig.from_dict({"models": [{"name": "x"}, {"name": "x"}]})
    with pytest.raises(ValueError, match="interactive_reserve"):
        ModelConfig(max_sessions=2, interactive_reserve=2)
    cfg = ServiceConfig.from_dict({})
    assert cfg.models[0].model_type == "custom_voice" and ServiceConfig.from_dict(cfg.to_dict()) == cfg


def test_audio_dtype_in_the_model_config_reaches_the_engine(model_factory, cv_core):
    """models[].audio_dtype: the streaming decoder runs in it (bf16: close to the fp32 decode, not equal)."""
    for bad in ("int8", "float64", "", 16, ["bfloat16"], {"dtype": "bfloat16"}):
        with pytest.raises(ValueError, match=r"models\[tiny-custom-voice\]\.audio_dtype"):
            ModelConfig(audio_dtype=bad)
    cfg = ModelConfig(name="cv16", model_type="custom_voice", max_sessions=4, max_queue=2, max_new_tokens=32,
                      audio_dtype="bfloat16")
    core = ReplicaCore(model_factory("custom_voice"), cfg, None)
    assert core.engine.audio.bank.decoder.pre_conv.conv.weight.dtype == torch.bfloat16
    assert cv_core.engine.audio.bank.decoder.pre_conv.conv.weight.dtype == torch.float32
    payload = {"input": "Hello there.", "voice": "Vivian", "seed": 3, "max_new_tokens": 8}
    pcm = [np.concatenate([x["pcm"] for x in asyncio.run(_items(c, payload)) if x["type"] == "audio"])
           for c in (core, cv_core)]
    assert pcm[0].shape == pcm[1].shape and pcm[0].size
    diff = float(np.abs(pcm[0] - pcm[1]).max())
    assert 0 < diff < 0.5 * float(np.abs(pcm[1]).max())


def test_a_chunk_reaches_the_client_while_the_talker_step_after_it_runs(cv_core, monkeypatch):
    """On a CPU (eager) replica the first chunk is decoded after the code predictor and handed to the client before
    that step's talker pass: the talker waits here until the client holds the audio (it would wait in vain if the
    chunk left with the step's end)."""
    eng = cv_core.engine
    got_audio, waited, first_decode = threading.Event(), [], []
    real_decode, real_run = eng.audio.decode, eng.runner._run

    def decode():
        outs = real_decode()
        if not first_decode and any(o.num_frames for o in outs):
            first_decode.append(eng.steps)
        return outs

    def run(key, *a):
        if key[0] == "talker" and first_decode == [eng.steps] and not waited:
            waited.append(got_audio.wait(10))
        return real_run(key, *a)

    monkeypatch.setattr(eng.audio, "decode", decode)
    monkeypatch.setattr(eng.runner, "_run", run)

    async def consume() -> list[dict]:
        cv_core.start(asyncio.get_running_loop())
        items = []
        try:
            async for x in cv_core.stream({"input": "Hello there, early audio.", "voice": "ryan", "seed": 1}):
                items.append(x)
                if x["type"] == "audio":
                    got_audio.set()
        finally:
            cv_core.scheduler.stop()
        return items

    items = asyncio.run(consume())
    assert waited == [True], (waited, first_decode)
    assert items[-1]["type"] == "end" and any(x["type"] == "audio" for x in items)


def test_incremental_bulk_text_fed_while_parked_reaches_the_session(model_factory):
    """Review finding: `feed` on an incremental bulk session still waiting for a bulk slot (no engine session yet)
    raised AttributeError (the client heard "replica failed"). Text and `end` fed while parked are kept and handed
    to the session when it enters the engine; cancelling a parked session frees it and what it was fed."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_sessions=2, max_queue=2, interactive_reserve=1,
                      max_new_tokens=32, default_max_new_tokens=6)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None)

    async def opened(**kw):
        gen = core.stream({"voice": "ryan", "seed": 1, "priority": "bulk", **kw}, incremental=True)
        return gen, (await gen.__anext__())["session"]

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            holder, h_sid = await opened()                # enters the engine: the one bulk slot, waiting for text
            parked, p_sid = await opened()
            gone, g_sid = await opened()
            t_parked = core.sessions.get(p_sid).ticket
            assert t_parked.session is None and core.sessions.get(g_sid).ticket.session is None
            fed = [core.feed(p_sid, "Hello there."), core.feed(p_sid, " Again.", end=True)]
            core.feed(g_sid, "Never spoken.")
            assert t_parked.session is None and t_parked.parked_text == ["Hello there.", " Again.", None]
            await gone.aclose()                           # the client left while parked: freed at once
            await asyncio.sleep(0.05)                     # (its end is delivered through the event loop)
            assert g_sid not in core.sessions._open and len(core.scheduler.open_tickets()) == 2
            core.feed(h_sid, "Short.", end=True)
            first = [x async for x in holder]
            items = await asyncio.wait_for(_drain(parked), 60)
            return fed, first[-1], items, core.scheduler.active_sessions, len(core.sessions)
        finally:
            core.stop()
    fed, first_end, items, active, held = asyncio.run(main())
    assert fed == [{"chars": 12}, {"chars": 19}]
    assert first_end["type"] == "end" and first_end["status"] is None, first_end
    assert items[-1]["type"] == "end" and items[-1]["status"] is None, items[-1]
    assert any(x["type"] == "audio" for x in items)
    assert active == 0 and held == 0


async def _drain(gen) -> list[dict]:
    return [x async for x in gen]


def test_incremental_text_past_max_len_ends_with_a_400_naming_text(model_factory):
    """An incremental (WebSocket) session whose appended text passes max_len fails (the core names `text`): its end
    item names `text`, the WebSocket's own message field (as feed refusals do), not HTTP's `input`."""
    cfg = ModelConfig(name="cv", model_type="custom_voice", max_len=64, max_new_tokens=60, default_max_new_tokens=60)
    core = ReplicaCore(model_factory("custom_voice"), cfg, None)

    async def main():
        core.start(asyncio.get_running_loop())
        try:
            gen = core.stream({"voice": "ryan", "seed": 1}, incremental=True)
            sid = (await gen.__anext__())["session"]
            core.feed(sid, "A sentence ")
            core.feed(sid, "of several words. " * 40, end=True)
            return await asyncio.wait_for(_drain(gen), 60), len(core.sessions)
        finally:
            core.stop()
    items, held = asyncio.run(main())
    end = items[-1]
    assert (end["type"], end["status"], end["param"], end["field"]) == ("end", 400, "text", "text"), end
    assert "max_len" in end["message"] and end["message"].startswith("text: ") and held == 0


def test_a_voice_is_never_made_from_a_url_the_client_sent(model_factory, ref_wav_path, tmp_path):
    """Review: the replica made voices with create_voice_clone_prompt's default allow_urls=True; the ingress only
    ever passes bytes today, but a str reaching create_voice would have been fetched. It asks for uploads only now:
    a URL (here one that serves a real WAV on loopback) is refused naming ref_audio, and never fetched."""
    import http.server
    import threading

    hits = []
    body = ref_wav_path.read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        core = ReplicaCore(model_factory("base"), ModelConfig(name="b", model_type="base", max_new_tokens=16,
                                                              default_max_new_tokens=6), VoiceStore(tmp_path / "v"))
        url = f"http://127.0.0.1:{server.server_address[1]}/ref.wav"
        with pytest.raises(ValueError, match="ref_audio"):
            asyncio.run(core.create_voice(url, "A reference sentence.", False, "alice"))
        assert hits == []
    finally:
        server.shutdown()


@pytest.mark.parametrize("kind", ["base", "custom_voice"])
def test_warm_up_warms_the_engine_for_every_model_type_base_included(model_factory, ref_wav_path, tmp_path, kind):
    """A replica's warm-up runs the engine's own warm-up (graphs, a prefill, steps, an audio decode), which needs no
    request: a Base replica, which has no voice to synthesize with, skipped warming altogether and left its first
    request to pay every first-call cost (issue 9: graphs ready before traffic for every model type). What comes after
    the warm-up is what a cold replica gives."""
    store = VoiceStore(tmp_path / "voices")
    cfg = ModelConfig(name="w", model_type=kind, max_new_tokens=16, default_max_new_tokens=5)
    model = model_factory(kind)
    cold, warm = ReplicaCore(model, cfg, store), ReplicaCore(model, cfg, store)
    calls = []
    original = warm.engine.warm_up
    warm.engine.warm_up = lambda: calls.append(1) or original()
    assert warm.warm_up() > 0 and calls == [1]

    async def main(core):
        payload = {"input": "After the warm-up.", "seed": 3}
        if kind == "base":
            voice = await core.create_voice(ref_wav_path.read_bytes(), "A reference sentence.", False, "v")
            payload["voice"] = voice["id"]
        items = await _items(core, payload)
        assert items[-1]["type"] == "end" and items[-1]["status"] is None
        return np.concatenate([x["pcm"] for x in items if x["type"] == "audio"])

    np.testing.assert_array_equal(asyncio.run(main(warm)), asyncio.run(main(cold)))
