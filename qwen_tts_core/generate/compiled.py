"""CPU: a step body torch.compiled whole, with `Engine(compile=True)`.

On a CPU a decode step is memory-bound in its products and dispatch-bound in everything else: the 0.6B model runs
~10,000 small ops a frame (a code-predictor pass alone ~4,850) at a few microseconds of Python and dispatcher each,
~50 ms a frame beside ~200 ms of products (fp32, 2 cores). Compiling the layers' elementwise pieces alone
(`model/fused.py`, what `compile` does on a GPU) leaves that overhead where it is. Here the whole talker step and the
whole 15-codebook code-predictor pass (sampling included) become one graph each: inductor fuses the small ops into a
few C++ loops and one lean wrapper calls them; the oneDNN products stay opaque ops (`layers.slot_linear`).

The graph is compiled for symbolic batch and key lengths (`dynamic=True`) and at least two rows (the runner pads a
single row with a discarded one): size-1 batches would get a graph of their own, whose loops may sum in another
order, and a session's numbers would then depend on whether it ran alone. One graph per body serves every batch,
key length and cache size. Compiling takes minutes on a few cores (the engine does it when it is built); the
graph is one guard check per call after that.

A body that fails to compile (no C++ compiler, an unsupported op in some torch) logs it once and runs eagerly from
then on: the same result, at the eager speed. With `fullgraph=True` a compile error happens before the graph runs,
so the eager retry starts from untouched state.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

import torch
from torch._dynamo import config as dynamo_config
from torch.fx.experimental import _config as fx_config

from ..model.fused import raise_recompile_limit

log = logging.getLogger(__name__)

MIN_ROWS = 2
"""The fewest rows a compiled body runs (see the module's text)."""


class CompiledBody:
    """`fn` (a runner's step body) run through `torch.compile(fn, dynamic=True, fullgraph=True)`; eager once it
    failed to compile. `graphs`: graphs compiled so far (a recompile mid-traffic would stall a step for minutes:
    tests watch this)."""

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn, self.name = fn, name
        self.broken = False
        self.lock = threading.Lock()
        self._count = [0]
        # the backend holds the counter, not this object: torch keeps backends for the process's lifetime
        # (eval_frame.cached_backends), and through `fn` this object holds the runner, its caches and its model
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True,
                                      backend=functools.partial(_inductor, self._count))

    @property
    def graphs(self) -> int:
        return self._count[0]

    def __call__(self, *args) -> None:
        if self.broken:
            return self.fn(*args)
        raise_recompile_limit()   # where this call runs (past the limit the body runs eagerly: RECOMPILE_LIMIT)
        try:
            # no duck sizing: sizes equal while compiling (a 64-position cache read to 64 keys, two rows and two
            # positions) would share one symbol, and the graph would demand they stay equal; floats specialized:
            # the modules' constants (norm eps, embedding norm_type) made symbolic floats that the tensorify pass
            # cannot keep, and dynamo traced each body a second time to specialize them (~22% of the first build)
            with self.lock, fx_config.patch(use_duck_shape=False), dynamo_config.patch(specialize_float=True):
                return self.compiled(*args)
        except COMPILE_ERRORS:  # tracing or compiling failed, or no more graphs may be made: nothing has run yet
            log.warning("torch.compile of the %s step failed; it runs eagerly from now on", self.name, exc_info=True)
            self.broken = True
            return self.fn(*args)


COMPILE_MODES = (False, True, "ops", "step")
_STEP_NEEDS = "compile='step' needs a CPU model, sampler='device' and no CUDA graphs"


def _inductor(count: list[int], gm: torch.fx.GraphModule, example_inputs):
    count[0] += 1
    # emulate_precision_casts: a bf16 value rounded to bf16 where the eager ops round it, nearer the eager step than
    # fp32 kept across fused ops, but not its bits (the random 0.6B's bf16 codes part from eager; fp32's do not)
    from torch._inductor import config

    with config.patch(emulate_precision_casts=True):
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)


COMPILE_ERRORS: tuple[type[BaseException], ...] = (torch._dynamo.exc.TorchDynamoException,) + tuple(
    e for e in (getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", None),) if e is not None)
"""What a compiled call raises before anything ran: tracing or compiling failed, or (fullgraph) the recompile
limit was hit (FailOnRecompileLimitHit is no TorchDynamoException)."""


def check_compile(compile, sampler: str = "device", cuda_graphs: bool | None = None) -> None:
    """`compile` is one of COMPILE_MODES, and "step" comes with the device sampler and no CUDA graphs (ValueError
    naming compile otherwise; whether the model is on a CPU shows when the engine is built)."""
    if not any(compile is m or (isinstance(m, str) and compile == m) for m in COMPILE_MODES):
        raise ValueError(f"compile must be True, False, 'ops' or 'step', got {compile!r}")
    if compile == "step" and (sampler != "device" or cuda_graphs):
        raise ValueError(_STEP_NEEDS)


def compile_mode(compile, device: torch.device, sampler: str, graphs: bool) -> str | None:
    """What `compile` does for a runner: None (nothing), "step" (whole bodies, this module) or "ops" (the layers'
    elementwise pieces, model/fused.py). True picks "step" where it can run: CPU, the device sampler (the torch
    sampler draws on the host) and no CUDA graphs (a GPU compiles the pieces before capture instead); "ops"
    elsewhere. "step" where it cannot run is a ValueError naming compile."""
    check_compile(compile, sampler, graphs)
    if compile is False:
        return None
    whole = device.type == "cpu" and sampler == "device" and not graphs
    if compile == "step" and not whole:  # what check_compile cannot know: the device
        raise ValueError(_STEP_NEEDS)
    return "step" if compile == "step" or (compile is True and whole) else "ops"


__all__ = ["COMPILE_ERRORS", "COMPILE_MODES", "MIN_ROWS", "CompiledBody", "check_compile", "compile_mode"]
