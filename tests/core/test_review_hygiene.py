"""Review of the core engine's long-run hygiene and session isolation: many requests one after another and
interleaved leave nothing behind, a slot or audio row reused by another user's session gives exactly what a fresh
engine gives, and `configure_engine` never lets two engines exist at once."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from qwen_tts_core import Qwen3TTSModel
from qwen_tts_core.generate.driver import EngineDriver

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)


@pytest.fixture
def fresh(checkpoint_factory):
    """A model of its own (these tests rebuild or break its engine)."""
    return Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu",
                                         dtype="float32")


def _engines_alive(refs: list[weakref.ref]) -> int:
    gc.collect()
    return sum(r() is not None for r in refs)


@pytest.mark.parametrize("call", ["generate", "stream"])
def test_configure_engine_refuses_while_a_call_holds_the_engine_before_adding_its_session(fresh, monkeypatch, call):
    """A call that took the engine but had not added its session yet (has_work() False) let configure_engine drop
    the engine; the call then ran on the old engine while the next call built a new one: two engines' caches at
    once. The call is forced to stop between taking the driver and adding its session."""
    fresh.configure_engine(max_sessions=2)
    first = weakref.ref(fresh.engine)
    took, go = threading.Event(), threading.Event()
    real_open = EngineDriver.open

    def paused_open(self, req):
        took.set()
        assert go.wait(30)
        return real_open(self, req)

    monkeypatch.setattr(EngineDriver, "open", paused_open)
    results: list = []

    def caller() -> None:
        try:
            if call == "generate":
                results.append(fresh.generate_custom_voice("Hello.", speaker="ryan", **G)[0][0].size)
            else:
                results.append(sum(p.size for p in fresh.stream_custom_voice("Hello.", speaker="ryan", **G)))
        except BaseException as e:  # noqa: BLE001
            results.append(e)

    t = threading.Thread(target=caller)
    t.start()
    try:
        assert took.wait(30)
        with pytest.raises(RuntimeError, match="busy"):
            fresh.configure_engine(max_sessions=3)
        assert fresh.engine is first() and fresh.engine.max_sessions == 2
    finally:
        go.set()
        t.join(60)
    monkeypatch.setattr(EngineDriver, "open", real_open)
    assert not t.is_alive() and results == [(G["max_new_tokens"] - 1) * 1920]
    fresh.configure_engine(max_sessions=3)   # the call is over: free to change now
    assert _engines_alive([first]) == 0 and fresh.engine.max_sessions == 3


def test_a_stream_holds_the_engine_until_it_is_over_and_not_after(fresh):
    """A stream not over (unread, or read up to its last chunk but not exhausted) holds the engine: configure_engine
    refuses. Closed, dropped or read to its end it lets go: configure_engine works at once (a closed stream's
    cancelled session made it 'busy' until some later call stepped the engine), and a finished stream the caller
    keeps does not keep the old engine alive beside the new one."""
    fresh.configure_engine(max_sessions=2)
    old = [weakref.ref(fresh.engine)]
    done = fresh.stream_custom_voice("Hello.", speaker="ryan", **G)
    assert sum(p.size for p in done) == (G["max_new_tokens"] - 1) * 1920
    fresh.configure_engine(max_sessions=3)
    assert fresh.engine.max_sessions == 3 and _engines_alive(old) == 0 and done is not None

    for end in ("close", "drop", "exhaust"):
        old = [weakref.ref(fresh.engine)]
        it = fresh.stream_custom_voice("Hello.", speaker="ryan", first_chunk_frames=100, **G)  # one chunk: the last
        assert next(it).size
        with pytest.raises(RuntimeError, match="busy"):
            fresh.configure_engine(max_sessions=2)
        if end == "close":
            it.close()
        elif end == "drop":
            del it
            gc.collect()
        else:
            assert next(it, None) is None
        fresh.configure_engine(max_sessions=2)
        assert _engines_alive(old) == 0, end

    unread = fresh.stream_custom_voice("Hello.", speaker="ryan", **G)
    with pytest.raises(RuntimeError, match="busy"):
        fresh.configure_engine(max_sessions=3)
    unread.close()
    fresh.configure_engine(max_sessions=3)
    assert fresh.engine.max_sessions == 3


def test_a_stream_whose_session_a_direct_engine_step_ended_leaves_nothing_in_the_driver(fresh):
    """`model.engine` is public: a caller stepping it directly ends a dropped or closed stream's session without
    the driver seeing its last chunk. The driver then kept the stream's queue and id forever (one entry per such
    stream, found by a long-run probe: /tmp/h1/probe_driver_leak.py)."""
    driver = fresh._engine_driver()
    for end in ("break", "close"):
        it = fresh.stream_custom_voice("Hello.", speaker="ryan", **G)
        if end == "break":
            for _ in it:
                break
        while fresh.engine.has_work():   # the session runs to its end here (the reader is not reaped yet)
            fresh.engine.step()
        if end == "close":
            it.close()
        del it
        gc.collect()
        fresh.generate_custom_voice("Hi.", speaker="ryan", **G)   # reaps the dropped reader
        assert not driver._queues and not driver._abandoned and not driver._orphans, end


def test_a_voice_prompt_changed_in_place_after_add_neither_reaches_the_session_nor_poisons_the_shared_cache(
        model_factory):
    """The session shared the caller's ref_code tensor (on CPU `.to()` copies nothing) while its context-cache key
    was taken at add: a caller reusing its buffer after `add` made the engine store the decoder state of the NEW
    codes under the OLD codes' key, so every later session of the original voice, anyone's, streamed from a wrong
    context (found by /tmp/h1/probe_ref_mutation.py). The session now owns copies of the prompt's tensors."""
    import numpy as np
    import torch

    from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
    from qwen_tts_core.codec.context import codes_key
    from qwen_tts_core.voice_prompt import VoiceClonePromptItem

    m = model_factory("base", "tiny")
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 2048, (10, 16), generator=g)
    spk = torch.randn(m.cfg.talker.hidden_size, generator=g) * 0.1

    def run(mutate: bool) -> tuple[torch.Tensor, np.ndarray]:
        vp = VoiceClonePromptItem(ref_code=codes.clone(), ref_spk_embedding=spk.clone(), x_vector_only_mode=False,
                                  icl_mode=True, ref_text="A reference sentence.")
        eng = Engine(m, max_sessions=2)
        s = eng.add(SynthesisRequest(text="Hello there.", language="english", kind="voice_clone",
                                     voice_clone_prompt=vp, decode_audio=True,
                                     sampling=SamplingParams(do_sample=False, subtalker_dosample=False,
                                                             max_new_tokens=5)))
        if mutate:
            vp.ref_code.random_(0, 2048, generator=g)
            vp.ref_spk_embedding.mul_(-3)
        pcm = []
        while eng.has_work():
            pcm += [c.pcm for c in eng.step() if c.session_id == s.id]
        return s.codes(), np.concatenate(pcm)

    dec = m.codec.decoder
    dec.context_cache._entries.clear()
    dec.context_cache._bytes = 0
    mutated = run(mutate=True)
    held = dec.context_cache._entries.get(codes_key(codes))
    want = dec.context_cache._compute(dec, codes)
    assert held is not None and all(torch.equal(a, b) for a, b in zip(held._tensors(), want._tensors()))
    dec.context_cache._entries.clear()
    dec.context_cache._bytes = 0
    clean = run(mutate=False)
    assert torch.equal(mutated[0], clean[0]) and np.array_equal(mutated[1], clean[1])


def test_streams_released_while_running_then_ended_by_direct_engine_steps_are_forgotten(fresh):
    """As above, but the stream is closed (or broken out of) while its session runs, and a direct step ends it: the
    driver kept its queue and id in _abandoned forever, two entries per round of the long-run probe
    (/tmp/h1/probe_hygiene.py: 56 after 28 rounds)."""
    driver = fresh._engine_driver()
    for _ in range(3):
        for _ in fresh.stream_custom_voice("Hello.", speaker="ryan", **G):
            break
        it = fresh.stream_custom_voice("Hello.", speaker="ryan", **G)
        next(it)
        it.close()
        gc.collect()
        while fresh.engine.has_work():
            fresh.engine.step()
    fresh.generate_custom_voice("Hi.", speaker="ryan", **G)
    assert not driver._queues and not driver._abandoned and not driver._orphans


def _voice(m, seed: int, icl: bool):
    import torch

    from qwen_tts_core.voice_prompt import VoiceClonePromptItem

    g = torch.Generator().manual_seed(seed)
    return VoiceClonePromptItem(ref_code=torch.randint(0, 2048, (6 + seed, 16), generator=g) if icl else None,
                                ref_spk_embedding=torch.randn(m.cfg.talker.hidden_size, generator=g) * 0.1,
                                x_vector_only_mode=not icl, icl_mode=icl, ref_text="A reference." if icl else None)


def _request(kind: str, text: str, seed: int, frames: int, first: int, every: int, voice=None):
    from qwen_tts_core import SamplingParams, SynthesisRequest

    who = dict(kind="voice_clone", voice_clone_prompt=voice) if kind == "voice_clone" else \
        dict(kind="custom_voice", speaker="ryan")
    return SynthesisRequest(text=text, language="english", seed=seed, decode_audio=True, first_chunk_frames=first,
                            chunk_frames=every, sampling=SamplingParams(top_k=20, subtalker_top_k=20,
                                                                        max_new_tokens=frames), **who)


def _collect(eng, sessions, pcm) -> None:
    for c in eng.step():
        pcm.setdefault(c.session_id, []).append(c.pcm)


@pytest.mark.parametrize("kind", ["custom_voice", "voice_clone"])
def test_a_reused_slot_and_audio_row_give_what_a_fresh_engine_gives(model_factory, kind):
    """Sessions that take the KV slot and the streaming audio row another user's session just left (ended early,
    cancelled mid-chunk, or moved down by compaction) give the codes of a fresh engine bit for bit and its audio
    to < 1e-5 (CPU, the default device sampler). Voice clone: rows that held one voice's (ICL) context, then an
    x-vector voice (no context), then another ICL voice."""
    import numpy as np

    from qwen_tts_core import Engine

    m = model_factory("base" if kind == "voice_clone" else "custom_voice", "tiny")
    v = [_voice(m, i, icl=i != 1) for i in range(3)] if kind == "voice_clone" else [None] * 3
    reqs = {  # name: (request, step at which it is added)
        "a": _request(kind, "The first user speaks at length here.", 1, 14, 1, 3, v[0]),
        "b": _request(kind, "Short.", 2, 4, 2, 5, v[1]),
        "c": _request(kind, "Cancelled mid chunk.", 3, 14, 3, 4, v[2]),
        "d": _request(kind, "Good morning!", 4, 9, 1, 2, v[1]),
        "e": _request(kind, "It rained all day.", 5, 8, 2, 1, v[0]),
        "f": _request(kind, "Press one for sales.", 6, 7, 1, 4, v[2]),
    }
    eng = Engine(m, max_sessions=2)
    moves, real_move = [], eng.runner.move
    eng.runner.move = lambda *a: (moves.append(a), real_move(*a))[1]
    sess, pcm, at = {}, {}, {"a": 0, "b": 0, "c": 6, "d": 7, "e": 9, "f": 12}
    step = 0
    while step < 200 and (eng.has_work() or len(sess) < len(reqs)):
        for name, when in at.items():
            if when == step:
                sess[name] = eng.add(reqs[name])
        if step == 8:
            eng.cancel(sess["c"])
        _collect(eng, sess, pcm)
        step += 1
    assert not eng.has_work() and sorted(eng.free_slots) == [0, 1] and eng.audio.num_open == 0
    assert sess["c"].finish_reason == "cancelled" and moves   # (a session moved down to a freed slot too)
    for name in "def":
        alone_eng = Engine(m, max_sessions=2)
        alone = alone_eng.add(reqs[name])
        alone_pcm: dict = {}
        while alone_eng.has_work():
            _collect(alone_eng, [alone], alone_pcm)
        s = sess[name]
        assert s.finish_reason == alone.finish_reason and s.num_frames > 1, name
        assert np.array_equal(s.codes().numpy(), alone.codes().numpy()), name
        got, want = np.concatenate(pcm[s.id]), np.concatenate(alone_pcm[alone.id])
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5, name


def _kept_bytes(a) -> int:
    """Bytes an array keeps alive: those of the buffer at the root of its chain of views."""
    import numpy as np

    while isinstance(getattr(a, "base", None), np.ndarray):
        a = a.base
    return a.nbytes


def test_what_a_session_hands_out_keeps_only_its_own_bytes_alive(model_factory):
    """A chunk's PCM was a view of the step's decode of EVERY row, and each of a session's frames a view of the
    step's codes of every slot: a consumer keeping one session's chunks (the replica gathers a whole utterance's
    chunks; a slow client's queue) or a finished session kept that many times its own memory alive (x the rows
    decoded with it: 64 on a full GPU replica). Found by reading audio_stream.decode; measured here on 4 rows."""
    from qwen_tts_core import Engine

    m = model_factory("custom_voice", "tiny")
    eng = Engine(m, max_sessions=4)
    sessions = [eng.add(_request("custom_voice", f"Sentence number {i}.", i, 9, 2, 2)) for i in range(4)]
    chunks = []
    while eng.has_work():
        chunks += [c for c in eng.step() if c.pcm.size]
    assert len({c.session_id for c in chunks}) == 4
    for c in chunks:
        assert _kept_bytes(c.pcm) == c.pcm.nbytes, (c.session_id, _kept_bytes(c.pcm), c.pcm.nbytes)
    for s in sessions:
        assert s.num_frames > 1 and all(_kept_bytes(f) == f.nbytes for f in s.frames)


def test_a_huge_chunk_is_decoded_in_pieces_and_streams_what_small_chunks_stream(model_factory, monkeypatch):
    """first_chunk_frames / chunk_frames far above the utterance ("everything at the end") decoded the whole
    utterance in ONE decoder call at its end: activations grow with its length (tiny codec, 3000 frames: +984 MiB
    peak RSS against +33 MiB in 4-frame chunks, /tmp/h1/probe_big_chunk.py; the full-size decoder needs many times
    that), and on CUDA every row due in that step is padded to it. The frames are now decoded as they gather, in
    pieces of at most BatchedAudio.piece frames, and emitted together when the chunk is due: one chunk, the same
    samples (< 1e-5)."""
    import numpy as np

    from qwen_tts_core import Engine
    from qwen_tts_core.codec.rows import StreamRows

    m = model_factory("custom_voice", "tiny")
    lengths: list[int] = []
    real = StreamRows.decode
    monkeypatch.setattr(StreamRows, "decode", lambda self, rows, ns: (lengths.append(max(ns)), real(self, rows, ns))[1])

    def stream(first: int, every: int) -> list:
        eng = Engine(m, max_sessions=2)
        eng.audio.piece = 8
        s = eng.add(_request("custom_voice", "A somewhat longer sentence to speak here.", 9, 40, first, every))
        chunks = []
        while eng.has_work():
            chunks += [c for c in eng.step() if c.session_id == s.id]
        assert s.num_frames > 30
        return chunks

    small = stream(1, 4)
    lengths.clear()
    (big,) = stream(10**9, 10**9)
    assert max(lengths) <= 8 and big.is_last and big.frame_start == 0
    want = np.concatenate([c.pcm for c in small])
    assert big.num_frames * 1920 == big.pcm.size == want.size and np.abs(big.pcm - want).max() < 1e-5
    (one,) = stream(10**9, 10**9)  # again, on a row a piece-decoded session used
    assert np.array_equal(one.pcm, big.pcm)


def test_an_emit_callback_that_raises_ends_each_session_once_and_leaves_the_engine_as_new(model_factory):
    """step(emit=...) whose callback raises (a serving loop's bug) mid-step, between the code predictor and the
    talker step: the sessions of that step end once each with an error naming it, nothing after; slots and audio
    rows come back; cancelling them afterwards (twice) changes nothing; the next session gives a fresh engine's
    codes and audio."""
    import numpy as np

    from qwen_tts_core import Engine

    m = model_factory("custom_voice", "tiny")
    eng = Engine(m, max_sessions=2)
    sessions = [eng.add(_request("custom_voice", t, i, 10, 1, 2)) for i, t in enumerate(["One two.", "Three."])]
    lasts: dict = {}

    def take(chunks) -> None:
        for c in chunks:
            assert c.session_id not in lasts
            if c.is_last:
                lasts[c.session_id] = c

    take(eng.step())
    take(eng.step())

    def boom(chunks):
        take(chunks)
        raise RuntimeError("the callback failed")

    take(eng.step(emit=boom))
    while eng.has_work():
        take(eng.step())
    assert {s.id for s in sessions} == set(lasts)
    assert all(lasts[s.id].finish_reason == "error" and "callback failed" in lasts[s.id].error for s in sessions)
    for s in sessions:
        eng.cancel(s)
        eng.cancel(s)
    take(eng.step())
    assert sorted(eng.free_slots) == [0, 1] and eng.audio.num_open == 0 and not eng.has_work()

    def alone(engine):
        s, pcm = engine.add(_request("custom_voice", "Good morning!", 7, 8, 1, 3)), []
        while engine.has_work():
            pcm += [c.pcm for c in engine.step() if c.session_id == s.id]
        return s.codes().numpy(), np.concatenate(pcm)

    got, want = alone(eng), alone(Engine(m, max_sessions=2))
    assert np.array_equal(got[0], want[0]) and np.abs(got[1] - want[1]).max() < 1e-5


def test_a_step_interrupted_midway_fails_its_sessions_instead_of_going_on_with_wrong_codes(model_factory):
    """A KeyboardInterrupt (Ctrl-C reaches the thread that steps: generate_* on the main thread, a notebook's
    interrupt) after the runner drew a frame but before the sessions took it: the sessions went on and finished
    normally ("max_new_tokens") with codes other than their own, silently (/tmp/h1/probe_interrupt.py). Now the
    step fails the sessions it touched (error naming the interrupt, their last chunks handed to `emit`), the
    interrupt still propagates, and the engine serves the next session as a fresh one."""
    import numpy as np

    from qwen_tts_core import Engine

    m = model_factory("custom_voice", "tiny")
    eng = Engine(m, max_sessions=2)
    s = eng.add(_request("custom_voice", "Hello there, a longer one.", 3, 12, 1, 2))
    for _ in range(4):
        eng.step()
    real = eng.runner.step

    def interrupted(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    eng.runner.step = interrupted
    emitted = []
    try:
        with pytest.raises(KeyboardInterrupt):
            eng.step(emit=emitted.extend)
    finally:
        eng.runner.step = real
    assert s.finish_reason == "error" and "KeyboardInterrupt" in s.error
    assert [c.finish_reason for c in emitted if c.is_last] == ["error"]
    while eng.has_work():
        eng.step()
    assert sorted(eng.free_slots) == [0, 1] and eng.audio.num_open == 0

    def codes(engine):
        t = engine.add(_request("custom_voice", "Good morning!", 7, 8, 1, 3))
        while engine.has_work():
            engine.step()
        return t.codes().numpy()

    assert np.array_equal(codes(eng), codes(Engine(m, max_sessions=2)))


def test_a_static_cache_bigger_than_host_memory_is_refused_at_start_naming_its_settings(model_factory, monkeypatch):
    """On a GPU a static cache that cannot fit was already refused (mem_get_info); on the CPU it was allocated lazily
    (zeroed pages), so a replica with max_sessions x max_len beyond the host's memory started, then was OOM-killed
    under traffic as sessions grew. Now refused at start against MemAvailable, naming both settings; a cache that
    fits, and a host where the figure is unknown, start as before."""
    from qwen_tts_core.generate import engine as E

    cv = model_factory("custom_voice")
    t = cv.cfg.talker
    per_pos = (2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim + t.hidden_size) * 4   # fp32
    need = per_pos * 8 * 512
    monkeypatch.setattr(E, "host_memory_available", lambda: need)          # 90% of it is not enough
    with pytest.raises(ValueError, match=r"max_sessions=8 x max_len=512 needs .* free: lower max_sessions or max_len"):
        E.Engine(cv, max_sessions=8, max_len=512, static=True)
    E.Engine(cv, max_sessions=4, max_len=512, static=True)                 # half of it fits
    E.Engine(cv, max_sessions=8, max_len=512, static=False)                # a growing cache is not checked here
    monkeypatch.setattr(E, "host_memory_available", lambda: None)
    E.Engine(cv, max_sessions=8, max_len=512, static=True)


def test_host_memory_is_the_smaller_of_memavailable_and_the_cgroups_room(tmp_path):
    """In a container (a Kubernetes pod) /proc/meminfo shows the node's memory, not the pod's limit: the room left
    under a cgroup limit (limit less usage without inactive file pages, as the kubelet counts) bounds it too; an
    unlimited cgroup ("max", or v1's huge number) and unreadable or odd files do not."""
    from qwen_tts_core.generate.engine import host_memory_available

    gib = 1 << 30

    def root(name: str, files: dict[str, str]) -> str:
        base = tmp_path / name
        for rel, text in files.items():
            (base / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / rel).write_text(text)
        base.mkdir(exist_ok=True)
        return str(base)

    meminfo = {"proc/meminfo": f"MemTotal: {64 * gib // 1024} kB\nMemAvailable: {10 * gib // 1024} kB\n"}
    v2 = "sys/fs/cgroup/"
    assert host_memory_available(root("none", {})) is None
    assert host_memory_available(root("odd", {"proc/meminfo": "MemAvailable: lots kB\n"})) is None
    assert host_memory_available(root("host", meminfo)) == 10 * gib
    assert host_memory_available(root("v2", {**meminfo, v2 + "memory.max": f"{4 * gib}\n",
                                             v2 + "memory.current": f"{3 * gib}\n",
                                             v2 + "memory.stat": f"anon 1\ninactive_file {gib}\n"})) == 2 * gib
    assert host_memory_available(root("v2max", {**meminfo, v2 + "memory.max": "max\n",
                                                v2 + "memory.current": f"{3 * gib}\n"})) == 10 * gib
    assert host_memory_available(root("v2only", {v2 + "memory.max": f"{4 * gib}\n", v2 + "memory.current": "0\n"})) \
        == 4 * gib
    v1 = "sys/fs/cgroup/memory/"
    assert host_memory_available(root("v1", {**meminfo, v1 + "memory.limit_in_bytes": f"{8 * gib}\n",
                                             v1 + "memory.usage_in_bytes": f"{7 * gib}\n",
                                             v1 + "memory.stat": f"total_inactive_file {3 * gib}\n"})) == 4 * gib
    assert host_memory_available(root("v1huge", {**meminfo, v1 + "memory.limit_in_bytes": "9223372036854771712\n",
                                                 v1 + "memory.usage_in_bytes": f"{7 * gib}\n"})) == 10 * gib
    assert host_memory_available(root("full", {**meminfo, v2 + "memory.max": f"{gib}\n",
                                               v2 + "memory.current": f"{2 * gib}\n"})) == 0
