"""Without CUDA graphs, a chunk that is due after the code predictor is decoded before the talker step, and
`Engine.step(emit=...)` hands it over then: first audio (and every chunk) one talker step sooner, same samples. With
graphs, a first chunk is."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate.graphs import GraphCapture

G = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=14)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Press one for sales.", "Good morning!"]


def req(text: str, **kw) -> SynthesisRequest:
    kw.setdefault("sampling", G)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english", **kw)


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


def _events(eng: Engine, monkeypatch) -> list[tuple]:
    events: list[tuple] = []
    real = eng.runner._run

    def run(key, *a):  # a step body, eager or replayed
        if key[0] == "talker":
            events.append(("talker", eng.steps))
        return real(key, *a)

    monkeypatch.setattr(eng.runner, "_run", run)
    decode = eng.audio.decode

    def decoded():
        outs = decode()
        if any(o.num_frames for o in outs):
            events.append(("decode", eng.steps))
        return outs

    monkeypatch.setattr(eng.audio, "decode", decoded)
    return events


def _run(eng: Engine, sessions, events: list | None = None) -> dict[int, list]:
    got: dict[int, list] = {s.id: [] for s in sessions}

    def take(chunks):
        for c in chunks:
            got[c.session_id].append(c)
            if events is not None and c.num_frames:
                events.append(("chunk", eng.steps, c.session_id, c.frame_start))

    while not all(s.done for s in sessions):
        take(eng.step(emit=take))
    return got


def test_the_first_chunk_is_emitted_before_the_talker_step_of_its_step(model, monkeypatch):
    eng = Engine(model, max_sessions=1)
    events = _events(eng, monkeypatch)
    (s,) = sessions = [eng.add(req(TEXTS[0], first_chunk_frames=1, chunk_frames=4))]
    _run(eng, sessions, events)
    first = events.index(next(e for e in events if e[0] == "chunk"))
    assert events[:first + 2] == [("decode", 0), ("chunk", 0, s.id, 0), ("talker", 0)], events[:4]
    # every later chunk too: it comes before the talker step of the step that completed it
    for i, e in enumerate(events):
        if e[0] == "chunk" and i + 1 < len(events) and events[i + 1][0] == "talker":
            assert events[i + 1][1] == e[1]
    assert s.finish_reason == "max_new_tokens"


def test_chunks_are_the_same_with_emit_without_it_and_as_the_offline_decode(model):
    outs = []
    for use_emit in (True, False):
        eng = Engine(model, max_sessions=3)
        sessions = [eng.add(req(t, first_chunk_frames=1 + i, chunk_frames=3 + i)) for i, t in enumerate(TEXTS)]
        if use_emit:
            got = _run(eng, sessions)
        else:
            got = {s.id: [] for s in sessions}
            while not all(s.done for s in sessions):
                for c in eng.step():
                    got[c.session_id].append(c)
        for s in sessions:
            chunks = got[s.id]
            assert sum(c.is_last for c in chunks) == 1 and chunks[-1].is_last
            starts = [c.frame_start for c in chunks if c.num_frames]
            assert starts == sorted(starts) and sum(c.num_frames for c in chunks) == s.num_frames
        outs.append([np.concatenate([c.pcm for c in got[s.id]]) for s in sessions])
    for a, b in zip(*outs):
        assert np.array_equal(a, b)
    for s, pcm in zip(sessions, outs[0]):
        (offline,) = model.codec.decode([s.codes()])
        assert pcm.shape == offline.shape and np.abs(pcm - offline).max() <= 1e-4


def test_a_guard_stop_between_the_two_halves_still_ends_with_its_audio(model):
    eng = Engine(model, max_sessions=2, guard_frames_per_token=0.01, guard_base_frames=5)
    sessions = [eng.add(req(t, first_chunk_frames=2, chunk_frames=2)) for t in TEXTS[:2]]
    got = _run(eng, sessions)
    for s in sessions:
        assert s.finish_reason == "guard"
        assert sum(c.num_frames for c in got[s.id]) == s.num_frames == s.max_frames
        assert sum(len(c.pcm) for c in got[s.id]) == s.num_frames * 1920


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_decode_failure_between_the_halves_fails_those_sessions_visibly_and_frees_them(model, monkeypatch, graphs):
    """A decode call raises (eager: the second; graphs: the first, which decodes the first chunks between the code
    predictor and the talker replay): both sessions end with an error chunk, slots and audio rows are freed, and the
    next request runs."""
    eng = Engine(model, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True)) if graphs \
        else Engine(model, max_sessions=2)
    real, calls = eng.audio.decode, []

    def broken():
        calls.append(1)
        if len(calls) == (1 if graphs else 2):
            raise RuntimeError("simulated codec failure")
        return real()

    monkeypatch.setattr(eng.audio, "decode", broken)
    sessions = [eng.add(req(t, first_chunk_frames=1, chunk_frames=1)) for t in TEXTS[:2]]
    got = _run(eng, sessions)
    for s in sessions:
        assert s.finish_reason == "error" and "simulated codec failure" in s.error
        assert got[s.id][-1].is_last and got[s.id][-1].error
    assert sorted(eng.free_slots) == [0, 1] and eng.audio.num_open == 0
    monkeypatch.setattr(eng.audio, "decode", real)
    (again,) = [eng.add(req(TEXTS[2]))]
    _run(eng, [again])
    assert again.finish_reason == "max_new_tokens"


def test_with_graphs_only_a_first_chunk_is_decoded_before_the_talker_step(model, monkeypatch):
    """The graph path (the CPU stand-in here): a step that completes a session's first chunk decodes it between the
    code predictor and the talker step (a second read in that step only: time to first audio); every other step runs
    the talker before the decode, with one read (the talker is a few ms on a GPU; a read a step would cost more than
    it saves there). A second session's first chunk, due while the first streams, gets the same."""
    eng = Engine(model, max_sessions=2, max_len=128, graph_capture=GraphCapture("cpu", fake=True))
    events = _events(eng, monkeypatch)
    reads = []
    real_read = eng.runner._read
    monkeypatch.setattr(eng.runner, "_read", lambda B: reads.append(eng.steps) or real_read(B))
    a = eng.add(req(TEXTS[0], first_chunk_frames=1, chunk_frames=2))
    got: dict[int, list] = {}

    def take(chunks):
        for c in chunks:
            got.setdefault(c.session_id, []).append(c)
            if c.num_frames:
                events.append(("chunk", eng.steps, c.session_id, c.frame_start))

    for _ in range(3):
        take(eng.step(emit=take))
    b = eng.add(req(TEXTS[1], first_chunk_frames=2, chunk_frames=2))
    while not (a.done and b.done):
        take(eng.step(emit=take))
    firsts = {next(e[1] for e in events if e[0] == "chunk" and e[2] == s.id) for s in (a, b)}
    assert len(firsts) == 2
    for step in range(eng.steps):
        mine = [e[0] for e in events if e[1] == step and e[0] != "chunk"]
        if step in firsts:
            assert mine[:2] == ["decode", "talker"], (step, mine)  # the first chunk before that step's talker
            assert reads.count(step) == 2
        elif "decode" in mine and "talker" in mine:
            assert mine.index("talker") < mine.index("decode"), (step, mine)
            assert reads.count(step) == 1
    assert sum(reads.count(i) == 2 for i in range(eng.steps)) == 2  # a second read in those two steps only
    for s in (a, b):
        assert sum(c.num_frames for c in got[s.id]) == s.num_frames and got[s.id][-1].is_last
