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

import logging
import threading
from collections.abc import Callable

import torch
from torch.fx.experimental import _config as fx_config

log = logging.getLogger(__name__)

MIN_ROWS = 2
"""The fewest rows a compiled body runs (see the module's text)."""

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per body's code, across all engines of a process (each engine's runner is a new `self`
for the guards: one graph each; torch's default limit, 8, would turn the 9th engine's step eager for good)."""


class CompiledBody:
    """`fn` (a runner's step body) run through `torch.compile(fn, dynamic=True, fullgraph=True)`; eager once it
    failed to compile. `graphs`: graphs compiled so far (a recompile mid-traffic would stall a step for minutes:
    tests watch this)."""

    def __init__(self, fn: Callable, name: str) -> None:
        self.fn, self.name = fn, name
        self.graphs = 0
        self.broken = False
        self.lock = threading.Lock()
        cfg = torch._dynamo.config  # the limit's name before torch 2.6: cache_size_limit
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), RECOMPILE_LIMIT))
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=self._backend)

    def _backend(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        # emulate_precision_casts: a bf16 value rounded to bf16 wherever the eager ops round it, so a compiled bf16
        # step computes what the eager one does instead of keeping fp32 across fused ops
        from torch._inductor import config

        with config.patch(emulate_precision_casts=True):
            return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)

    def __call__(self, *args) -> None:
        if self.broken:
            return self.fn(*args)
        try:
            # no duck sizing: sizes equal while compiling (a 64-position cache read to 64 keys, two rows and two
            # positions) would share one symbol, and the graph would demand they stay equal
            with self.lock, fx_config.patch(use_duck_shape=False):
                return self.compiled(*args)
        except torch._dynamo.exc.TorchDynamoException:  # tracing or compiling failed: nothing has run yet
            log.warning("torch.compile of the %s step failed; it runs eagerly from now on", self.name, exc_info=True)
            self.broken = True
            return self.fn(*args)


COMPILE_MODES = (False, True, "ops", "step")


def check_compile(compile) -> None:
    """`compile` is one of COMPILE_MODES (ValueError naming it otherwise)."""
    if not any(compile is m or (isinstance(m, str) and compile == m) for m in COMPILE_MODES):
        raise ValueError(f"compile must be True, False, 'ops' or 'step', got {compile!r}")


def compile_mode(compile, device: torch.device, sampler: str, graphs: bool) -> str | None:
    """What `compile` does for a runner: None (nothing), "step" (whole bodies, this module) or "ops" (the layers'
    elementwise pieces, model/fused.py). True picks "step" where it can run: CPU, the device sampler (the torch
    sampler draws on the host) and no CUDA graphs (a GPU compiles the pieces before capture instead); "ops"
    elsewhere. "step" where it cannot run is a ValueError naming compile."""
    check_compile(compile)
    if compile is False:
        return None
    whole = device.type == "cpu" and sampler == "device" and not graphs
    if compile == "step" and not whole:
        raise ValueError("compile='step' needs a CPU model, sampler='device' and no CUDA graphs")
    return "step" if compile == "step" or (compile is True and whole) else "ops"


__all__ = ["COMPILE_MODES", "MIN_ROWS", "CompiledBody", "check_compile", "compile_mode"]
