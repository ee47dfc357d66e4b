"""GPU-path review (benchmarks/gpu_check.sh's first real run): what a CUDA graph refuses that the CPU stand-in
(graphs.FakeCUDAGraph) lets through.

On a CUDA tensor, a Python scalar assigned through a tensor index (`t[idx] = 1`, `t[idx, ids] = True`) becomes a
0-dim CPU tensor that index_put_ copies to the device with a blocking copy (cudaMemcpyAsync + cudaStreamSynchronize,
torch 2.11; later torch dispatches such scalars to fill kernels). Inside a capture that sync is "operation not
permitted when stream is capturing": the graph, and the engine that captures it at construction, fail. On CPU the
scalar is already on the tensor's device, so nothing synced and the stand-in recorded the op happily. The stand-in
now refuses a Python number assigned through a tensor index, or into a single element (`t[i] = v`: select + a
blocking copy_ too), while it captures; `t[:, 0] = False` and `t[a:b] = 0` dispatch to fill kernels: capturable."""

from __future__ import annotations

import pytest
import torch

from qwen_tts_core import Engine, Qwen3TTSModel, make_checkpoint
from qwen_tts_core.generate import graphs as G


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ck") / "cv", "custom_voice", "tiny")
    return Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="float32")


def test_a_graph_engine_captures_no_host_scalar_through_a_tensor_index(tiny):
    """Found by the GPU-path review: runner._prefill_and_draw assigned `self.ngen[idx] = 1` and
    `self.seen[idx, ids] = True` inside the prefill graphs (with torch 2.11 on CUDA the capture, and the graph
    engine, would fail). Now index_fill_ and index_put_ of a device value; the stand-in refuses the old form while
    it captures, so building a graph engine (every bucket captured at start) is the test."""
    eng = Engine(tiny, max_sessions=2, max_len=128, graph_capture=G.GraphCapture("cpu", fake=True))
    assert eng.capture_s > 0


def test_the_stand_in_refuses_a_host_scalar_through_an_index_while_capturing():
    """The stand-in's contract now includes it (graphs._NoHostSync): what a CUDA capture refuses fails the CPU
    capture too, so every graph engine built in CI would have caught runner._prefill_and_draw's assignments."""
    t, idx = torch.zeros(4, dtype=torch.long), torch.tensor([1, 2])
    t2 = torch.zeros(3, 4, dtype=torch.bool)
    cap = G.GraphCapture("cpu", fake=True, warmup=0)

    def assign(target, key, value):
        def body():
            target[key] = value
        return body

    for target, key, value in ((t, idx, 1), (t, 2, 1), (t2, (idx, idx), True), (t2, (0, 1), False)):
        with pytest.raises(G.CaptureError, match="blocking host-to-device copy"):
            cap.capture(assign(target, key, value))
    for body in (lambda: t.index_fill_(0, idx, 1), assign(t2, (slice(None), 0), False), assign(t, slice(0, 2), 0),
                 assign(t, idx, torch.ones((), dtype=torch.long)), lambda: t[2].fill_(7)):
        cap.capture(body).replay()
    assert t[2] == 7 and t[0] == 0
