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


def matvec_bandwidth_gbs(dtype_name: str = "float32", n: int = 8192, reps: int = 20) -> float:
    """Bytes of a large matrix streamed per second by a matrix-vector product (the memory bound of decoding)."""
    import torch

    dt = getattr(torch, dtype_name)
    w = torch.randn(n, n, dtype=torch.float32).to(dt)
    x = torch.randn(1, n, dtype=torch.float32).to(dt)
    best = 0.0
    for layout in (w, w.t().contiguous().t()):  # row- and column-major storage: the faster one sets the bound
        torch.nn.functional.linear(x, layout)
        t = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(x, layout)
        best = max(best, layout.numel() * layout.element_size() / ((time.perf_counter() - t) / reps) / 1e9)
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
