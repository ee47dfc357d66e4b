"""GPU-path review (benchmarks/gpu_check.sh's first real run): what a CUDA graph refuses that the CPU stand-in
(graphs.FakeCUDAGraph) lets through.

On a CUDA tensor, a Python scalar assigned through a tensor index (`t[idx] = 1`, `t[idx, ids] = True`) becomes a
0-dim CPU tensor that index_put_ copies to the device with a blocking copy (cudaMemcpyAsync + cudaStreamSynchronize,
torch 2.11; later torch dispatches such scalars to fill kernels). Inside a capture that sync is "operation not
permitted when stream is capturing": the graph, and the engine that captures it at construction, fail. On CPU the
scalar is already on the tensor's device, so nothing syncs and the stand-in records the op happily. This test looks
for exactly that in every captured body of a graph engine: a Python number assigned through a tensor index, or into
a single element (`t[i] = v` on a 1-D tensor: select + a blocking copy_ too), while a stand-in graph captures.
(`t[:, 0] = False` and `t[a:b] = 0` dispatch to fill kernels: capturable.)"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from qwen_tts_core import Engine, Qwen3TTSModel, make_checkpoint
from qwen_tts_core.generate import graphs as G


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("ck") / "cv", "custom_voice", "tiny")
    return Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="float32")


def _scalar_through_index(args) -> bool:
    """`t[key] = value` (Tensor.__setitem__ args) that torch turns into a host->device copy on CUDA: a Python number
    assigned through a tensor index (index_put_), or into a single element (select + copy_ of a 0-dim tensor)."""
    t, key, value = args[0], args[1], args[2]
    if not isinstance(value, bool | int | float):
        return False
    keys = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, torch.Tensor) for k in keys):
        return True
    return t[key].dim() == 0


class _SetitemWatch(TorchFunctionMode):
    def __init__(self, found: list[str], capturing: list[bool]) -> None:
        super().__init__()
        self.found, self.capturing = found, capturing

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__setitem__ and self.capturing[0] and _scalar_through_index(args):
            site = next((f for f in reversed(traceback.extract_stack()) if "qwen_tts_core" in f.filename
                         and not f.filename.endswith("graphs.py")), None)
            self.found.append(f"{site.filename.rsplit('/', 1)[-1]}:{site.lineno} {site.line}" if site else "?")
        return func(*args, **(kwargs or {}))


def host_scalar_index_puts(monkeypatch, build) -> list[str]:
    """Where a captured body assigns a Python number through a tensor index (or into one element) while `build()`
    captures graphs with the stand-in."""
    found: list[str] = []
    capturing = [False]
    begin, end = G.FakeCUDAGraph.capture_begin, G.FakeCUDAGraph.capture_end

    def capture_begin(self, *a, **k):
        capturing[0] = True
        return begin(self, *a, **k)

    def capture_end(self):
        capturing[0] = False
        return end(self)

    monkeypatch.setattr(G.FakeCUDAGraph, "capture_begin", capture_begin)
    monkeypatch.setattr(G.FakeCUDAGraph, "capture_end", capture_end)
    with _SetitemWatch(found, capturing):
        build()
    return sorted(set(found))


def test_the_checker_sees_a_host_scalar_assigned_through_a_tensor_index(monkeypatch):
    """The check itself: captured `t[idx] = 1` and `t[2] = 1` are found; `t.index_fill_(0, idx, 1)`, `t[idx] = a
    device value`, `t2[:, 0] = False` (a fill kernel) and the same assignment outside a capture are not."""
    t, idx, one = torch.zeros(4, dtype=torch.long), torch.tensor([1, 2]), torch.ones((), dtype=torch.long)
    t2 = torch.zeros(3, 4, dtype=torch.bool)

    def capture(body):
        return lambda: G.GraphCapture("cpu", fake=True, warmup=0).capture(body)

    def assign(key, value, target=t):
        def body():
            target[key] = value
        return body

    assert host_scalar_index_puts(monkeypatch, capture(assign(idx, 1)))
    assert host_scalar_index_puts(monkeypatch, capture(assign(2, 1)))
    assert not host_scalar_index_puts(monkeypatch, capture(lambda: t.index_fill_(0, idx, 1)))
    assert not host_scalar_index_puts(monkeypatch, capture(assign(idx, one)))
    assert not host_scalar_index_puts(monkeypatch, capture(assign((slice(None), 0), False, t2)))
    assert not host_scalar_index_puts(monkeypatch, assign(idx, 1))


def test_no_captured_body_assigns_a_host_scalar_through_a_tensor_index(tiny, monkeypatch):
    """Found by the GPU-path review: runner._prefill_and_draw assigned `self.ngen[idx] = 1` and
    `self.seen[idx, ids] = True` inside the prefill graphs (with torch 2.11 on CUDA the capture, and the graph
    engine, would fail). Now index_fill_ and index_put_ of a device value."""
    found = host_scalar_index_puts(
        monkeypatch, lambda: Engine(tiny, max_sessions=2, max_len=128, graph_capture=G.GraphCapture("cpu", fake=True)))
    assert not found, found
