"""The engine as a state machine (Hypothesis): random interleavings of what callers do to one long-lived engine
(add whole or incremental requests, greedy or seeded, interactive or bulk, with or without audio; append text,
end it, cancel; step) on the eager engine and on the graph engine with the CPU CUDA-graph stand-in.

Whatever the order, every session ends with exactly one last chunk and nothing after it; a session that finished
(eos or max_new_tokens) has exactly the codes of its request run alone (its text: what the engine accepted); its
streamed audio is the offline decode of those codes (<= 1e-4); misuse is refused with RequestError, never
silently dropped; slots never exceed max_sessions; and once drained the engine holds nothing, ready for the next
caller (the engines are shared by every example)."""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from qwen_tts_core import AudioChunk, Engine, EngineBusy, SamplingParams, SynthesisRequest
from qwen_tts_core.errors import RequestError, SessionEnded
from qwen_tts_core.generate.graphs import GraphCapture

TEXTS = ["Hello world.", "Good morning!", "Press one for sales.", "It rained."]
PIECES = ["Hel", "lo ", "world", ".", " Good", " morning!", "你", "好。"]
SLOTS, QUEUE = 3, 3


def request(text: str | None, seed: int | None, frames: int, priority: str, audio: bool, chunk: int,
            voice=None) -> SynthesisRequest:
    """A CustomVoice request (speaker vivian), or a Base one when `voice` is a voice clone prompt."""
    sampling = SamplingParams(do_sample=seed is not None, subtalker_dosample=seed is not None, top_k=20,
                              subtalker_top_k=20, max_new_tokens=frames)
    kind = dict(kind="voice_clone", voice_clone_prompt=voice) if voice is not None else \
        dict(kind="custom_voice", speaker="vivian")
    return SynthesisRequest(text=text, language="english", sampling=sampling, seed=seed, priority=priority,
                            decode_audio=audio, first_chunk_frames=1, chunk_frames=chunk, **kind)


@dataclass
class Track:
    session: object
    request: SynthesisRequest
    pieces: list[str] = field(default_factory=list)   # incremental text the engine accepted
    ended: bool = False                                 # end_text accepted
    cancelled: bool = False
    chunks: list[AudioChunk] = field(default_factory=list)


def machine(model, engine: Engine, alone: dict, stats: Counter, voices: tuple = (None,)):
    """A state machine class over `engine` (shared: left drained by every example); `alone` caches solo codes;
    `stats` counts what the examples did (so a run that checked nothing shows); `voices`: what requests speak with
    (None: CustomVoice's speaker; Base: voice clone prompts)."""

    class EngineMachine(RuleBasedStateMachine):
        sessions = Bundle("sessions")

        @initialize()
        def clean(self) -> None:
            assert not engine.has_work() and sorted(engine.free_slots) == list(range(SLOTS))
            self.tracks: dict[int, Track] = {}

        @rule(target=sessions, text=st.sampled_from([None, *TEXTS]), seed=st.none() | st.integers(0, 3),
              frames=st.integers(1, 9), priority=st.sampled_from(["interactive", "bulk"]), audio=st.booleans(),
              chunk=st.integers(1, 4), voice=st.sampled_from(range(len(voices))))
        def add(self, text, seed, frames, priority, audio, chunk, voice):
            r = request(text, seed, frames, priority, audio, chunk, voices[voice])
            queued = engine.num_queued
            try:
                s = engine.add(r)
            except EngineBusy:
                assert queued >= QUEUE, "busy with room in the queue"
                return multiple()
            except RequestError as e:   # incremental text with an ICL prompt (its transcript leads the text)
                assert text is None and voices[voice].icl_mode and e.field == "text", e
                stats["refused"] += 1
                return multiple()
            self.tracks[s.id] = Track(s, r)
            return s.id

        @rule(sid=sessions, piece=st.sampled_from(PIECES))
        def append(self, sid, piece):
            t = self.tracks[sid]
            try:
                t.session.append_text(piece)
            except SessionEnded:
                assert t.session.done or t.cancelled, "refused text of a live session"
                return
            except RequestError as e:
                assert t.request.text is not None or t.ended, e
                return
            assert t.request.text is None and not t.ended and not t.session.done and not t.cancelled
            t.pieces.append(piece)

        @rule(sid=sessions)
        def end(self, sid):
            t = self.tracks[sid]
            try:
                t.session.end_text()
            except SessionEnded:
                assert t.session.done or t.cancelled
                return
            except RequestError as e:
                assert t.request.text is not None or t.ended, e
                return
            t.ended = True

        @rule(sid=sessions)
        def cancel(self, sid):
            engine.cancel(self.tracks[sid].session)
            self.tracks[sid].cancelled = True

        @rule(n=st.integers(1, 4))
        def step(self, n):
            for _ in range(n):
                self._step()

        def _step(self) -> None:
            for c in engine.step():
                t = self.tracks[c.session_id]
                assert not (t.chunks and t.chunks[-1].is_last), f"a chunk after the last of session {c.session_id}"
                t.chunks.append(c)

        @invariant()
        def slots(self) -> None:
            assert engine.num_active <= SLOTS and len(engine.free_slots) + engine.num_active == SLOTS

        def teardown(self) -> None:
            for t in self.tracks.values():  # let every open text end, then drain
                if t.request.text is None and not t.ended:
                    with contextlib.suppress(RequestError):
                        t.session.end_text()
            for _ in range(500):
                if not engine.has_work():
                    break
                self._step()
            assert not engine.has_work() and sorted(engine.free_slots) == list(range(SLOTS)), "the engine holds"
            for sid, t in self.tracks.items():
                self._check(sid, t)

        def _check(self, sid: int, t: Track) -> None:
            s = t.session
            stats[f"{'incremental' if t.request.text is None else 'whole'} {s.finish_reason}"] += 1
            lasts = [c for c in t.chunks if c.is_last]
            assert len(lasts) == 1 and t.chunks[-1].is_last, f"session {sid}: {len(lasts)} last chunks"
            assert s.done and s.finish_reason == lasts[0].finish_reason
            if s.finish_reason == "cancelled":
                assert t.cancelled
            if s.finish_reason == "error":
                stats[f"error: {lasts[0].error[:60]}"] += 1
                assert lasts[0].error and lasts[0].error_field == "text", lasts[0]   # only blank incremental text
                return
            if s.finish_reason not in ("eos", "max_new_tokens"):
                return
            text = t.request.text if t.request.text is not None else "".join(t.pieces)
            r = t.request
            vp = r.voice_clone_prompt
            key = (text, r.seed, r.sampling.max_new_tokens, id(vp))
            if key not in alone:
                solo = request(text, r.seed, r.sampling.max_new_tokens, "interactive", False, 1, vp)
                alone[key] = Engine(model, max_sessions=1).run_all([solo])[0].codes()
            codes = s.codes()
            assert torch.equal(codes, alone[key]), f"session {sid} ({text!r}, seed {r.seed}): codes differ from alone"
            stats["codes checked"] += 1
            if r.decode_audio and len(codes):
                stats["audio checked"] += 1
                pcm = np.concatenate([c.pcm for c in t.chunks])
                offline = model.decode_codes([codes], [vp.ref_code if vp is not None and vp.icl_mode else None])[0]
                assert pcm.shape == offline.shape and np.abs(pcm - offline).max() <= 1e-4, f"session {sid} audio"

    return EngineMachine


SETTINGS = settings(max_examples=50, stateful_step_count=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


@pytest.fixture(scope="module")
def alone() -> dict:
    return {}


def _run(model, engine: Engine, alone: dict, voices: tuple = (None,), least: dict[str, int] | None = None) -> None:
    """Run the machine; then check the examples reached every kind of ending asked for (`least`: at least this
    many of these counts)."""
    stats: Counter = Counter()
    run_state_machine_as_test(machine(model, engine, alone, stats, voices), settings=SETTINGS)
    print(dict(stats))
    for what, n in {"codes checked": 20, "audio checked": 5, "whole cancelled": 1, **(least or {})}.items():
        assert stats[what] >= n, (what, dict(stats))


@pytest.mark.slow
def test_any_interleaving_on_the_eager_engine(model, alone):
    _run(model, Engine(model, max_sessions=SLOTS, max_queue=QUEUE), alone, least={"incremental max_new_tokens": 1})


@pytest.mark.slow
def test_any_interleaving_on_the_graph_engine(model, alone):
    engine = Engine(model, max_sessions=SLOTS, max_queue=QUEUE, max_len=128,
                    graph_capture=GraphCapture("cpu", fake=True), audio_chunk_frames=(1, 2, 3, 4))
    _run(model, engine, alone, least={"incremental max_new_tokens": 1})


@pytest.mark.slow
def test_any_interleaving_of_voice_clones_on_the_graph_engine(model_factory, ref_wav_path):
    """Base: ICL prompts (the reference's codes are the codec rows' left context) and x-vector-only prompts."""
    base = model_factory("base", "tiny")
    icl = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="A short reference sentence.")[0]
    xvec = base.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)[0]
    engine = Engine(base, max_sessions=SLOTS, max_queue=QUEUE, max_len=256,
                    graph_capture=GraphCapture("cpu", fake=True), audio_chunk_frames=(1, 2, 3, 4))
    _run(base, engine, {}, (icl, xvec), least={"refused": 1})
