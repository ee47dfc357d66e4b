"""One memory pool for every graph of an engine (`torch.cuda.graph_pool_handle()` on CUDA): a graph captured later
may take the blocks an earlier one freed (its intermediates, any output its caller dropped), so replaying the
earlier graph may overwrite what the later one holds, its static outputs included. PyTorch documents sharing a pool
as safe only for graphs replayed in capture order; the engine replays its step, prefill and audio graphs in any
order. The CPU stand-in models the worst case (a replay poisons the capture-time tensors of every graph captured
after it in the pool), so the whole graph path runs against it in CI. These tests check the model itself and that a
graph engine, talker, code predictor, prefill and audio decoder replaying in the orders real traffic makes, gives
exactly what the eager engine gives under it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
from qwen_tts_core.generate import graphs as graphs_mod
from qwen_tts_core.generate.graphs import FakeCUDAGraph, FakePool, GraphCapture, fake_graph

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=12)
TEXTS = ["Hello world.", "The quick brown fox jumps over the lazy dog.", "Good morning!"]


def _two_graphs(pool):
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([5.0, 6.0])
    a, b = FakeCUDAGraph(), FakeCUDAGraph()
    with fake_graph(a, pool=pool):
        out_a = x * 2
    with fake_graph(b, pool=pool):
        out_b = y + 1
    return a, b, out_a, out_b


def test_a_replay_poisons_what_graphs_captured_after_it_in_the_pool_hold():
    a, b, out_a, out_b = _two_graphs(FakePool())
    a.replay()
    b.replay()
    assert out_a.tolist() == [2.0, 4.0] and out_b.tolist() == [6.0, 7.0]  # replayed in capture order: both stand
    a.replay()
    assert out_a.tolist() == [2.0, 4.0]
    assert torch.isnan(out_b).all()     # b may sit in blocks a freed: a's replay may have overwritten it
    b.replay()
    assert out_b.tolist() == [6.0, 7.0] and out_a.tolist() == [2.0, 4.0]  # a's output was alive when b was captured


def test_graphs_in_pools_of_their_own_never_touch_each_other():
    a, b, out_a, out_b = _two_graphs(None)
    b.replay()
    a.replay()
    assert out_a.tolist() == [2.0, 4.0] and out_b.tolist() == [6.0, 7.0]


def test_a_reset_graph_leaves_the_pool():
    pool = FakePool()
    a, b, out_a, out_b = _two_graphs(pool)
    b.replay()
    a.reset()
    assert pool.graphs == [b] and pool.after(a) == []


@pytest.fixture(scope="module")
def model(model_factory):
    return model_factory("custom_voice", "tiny")


def test_a_graph_engine_shares_one_pool_and_is_exact_under_it(model, monkeypatch):
    """Sessions joining and leaving (batch buckets 1 -> 2 -> 3 -> 2 -> 1), prefills between steps, streamed audio
    decoded in its own graphs: every graph the engine captured is in its one pool, earlier graphs' replays did
    poison later graphs' tensors during the run, and codes and audio equal the eager engine's."""
    poisoned = {"n": 0}
    real_after = FakePool.after

    def counting_after(self, g):
        later = real_after(self, g)
        poisoned["n"] += bool(later)
        return later

    monkeypatch.setattr(graphs_mod.FakePool, "after", counting_after)
    capture = GraphCapture("cpu", fake=True)
    eng = Engine(model, max_sessions=4, max_len=128, graph_capture=capture)
    assert eng.audio_graphs and len(capture.pool.graphs) == len(capture.graphs) > 10
    rs = [SynthesisRequest(kind="custom_voice", text=t, speaker="ryan", language="english", sampling=GREEDY,
                           first_chunk_frames=1, chunk_frames=3) for t in TEXTS]
    got = {}
    sessions = [eng.add(rs[0])]
    steps = 0
    while not all(s.done for s in sessions) or len(sessions) < len(rs):
        if steps in (2, 4):                      # late arrivals: a prefill between steps of running sessions
            sessions.append(eng.add(rs[len(sessions)]))
        for c in eng.step():
            got.setdefault(c.session_id, []).append(c)
        steps += 1
    assert poisoned["n"] > 0                     # the model was exercised, not only installed
    eager = Engine(model, max_sessions=4, max_len=128)
    for s, r in zip(sessions, rs):
        ref = eager.run_all([r])[0]
        assert torch.equal(s.codes(), ref.codes())
        pcm = np.concatenate([c.pcm for c in got[s.id]])
        off = model.generate_custom_voice(r.text, speaker="ryan", language="english", non_streaming_mode=False,
                                          do_sample=False, subtalker_dosample=False, max_new_tokens=12)[0][0]
        assert pcm.shape == off.shape and np.abs(pcm - off).max() <= 1e-4
