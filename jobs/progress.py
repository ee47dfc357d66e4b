"""What a person sees while a job runs: one bar counting rows (and audio seconds), logs above it, no Ray noise.

    tracker = Tracker.start()                      # a small actor on the driver's node; workers report to it
    with Console(verbose=False) as console, console.bar(total, "narrate") as bar:
        ...                                        # bar.set(done, audio_s), or poll(tracker, bar) in a thread

Workers call `tracker.started(ids, node)` before a batch and `tracker.finished([(id, status, audio_s)])` after each
row, so the bar moves as rows finish (not when Ray Data hands a block back), and a row started twice (its worker was
lost and Ray Data ran the batch again elsewhere) is known to the driver and reported.
Ray Data's own progress bars and start/finish lines are off unless `verbose`; so is the core worker's line about
actor restarts and object-store constructor arguments (printed by C++ straight to stderr, so it is filtered at the
file descriptor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

# Lines Ray prints that mean nothing to the person running a job (shown with --verbose).
NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* max_restarts"),
    re.compile(rb"Progress bars disabled\. To enable"),
)


class Tracker:
    """The actor's state: rows started (with the node each start ran on) and rows finished."""

    def __init__(self) -> None:
        self.starts: dict[str, list[str]] = {}
        self.done: dict[str, tuple[str, float]] = {}

    def started(self, ids: list[str], node: str) -> None:
        for i in ids:
            self.starts.setdefault(i, []).append(node)

    def finished(self, items: list[tuple[str, str, float]]) -> None:
        for rid, status, audio_s in items:
            self.done[rid] = (status, audio_s)

    def snapshot(self) -> tuple[int, float]:
        return len(self.done), sum(a for _, a in self.done.values())

    def restarts(self) -> dict[str, list[str]]:
        """Rows started more than once, with the nodes of every start."""
        return {k: v for k, v in self.starts.items() if len(v) > 1}

    @classmethod
    def start(cls) -> Any:
        """A tracker actor (of this class) pinned to this (the driver's) node, so losing a worker node never loses
        it."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        node = ray.get_runtime_context().get_node_id()
        return ray.remote(cls).options(
            num_cpus=0, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()


class _NoiseFilter:
    """Route this process's stderr (fd 2) through a pipe and drop NOISE lines; restore on close."""

    def __init__(self) -> None:
        self.saved = -1
        self._thread: threading.Thread | None = None

    def open(self) -> int:
        sys.stderr.flush()
        self.saved = os.dup(2)
        r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._thread = threading.Thread(target=self._pump, args=(r,), name="qtts-stderr-filter", daemon=True)
        self._thread.start()
        return self.saved

    def _pump(self, r: int) -> None:
        buf = b""
        try:
            while True:
                chunk = os.read(r, 65536)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = re.split(rb"(?<=\n)", buf)
                for line in lines:
                    if not any(p.search(line) for p in NOISE):
                        os.write(self.saved, line)
                if len(buf) > 8192:  # a long line without a newline: pass it on
                    os.write(self.saved, buf)
                    buf = b""
            if buf:
                os.write(self.saved, buf)
        except OSError:
            pass
        finally:
            os.close(r)

    def close(self) -> None:
        if self.saved < 0:
            return
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.saved, 2)  # closes the pipe's write end: the pump sees EOF
        if self._thread is not None:
            self._thread.join(timeout=2)
        os.close(self.saved)
        self.saved = -1


def quiet_ray_data(verbose: bool) -> None:
    """Ray Data's bars, execution banners and stats logs only with --verbose."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose and sys.stderr.isatty()
    ctx.enable_operator_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.enable_auto_log_stats = verbose
    ctx.verbose_stats_logs = False
    for name in ("ray.data", "ray.serve"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if verbose else logging.ERROR)


class Bar:
    """tqdm on a terminal (or with QTTS_PROGRESS=1), else a log line every ~5 % / 15 s."""

    def __init__(self, total: int, desc: str, enabled: bool, stream: Any) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.done, self.audio_s = 0, 0.0
        self._last_log = (0, time.monotonic())
        self._tqdm = None
        tty = getattr(stream, "isatty", lambda: False)() or os.environ.get("QTTS_PROGRESS") == "1"
        if enabled and total and tty:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit="row", file=stream, dynamic_ncols=True,
                              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} rows "
                                         "[{elapsed}<{remaining}{postfix}]")

    def set(self, done: int, audio_s: float) -> None:
        done = min(done, self.total)
        if done == self.done and audio_s == self.audio_s:
            return
        if self._tqdm is not None:
            self._tqdm.update(done - self._tqdm.n)
            self._tqdm.set_postfix_str(f"{audio_s:,.1f} s audio", refresh=True)
        elif self.enabled and self.total:
            n0, t0 = self._last_log
            if done == self.total or done - n0 >= max(1, self.total // 20) or time.monotonic() - t0 > 15:
                log.info("%s: %d/%d rows, %.1f s of audio", self.desc, done, self.total, audio_s)
                self._last_log = (done, time.monotonic())
        self.done, self.audio_s = done, audio_s

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None


class Console:
    """Logs above the bar (tqdm.contrib.logging), Ray noise filtered unless verbose; restores stderr on exit."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        self._filter = _NoiseFilter()
        self.stream: Any = sys.stderr
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Console:
        if not self.verbose:
            try:
                fd = self._filter.open()
                self.stream = os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
                self._stack.callback(self.stream.close)
                self.stream.isatty = lambda: os.isatty(fd)  # type: ignore[method-assign]
            except OSError as e:  # no usable fd 2: run unfiltered
                log.debug("stderr filter unavailable: %s", e)
                return self
            # our log lines go straight to the terminal too, in order with the bar
            for h in logging.getLogger().handlers:
                if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr:
                    h.setStream(self.stream)
                    self._stack.callback(h.setStream, sys.stderr)
        return self

    def bar(self, total: int, desc: str, enabled: bool = True) -> Bar:
        b = Bar(total, desc, enabled, self.stream)
        if b._tqdm is not None:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._stack.enter_context(logging_redirect_tqdm())
        self._stack.callback(b.close)
        return b

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._filter.close()
