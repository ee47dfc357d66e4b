"""Rows -> audio objects + manifest records. Shared by the Ray Data workers and the one-process runner.

Per row: split the text into chunks, synthesize all chunks of all rows of a batch in one backend call
(same voice and seed across a row's chunks; when that call raises, each row is sent again alone, so only a row the
backend chokes on fails), retry chunks whose runaway guard tripped with another seed,
join with pauses, check quality, resample/encode, then write the audio object and, last, its JSON
sidecar. The sidecar is the commit marker: an output counts as done only when both exist and agree.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import deliver
from .audio import check_pause
from .inputs import SEED_MAX, Utterance
from .lease import LeaseLost, check_writes
from .lexicon import Lexicon
from .manifest import ManifestRecord, from_sidecar
from .mastering import MasterConfig
from .quality import QualityConfig
from .split import key_text, normalize_text
from .storage import Sink, StorageError, content_key, text_hash
from .synth import Backend, ChunkJob, ChunkResult

log = logging.getLogger(__name__)
RETRY_REASONS = ("guard", "max_new_tokens")  # finish reasons that count as a runaway
SEED_STRIDE = 1_000_003
NOT_RENDERED = "not rendered: the job was stopped before this row finished (the next run renders it)"


class Halt:
    """What stops a batch, on one path: the job's stop event (SIGTERM) or the pass's lost lease (catalog, S3: the
    sink's fence refused a write, or the check before the batch). Once set no backend call is made; once the lease
    is lost nothing more is written either. `is_set` as an Event's."""

    def __init__(self, stop: threading.Event | None) -> None:
        self.stop = stop
        self.lost: str | None = None   # the record error of rows left by a lost lease

    def is_set(self) -> bool:
        return self.lost is not None or (self.stop is not None and self.stop.is_set())

    def lose(self, e: LeaseLost) -> None:
        self.lost = self.lost or f"not rendered: {e}"

    @property
    def error(self) -> str:
        return self.lost or NOT_RENDERED


@dataclass(frozen=True)
class RenderConfig:
    """Everything that shapes an output (and therefore its key), plus retry policy.

    `models` maps each model name rows use to its resolved spec (jobs.models.ModelSpec.to_dict(): checkpoint digest
    and the audio settings outside the request); `voice_files` maps voice-prompt file paths to their content hash.
    `revision` labels models without a spec (test backends). What workers open is named by absolute paths resolved
    in the driver (`models[name]["path"]`, `voice_paths`), never as rows name it: a worker's working directory is
    its Ray node's; keys and the manifest keep the names as given.
    """

    model: str
    revision: str = "unknown"
    max_chars: int = 200
    pause_s: float = 0.4
    max_attempts: int = 3
    sampling: dict[str, Any] = field(default_factory=dict)
    quality: QualityConfig = QualityConfig()
    key_prefix: str = "audio"
    retry_on: tuple[str, ...] = RETRY_REASONS  # tiny random checkpoints: ("guard",) accepts max_new_tokens
    master: MasterConfig = MasterConfig()     # delivery preset (jobs/mastering.py)
    speed: float = 1.0                        # pitch-preserving time stretch, 0.25-4.0
    lexicon: Lexicon = Lexicon()              # respellings applied before synthesis
    captions: bool = False                    # one sentence per chunk, .srt + .vtt per output
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    voice_files: dict[str, str] = field(default_factory=dict)
    voice_paths: dict[str, str] = field(default_factory=dict)  # engine: voice-prompt file -> its absolute path

    def __post_init__(self) -> None:
        if isinstance(self.master, dict):  # asdict() round trip to the Ray workers
            object.__setattr__(self, "master", MasterConfig(**self.master))
        if isinstance(self.lexicon, dict):
            object.__setattr__(self, "lexicon", Lexicon(**self.lexicon))
        from qwen_tts_core.audio_fx import check_speed

        object.__setattr__(self, "speed", check_speed(self.speed))
        object.__setattr__(self, "retry_on", tuple(self.retry_on))
        bad = set(self.retry_on) - set(RETRY_REASONS)
        if bad:
            raise ValueError(f"retry_on must be a subset of {list(RETRY_REASONS)}, got {sorted(bad)}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts!r}")
        check_pause(self.pause_s)

    def revision_of(self, model: str) -> str:
        spec = self.models.get(model)
        return str(spec["digest"]) if spec else self.revision


def key_fields(row: Utterance, cfg: RenderConfig) -> dict[str, Any]:
    """Every input of the audio: the text, the row's voice/language/instruct/seed, the resolved checkpoint (its
    digest, not its name) with the settings that change its output, chunking, sampling and the runaway policy."""
    model = row.model or cfg.model
    spec = cfg.models.get(model)
    fields = {"text": key_text(row.text), "voice": row.voice, "language": (row.language or "auto").lower(),
              "instruct": row.instruct, "checkpoint": cfg.revision_of(model), "seed": row.seed,
              "format": row.format, "sample_rate": row.sample_rate, "max_chars": cfg.max_chars,
              "pause_s": cfg.pause_s, "sampling": dict(sorted(cfg.sampling.items())),
              "retry_on": sorted(cfg.retry_on)}
    if spec is None:  # nothing resolved (test backends): the name is all we know
        fields["model"] = model
    else:
        fields["audio"] = dict(sorted(spec.get("audio", {}).items()))
    if row.voice in cfg.voice_files:
        fields["voice_file"] = cfg.voice_files[row.voice]
    fields.update(deliver.key_extra(row.text, cfg))  # mastering, speed, lexicon, captions (empty by default)
    return fields


def plan_key(row: Utterance, cfg: RenderConfig) -> tuple[str, str]:
    """(object key, canonical params JSON) for a valid row."""
    fields = key_fields(row, cfg)
    ext = deliver.extension(row.format, cfg)
    params = {k: v for k, v in fields.items() if k != "text"}
    return content_key(fields, row.id, ext, cfg.key_prefix), json.dumps(params, sort_keys=True)


def sidecar_key(key: str) -> str:
    return f"{key}.json"


def base_record(row: Utterance, cfg: RenderConfig) -> ManifestRecord:
    model = row.model or cfg.model
    rec = ManifestRecord(id=row.id, key=None, status="failed", error=row.error, model=model,
                         revision=cfg.revision_of(model), voice=row.voice, language=row.language, instruct=row.instruct,
                         seed=row.seed, format=row.format, text_hash=text_hash(normalize_text(row.text)))
    if row.error is None:
        try:
            rec.key, rec.params = plan_key(row, cfg)
        except Exception as e:  # noqa: BLE001 - a row that slipped past check_row fails alone
            rec.error = f"key: {type(e).__name__}: {e}"
    return rec


def existing_output(sink: Sink, row: Utterance, cfg: RenderConfig, this_run: bool = False,
                    ) -> ManifestRecord | None:
    """The committed record for this row's key when the object exists and matches its sidecar, else None; the
    catalog's fields (`previous_keys`, `layout`, `catalog`) are never taken from the sidecar.

    Its `retries` are cleared unless `this_run` (this job rendered it: runner._committed): they tell what was
    retried in the run that rendered it (its sidecar keeps them, with its `attempts`); a reusing run retried nothing
    for it, and its manifest and summary say what this run did."""
    key, _ = plan_key(row, cfg)
    raw = sink.get(sidecar_key(key))
    if raw is None:
        return None
    rec = from_sidecar(raw)  # anything but a well-formed record (null, a list, wrong types) is "not done"
    if rec is None:
        return None
    if rec.key != key or sink.size(key) != rec.bytes:   # a row of zero samples (44 bytes of WAV) is done too
        return None
    rec.id, rec.reused, rec.url = row.id, not this_run, sink.url(key)
    rec.retries = rec.retries if this_run else []
    # only what rendering wrote is taken from the sidecar: what the catalog keeps on a record (earlier versions to
    # delete, package files, its owner) is the catalog's own, from its manifest; a sidecar edited to list other
    # keys there must never make a pass delete them
    rec.previous_keys, rec.layout, rec.catalog, rec.error = [], [], None, None
    return rec


def worker_model(row: Utterance, cfg: RenderConfig) -> str:
    """The model a worker loads for `row`: a local folder's absolute path (resolved in the driver), else its name."""
    model = row.model or cfg.model
    return (cfg.models.get(model) or {}).get("path") or model


def _chunk_jobs(row: Utterance, cfg: RenderConfig, chunks: list[str], attempt: int) -> list[ChunkJob]:
    seed = (row.seed + attempt * SEED_STRIDE) % SEED_MAX  # retries stay in the engine's seed range
    model = worker_model(row, cfg)
    voice = cfg.voice_paths.get(row.voice, row.voice) if row.voice else row.voice
    return [ChunkJob(text=c, voice=voice, language=row.language, instruct=row.instruct, seed=seed,
                     model=model, sampling=dict(cfg.sampling)) for c in chunks]


def _finite(res: ChunkResult) -> bool:
    """False when a chunk's audio holds NaN or inf (e.g. a half-precision overflow): retried like a runaway."""
    return res.pcm is None or bool(np.isfinite(np.asarray(res.pcm, dtype=np.float32)).all())


def _raised(backend: Backend, jobs: list[ChunkJob]) -> tuple[list[ChunkResult], BaseException | None]:
    """One backend call; a call that raises gives every job its error (and the exception)."""
    try:
        return backend.synthesize(jobs), None
    except Exception as e:  # noqa: BLE001 - a crashed backend call fails these chunks, not the job
        return [ChunkResult(None, "error", f"{type(e).__name__}: {e}") for _ in jobs], e


def _call(backend: Backend, jobs: list[ChunkJob], owners: list[int], stop: threading.Event | Halt | None = None,
          ) -> list[ChunkResult | None]:
    """One backend call for `jobs` (`owners[i]`: the row of jobs[i]). When a call holding more than one row's chunks
    raises, each of those rows is sent again alone (all its chunks in one call), so only a row whose own call
    raises gets the error: one input the backend chokes on no longer fails the rows batched with it, on every run.
    Nothing is sent more than twice and nothing waits: a backend that is down entirely costs one more (failing) call
    per row of the batch, never a retry loop (the backends wait out back-pressure and lost replicas themselves).
    Once `stop` is set (SIGTERM) no row is sent again: its chunks' results are None (not rendered)."""
    first, err = _raised(backend, jobs)
    out: list[ChunkResult | None] = list(first)
    rows = list(dict.fromkeys(owners))
    if err is None:
        return out
    if len(rows) == 1:
        log.error("backend failed on %d chunk(s) of one row: %s", len(jobs), err, exc_info=err)
        return out
    log.warning("backend failed on %d chunks of %d rows (%s: %s); sending each row again alone", len(jobs),
                len(rows), type(err).__name__, err)
    for row in rows:
        idx = [i for i, o in enumerate(owners) if o == row]
        if stop is not None and stop.is_set():
            for i in idx:
                out[i] = None
            continue
        alone, e = _raised(backend, [jobs[i] for i in idx])
        if e is not None:
            log.error("backend failed on %d chunk(s) of one row: %s", len(idx), e, exc_info=e)
        for i, res in zip(idx, alone):
            out[i] = res
    return out


def _synthesize_all(rows: list[Utterance], chunks: list[list[str]], backend: Backend, cfg: RenderConfig,
                    stop: threading.Event | Halt | None = None,
                    ) -> tuple[list[list[ChunkResult | None]], list[int], set[int]]:
    """All chunks of all rows, retrying runaway chunks with a new seed; returns results, attempts and the rows left
    unfinished because `stop` was set (no backend call is made after it: not rendered, for the next run)."""
    results: list[list[ChunkResult | None]] = [[None] * len(c) for c in chunks]
    attempts = [0] * len(rows)
    stopped: set[int] = set()
    todo = [(r, c) for r in range(len(rows)) for c in range(len(chunks[r]))]
    for attempt in range(cfg.max_attempts):
        if not todo:
            break
        if stop is not None and stop.is_set():
            stopped.update(r for r, _ in todo)
            break
        jobs = [_chunk_jobs(rows[r], cfg, [chunks[r][c]], attempt)[0] for r, c in todo]
        for r in {r for r, _ in todo}:
            attempts[r] = attempt + 1
        out = _call(backend, jobs, [r for r, _ in todo], stop)
        retry = []
        for (r, c), res in zip(todo, out):
            if res is None:
                stopped.add(r)
                continue
            results[r][c] = res
            if res.error is None and (res.finish_reason in cfg.retry_on or not _finite(res)):
                retry.append((r, c))
        todo = retry
    return results, attempts, stopped


def _finish_row(row: Utterance, rec: ManifestRecord, res: list[ChunkResult | None], sink: Sink,
                cfg: RenderConfig, texts: list[str] | None = None) -> ManifestRecord:
    rec.retries = sorted({r for x in res if x is not None for r in x.retries})
    errors = [x.error for x in res if x is None or x.error is not None]
    if errors:
        rec.error = str(errors[0] or "chunk missing")
        return rec
    reasons = [str(x.finish_reason) for x in res]  # type: ignore[union-attr]
    rec.finish_reasons = reasons
    runaway = [r for r in reasons if r in cfg.retry_on]
    if runaway:
        rec.error = f"runaway guard tripped ({runaway[0]}) after {rec.attempts} attempt(s)"
        return rec
    broken = [i for i, x in enumerate(res) if not _finite(x)]  # type: ignore[arg-type]
    if broken:
        rec.error = (f"chunk {broken[0] + 1} of {len(res)}: non-finite samples (NaN/inf) after {rec.attempts} "
                     "attempt(s)")
        return rec
    sr_in = res[0].sample_rate  # type: ignore[union-attr]
    # speed, join, quality flags, mastering or plain encoding, measurements, captions (jobs/deliver.py)
    try:
        objects = deliver.finish_audio(row, rec, [x.pcm for x in res], sr_in, cfg, texts)  # type: ignore[union-attr, misc]
    except Exception as e:  # noqa: BLE001 - a row that cannot be mastered fails alone, never the batch
        log.exception("delivery failed for %s", row.id)
        rec.status, rec.error = "failed", f"deliver: {type(e).__name__}: {e}"
        return rec
    rec.error = None
    try:
        for key, data, ctype in objects:
            sink.put(key, data, ctype)
        sink.put(sidecar_key(rec.key), json.dumps(rec.to_dict()).encode(), "application/json")  # type: ignore[arg-type]
    except LeaseLost:
        raise   # (render_rows: the pass stops, the row is not rendered)
    except StorageError as e:
        rec.status, rec.error = "failed", f"storage: {e}"
        return rec
    rec.url = sink.url(rec.key)  # type: ignore[arg-type]
    return rec


def render_rows(rows: list[Utterance], backend: Backend, sink: Sink, cfg: RenderConfig,
                skip_existing: bool = True, on_row: Callable[[ManifestRecord], None] | None = None,
                stop: threading.Event | None = None) -> list[ManifestRecord]:
    """Render a batch of rows; never raises for a row's failure (it is in the returned record). `on_row` sees each
    record as soon as its row is finished (progress). Once `stop` is set no backend call is made (a batch call that
    failed is not sent again row by row, no runaway is retried): a row not finished then is not written, not shown
    to `on_row`, and its returned record says NOT_RENDERED (the next run renders it). A lost lease (a fenced sink:
    checked before the batch's first call, and by each write) stops the batch the same way, and nothing is written
    after it: each row left says `not rendered:` and why."""
    records = [base_record(r, cfg) for r in rows]
    todo: list[int] = []
    for i, row in enumerate(rows):
        if row.error is not None:
            continue
        if skip_existing:
            try:
                found = existing_output(sink, row, cfg)
            except StorageError as e:
                records[i].error = f"storage: {e}"
                continue
            if found is not None:
                records[i] = found
                continue
        todo.append(i)
    plans = [deliver.plan_text(rows[i].text, cfg) for i in todo]  # lexicon; a sentence per chunk for captions
    chunks = [p.synth for p in plans]
    for i, c, p in zip(todo, chunks, plans):
        records[i].num_chunks, records[i].lexicon = len(c), p.fired
        if not c:
            records[i].error = "text: nothing to say after cleaning"
    live = [k for k, c in enumerate(chunks) if c]
    halt = Halt(stop)
    if live:
        try:
            check_writes(sink)
        except LeaseLost as e:
            halt.lose(e)
        except StorageError as e:   # (not known to be lost: each write reads it again, and fails while it cannot)
            log.warning("could not read the catalog lease before a batch (%s)", e)
    results, attempts, stopped = _synthesize_all([rows[todo[k]] for k in live], [chunks[k] for k in live], backend,
                                                  cfg, halt)
    for j, (k, res, n) in enumerate(zip(live, results, attempts)):
        i = todo[k]
        records[i].attempts = n
        if j not in stopped and halt.lost is None:
            try:
                records[i] = _finish_row(rows[i], records[i], res, sink, cfg, plans[k].display)
            except LeaseLost as e:
                halt.lose(e)
        if j in stopped or halt.lost is not None:
            left = base_record(rows[i], cfg)
            left.attempts, left.num_chunks, left.lexicon, left.error = n, len(chunks[k]), plans[k].fired, halt.error
            records[i] = left
            continue
        if on_row is not None:
            on_row(records[i])
    if on_row is not None:
        rendered = {todo[k] for k in live}
        for i, rec in enumerate(records):
            if i not in rendered:
                on_row(rec)
    return records

