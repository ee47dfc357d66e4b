"""Run `render_rows` over many rows: fanned out on Ray Data (engine actors or Serve handles) or in one process.

The driver filters out rows that already have a committed output, sends the rest through
`map_batches(RenderWorker, ...)` (an actor pool: the model is loaded once per actor), collects the
manifest records as they stream back (tqdm bar in a terminal), and never lets one row stop the job.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .inputs import Utterance
from .manifest import ManifestRecord
from .render import RenderConfig, base_record, existing_output, render_rows
from .storage import RetryPolicy, Sink, StorageError, open_sink
from .synth import EngineOptions, make_backend, serve_app_running

log = logging.getLogger(__name__)
BACKENDS = ("auto", "engine", "serve")
# Workers inherit the Ray node's environment, not the driver's: pass the driver's S3 settings along.
FORWARD_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE")
RUNNERS = ("ray", "local")


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
    ray_address: str | None = None
    progress: bool = True
    engine: EngineOptions = EngineOptions()
    retry: RetryPolicy = RetryPolicy()
    extra_env: dict[str, str] = field(default_factory=dict)
    forward_env: bool = True       # s3:// output: send the driver's AWS_* settings to the workers

    def __post_init__(self) -> None:
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {list(RUNNERS)}, got {self.runner!r}")
        if self.backend not in BACKENDS and ":" not in self.backend:
            raise ValueError(f"backend must be one of {list(BACKENDS)} or 'module:Class', got {self.backend!r}")
        for name in ("actors", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


class RenderWorker:
    """Ray Data `map_batches` callable: builds its backend (loads the model) once, renders batches of rows."""

    def __init__(self, backend: str, engine: dict[str, Any], output: str, retry: dict[str, Any],
                 render: dict[str, Any], serve_app: str = "qtts", env: dict[str, str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO)
        # set here, not via a task runtime_env: that would re-download a `ray job` working_dir per worker
        os.environ.update(env or {})
        from .quality import QualityConfig

        render = dict(render, quality=QualityConfig(**render["quality"]))
        self.cfg = RenderConfig(**render)
        self.sink = open_sink(output, RetryPolicy(**retry))
        self.backend = make_backend(backend, EngineOptions(**engine), serve_app)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        rows = [Utterance(**json.loads(r)) for r in batch["row"]]
        recs = render_rows(rows, self.backend, self.sink, self.cfg, skip_existing=False)
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
        return "existing"
    drop_job_working_dir()
    addr = address or os.environ.get("RAY_ADDRESS")
    if addr and not address and addr not in ("auto", "local") and not _listening(addr):
        # ray.init would wait minutes for a GCS that is not there (cluster/env.sh always sets RAY_ADDRESS)
        log.warning("no Ray head listens at %s; starting a local one", addr)
        os.environ.pop("RAY_ADDRESS", None)
        addr = None
    if addr:
        try:
            ray.init(address=addr, logging_level=logging.WARNING, log_to_driver=False)
            return addr
        except (ConnectionError, RuntimeError) as e:
            if address:
                raise ValueError(f"ray_address: no Ray cluster answers at {address} ({e})") from e
            log.warning("no Ray head at %s; starting a local one", addr)
            os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False,
             object_store_memory=256 * 1024 * 1024)
    return "local"


def resolve_backend(opts: RunOptions) -> str:
    if opts.backend != "auto":
        return opts.backend
    if opts.runner == "ray" and serve_app_running(opts.serve_app):
        return "serve"
    return "engine"


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=not sys.stderr.isatty() and
                os.environ.get("QTTS_PROGRESS") != "1")


def _run_local(rows: list[Utterance], backend: str, sink: Sink, cfg: RenderConfig, opts: RunOptions,
               emit: Callable[[ManifestRecord], None]) -> None:
    be = make_backend(backend, opts.engine, opts.serve_app)
    for i in range(0, len(rows), opts.batch_size):
        for rec in render_rows(rows[i:i + opts.batch_size], be, sink, cfg, skip_existing=False):
            emit(rec)


def _run_ray(rows: list[Utterance], backend: str, cfg: RenderConfig, opts: RunOptions,
             emit: Callable[[ManifestRecord], None]) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(opts.progress and sys.stderr.isatty())
    ctx.verbose_stats_logs = False
    items = [{"row": json.dumps(asdict(r))} for r in rows]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / opts.batch_size)))
    render = asdict(cfg)
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ} \
        if opts.forward_env and opts.output.startswith("s3://") else {}
    env.update(opts.extra_env)
    ds = ds.map_batches(
        RenderWorker, batch_size=opts.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=opts.actors),
        num_cpus=opts.num_cpus, num_gpus=opts.num_gpus or None,
        fn_constructor_kwargs={"backend": backend, "engine": asdict(opts.engine), "output": opts.output,
                               "retry": asdict(opts.retry), "render": render, "serve_app": opts.serve_app,
                               "env": env},
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for raw in batch["record"]:
            emit(ManifestRecord.from_dict(json.loads(raw)))


def run_rows(rows: list[Utterance], cfg: RenderConfig, opts: RunOptions, sink: Sink | None = None,
             desc: str = "narrate") -> list[ManifestRecord]:
    """Render every row that lacks a committed output; returns one record per input row (input order).

    Raises:
        StorageError: the output is not writable (checked before any work starts).
    """
    sink = sink or open_sink(opts.output, opts.retry)
    sink.preflight()
    records: dict[int, ManifestRecord] = {}
    todo: list[int] = []

    def lookup(row: Utterance) -> ManifestRecord | None | StorageError:
        try:
            return existing_output(sink, row, cfg)
        except StorageError as e:
            return e

    valid = [i for i, row in enumerate(rows) if row.error is None]
    for i, row in enumerate(rows):
        if row.error is not None:
            records[i] = base_record(row, cfg)
    with ThreadPoolExecutor(max_workers=16) as pool:  # one GET per row: overlap them on S3
        found_all = list(pool.map(lookup, [rows[i] for i in valid]))
    for i, found in zip(valid, found_all):
        if isinstance(found, StorageError):
            rec = base_record(rows[i], cfg)
            rec.error = f"storage: {found}"
            records[i] = rec
        elif found is not None:
            records[i] = found
        else:
            todo.append(i)
    log.info("%d rows: %d to render, %d already done, %d invalid", len(rows), len(todo),
             sum(r.reused for r in records.values()), sum(r.status == "failed" for r in records.values()))
    by_id = {rows[i].id: i for i in todo}
    bar = _progress(len(todo), opts.progress, desc)

    every = max(1, len(todo) // 20)
    done = [0]

    def emit(rec: ManifestRecord) -> None:
        records[by_id[rec.id]] = rec
        done[0] += 1
        if bar is not None:
            bar.update(1)
        elif opts.progress and (done[0] % every == 0 or done[0] == len(todo)):
            log.info("progress: %d/%d rows (%s: %s)", done[0], len(todo), rec.id, rec.status)

    if todo:
        backend = resolve_backend(opts)
        log.info("rendering %d rows with backend=%s runner=%s", len(todo), backend, opts.runner)
        t0 = time.perf_counter()
        pending = [rows[i] for i in todo]
        try:
            if opts.runner == "local":
                _run_local(pending, backend, sink, cfg, opts, emit)
            else:
                connect_ray(opts.ray_address)
                _run_ray(pending, backend, cfg, opts, emit)
        except Exception as e:  # noqa: BLE001 - record what is missing, keep what finished
            log.exception("run aborted")
            for i in todo:
                if i not in records:
                    rec = base_record(rows[i], cfg)
                    rec.error = f"job aborted: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                    records[i] = rec
        log.info("rendered %d rows in %.1fs", len(todo), time.perf_counter() - t0)
    if bar is not None:
        bar.close()
    return [records[i] for i in range(len(rows))]
