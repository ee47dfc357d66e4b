"""Run `render_rows` over many rows: fanned out on Ray Data (engine actors or Serve handles) or in one process.

The driver filters out rows that already have a committed output, sends the rest through
`map_batches(RenderWorker, ...)` (an actor pool: the model is loaded once per actor), collects the
manifest records as they stream back (tqdm bar in a terminal), and never lets one row stop the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .inputs import Utterance
from .lease import Fence, fenced
from .manifest import ManifestRecord
from .progress import Bar, Console, Tracker, quiet_ray_data
from .render import (
    NOT_RENDERED,
    RenderConfig,
    base_record,
    existing_output,
    render_rows,
    worker_model,
)
from .serve_backend import REPLY_SETTINGS, model_changed, serve_app_running
from .storage import RetryPolicy, Sink, StorageError, open_sink
from .synth import Backend, EngineOptions, error_text, make_backend

log = logging.getLogger(__name__)
BACKENDS = ("auto", "engine", "serve")
# Workers inherit the Ray node's environment, not the driver's: pass the driver's S3 settings along.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE")
RUNNERS = ("ray", "local")
# A row whose rendering killed its worker process (out of memory, a segfault) this many times is failed, not tried
# again: Ray would restart the worker and run the batch again without end (RunOptions.max_worker_losses).
MAX_WORKER_LOSSES = 3


@dataclass(frozen=True)
class RunOptions:
    """How to execute (never part of output keys)."""

    output: str = "file://./output"
    backend: str = "auto"          # auto | engine | serve | module:Class
    runner: str = "ray"            # ray | local (one process, no Ray)
    actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0
    batch_size: int = 4
    serve_app: str = "qtts"
    max_inflight_per_replica: int = 4  # Serve backend: calls in flight per replica, all workers together
    ray_address: str | None = None
    progress: bool = True
    verbose: bool = False          # Ray Data's own bars and log lines
    engine: EngineOptions = EngineOptions()
    retry: RetryPolicy = RetryPolicy()
    extra_env: dict[str, str] = field(default_factory=dict)
    forward_env: bool = True       # s3:// output: send the driver's AWS_* settings to the workers
    max_worker_losses: int = MAX_WORKER_LOSSES  # Ray: a row that lost its worker this often fails, not run again

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {list(RUNNERS)}, got {self.runner!r}")
        if self.backend not in BACKENDS and ":" not in self.backend:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or 'module:Class', got {self.backend!r}")
        for name in ("actors", "batch_size", "max_inflight_per_replica", "max_worker_losses"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def backend_args(self, backend: str, cfg: RenderConfig) -> dict[str, Any]:
        """make_backend's keyword arguments for `backend` (picklable: they travel to the workers)."""
        revisions = {k: v["revision"] for k, v in cfg.models.items() if v.get("revision")}
        digests = {k: v["digest"] for k, v in cfg.models.items() if v.get("digest")}  # each reply is checked
        settings = {k: {f: v["audio"][f] for f in REPLY_SETTINGS if f in (v.get("audio") or {})}
                    for k, v in cfg.models.items()}   # ... and its settings (serve/requests.py render_settings)
        return {"spec": backend, "engine": asdict(self.engine), "app_name": self.serve_app,
                "revisions": revisions, "serve_opts": {"max_inflight_per_replica": self.max_inflight_per_replica,
                                                       "workers": self.actors if self.runner == "ray" else 1,
                                                       "digests": digests, "settings": settings}}


def build_backend(args: dict[str, Any]) -> Backend:
    return make_backend(args["spec"], EngineOptions(**args["engine"]), args["app_name"], args["revisions"],
                        args["serve_opts"])


def render_batch(rows: list[Utterance], backend: Backend, sink: Sink, cfg: RenderConfig,
                 on_row: Callable[[ManifestRecord], None], stop: threading.Event | None = None,
                 ) -> list[ManifestRecord]:
    """`render_rows` for a batch of rows to render (both runners). A pass whose lease was lost (catalog, S3: the
    sink is fenced) is stopped as SIGTERM stops it, on render_rows' one path: no backend call or write after the
    loss, each row left recorded as not rendered, naming the loss."""
    return render_rows(rows, backend, sink, cfg, skip_existing=False, on_row=on_row, stop=stop)


class RowTracker(Tracker):
    """The job's tracker (jobs/progress.py) plus what the poison-row rule needs: starts of a row that never finished.

    A start that is still open when the row is started again was lost with its worker (Ray Data runs the batch again
    after the worker process died); `begin` counts those per row.
    """

    def __init__(self) -> None:
        super().__init__()
        self.open: set[str] = set()
        self.lost: dict[str, int] = {}
        self.loading: set[str] = set()           # actors loading their backend (the model) now
        self.load_deaths: dict[str, int] = {}    # per actor: loads that never finished (it was restarted first)

    def begin_load(self, actor: str) -> int:
        """`actor` starts loading its backend; returns how many of its loads died so far. A restarted actor keeps
        its id, so one that begins again while its last load is open died loading (out of memory, a crash): no row
        is open then, so the poison-row rule never sees it. Counted per actor: a node lost while its actors load
        kills each of them once, a model that does not fit kills the same actor on every load."""
        if actor in self.loading:
            self.load_deaths[actor] = self.load_deaths.get(actor, 0) + 1
        self.loading.add(actor)
        return self.load_deaths.get(actor, 0)

    def end_load(self, actor: str) -> None:
        self.loading.discard(actor)

    def lost_starts(self, ids: list[str]) -> dict[str, int]:
        """Each row's lost starts so far, an open one included (a row is only started again after its worker died)."""
        return {i: self.lost.get(i, 0) + (i in self.open) for i in ids}

    def begin_batch(self, ids: list[str], node: str) -> bool:
        """A batch about to render: starts its rows and returns False, or, when one of them lost a worker before,
        starts nothing and returns True (the batch goes a row at a time, each row begun alone). One call per batch."""
        if any(self.lost_starts(ids).values()):
            return True
        self.begin(ids, node)
        return False

    def begin(self, ids: list[str], node: str) -> dict[str, int]:
        """Record a start of each row now; returns each row's lost starts before this one. A start lost with its
        whole node (removed, pre-empted) is not charged to the row: the node went, not the row's process."""
        gone: set[str] | None = None
        for i in ids:
            if i in self.open:
                last = self.starts[i][-1]
                if gone is None:
                    gone = self.nodes_gone({self.starts[j][-1] for j in ids if j in self.open})
                if last not in gone:
                    self.lost[i] = self.lost.get(i, 0) + 1
            self.open.add(i)
        self.started(ids, node)
        return {i: self.lost.get(i, 0) for i in ids}

    @staticmethod
    def nodes_gone(nodes: set[str]) -> set[str]:
        """Which of these Ray nodes are no longer alive (none when the cluster cannot be asked)."""
        try:
            import ray

            alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        except Exception:  # noqa: BLE001 - no answer: charge the row, as before
            return set()
        return {n for n in nodes if n not in alive}

    def finished(self, items: list[tuple[str, str, float]]) -> None:
        super().finished(items)
        for rid, _, _ in items:
            self.open.discard(rid)


class RenderWorker:
    """Ray Data `map_batches` callable: builds its backend (loads the model) once, renders batches of rows and
    reports each row to the job's tracker as it finishes.

    A batch run again after its worker was lost is rendered one row at a time, each row started on the tracker just
    before it, so the next loss is charged to the row that caused it; a row that lost its worker `max_losses` times
    is failed without rendering (one poison row must not restart workers without end nor fail its batch mates).
    `fence`: the catalog pass's S3 lease, checked before each batch and each write (run_rows).
    """

    def __init__(self, backend: dict[str, Any], output: str, retry: dict[str, Any], render: dict[str, Any],
                 tracker: Any = None, env: dict[str, str] | None = None,
                 max_losses: int = MAX_WORKER_LOSSES, preload: tuple[str, ...] = (),
                 fence: Fence | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        # set here, not via a task runtime_env: that would re-download a `ray job` working_dir per worker
        os.environ.update(env or {})
        import ray

        from .quality import QualityConfig

        render = dict(render, quality=QualityConfig(**render["quality"]))
        self.cfg = RenderConfig(**render)
        self.sink = fenced(open_sink(output, RetryPolicy(**retry)), fence)
        actor = ray.get_runtime_context().get_actor_id() if tracker is not None else None
        if actor is not None:
            died = ray.get(tracker.begin_load.remote(actor))
            if died >= max_losses:   # raised in the constructor: the actor is not restarted, the job ends
                raise RuntimeError(f"workers died {died} times while loading the backend ({backend['spec']}, "
                                   "e.g. the model out of memory): giving up instead of loading it again")
        self.backend = build_backend(backend)
        if preload and hasattr(self.backend, "preload"):   # the models the rows to render use
            try:
                self.backend.preload(list(preload))
            except Exception as e:  # noqa: BLE001 - an error (not a death) fails the rows, each naming it, as before
                log.warning("loading the job's models failed (%s); the rows will say so", error_text(e))
        if actor is not None:
            tracker.end_load.remote(actor)
        self.tracker = tracker
        self.max_losses = max_losses
        self.node = ray.get_runtime_context().get_node_id()

    def _report(self, rec: ManifestRecord) -> None:
        if self.tracker is not None:
            self.tracker.finished.remote([(rec.id, rec.status, rec.duration_s)])

    def _render(self, rows: list[Utterance]) -> list[ManifestRecord]:
        return render_batch(rows, self.backend, self.sink, self.cfg, self._report)

    def _one_by_one(self, rows: list[Utterance]) -> list[ManifestRecord]:
        """A batch run again after a lost worker: each row alone, a poison row failed instead of rendered."""
        import ray

        recs = []
        for row in rows:
            lost = ray.get(self.tracker.begin.remote([row.id], self.node))[row.id]
            if lost < self.max_losses:
                recs += self._render([row])
                continue
            rec = base_record(row, self.cfg)
            rec.error = (f"worker lost {lost} times on this row: its process died while rendering it (out of "
                         "memory, a crash); not rendered again")
            log.error("row %r: %s", row.id, rec.error)
            self._report(rec)
            recs.append(rec)
        return recs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        import ray

        rows = [Utterance(**json.loads(r)) for r in batch["row"]]
        ids = [r.id for r in rows]
        if self.tracker is not None and ray.get(self.tracker.begin_batch.remote(ids, self.node)):
            recs = self._one_by_one(rows)
        else:
            recs = self._render(rows)
        return {"record": [json.dumps(r.to_dict()) for r in recs]}


JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def drop_job_working_dir() -> bool:
    """Inside `ray job submit --working-dir ...`: stop the job's workers from downloading the upload again.

    With Ray 2.60 on one node, workers started by a job driver often fail to fetch the job's
    `gcs://_ray_pkg_*.zip` ("may have prematurely been deleted", ray-project/ray#36703) although the
    driver itself runs from it. Our workers import `jobs`/`qwen_tts_core` from the installed package
    (editable install locally, the image on KubeRay), so the driver removes `working_dir` from the
    job's runtime env before `ray.init`. Set QTTS_KEEP_JOB_WORKING_DIR=1 to keep it.
    Returns True when it removed one.
    """
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw or os.environ.get("QTTS_KEEP_JOB_WORKING_DIR") == "1":
        return False
    cfg = json.loads(raw)
    env = cfg.get("runtime_env") or {}
    if not str(env.get("working_dir", "")).startswith("gcs://"):
        return False
    env.pop("working_dir")
    cfg["runtime_env"] = env
    os.environ[JOB_CONFIG_ENV] = json.dumps(cfg)
    log.info("running workers from the installed packages, not the job's uploaded working_dir")
    return True


def _listening(addr: str) -> bool:
    """True when something accepts TCP connections at `host:port` (a `ray://` or http URL counts as yes)."""
    import socket

    if "://" in addr:
        return True
    host, _, port = addr.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def connect_ray(address: str | None, num_cpus: int | None = None) -> str:
    """Join the given/`RAY_ADDRESS` cluster, or start an in-process one when none answers."""
    import ray

    if ray.is_initialized():
        _ray_errors_to_stderr()
        return "existing"
    drop_job_working_dir()
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr and not address and addr not in ("auto", "local") and not _listening(addr):
        # ray.init would wait minutes for a GCS that is not there (RAY_ADDRESS exported for a head since stopped)
        log.warning("no Ray head listens at %s; starting a local one", addr)
        os.environ.pop("RAY_ADDRESS", None)
        addr = None
    if addr:
        try:
            ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
            _restore_sigterm()
            _ray_errors_to_stderr()
            return addr
        except (ConnectionError, RuntimeError) as e:
            if address:
                raise ValueError(f"ray_address: no Ray cluster answers at {address} ({e})") from e
            log.warning("no Ray head at %s; starting a local one", addr)
            os.environ.pop("RAY_ADDRESS", None)
    # an in-process cluster on loopback: no token file under ~/.ray (every later driver would turn token auth on)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    _restore_sigterm()
    _ray_errors_to_stderr()
    return "local"


def _ray_errors_to_stderr() -> None:
    """Print the errors the cluster pushes to this driver on stderr. Ray prints them on stdout, log_to_driver or not
    ("(raylet) Task ... submit failed ... will be retried", as when a stop kills the workers), where the job's JSON
    summary must be the last line (jobs/README.md): after a stop they came after it. A Ray without this private
    function is left as it is."""
    try:
        from ray._private import worker
    except ImportError:
        return
    show = getattr(worker, "print_to_stdstream", None)
    if show is None or getattr(show, "qtts_to_stderr", False):
        return

    def to_stderr(data: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return show({**data, "is_err": True}, *args, **kwargs)

    to_stderr.qtts_to_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_stderr


def resolve_backend(opts: RunOptions) -> str:
    """auto: the Serve app's replicas when the app runs on the connected cluster (runner ray), else engine."""
    if opts.backend != "auto":
        return opts.backend
    if opts.runner == "ray":
        connect_ray(opts.ray_address)
        if serve_app_running(opts.serve_app):
            return "serve"
    return "engine"


# --- stopping on SIGTERM ------------------------------------------------------------------------------------------
_stop: threading.Event | None = None
_interruptible = False  # True while the main thread only waits for Ray Data: then SIGTERM interrupts the wait


class Stopped(BaseException):
    """Raised in the main thread by SIGTERM while it waits on Ray Data (a BaseException: never caught as an error)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    if _stop is None:
        raise SystemExit(128 + signum)
    if _stop.is_set():  # a second signal: leave now
        raise SystemExit(128 + signum)
    log.warning("%s: finishing up; rows not done yet are left for the next run", signal.Signals(signum).name)
    _stop.set()
    if _interruptible:
        raise Stopped()


def _stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, and SIGINT (Ctrl-C) unless this process was started with it ignored (a background `cmd &`)."""
    return (signal.SIGTERM,) + ((signal.SIGINT,) if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN else ())


def stop_on_sigterm() -> threading.Event:
    """SIGTERM and SIGINT (Ctrl-C) set the returned event instead of killing the process (a KeyboardInterrupt left a
    traceback and no summary); a second one leaves at once (main thread only; Ray's own handler, which exits with
    a stack dump, is replaced again after every connect)."""
    global _stop
    _stop = _stop or threading.Event()
    _restore_sigterm()
    return _stop


def _restore_sigterm() -> None:
    if _stop is not None and threading.current_thread() is threading.main_thread():
        for sig in _stop_signals():
            signal.signal(sig, _on_sigterm)


# --- runners ------------------------------------------------------------------------------------------------------
class _Collector:
    """Records as they come back (exactly one per row: a second one for a row is dropped and counted)."""

    def __init__(self, by_id: dict[str, int], bar: Bar) -> None:
        self.by_id, self.bar = by_id, bar
        self.records: dict[int, ManifestRecord] = {}
        self.duplicates = 0
        self.frozen = False
        self._lock = threading.Lock()
        self.audio_s = 0.0

    def emit(self, rec: ManifestRecord) -> None:
        with self._lock:
            if self.frozen:
                return
            i = self.by_id[rec.id]
            if i in self.records:
                self.duplicates += 1
                log.warning("a second record for row %r was dropped (exactly one output per row)", rec.id)
                return
            self.records[i] = rec
            self.audio_s += rec.duration_s
            n = len(self.records)
        self.bar.set(max(n, self.bar.done), max(self.audio_s, self.bar.audio_s))


def _run_local(rows: list[Utterance], backend: str, sink: Sink, cfg: RenderConfig, opts: RunOptions,
               out: _Collector, stop: threading.Event | None) -> None:
    be = build_backend(opts.backend_args(backend, cfg))
    for i in range(0, len(rows), opts.batch_size):
        if stop is not None and stop.is_set():
            return
        render_batch(rows[i:i + opts.batch_size], be, sink, cfg, out.emit, stop)


def _map_workers(ds: Any, backend: str, cfg: RenderConfig, opts: RunOptions, tracker: Any, env: dict[str, str],
                 rows: list[Utterance], fence: Fence | None) -> Any:
    """The dataset through the RenderWorker actor pool, with Ray's retries bounded (worker_retries)."""
    import ray.data

    with warnings.catch_warnings():  # Ray 2.60 has no named parameter for max_restarts / max_task_retries
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(
            RenderWorker, batch_size=opts.batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=opts.actors),
            num_cpus=opts.num_cpus, num_gpus=opts.num_gpus or None,
            fn_constructor_kwargs={"backend": opts.backend_args(backend, cfg), "output": opts.output,
                                   "retry": asdict(opts.retry), "render": asdict(cfg), "tracker": tracker,
                                   "env": env, "max_losses": opts.max_worker_losses,
                                   "preload": _models_of(rows, cfg), "fence": fence},
            **worker_retries(opts.max_worker_losses, len(rows)),
        )


def _models_of(rows: list[Utterance], cfg: RenderConfig) -> tuple[str, ...]:
    """The models these rows use, as a worker loads them (render.worker_model)."""
    return tuple(m for m in dict.fromkeys(worker_model(r, cfg) for r in rows if not r.error) if m)


def _run_ray(rows: list[Utterance], backend: str, cfg: RenderConfig, opts: RunOptions, out: _Collector,
             stop: threading.Event | None, fence: Fence | None = None) -> None:
    import ray
    import ray.data

    quiet_ray_data(opts.verbose)
    tracker = RowTracker.start()
    items = [{"row": json.dumps(asdict(r))} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / opts.batch_size)))
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ} \
        if opts.forward_env and opts.output.startswith("s3://") else {}
    env.update(opts.extra_env)
    ds = _map_workers(ds, backend, cfg, opts, tracker, env, rows, fence)
    polling = threading.Event()

    def poll() -> None:  # the bar follows the tracker: rows as they finish, not blocks as Ray Data returns them
        while not polling.wait(0.5):
            with contextlib.suppress(Exception):
                done, audio_s = ray.get(tracker.snapshot.remote(), timeout=5)
                out.bar.set(max(done, len(out.records)), max(audio_s, out.audio_s))

    global _interruptible
    poller = threading.Thread(target=poll, name="qtts-progress", daemon=True)
    poller.start()
    batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy"))
    try:
        if stop is None or not stop.is_set():
            _interruptible = threading.current_thread() is threading.main_thread()
            try:
                for batch in batches:
                    for raw in batch["record"]:
                        out.emit(ManifestRecord.from_dict(json.loads(raw)))
                    if stop is not None and stop.is_set():
                        break
            finally:
                _interruptible = False
    except Stopped:
        log.warning("stopping: %d of %d rows finished; abandoning the rest", len(out.records), len(rows))
    finally:
        with out._lock:
            out.frozen = True
        close = getattr(batches, "close", None)
        if close is not None:  # shuts Ray Data's executor down now, in this thread
            with contextlib.suppress(Exception):
                close()
        polling.set()
        poller.join(timeout=10)
        with contextlib.suppress(Exception):
            reruns = ray.get(tracker.restarts.remote(), timeout=10)
            for rid, nodes in reruns.items():
                rec = out.records.get(out.by_id.get(rid, -1))
                if rec is not None:
                    rec.retries = [*rec.retries, f"row re-run: its worker on node {nodes[0][:8]} was lost"]
            if reruns:
                log.warning("%d row(s) were run again after their worker was lost: %s", len(reruns),
                            sorted(reruns)[:10])
        with contextlib.suppress(Exception):
            ray.kill(tracker)


def worker_retries(max_losses: int, rows: int) -> dict[str, int]:
    """Ray's own retries, bounded (Ray Data's default is without end). Every lost worker is charged to a row not
    finished (all rows of a batch on its first run, then the row run alone: RenderWorker), and a row charged
    `max_losses` times is failed, so a job loses at most `max_losses * rows` workers: a bound that the rule never
    reaches (a batch may also die for its batch mates, queued on the same actor) and that Ray never exceeds."""
    bound = max_losses * max(1, rows)
    return {"max_task_retries": bound, "max_restarts": bound}


def _committed(rows: list[Utterance], missing: list[int], sink: Sink, cfg: RenderConfig,
               ) -> dict[int, ManifestRecord]:
    """Rows whose record never came back (the job stopped or aborted) but whose output this job committed (the
    driver found none before it started): their records from the sidecars, not "not rendered"."""
    found: dict[int, ManifestRecord] = {}
    for i in missing:
        try:
            rec = existing_output(sink, rows[i], cfg, this_run=True)   # written by this job, with its retries
        except Exception as e:  # noqa: BLE001 - a lookup that fails leaves the row as not rendered
            log.warning("row %r: cannot look for its committed output (%s)", rows[i].id, error_text(e))
            continue
        if rec is not None:
            found[i] = rec
    return found


def run_rows(rows: list[Utterance], cfg: RenderConfig, opts: RunOptions, sink: Sink | None = None,
             desc: str = "narrate", backend: str | None = None, stop: threading.Event | None = None,
             fence: Fence | None = None) -> list[ManifestRecord]:
    """Render every row that lacks a committed output; returns one record per input row (input order).

    `backend`: the resolved backend (default: resolve `opts.backend`). `stop` (see stop_on_sigterm): when set, no
    more rows are started and rows not finished are recorded as not rendered (their outputs, if any were
    committed, are found by the next run). `fence` (catalog, S3: `lease.Fence`): every write, in this process and
    in the workers, checks the pass's lease first; once it is lost nothing more is rendered or written (each row
    left says so), and the caller must not reconcile.

    Raises:
        StorageError: the output is not writable (checked before any work starts).
    """
    sink = sink or open_sink(opts.output, opts.retry)
    sink.preflight(need_delete=False)  # rendering never deletes; a caller that does checks it (catalog)
    sink = fenced(sink, fence)
    records: dict[int, ManifestRecord] = {}
    todo: list[int] = []

    def lookup(row: Utterance) -> ManifestRecord | None | Exception:
        try:
            return existing_output(sink, row, cfg)
        except Exception as e:  # noqa: BLE001 - one row's resume check never stops the job
            return e

    valid = [i for i, row in enumerate(rows) if row.error is None]
    for i, row in enumerate(rows):
        if row.error is not None:
            records[i] = base_record(row, cfg)
    with ThreadPoolExecutor(max_workers=16) as pool:  # one GET per row: overlap them on S3
        found_all = list(pool.map(lookup, [rows[i] for i in valid]))
    for i, found in zip(valid, found_all):
        if isinstance(found, Exception):
            rec = base_record(rows[i], cfg)
            rec.error = rec.error or (f"storage: {found}" if isinstance(found, StorageError)
                                      else f"resume check: {type(found).__name__}: {found}")
            records[i] = rec
        elif found is not None:
            records[i] = found
        else:
            todo.append(i)
    log.info("%d rows: %d to render, %d already done, %d invalid", len(rows), len(todo),
             sum(r.reused for r in records.values()), sum(r.status == "failed" for r in records.values()))
    if todo:
        backend = backend or resolve_backend(opts)
        log.info("rendering %d rows with backend=%s runner=%s", len(todo), backend, opts.runner)
        t0 = time.perf_counter()
        pending = [rows[i] for i in todo]
        with Console(opts.verbose) as console:
            out = _Collector({rows[i].id: i for i in todo}, console.bar(len(todo), desc, opts.progress))
            try:
                if opts.runner == "local":
                    _run_local(pending, backend, sink, cfg, opts, out, stop)
                else:
                    connect_ray(opts.ray_address)
                    # the sink as resolved here: file://./output is the driver's ./output, not each worker's
                    _run_ray(pending, backend, cfg, replace(opts, output=sink.uri), out, stop, fence)
            except Exception as e:  # noqa: BLE001 - record what is missing, keep what finished
                log.exception("run aborted")
                with out._lock:
                    out.frozen = True
                out.records.update(_committed(rows, [i for i in todo if i not in out.records], sink, cfg))
                for i in todo:
                    if i not in out.records:
                        rec = base_record(rows[i], cfg)
                        rec.error = f"job aborted: {error_text(e)[:300]}"  # (a bare assert has no text at all)
                        out.records[i] = rec
        with out._lock:
            out.frozen = True
            records.update(out.records)
        records.update(_committed(rows, [i for i in todo if i not in records], sink, cfg))
        stopped = [i for i in todo if i not in records]
        for i in stopped:
            rec = base_record(rows[i], cfg)
            rec.error = NOT_RENDERED
            records[i] = rec
        log.info("rendered %d rows in %.1fs%s", len(todo) - len(stopped), time.perf_counter() - t0,
                 f" ({len(stopped)} abandoned)" if stopped else "")
        changed = sorted(records[i].id for i in todo if model_changed(records[i].error))
        if changed:
            log.warning("%d row(s) failed because the served model changed during the job (the Serve app was "
                        "upgraded); run again to render them with the new model: %s", len(changed), changed[:10])
    return [records[i] for i in range(len(rows))]
