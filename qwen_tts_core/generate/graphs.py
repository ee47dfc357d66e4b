"""Graph capture for the step bodies: CUDA graphs on a GPU, and a CPU stand-in with the same contract for CI.

`GraphCapture(device)` warms a body up and captures it; `capture(fn)` returns a graph whose `replay()` re-runs what
`fn` did, on the tensors it used. On CUDA: `torch.cuda.CUDAGraph`, one memory pool shared by every graph of the
engine, a capture stream on the model's own device (any `cuda:N`), and the thread-local capture error mode so another
thread's GPU work (a voice being created) cannot break a capture or be broken by it.

`FakeCUDAGraph` is the stand-in (a test double, also used by `benchmarks/gpu_check.sh --device cpu`). It keeps
`torch.cuda.CUDAGraph`'s contract, so code that is wrong under real graphs is wrong under it too:
  - capture records the aten ops the body runs (a tape, like the kernels a CUDA graph records); Python control flow
    and host values read at capture time are frozen into it; a host sync while capturing (`.item()`, `.tolist()`,
    `.cpu()`, `bool(tensor)`, `int(tensor)`, `nonzero`) raises, as it does on a capturing CUDA stream, and so does a
    Python number assigned through a tensor index or into one element (`t[idx] = 1`: on CUDA a blocking copy of a
    host scalar, torch 2.11), which on CPU copies nothing;
  - `replay()` re-runs the tape on the very tensors recorded, and writes every op's result into the tensor the op
    produced at capture: static outputs are rewritten in place on every replay, so a caller that kept a view of an
    output sees it change (defect: frames that alias the graph's output);
  - tensors allocated during capture (the graph's pool: intermediates and outputs) are poisoned (NaN, or a huge
    negative integer) right after capture and again before every replay, so reading an output before the replay
    that produces it, or across replays, gives garbage rather than a plausible stale value;
  - new tensors passed later are ignored: only the static inputs recorded at capture are read;
  - graphs captured into one shared pool (`FakePool`, what `GraphCapture(fake=True)` passes, as the engine's one
    `graph_pool_handle()` on CUDA): a later capture may take the blocks an earlier graph freed (its intermediates,
    and any output its caller dropped), so replaying a graph may overwrite what any graph captured after it
    allocated, its static outputs included. A replay therefore poisons the capture-time tensors of every graph
    captured after it in the same pool (those its own replay wrote since: poisoned ones stay so until then): an
    output read after another graph's replay, or state kept in a graph's pool across replays, comes out as garbage
    here as it may on a GPU. (An earlier graph's outputs, alive when a
    later one was captured, are safe from the later one's replays: the model poisons nothing of theirs.)
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

log = logging.getLogger(__name__)

# ops that read device memory back to the host (a sync): not allowed while a CUDA stream captures
_HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
                  "aten::_unique2", "aten::item", "aten::equal", "aten::is_nonzero"}


# ops that launch no kernel on a GPU (allocation, aliasing); besides these, an op launches none when it mutates nothing
# and every output aliases an input (a view, or a no-op `.to`/`.reshape`/`.contiguous`)
_NO_KERNEL_OPS = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::lift_fresh", "aten::detach",
                  "aten::alias", "aten::set_", "aten::resize_"}


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def launches(func, in_storages: set[int], out) -> bool:
    """Whether an aten op, recorded at the dispatcher with its input storages and its output, stands for a kernel
    launch on a GPU: the proxy for "CUDA kernels per step" that CPU runs count. Composite ops (linear, rms_norm,
    softmax, sdpa) count as one, as their fused CUDA kernels do; views and no-op casts count as none."""
    if func._schema.name in _NO_KERNEL_OPS:
        return False
    if func._schema.is_mutable:
        return True
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    return not outs or any(t.untyped_storage().data_ptr() not in in_storages for t in outs if t.numel())


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run inside it (`with OpCounter() as c: ...`): `c.ops` all of them, `c.kernels` the
    ones that stand for a GPU kernel (`launches`), `c.by_name` a Counter of the kernel ops by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = self.kernels = 0
        self.by_name: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ins = _storages((args, kwargs))
        out = func(*args, **kwargs)
        self.ops += 1
        if launches(func, ins, out):
            self.kernels += 1
            self.by_name[func._schema.name] += 1
        return out


class CaptureError(RuntimeError):
    """An operation that a CUDA graph cannot capture (a host sync) ran while capturing."""


def _poison_(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(torch.iinfo(t.dtype).min // 2 if t.dtype != torch.uint8 else 255)


# tensor methods that copy device memory to the host, refused by name: on CPU tensors some never reach the dispatcher,
# where the recorder refuses the ops that sync (`item`, `int(t)` do reach it, as aten::_local_scalar_dense)
_HOST_SYNC_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.item, torch.Tensor.__bool__,
                      torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu}


def _host_scalar_copy(args: tuple) -> bool:
    """`t[key] = value` that copies a host scalar to the device on CUDA (torch 2.11: a blocking copy): a Python number
    assigned through a tensor index (index_put_ of a 0-dim host tensor) or into a single element (copy_ of one);
    `t[:, 0] = False` or `t[a:b] = 0` are fill kernels."""
    t, key, value = args[0], args[1], args[2]
    if not isinstance(value, bool | int | float):
        return False
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) for k in keys) or t[key].dim() == 0


class _NoHostSync(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _HOST_SYNC_METHODS or (func is torch.Tensor.to and any(
                a == "cpu" or (isinstance(a, torch.device) and a.type == "cpu") for a in
                list(args[1:]) + list((kwargs or {}).values()))):
            raise CaptureError(f"{getattr(func, '__name__', func)}: a host sync is not permitted while a CUDA graph "
                               "captures")
        if func is torch.Tensor.__setitem__ and _host_scalar_copy(args):
            raise CaptureError("t[index] = <Python number>: a blocking host-to-device copy on CUDA, not permitted "
                               "while a CUDA graph captures (use index_fill_, fill_ or a device value)")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self, graph: FakeCUDAGraph) -> None:
        super().__init__()
        self.graph = graph
        self.known: set[int] = set()  # storages that existed before the op ran (inputs, pool, outside tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _HOST_SYNC_OPS:
            raise CaptureError(f"{name}: a host sync is not permitted while a CUDA graph captures")
        in_storages = _storages((args, kwargs))
        out = func(*args, **kwargs)
        self.graph._tape.append((func, args, kwargs, out))
        self.graph.num_kernels += launches(func, in_storages, out)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr not in in_storages and ptr not in self.graph._pool_ptrs and t.numel():
                    self.graph._pool_ptrs.add(ptr)
                    self.graph._pool.append(t)
        return out


class FakePool:
    """The stand-in's shared memory pool: the graphs captured into it, in capture order (see the module docstring)."""

    def __init__(self) -> None:
        self.graphs: list[FakeCUDAGraph] = []

    def after(self, g: FakeCUDAGraph) -> list[FakeCUDAGraph]:
        """The graphs captured into this pool after `g`: their blocks may be ones `g` writes when it replays."""
        try:
            return self.graphs[self.graphs.index(g) + 1:]
        except ValueError:  # not captured into this pool (or reset)
            return []


class FakeCUDAGraph:
    """CPU stand-in for `torch.cuda.CUDAGraph` (see the module docstring for the contract it enforces)."""

    def __init__(self) -> None:
        self._tape: list[tuple[Any, tuple, dict, Any]] = []
        self._pool: list[torch.Tensor] = []
        self._pool_ptrs: set[int] = set()
        self._mode: _Recorder | None = None
        self._inference = False
        self._shared: FakePool | None = None
        self._written = False  # its pool holds what its last replay wrote (not poisoned since)
        self.replays = 0
        self.num_kernels = 0  # recorded ops that stand for a GPU kernel (see `launches`)

    def capture_begin(self, pool=None, capture_error_mode: str = "global") -> None:
        if self._mode is not None or self._tape:
            raise RuntimeError("this graph has already been captured")
        self._shared = pool if isinstance(pool, FakePool) else None
        self._inference = torch.is_inference_mode_enabled()
        self._mode = _Recorder(self)
        self._guard = _NoHostSync()
        self._guard.__enter__()
        self._mode.__enter__()

    def capture_end(self) -> None:
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        self._guard.__exit__(None, None, None)
        for t in self._pool:
            _poison_(t)
        if self._shared is not None:
            self._shared.graphs.append(self)

    def replay(self) -> None:
        if not self._tape:
            raise RuntimeError("replay() of a graph that captured nothing")
        ctx = torch.inference_mode() if self._inference else torch.no_grad()
        # a replay is one launch, not ops the host dispatches: modes around it (an OpCounter) do not see its tape
        with ctx, _disable_current_modes():
            for t in self._pool:
                _poison_(t)
            for func, args, kwargs, out in self._tape:
                res = func(*args, **kwargs)
                for r, o in zip(tree_flatten(res)[0], tree_flatten(out)[0]):
                    if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() != \
                            r.untyped_storage().data_ptr():
                        o.copy_(r)
            for later in self._shared.after(self) if self._shared is not None else ():
                if later._written:  # blocks this replay may have written (a shared pool); once poisoned, they stay
                    later._written = False  # so until that graph's own replay writes them again
                    for t in later._pool:
                        _poison_(t)
        self._written = True
        self.replays += 1

    def reset(self) -> None:
        if self._shared is not None and self in self._shared.graphs:
            self._shared.graphs.remove(self)
        self._tape, self._pool, self._pool_ptrs = [], [], set()
        self.num_kernels = 0

    def pool(self) -> tuple[int, int]:
        return (id(self), 0)

    @property
    def num_ops(self) -> int:
        return len(self._tape)


@contextlib.contextmanager
def fake_graph(graph: FakeCUDAGraph, pool=None, stream=None, capture_error_mode: str = "global") -> Iterator[None]:
    """The stand-in's `torch.cuda.graph(...)` context manager."""
    graph.capture_begin(pool=pool, capture_error_mode=capture_error_mode)
    try:
        yield
    finally:
        graph.capture_end()


class GraphCapture:
    """Warm-up + capture of step bodies for one engine: real CUDA graphs, or the CPU stand-in (`fake=True`)."""

    def __init__(self, device: torch.device, fake: bool = False, warmup: int = 2) -> None:
        self.device, self.fake, self.warmup = torch.device(device), fake, warmup
        if not fake:
            if self.device.type != "cuda" or not torch.cuda.is_available():
                raise ValueError(f"cuda_graphs=True needs a CUDA model; this one is on {self.device}")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            with torch.cuda.device(self.device):
                self.stream = torch.cuda.Stream(device=self.device)
                self.pool = torch.cuda.graph_pool_handle()  # one pool for every graph of this engine
        else:
            self.stream, self.pool = None, FakePool()
        self.graphs: list[Any] = []
        # one capture at a time per engine (the step bodies and the audio decoder share the pool)
        self.lock = threading.RLock()

    def device_context(self):
        return torch.cuda.device(self.device) if not self.fake else contextlib.nullcontext()

    def capture(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` `warmup` times, then capture it; returns the graph (call `.replay()`)."""
        return self.capture_output(fn)[0]

    def capture_output(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        """`capture`, also returning what the captured call of `fn` returned: its static output, rewritten by every
        replay (copy what must outlive the next replay)."""
        with self.lock:
            if self.fake:
                for _ in range(self.warmup):
                    fn()
                g = FakeCUDAGraph()
                with fake_graph(g, pool=self.pool):
                    out = fn()
            else:
                with torch.cuda.device(self.device):
                    cur = torch.cuda.current_stream(self.device)
                    self.stream.wait_stream(cur)
                    with torch.cuda.stream(self.stream):
                        for _ in range(self.warmup):
                            fn()
                    cur.wait_stream(self.stream)
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
                        out = fn()
            self.graphs.append(g)
        return g, out


__all__ = ["CaptureError", "FakeCUDAGraph", "FakePool", "GraphCapture", "OpCounter", "fake_graph", "launches"]
