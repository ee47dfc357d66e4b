"""Bulk narration: `python -m jobs.narrate INPUT --model CKPT --out file://./output|s3://bucket/prefix`.

INPUT is a .txt/.md file (one chapter), a folder of chapter files, or JSONL/Parquet rows (id, text,
voice|speaker, language, instruct, model, seed, format, sample_rate). Writes one audio object per row
under a content-derived key, a JSON sidecar per object, and `manifest.parquet`, then the `--book`; prints a JSON
summary last. Exit code: 0 all good, 1 some rows failed or were not rendered (see the manifest) or the book was not
made (the summary's `book.error`), 2 nothing done: bad arguments, an unusable input, output, model or voice (checked
before any work starts), 3 the rows were rendered but the manifest could not be written (it is kept locally; the
message says where).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwen_tts_core.errors import RequestError, shown
from qwen_tts_core.types import SAMPLE_RATE, SamplingParams

from . import deliver
from .audio import MAX_PAUSE_S
from .inputs import (
    FORMATS,
    SAMPLE_RATES,
    InputLimits,
    RowDefaults,
    Utterance,
    check_seed,
    is_unicode,
    printable,
    read_inputs,
)
from .lexicon import Lexicon
from .lexicon import load as load_lexicon
from .manifest import ManifestRecord, from_parquet, summarize, to_jsonl, to_parquet
from .mastering import PRESET_CODECS, PRESETS, MasterConfig
from .models import check_voices, resolve_models, voice_file_digests, voice_file_paths
from .render import RenderConfig
from .runner import BACKENDS, RUNNERS, RunOptions, resolve_backend, run_rows, stop_on_sigterm
from .split import MIN_CHUNK_CHARS
from .storage import LocalSink, RetryPolicy, StorageError, open_sink
from .synth import EngineOptions, error_text

log = logging.getLogger(__name__)
SAMPLING_ARGS = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")


def load_config(path: str | None, command: str | None = None) -> dict[str, Any]:
    """A YAML file of option defaults (keys: the options' destinations, see configs/jobs/narrate.yaml). One format
    serves narrate and catalog; `command` (the one reading it) gets a warning naming the keys only the other one
    uses (a `layout:` in a narrate config did nothing, silently)."""
    if not path:
        return {}
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config: {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config: {p} is not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"config: {p} must hold a mapping of option names to values")
    data = {k: v for k, v in data.items() if v is not None}   # `key: ~` in YAML: the option is not set
    check_config(data, p)
    if command is not None:
        from .catalog import build_parser as catalog_parser

        mine = {a.dest for a in (build_parser() if command == "narrate" else catalog_parser())._actions}
        other = "catalog" if command == "narrate" else "narrate"
        unused = sorted(set(data) - mine)
        if unused:
            log.warning("config %s: %s %s only for %s; %s ignores %s", p, unused, "is" if len(unused) == 1 else "are",
                        other, command, "it" if len(unused) == 1 else "them")
    return data


COMMAND_LINE_ONLY = ("input", "catalog", "config", "retire_all")
"""What a config file cannot give: what to read, the config itself, and a catalog's retirement of all its prompts
(a config shared by runs must not turn that on for each)."""


def option_value(args: argparse.Namespace, conf: dict[str, Any], name: str, default: Any) -> Any:
    """An option's value: the command line's, else the config file's, else `default` (the one precedence rule;
    options whose value on the command line can be "not given" have a default of None)."""
    v = getattr(args, name, None)
    return v if v is not None else conf.get(name, default)


def check_config(conf: dict[str, Any], where: Any) -> None:
    """Every key is an option of `narrate` or `catalog`, every value of its option's kind: an integer or a number for
    a numeric option (its range is checked where it is used), true/false for a switch, one of the choices, else a
    string.
    ValueError naming the key (a YAML list or number where a string goes failed as a TypeError deep inside)."""
    from .catalog import build_parser as catalog_parser

    actions = {a.dest: a for parser in (build_parser(), catalog_parser()) for a in parser._actions}
    command_line = sorted(set(conf) & set(COMMAND_LINE_ONLY))
    if command_line:
        raise ValueError(f"config: {command_line} can only be given on the command line")
    unknown = set(conf) - set(actions)
    if unknown:
        keys = sorted(set(actions) - {"help", "func", *COMMAND_LINE_ONLY})
        raise ValueError(f"config: unknown option(s) {shown(sorted(map(str, unknown)))}; the keys are {keys}")
    for key, v in conf.items():
        a = actions[key]
        if a.choices is not None:
            ok, want = v in a.choices, f"one of {list(a.choices)}"
        elif isinstance(a, argparse._StoreTrueAction | argparse._StoreFalseAction):
            ok, want = isinstance(v, bool), "true or false"
        elif a.type is int:   # (its range is checked where it is used)
            ok = isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and v.is_integer()
            want = "an integer"
        elif a.type is float:
            ok, want = isinstance(v, int | float) and not isinstance(v, bool), "a number"
        else:
            ok, want = isinstance(v, str), "a string"
        if not ok:
            raise ValueError(f"{flag(key)} must be {want}, got {shown(v)} (config {where})")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared by `narrate` and `catalog`."""
    p.add_argument("--config", help="YAML file with defaults for these options (e.g. configs/jobs/*.yaml)")
    p.add_argument("--model", help="engine backend: checkpoint folder or hub id; Serve backend: the served model "
                   "name (no '/'; default: the app's only model). Rows may name their own `model`.")
    p.add_argument("--revision", help="engine backend: the hub revision (branch, tag or commit) to load; keys use "
                   "the digest of what it resolves to. Serve backend: a label for a service that reports no digest")
    p.add_argument("--out", dest="output", help="file://DIR (default file://./output) or s3://bucket/prefix")
    p.add_argument("--voice", help="default voice/speaker for rows without one")
    p.add_argument("--language", help="default language (default auto)")
    p.add_argument("--instruct", help="default instruction / voice description")
    p.add_argument("--seed", type=int, help="default seed (default 0)")
    p.add_argument("--format", choices=FORMATS, help="default audio format (default wav)")
    p.add_argument("--sample-rate", type=int, help=f"default output sample rate (default {SAMPLE_RATE})")
    p.add_argument("--max-chars", type=int, help="chunk budget in characters (default 200)")
    p.add_argument("--pause", type=float, dest="pause_s", help="seconds of silence between chunks, 0-60 (default 0.4)")
    p.add_argument("--attempts", type=int, dest="max_attempts", help="tries per chunk when the guard trips (default 3)")
    p.add_argument("--backend", help=f"{' | '.join(BACKENDS)} | module:Class (default auto: Serve app if running)")
    p.add_argument("--runner", choices=RUNNERS, help="ray (default) or local (one process, no Ray)")
    p.add_argument("--actors", type=int, help="engine actors (default 1)")
    p.add_argument("--num-cpus", type=float, help="CPUs per actor (default 0.5)")
    p.add_argument("--num-gpus", type=float, help="GPUs per actor (default 0)")
    p.add_argument("--batch-size", type=int, help="rows per map_batches batch (default 4)")
    p.add_argument("--serve-app", help="Serve app name (default qtts)")
    p.add_argument("--max-inflight-per-replica", type=int, help="Serve backend: calls in flight per replica, all "
                   "workers together (default 4); replicas answering Busy are waited out")
    p.add_argument("--voices-uri", help="engine backend, Base models: the voice store (folder or s3://) holding "
                   "the voice ids rows name (a voice may also be a voice-prompt file)")
    p.add_argument("--max-row-chars", type=int, help="longest row text in characters (default 200000); a longer "
                   "row fails, naming it")
    p.add_argument("--max-input-bytes", type=int, help="largest input file in bytes (default 256 MiB)")
    p.add_argument("--ray-address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    p.add_argument("--device", help="engine device (default cpu)")
    p.add_argument("--dtype", help="engine dtype (default float32)")
    p.add_argument("--max-sessions", type=int, help="engine batch size (default 8)")
    p.add_argument("--retry-on", help="finish reasons that count as a runaway and are retried with another "
                   "seed: guard,max_new_tokens (default both, or guard alone when --max-new-tokens is given: "
                   "then hitting that cap ends a chunk)")
    p.add_argument("--guard-frames-per-token", type=float, help="engine runaway guard (default 8.0; 0: off)")
    p.add_argument("--guard-base-frames", type=int, help="engine runaway guard base frames (default 64)")
    p.add_argument("--master", choices=PRESETS, help="mastering preset: acx (MP3 for audiobook stores), podcast "
                   "(-19 LUFS MP3/Opus), telephony (-19 dBm0 G.711/linear) or none (default: plain --format)")
    p.add_argument("--codec", help="the preset's codec: acx mp3; podcast mp3|opus; telephony ulaw|alaw|sln|sln16 "
                   f"(default: {', '.join(f'{k} {next(iter(v))}' for k, v in PRESET_CODECS.items() if v)})")
    p.add_argument("--tail-silence", type=float, help="telephony: seconds of silence after the prompt (default 0.3)")
    p.add_argument("--speed", type=float, help="speaking rate 0.25-4.0, pitch kept (default 1.0)")
    p.add_argument("--lexicon", help="pronunciation lexicon (.yaml or .csv: word -> respelling; see jobs/lexicon.py)")
    p.add_argument("--captions", action="store_true", default=None,
                   help="synthesize a sentence per chunk and write .srt and .vtt captions next to each file")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar (no progress log lines either)")
    p.add_argument("--verbose", action="store_true", default=None,
                   help="also show Ray Data's own progress bars and log lines")
    p.add_argument("--quiet", action="store_true", default=None, help="do not print the manifest table")
    for name in SAMPLING_ARGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=float if "_p" in name or "temp" in name
                       or "penalty" in name else int,
                       help="frames per chunk at most (default: the checkpoint's)" if name == "max_new_tokens"
                       else f"sampling {name} for every row (default: the checkpoint's)")


def build_options(args: argparse.Namespace, key_prefix: str, conf: dict[str, Any] | None = None
                  ) -> tuple[RowDefaults, RenderConfig, RunOptions, InputLimits]:
    """CLI args over the YAML config (`conf`, default read from `args.config`: either command's options may sit in
    it, checked there) over built-in defaults -> the option objects (models are resolved later)."""
    conf = load_config(args.config) if conf is None else conf

    def get(name: str, default: Any) -> Any:
        return option_value(args, conf, name, default)

    def num(name: str, default: Any) -> Any:
        return option_number(name, get(name, default))

    given = {k: v for k, v in vars(args).items() if v is not None}  # (an option not given is None in `args`)
    for name, v in {**conf, **given}.items():  # a lone surrogate (from argv or the config) would fail every row
        if isinstance(v, str) and not is_unicode(v):
            raise ValueError(f"{flag(name)} is not valid Unicode: {printable(v)[:80]!r}")
    if get("format", "wav") not in FORMATS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {get('format', 'wav')!r}")
    model = get("model", None)
    defaults = RowDefaults(voice=get("voice", None), language=get("language", "auto"),
                           instruct=get("instruct", None), model=model, seed=check_seed(get("seed", 0), "--seed"),
                           format=get("format", "wav"), sample_rate=num("sample_rate", SAMPLE_RATE))
    sampling = {k: get(k, None) for k in SAMPLING_ARGS if get(k, None) is not None}
    check_device(get("device", "cpu"))
    try:  # the core's rules, up front: a bad value would fail every row
        SamplingParams().with_overrides(**sampling)
    except RequestError as e:
        raise ValueError(f"{flag(e.field)} {e.message}") from None
    render = RenderConfig(model=model or "", revision=str(get("revision", None) or "unknown"),
                          max_chars=num("max_chars", 200), pause_s=num("pause_s", 0.4),
                          max_attempts=num("max_attempts", 3), sampling=sampling, key_prefix=key_prefix,
                          # a frame cap the user chose is an ending, not a runaway
                          retry_on=_retry_on(get("retry_on", "guard" if "max_new_tokens" in sampling
                                                 else "guard,max_new_tokens")),
                          master=MasterConfig(get("master", "none"), get("codec", None), get("tail_silence", None)),
                          speed=get("speed", 1.0), captions=bool(get("captions", False)),
                          lexicon=load_lexicon(get("lexicon", None)) if get("lexicon", None) else Lexicon())
    gfpt = num("guard_frames_per_token", 8.0)
    opts = RunOptions(output=get("output", "file://./output"), backend=get("backend", "auto"),
                      runner=get("runner", "ray"), actors=num("actors", 1),
                      num_cpus=num("num_cpus", 0.5), num_gpus=num("num_gpus", 0.0),
                      batch_size=num("batch_size", 4), serve_app=get("serve_app", "qtts"),
                      max_inflight_per_replica=num("max_inflight_per_replica", 4),
                      ray_address=get("ray_address", None), progress=bool(get("progress", True)),
                      verbose=bool(get("verbose", False)),
                      engine=EngineOptions(device=get("device", "cpu"), dtype=get("dtype", "float32"),
                                           max_sessions=num("max_sessions", 8),
                                           guard_frames_per_token=gfpt or None,
                                           guard_base_frames=num("guard_base_frames", 64),
                                           voices_uri=get("voices_uri", None)),
                      retry=RetryPolicy())
    limits = InputLimits(max_row_chars=num("max_row_chars", InputLimits.max_row_chars),
                         max_input_bytes=num("max_input_bytes", InputLimits.max_input_bytes))
    return defaults, render, opts, limits


# numeric options: (type, lowest, highest), checked up front (exit 2) and named as on the command line
NUMBERS: dict[str, tuple[type, float | None, float | None]] = {
    "sample_rate": (int, *SAMPLE_RATES), "max_chars": (int, MIN_CHUNK_CHARS, None),
    "pause_s": (float, 0, MAX_PAUSE_S), "max_attempts": (int, 1, None), "actors": (int, 1, None),
    "num_cpus": (float, 0, None),
    "num_gpus": (float, 0, None), "batch_size": (int, 1, None), "max_inflight_per_replica": (int, 1, None),
    "max_sessions": (int, 1, None), "guard_frames_per_token": (float, 0, None), "guard_base_frames": (int, 0, None),
    "max_row_chars": (int, 1, None), "max_input_bytes": (int, 1, None)}
_FLAGS = {"pause_s": "--pause", "max_attempts": "--attempts", "output": "--out"}


def check_device(device: str) -> None:
    """A device torch knows ("cpu", "cuda", "cuda:1"); that it exists is the workers' to say (the driver may have
    no GPU). ValueError naming --device: a bad one failed every row."""
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be a torch device such as cpu, cuda or cuda:1, got {shown(device)}") \
            from None


def flag(name: str) -> str:
    """An option's name as typed on the command line (its config key is `name`)."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def option_number(name: str, value: Any) -> Any:
    """`value` as the type NUMBERS gives `name`, within its bounds; ValueError naming the option otherwise."""
    kind, lo, hi = NUMBERS[name]
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        x = kind(value)
        if x != x:  # NaN
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{flag(name)} must be {what}, got {value!r}") from None
    if not math.isfinite(x):  # inf passes float() and every ">= lo" bound, then fails or exhausts every row
        raise ValueError(f"{flag(name)} must be a finite number, got {value!r}")
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        bounds = f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None \
            else f"<= {hi}"
        raise ValueError(f"{flag(name)} must be {what} {bounds}, got {value!r}")
    return x


def _retry_on(value: str | list[str]) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(i.strip() for i in items if i.strip() and i.strip() != "none")


def prepare(rows: list[Utterance], defaults: RowDefaults, render: RenderConfig, opts: RunOptions,
            ) -> tuple[list[Utterance], RenderConfig, RunOptions, str]:
    """Everything checked before any work: the backend, every model (resolved once), the voices.

    Returns (rows with row-level errors marked, render config holding the model specs, run options, backend).
    Raises ValueError (exit 2) for what would fail every row: no model, an unusable --model, a missing or
    invalid default voice.
    """
    backend = resolve_backend(opts)
    revision = render.revision if render.revision != "unknown" else None
    rows, specs, default_model = resolve_models(rows, defaults.model, backend, engine=opts.engine,
                                                app=opts.serve_app, revision=revision)
    rows = check_voices(rows, specs, default_model, defaults.voice, defaults.instruct)
    voice_paths = voice_file_paths(rows, specs, default_model)
    render = replace(render, model=default_model or "", models={k: v.to_dict() for k, v in specs.items()},
                     voice_files=voice_file_digests(voice_paths),
                     voice_paths={k: str(p) for k, p in voice_paths.items()} if backend == "engine" else {})
    if backend == "serve" and opts.num_gpus:
        log.warning("--num-gpus ignored with the Serve backend: the replicas hold the GPUs, job workers only "
                    "call them")
        opts = replace(opts, num_gpus=0.0)
    return rows, render, opts, backend


def print_manifest(records: list[ManifestRecord], out: Any = None) -> None:
    """A short human-readable table of the manifest (on `out`, default the sys.stdout of the call, where the
    summary goes: not the one of import time)."""
    out = sys.stdout if out is None else out
    print(f"{'id':<24} {'status':<8} {'dur_s':>7} {'tries':>5}  key / error", file=out)
    for r in records:
        detail = r.key if r.status not in ("failed",) else f"ERROR {r.error}"
        flags = f" [{','.join(r.flags)}]" if r.flags else ""
        line = f"{r.id[:24]:<24} {r.status:<8} {r.duration_s:>7.2f} {r.attempts:>5}  {detail}{flags}"
        print(printable(line), file=out)


MANIFEST_RETRY = RetryPolicy(attempts=4, base_delay=1.0, max_delay=8.0)


def _keep_locally(name: str, data: bytes, suffix: str = ".parquet") -> Path:
    """Write a manifest that could not reach the output to the working directory (or the temp dir), all or nothing
    (LocalSink: temp file + rename, the temp file removed on failure): a full disk leaves no truncated file that
    looks like a manifest.

    Raises:
        StorageError: neither place took it (naming both and why).
    """
    file = f"{Path(name).stem}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}{suffix}"
    errors = []
    for folder in (os.getcwd, tempfile.gettempdir):
        try:
            sink = LocalSink(folder(), RetryPolicy(attempts=1))
            sink.put(file, data)
            return Path(sink.root) / file
        except (OSError, StorageError) as e:
            errors.append(str(e))
    raise StorageError(f"cannot keep the manifest locally either ({'; '.join(errors)})")


def _kept(name: str, data: bytes, suffix: str, why: str, error: str, advice: str = "") -> dict[str, str]:
    """Keep the manifest locally after `why` (the output did not take it); the summary fields: `manifest_error`
    (`error`) and `manifest_local` (where), or no `manifest_local` when it is lost. Never raises: the summary is
    printed whatever happens here."""
    try:
        local = _keep_locally(name, data, suffix)
    except StorageError as e:
        print(f"error: {why}; {e}: this run's manifest is lost (its outputs are kept; a re-run writes it)",
              file=sys.stderr, flush=True)
        return {"manifest_error": f"{error[:300]}; {e}"[:500]}
    print(f"error: {why}; kept it locally at {local}{advice}", file=sys.stderr, flush=True)
    return {"manifest_error": error[:500], "manifest_local": str(local)}


def write_manifest(records: list[ManifestRecord], opts: RunOptions, manifest_key: str,
                   ) -> tuple[str | None, dict[str, str]]:
    """Write the manifest (retried, whatever the error); on final failure keep it locally. Never raises.
    Returns (its URL or None, extra summary fields: `manifest_error`, `manifest_local` where it was kept)."""
    sink = open_sink(opts.output, opts.retry)
    try:
        data = to_parquet(records)
    except Exception as e:  # noqa: BLE001 - a value Arrow cannot hold must not lose the manifest
        log.exception("cannot encode the manifest as Parquet")
        why = f"cannot encode the manifest as Parquet ({type(e).__name__}: {e})"
        return None, _kept(manifest_key, to_jsonl(records), ".jsonl", why, why, " (as JSON lines)")
    last: Exception | None = None
    for attempt in range(MANIFEST_RETRY.attempts):
        try:
            sink.put(manifest_key, data, "application/vnd.apache.parquet")
            return sink.url(manifest_key), {}
        except (StorageError, OSError) as e:
            last = e
            if attempt + 1 < MANIFEST_RETRY.attempts:
                delay = min(MANIFEST_RETRY.max_delay, MANIFEST_RETRY.base_delay * 2**attempt)
                log.warning("manifest write failed (%s); retry %d/%d in %.0f s", e, attempt + 1,
                            MANIFEST_RETRY.attempts - 1, delay)
                time.sleep(delay)
    url = sink.url(manifest_key)
    why = f"could not write the manifest to {url} after {MANIFEST_RETRY.attempts} attempts ({last})"
    return None, _kept(manifest_key, data, ".parquet", why, str(last), " - copy it there when the storage is back")


DROPPED_SHOWN = 10  # ids named in the warning and the summary's `dropped_ids`


def dropped_ids(records: list[ManifestRecord], opts: RunOptions, manifest_key: str) -> dict[str, Any] | None:
    """Ids the output's previous manifest lists that this run's rows lack (another input written to the same
    --out, or an edited book that lost a chapter): this run's manifest replaces that one, so their objects would be
    listed nowhere. Warns once and returns the summary's `dropped_ids` ({"rows": n, "ids": first few}), or None.
    Never refuses and never raises: an unreadable previous manifest is only logged."""
    try:
        raw = open_sink(opts.output, opts.retry).get(manifest_key)
        previous = from_parquet(raw) if raw is not None else []
    except Exception as e:  # noqa: BLE001 - a check on the way out must not cost the run its manifest
        log.warning("could not read the previous manifest at %s to compare ids (%s)", opts.output, error_text(e))
        return None
    ids = {r.id for r in records}
    gone = sorted({r.id for r in previous} - ids)
    if not gone:
        return None
    log.warning("%d id(s) of the previous manifest at %s are not in this input (%s): their objects stay in storage, "
                "unlisted; use another --out per input", len(gone), opts.output,
                ", ".join(map(repr, gone[:DROPPED_SHOWN])))
    return {"rows": len(gone), "ids": gone[:DROPPED_SHOWN]}


def finish(records: list[ManifestRecord], opts: RunOptions, manifest_key: str, t0: float,
           quiet: bool, after: Callable[[], dict[str, Any]] | None = None) -> int:
    """Write the manifest, then run `after` (the book) for more summary fields, print the table and the JSON
    summary (last line); returns the exit code. The manifest comes first: what comes after can take minutes (a
    book of a long job) or fail in any way, and neither may cost the record of what was rendered."""
    dropped = dropped_ids(records, opts, manifest_key)  # before this run's manifest replaces the previous one
    url, extra = write_manifest(records, opts, manifest_key)
    if dropped:
        extra = {**extra, "dropped_ids": dropped}
    more = after() if after else {}
    summary = summarize(records)
    summary.update(output=open_sink(opts.output, opts.retry).uri, manifest=url,
                   wall_s=round(time.perf_counter() - t0, 2), **extra, **more)
    if not quiet:
        print_manifest(records)
    print(json.dumps(summary), flush=True)
    return exit_code(summary)


def exit_code(summary: dict[str, Any]) -> int:
    """3: the manifest was not written to the output; 1: a row failed or was not rendered, or the book was not made
    (`book.error`); else 0."""
    if "manifest_error" in summary:
        return 3
    return 1 if summary["failed"] or "error" in (summary.get("book") or {}) else 0


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    stop = stop_on_sigterm()
    try:
        conf = load_config(args.config, "narrate")
        defaults, render, opts, limits = build_options(args, "audio", conf)
        rows = read_inputs(args.input, defaults, limits)
        book = book_options(args, conf)
        rows, render, opts, backend = prepare(rows, defaults, render, opts)
        records = run_rows(rows, render, opts, desc="narrate", backend=backend, stop=stop)
        deliver.level_consistency(records, render)  # ACX: chapters within 1 dB of each other
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def the_book() -> dict[str, Any]:
        return {"book": make_book(records, rows, render, opts, book, stop)}

    quiet = bool(option_value(args, conf, "quiet", False))
    return finish(records, opts, "manifest.parquet", t0, quiet, after=the_book if book else None)


def book_options(args: argparse.Namespace, conf: dict[str, Any]) -> Any:
    """--book m4b and its metadata (None without --book); checked before any synthesis."""
    from .book import BOOK_FORMATS, BookMeta

    fmt = option_value(args, conf, "book", None)
    if not fmt:
        return None
    if fmt not in BOOK_FORMATS:
        raise ValueError(f"book must be one of {list(BOOK_FORMATS)}, got {fmt!r}")
    meta = BookMeta(**{k: option_value(args, conf, o, None) for k, o in
                       (("title", "book_title"), ("author", "author"), ("narrator", "narrator"), ("cover", "cover"))})
    meta.check()
    return meta


def make_book(records: list[ManifestRecord], rows: list[Utterance], render: RenderConfig, opts: RunOptions,
              meta: Any, stop: threading.Event | None = None) -> dict[str, Any]:
    """The book's summary entry, or {"error": why} when it was not made. Never raises: the chapters are written
    and in the manifest already; a book that fails is reported (exit 1) and the next run makes it."""
    from dataclasses import replace as _replace

    from .book import book_or_reuse, title_from

    if stop is not None and stop.is_set():  # a long book takes minutes: past a Kubernetes grace period
        log.warning("book: not made, the job was stopped; the next run makes it")
        return {"error": "book: not made, the job was stopped (SIGTERM) first; the next run makes it"}
    voices = sorted({r.voice for r in rows if r.voice})
    if not meta.narrator and voices:
        meta = _replace(meta, narrator=", ".join(voices))
    titles = [title_from(r.id, r.title) for r in rows]
    try:
        return book_or_reuse(records, titles, open_sink(opts.output, opts.retry), meta)
    except (ValueError, StorageError) as e:
        log.error("book not made: %s", e)
        return {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - an encoder or muxer error (PyAV), anything: report it, keep the rest
        log.exception("book not made")
        return {"error": f"book: {error_text(e)}"}


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m jobs.narrate", description=__doc__.split("\n")[0])
    p.add_argument("input", help="text/Markdown file, folder of chapters, or .jsonl/.parquet rows")
    add_common_args(p)
    p.add_argument("--book", choices=("m4b",), help="also write the chapters as one M4B with chapter markers (after "
                   "the manifest; not when stopped by SIGTERM; a book not made: exit 1, the summary's book.error)")
    p.add_argument("--book-title", help="--book: title (and album) tag")
    p.add_argument("--author", help="--book: author (artist) tag")
    p.add_argument("--narrator", help="--book: narrator (composer) tag (default: the voice)")
    p.add_argument("--cover", help="--book: cover art (.jpg or .png)")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
