"""Qwen3TTSModel keeps one engine for its generate_* and stream_* calls: calls made at the same time share engine
steps (they are batched), an abandoned stream frees its slot, and a failed session raises instead of ending short."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from qwen_tts_core import Qwen3TTSModel

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=10)
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Press one for sales, two for support."]


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


def test_one_engine_behind_every_call(model):
    model.generate_custom_voice("Hello.", speaker="ryan", **G)
    eng = model.engine
    list(model.stream_custom_voice("Hello.", speaker="ryan", **G))
    model.generate_custom_voice(["Hi.", "Bye."], speaker="ryan", **G)
    assert model.engine is eng and not eng.has_work()


def test_concurrent_streams_are_batched_together(model):
    offline = [model.generate_custom_voice(t, speaker="vivian", non_streaming_mode=False, **G)[0][0] for t in TEXTS]
    eng = model.engine
    widths: list[int] = []
    real_step = eng.step

    def step(emit=None):
        widths.append(eng.num_active)
        return real_step(emit)

    eng.step = step
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def consume(i: int) -> None:
        it = model.stream_custom_voice(TEXTS[i], speaker="vivian", non_streaming_mode=False, chunk_frames=2, **G)
        start.wait()
        for pcm in it:
            got[i].append(pcm)

    try:
        threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        del eng.step
    assert max(widths) == 2  # both streams in the same engine steps
    for i in (0, 1):
        stream = np.concatenate(got[i])
        assert stream.shape == offline[i].shape and np.abs(stream - offline[i]).max() <= 1e-4


def test_abandoned_stream_frees_its_slot(model):
    it = model.stream_custom_voice(TEXTS[0], speaker="ryan", chunk_frames=1, **dict(G, max_new_tokens=40))
    next(it)
    it.close()
    (w,), _ = model.generate_custom_voice("Hello.", speaker="ryan", **G)  # steps the engine past the cancel
    assert len(w) == (G["max_new_tokens"] - 1) * 1920
    assert not model.engine.has_work() and model.engine.num_active == 0


def widest_step_of_a_call(model) -> int:
    """The most sessions any engine step held while one short call ran (1: nothing ran beside it)."""
    widths: list[int] = []
    real_step = model.engine.step
    model.engine.step = lambda emit=None: (widths.append(model.engine.num_active), real_step(emit))[1]
    try:
        model.generate_custom_voice("Hello.", speaker="ryan", **G)
    finally:
        del model.engine.step
    return max(widths)


def test_a_stream_dropped_before_its_first_chunk_is_cancelled(model):
    """An unstarted generator never runs its `finally`: the session it opened must still be cancelled, not run on
    the next caller's steps with its audio kept forever."""
    import gc

    it = model.stream_custom_voice(TEXTS[0], speaker="ryan", **dict(G, max_new_tokens=40))
    driver = model._engine_driver()
    assert len(driver._queues) == 1
    del it
    gc.collect()
    assert widest_step_of_a_call(model) == 1  # the orphan never ran beside the call
    assert not driver._queues and not driver._abandoned and not driver._orphans
    assert not model.engine.has_work() and model.engine.num_active == 0


def test_a_stream_closed_before_its_first_chunk_is_cancelled_while_still_held(model):
    """`close()` on a stream never read (a caller that changed its mind but keeps the object): a generator's own
    close() runs nothing then, so the session kept its slot and ran on the next caller's steps until the object was
    garbage-collected (review of the engine). The driver's own reader (`chunks`) had the same hole."""
    it = model.stream_custom_voice(TEXTS[0], speaker="ryan", **dict(G, max_new_tokens=40))
    driver = model._engine_driver()
    it.close()
    assert widest_step_of_a_call(model) == 1  # the closed stream never ran beside the call
    assert not driver._queues and not driver._abandoned and not model.engine.has_work()
    with pytest.raises(StopIteration):
        next(it)
    from qwen_tts_core import SamplingParams, SynthesisRequest

    s = driver.open(SynthesisRequest(text=TEXTS[1], language="english", kind="custom_voice", speaker="ryan",
                                     sampling=SamplingParams(**dict(G, max_new_tokens=40))))
    reader = driver.chunks(s)
    reader.close()
    assert widest_step_of_a_call(model) == 1 and s.cancelled and not driver._queues and not driver._abandoned
    assert it is not None and reader is not None   # (held all along: no garbage collection did it)


def test_a_stream_closed_from_another_thread_while_read_is_cancelled(model):
    """Review: close() while a reader thread was inside next() raised "generator already executing" and cancelled
    nothing (a web app reading in a worker thread, closing from another when its client left): the session ran to
    its end. Now close() cancels from any thread and the reading thread's loop ends."""
    import time

    it = model.stream_custom_voice(TEXTS[0], speaker="ryan", chunk_frames=1, **dict(G, max_new_tokens=300))
    real_step = model.engine.step

    def slow_step(emit=None):
        time.sleep(0.01)
        return real_step(emit)

    model.engine.step = slow_step
    got, errors, inside = [], [], threading.Event()

    def read() -> None:
        try:
            for pcm in it:
                got.append(len(pcm))
                inside.set()
        except BaseException as e:  # noqa: BLE001
            errors.append(repr(e))

    try:
        t = threading.Thread(target=read)
        t.start()
        assert inside.wait(30)
        it.close()
        t.join(30)
    finally:
        del model.engine.step
    assert not t.is_alive() and errors == [] and len(got) < 100
    assert not model.engine.has_work() and model.engine.num_active == 0
    assert not model._engine_driver()._queues


def test_a_batch_with_a_refused_item_leaves_none_of_its_items_running(model):
    """generate_* with a list: the items opened before a later one is refused were left in the engine, running to
    their end on other callers' steps, their audio kept in the driver forever."""
    with pytest.raises(ValueError, match="speaker"):
        model.generate_custom_voice(TEXTS, speaker=["vivian", "nobody"], **dict(G, max_new_tokens=40))
    driver = model._engine_driver()
    assert widest_step_of_a_call(model) == 1 and not driver._queues and not driver._abandoned


@pytest.mark.parametrize("value", ["2", None, 2.5, 0])
def test_stream_chunk_sizes_are_checked_naming_the_argument(model, value):
    with pytest.raises(ValueError, match="first_chunk_frames") as e:
        model.stream_custom_voice(TEXTS[0], speaker="ryan", first_chunk_frames=value, **G)
    assert e.value.field == "first_chunk_frames"


def test_failed_session_raises_naming_the_field(checkpoint_factory):
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    m.configure_engine(max_len=12)  # no prompt fits: each session fails when it starts
    with pytest.raises(ValueError, match="max_len") as e:
        m.generate_custom_voice(TEXTS[0], speaker="ryan", **G)
    assert e.value.field == "text"
    with pytest.raises(ValueError, match="max_len"):
        list(m.stream_custom_voice(TEXTS[0], speaker="ryan", **G))
    m.configure_engine(max_len=4096)
    (w,), _ = m.generate_custom_voice("Hi.", speaker="ryan", **G)
    assert w.size


def test_a_read_while_another_thread_closes_ends_cleanly():
    """Review: while thread B closed the reader (its generator's `finally` running in B), thread A's next() raised
    "generator already executing". The generator is now closed only by the thread that holds it: A's read ends.
    A stand-in engine whose cancel takes 50 ms holds B inside the close long enough to show it."""
    import time
    import types

    from qwen_tts_core.generate.driver import EngineDriver
    from qwen_tts_core.types import AudioChunk

    class Engine:
        def __init__(self):
            self.sessions = []

        def add(self, req):
            self.sessions.append(types.SimpleNamespace(id=len(self.sessions) + 1, cancelled=False, left=100))
            return self.sessions[-1]

        def cancel(self, s):
            s.cancelled = True
            time.sleep(0.05)

        def has_work(self):
            return any(s.left > 0 for s in self.sessions)

        def wait_for_work(self, t):
            return True

        def step(self, emit=None):
            out = []
            for s in self.sessions:
                if s.left > 0:
                    s.left = 0 if s.cancelled else s.left - 1
                    out.append(AudioChunk(s.id, np.zeros(4, np.float32), 0, 1, is_last=s.left == 0,
                                          finish_reason=("cancelled" if s.cancelled else "eos") if s.left == 0
                                          else None))
            return out

    driver = EngineDriver(Engine())
    reader = driver.chunks(driver.open(None))
    next(reader)
    closer = threading.Thread(target=reader.close)
    closer.start()
    time.sleep(0.075)
    with pytest.raises(StopIteration):
        next(reader)
    closer.join(10)
    driver._deliver(driver.engine.step())   # the next step (anyone's) ends the cancelled session: nothing kept
    assert not closer.is_alive() and not driver._queues and not driver._abandoned


@pytest.mark.parametrize("bad", [dict(max_sesions=4), dict(max_sessions=0), dict(guard_frames_per_token=float("nan"))])
def test_configure_engine_refuses_bad_options_and_keeps_the_working_engine(checkpoint_factory, bad):
    """Review: a typo or a bad value was stored unchecked and the working engine dropped; every later call then
    failed (TypeError / ValueError at the next engine build) until options were fixed. Now configure_engine builds
    the engine itself: the refusal names the argument there, and the engine and options stay as they were."""
    import functools
    import gc
    import weakref

    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu")
    m.configure_engine(max_sessions=2)
    engine, options = m.engine, dict(m.engine_options)
    with pytest.raises((TypeError, ValueError), match=next(iter(bad))):
        m.configure_engine(**bad)
    assert m.engine is engine and m.engine_options == options
    (w,), _ = m.generate_custom_voice("Hi.", speaker="ryan", **G)
    assert w.size
    # a good one lets the old engine go before the next is built (second review: building the new one first held
    # two engines' caches, and on a GPU their graphs, at once)
    from qwen_tts_core.generate.engine import Engine

    old, alive_at_build = weakref.ref(engine), []
    del engine
    init = Engine.__init__

    @functools.wraps(init)
    def spy(self, *a, **k):
        gc.collect()
        alive_at_build.append(old() is not None)
        init(self, *a, **k)

    Engine.__init__ = spy
    try:
        m.configure_engine(max_sessions=3)
        assert m.engine.max_sessions == 3
    finally:
        Engine.__init__ = init
    assert alive_at_build == [False]
