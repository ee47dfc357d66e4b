"""The compiled step bodies and the CUDA-graph stand-in, pinned by a mutation review
(qwen_tts_core/generate/compiled.py, graphs.py; the compiled-op side of model/layers.py; generate/step.py's prefill):
each test here failed on a one-line change (a "mutant") that the rest of the suite let pass, or passed only after
minutes (a body re-traced at every step), named in its docstring.

No test here runs inductor, so the file takes about a second where tests/core/test_compiled_step.py (the engine's real
bodies, compiled once for its module) takes minutes: a `CompiledBody` is given a stand-in `compiled` callable, or
compiles a few-op function through dynamo with inductor replaced by the traced graph (`traced_only`: tracing, guards,
recompiles and the graph count are torch's own). The stand-in's contract is checked on a few tensors; the engine under
it is tests/core/test_graphs.py's. A tiny random talker from `make_config` on CPU; no checkpoint, no Ray. (M67, a
linear keyed on `is_compiling()`, is pinned by test_compiled_step.py's test of a product on another thread.)"""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core.config import make_config
from qwen_tts_core.generate.compiled import CompiledBody
from qwen_tts_core.generate.graphs import (
    CaptureError,
    FakeCUDAGraph,
    GraphCapture,
    OpCounter,
    fake_graph,
)
from qwen_tts_core.generate.step import prefill
from qwen_tts_core.model.talker import Talker


def test_a_body_that_failed_to_compile_never_tries_again(monkeypatch):
    """P15 C03: a body whose compile failed runs eagerly from then on without another try. Retrying re-traces the
    whole step body every step (seconds each on a CPU, minutes in test_compiled_step's fallback test) to fail again:
    the same numbers, at a fraction of the eager speed."""
    tries = []

    def failing(*args):
        tries.append(args)
        raise torch._dynamo.exc.TorchDynamoException("no C++ compiler here")

    b = CompiledBody(lambda x: x + 1, "test")
    monkeypatch.setattr(b, "compiled", failing)
    assert [b(1), b(2), b(3)] == [2, 3, 4]
    assert b.broken and tries == [(1,)]


@pytest.fixture
def traced_only(monkeypatch):
    """`CompiledBody`'s backend (`compiled._inductor`: counts the graph, then hands it to inductor) with inductor
    replaced by the traced graph run as is: dynamo's tracing, guards and recompiles stay, no code is generated."""
    monkeypatch.setattr(torch._dynamo, "lookup_backend", lambda name: lambda gm, example_inputs: gm.forward)


def test_one_graph_serves_every_batch_and_length_even_from_equal_sizes(traced_only):
    """P23 C06 P20: a body is compiled once for symbolic sizes (`graphs` counts it: tests and the engine's build
    watch it): sizes equal at the first call (two rows, two positions) get symbols of their own (no duck sizing), so
    later unequal ones reuse the graph. A recompile mid-traffic stalls every session for as long as a build."""
    b = CompiledBody(lambda x, y: (x * y).sum(-1), "test")
    for rows, n in ((2, 2), (3, 2), (2, 5), (7, 3)):
        x, y = torch.ones(rows, n), torch.arange(float(n))
        assert torch.equal(b(x, y), (x * y).sum(-1))
    assert b.graphs == 1 and not b.broken


def test_a_body_with_a_graph_break_runs_eagerly_from_untouched_state(traced_only):
    """C05: a body is traced whole (fullgraph): one that cannot be is a compile error before any of it ran, and runs
    eagerly from then on, once. Traced in pieces, the pieces run as graphs of their own (an error in a later piece
    would find the first one's writes done: the eager retry would apply them twice)."""
    def body(x):
        x.add_(1)
        torch._dynamo.graph_break()
        x.mul_(2)

    b = CompiledBody(body, "test")
    x = torch.zeros(2)
    b(x)
    assert b.broken and b.graphs == 0 and x.tolist() == [2.0, 2.0]


def test_a_prefill_reads_only_its_prompts_positions():
    """P12: `step.prefill` of T positions reads T keys back, so it fits a static cache of exactly T positions (a
    caller of the model's API: the runner keeps one spare position); reading T + 1 refused it with a ValueError."""
    torch.manual_seed(0)
    talker = Talker(make_config("custom_voice", "tiny").talker, max_positions=64).eval()
    T, C = 6, talker.cfg.hidden_size
    embeds = torch.randn(2, T, C)
    slots, last = torch.tensor([1, 0]), torch.tensor([T - 1, T - 3])
    with torch.no_grad():
        want = prefill(talker, talker.new_cache(2, 32), slots, embeds, last)
        got = prefill(talker, talker.new_cache(2, T, static=True), slots, embeds, last)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6)


# --- the CUDA-graph stand-in (graphs.py) ------------------------------------------------------------------------
def test_the_stand_in_poisons_what_it_allocated_while_capturing_in_every_dtype():
    """G02 G03: after capture, before the replay that writes them, tensors the graph allocated hold garbage of their
    dtype: NaN, True, half the integer minimum (255 for uint8). Zeros (or False) would read as a plausible id, position
    or mask, and code reading an output too early would go unseen."""
    x = torch.tensor([1.0, -2.0, 3.0])
    g = FakeCUDAGraph()
    with fake_graph(g):
        pos = x > 0
        ids = x.long() + 1
        small = pos.to(torch.int32)
        byte = pos.to(torch.uint8)
        half = x * 2
    assert pos.all() and torch.isnan(half).all()
    assert (ids == torch.iinfo(torch.int64).min // 2).all() and (small == torch.iinfo(torch.int32).min // 2).all()
    assert (byte == 255).all()
    g.replay()
    assert pos.tolist() == [True, False, True] and ids.tolist() == [2, -1, 4] and small.tolist() == [1, 0, 1]
    assert byte.tolist() == [1, 0, 1] and half.tolist() == [2.0, -4.0, 6.0]


def test_an_in_place_op_counts_as_a_kernel_and_a_view_or_an_allocation_as_none():
    """G01 G22: `launches` (the GPU kernel count CPU runs budget) counts an op that writes in place (a copy, a fill,
    index_put_: most of a step's state updates) as one kernel; views and allocations count none."""
    t = torch.zeros(4)
    with OpCounter() as c:
        t.add_(1)
        t[:2].view(2, 1)
        torch.empty(3)
    assert c.kernels == 1 and dict(c.by_name) == {"aten::add_": 1} and c.ops == 4


def test_a_stand_in_graph_is_captured_once():
    """G11: as a CUDAGraph, a captured graph refuses a second capture (it would append a second body to the tape: one
    replay running both)."""
    x = torch.ones(2)
    g = FakeCUDAGraph()
    with fake_graph(g):
        y = x * 2
    with pytest.raises(RuntimeError, match="already been captured"):
        g.capture_begin()
    g.replay()
    assert y.tolist() == [2.0, 2.0] and g.num_ops == 1


def test_a_graph_captured_in_inference_mode_replays_outside_it():
    """G10: a CUDA graph's replay is a launch, whatever autograd mode the caller is in; the stand-in replays its tape in
    the mode it was captured in (here inference mode, where its outputs are inference tensors that only inference
    mode may write), not in the caller's, or it fails where a GPU does not."""
    x = torch.ones(2)
    g = FakeCUDAGraph()
    with torch.inference_mode(), fake_graph(g):
        y = x * 2
    x.fill_(3)
    g.replay()
    assert y.tolist() == [6.0, 6.0]


def test_the_stand_in_capture_warms_up_as_the_cuda_path_does():
    """G14: `GraphCapture.capture` runs the body `warmup` times before it records it, on the stand-in as on CUDA: a
    buffer a body makes on its first call (lazy state) then exists before the capture, outside the graph's pool, as
    it does on a GPU; made during the capture it would be poisoned between replays on CPU only."""
    calls, lazy = [], {}

    def body():
        calls.append(len(calls))
        if "buf" not in lazy:
            lazy["buf"] = torch.full((2,), 5.0)
        lazy["buf"].add_(1)

    g = GraphCapture("cpu", fake=True, warmup=2).capture(body)
    assert calls == [0, 1, 2] and lazy["buf"].tolist() == [8.0, 8.0]
    g.replay()
    assert lazy["buf"].tolist() == [9.0, 9.0]


@pytest.mark.parametrize("body", [lambda t: t.cpu(), lambda t: t.to("cpu"),
                                  lambda t: t.__setitem__(torch.tensor([1]), 0.5)],
                         ids=["cpu", "to-cpu", "float-through-index"])
def test_the_stand_in_refuses_more_host_copies_while_capturing(body):
    """G18 G19 G20: `.cpu()`, `.to("cpu")` (a device-to-host copy) and a Python float assigned through a tensor index
    (a blocking host-to-device copy on CUDA) fail a capture on the stand-in as on a GPU; on CPU they copy nothing, so
    without the check a body doing them passes CI and fails its first capture on a GPU."""
    t = torch.ones(4)
    with pytest.raises(CaptureError, match="host"), fake_graph(FakeCUDAGraph()):
        body(t * 2)


def test_a_graph_that_captured_nothing_refuses_to_replay():
    """G21: a capture that recorded no op (a body whose work ran before the capture, or on other tensors than it
    should) is an error at its replay, not a silent no-op step."""
    g = FakeCUDAGraph()
    with fake_graph(g):
        pass
    with pytest.raises(RuntimeError, match="captured nothing"):
        g.replay()
