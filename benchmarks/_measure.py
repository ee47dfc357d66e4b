"""Shared measurement helpers for the benchmarks (no project imports: also runs under the oracle's python)."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB. /proc/self/status VmHWM (this program's own address space): Linux
    carries ru_maxrss across exec, and a worker started by vfork/posix_spawn (subprocess) starts from its parent's
    peak, so a small worker read its parent's matrix tests as its own. ru_maxrss where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def stream_bandwidth_gbs(dtype_name: str, working_set_bytes: int, rows: int = 4096, cols: int = 1024,
                         min_seconds: float = 0.3) -> float:
    """Bytes per second (GB/s) a one-row matrix product reads weights at when it cycles through `working_set_bytes`
    of distinct [rows, cols] matrices (at least two): the rate at which a decoder that re-reads that many bytes of
    weights per pass can read them. A working set that fits the last-level cache streams faster than one that does not
    (measured on a 2-core Emerald Rapids guest with a 300 MB L3, fp32: ~55 GB/s up to ~160 MB, ~26 GB/s from
    ~250 MB), so a bound taken from one matrix read again and again (a 256 MB one stays in such a cache) is half the
    time a model with gigabytes of weights can take. The faster of torch's product and oneDNN's on packed weights
    (the engine's CPU kernel; where this torch has it), best of three timed groups of passes after a warm-up pass."""
    import torch
    import torch.nn.functional as F

    dt = getattr(torch, dtype_name)
    count = max(2, -(-working_set_bytes // (rows * cols * dt.itemsize)))
    gen = torch.Generator().manual_seed(0)
    weights = [torch.rand(rows, cols, generator=gen).sub_(0.5).to(dt) for _ in range(count)]
    x = torch.rand(1, cols, generator=gen).to(dt)
    nbytes = count * rows * cols * dt.itemsize

    def rate(one_pass) -> float:
        one_pass()
        best = 0.0
        for _ in range(3):
            passes, t = 0, time.perf_counter()
            while passes == 0 or time.perf_counter() - t < min_seconds:
                one_pass()
                passes += 1
            best = max(best, nbytes * passes / (time.perf_counter() - t) / 1e9)
        return best

    best = rate(lambda: [F.linear(x, w) for w in weights])
    try:
        packed = []
        while weights:  # packed one by one, each plain copy dropped: never both sets in memory
            packed.append(torch.ops.mkldnn._reorder_linear_weight(weights.pop(0), None))
        best = max(best, rate(lambda: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")
                                       for p in packed]))
    except (AttributeError, RuntimeError):  # no oneDNN packing for this dtype/CPU/torch: torch's product alone
        pass
    return best


def gemm_gflops(dtype_name: str = "float32", n: int = 1536, reps: int = 10) -> float:
    """Floating-point operations per second (GFLOP/s) of a large square matrix product: the compute bound of the
    conv-heavy codec decoder (its convolutions are matrix products of about this size)."""
    import torch

    dt = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.mm(a, b)
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e9


def count_flops(fn) -> int:
    """Floating-point operations of one call of `fn` (torch's FlopCounterMode: matrix products and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def run_worker(python: str, script: str, args: list[str], env: dict | None = None, timeout: float = 3000) -> dict:
    """Run a worker process that prints one JSON line last; return that JSON."""
    proc = subprocess.run([python, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise RuntimeError(f"worker {script} {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
