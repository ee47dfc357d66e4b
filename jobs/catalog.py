"""Prompt catalogs: `python -m jobs.catalog CATALOG.yaml|csv --model CKPT --out URI [--every 1h]`.

A catalog lists prompts (id, text, voice, language, instruct, format, sample_rate; e.g. 8 kHz u-law for
telephony). Each run regenerates only prompts that are new or changed (content keys make unchanged
ones a no-op), marks or deletes prompts that left the catalog, and writes `catalog-manifest.parquet`.
Several catalogs may share an output: each owns its records there (`owned`, by the catalog's name) and retires
only its own, never an object another catalog's current prompts use.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import re
import sys
import threading
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from qwen_tts_core.errors import shown

from . import layout as layouts
from . import lease, pending
from .inputs import (
    InputLimits,
    RowDefaults,
    Utterance,
    check_row,
    mark_duplicates,
    printable,
    read_text,
)
from .manifest import ManifestRecord, ManifestSchemaError, read_stored, summarize
from .narrate import (
    add_common_args,
    build_options,
    load_config,
    option_value,
    prepare,
    print_manifest,
    write_manifest,
)
from .render import RenderConfig
from .retire import LIVE, RETIRE_MODES, held_keys, purge, reconcile
from .runner import RunOptions, run_rows, stop_on_sigterm
from .storage import Sink, StorageError, open_sink

log = logging.getLogger(__name__)
MANIFEST_KEY = "catalog-manifest.parquet"
# manifest rows a pass could not take as records, kept (JSON lines: {"why": ..., "row": the row as stored})
QUARANTINE_KEY = "catalog-manifest.quarantine.jsonl"
NAME_MAX = 100


def read_catalog(path: str | Path, defaults: RowDefaults, limits: InputLimits | None = None) -> list[Utterance]:
    """The catalog's prompts (`load_catalog` without the name)."""
    return load_catalog(path, defaults, limits)[0]


def load_catalog(path: str | Path, defaults: RowDefaults, limits: InputLimits | None = None,
                 ) -> tuple[list[Utterance], Any]:
    """YAML (a list of prompts, or {name: ..., defaults: {...}, prompts: [...]}) or CSV with a header row; returns
    the prompts and the YAML's `name:` (None when it has none; checked by `catalog_name`).

    A CSV row with more fields than the header fails (in the manifest): the usual cause is an unquoted comma in
    the text, and keeping the fields up to it would ship a prompt cut short.

    Raises:
        ValueError: missing, binary or too large file, unreadable YAML/CSV, or a document of the wrong shape. A
            catalog that lists no prompts is returned empty: `catalog_name` refuses it unless named explicitly.
    """
    p, limits = Path(path), limits or InputLimits()
    if not p.is_file():
        raise ValueError(f"catalog: {p} does not exist")
    suffix = p.suffix.lower()
    if suffix not in (".yaml", ".yml", ".csv"):
        raise ValueError(f"catalog: unsupported file type {p.suffix!r}; use .yaml, .yml or .csv")
    text = read_text(p, limits)
    too_many: dict[int, str] = {}  # CSV row index -> why it fails: an unquoted comma would cut its text
    name = None
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            doc = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, RecursionError) as e:  # an integer of over 4300 digits, deep nesting
            raise ValueError(f"catalog: {p} is not valid YAML ({type(e).__name__}: {str(e)[:200]})") from None
        if isinstance(doc, dict):
            extra = doc.get("defaults") or {}
            if not isinstance(extra, dict):
                raise ValueError("catalog: 'defaults' must be a mapping")
            raw_rows, name = doc.get("prompts"), doc.get("name")
            defaults = catalog_defaults(extra, defaults, p)
        else:
            raw_rows = doc
        if not isinstance(raw_rows, list):
            raise ValueError(f"catalog: {p} must be a list of prompts or a mapping with a 'prompts' list")
    else:
        try:
            with _field_limit(len(text) + 1):  # no field is longer than the file: a long text fails its row only
                raw_rows = _csv_rows(text, p, too_many)
        except csv.Error as e:
            raise ValueError(f"catalog: {p} is not valid CSV ({e})") from e
    rows = []
    for i, r in enumerate(raw_rows):
        row = check_row(r, defaults, where := f"{p.name}:{i + 1}", limits)
        rows.append(replace(row, text="", error=f"{printable(where)}: {too_many[i]}") if i in too_many else row)
    return mark_duplicates(rows), name


_FIELD_LIMIT = threading.Lock()


@contextlib.contextmanager
def _field_limit(chars: int) -> Iterator[None]:
    """csv's field size limit (131072 characters by default, one global) raised to `chars` while a catalog is read,
    then put back."""
    with _FIELD_LIMIT:
        old = csv.field_size_limit()
        csv.field_size_limit(max(old, chars))
        try:
            yield
        finally:
            csv.field_size_limit(old)


def _csv_rows(text: str, p: Path, too_many: dict[int, str]) -> list[dict[str, Any]]:
    """A CSV catalog's rows; `too_many` gets why each row with more fields than the header fails."""
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "id" not in reader.fieldnames or "text" not in reader.fieldnames:
        raise ValueError(f"catalog: {p} needs a header row with at least 'id' and 'text'")
    raw_rows: list[dict[str, Any]] = []
    for r in reader:
        cut = r.pop(None, None)  # fields past the header's (DictReader's restkey): never dropped silently
        if cut and any(c.strip() for c in cut):
            too_many[len(raw_rows)] = (f"line {reader.line_num} has {len(reader.fieldnames) + len(cut)} fields, the "
                                       f"header has {len(reader.fieldnames)}: quote a text that holds a comma "
                                       '("We are closed, please call again.")')
        raw_rows.append({k: v for k, v in r.items() if v not in (None, "")})
    return raw_rows


def catalog_name(option: Any, in_file: Any, path: str | Path, empty: bool = False, retire_all: bool = False) -> str:
    """The name this catalog's records carry at its output: `--name`, else the YAML's `name:`, else the file's stem
    (renaming the file renames the catalog: `--name`/`name:` keeps the old one), in Unicode NFC (a file name from
    macOS is NFD). ValueError (exit 2), naming `--name`, for one that is not a non-empty printable string of at most
    NAME_MAX characters without a path separator or surrounding spaces, or when `--name` and `name:` differ.
    `empty`: the catalog lists no prompts, which retires every prompt of its name: only with `--retire-all` (an
    export that failed down to a CSV header must not retire a catalog) and an explicit name."""
    option, in_file = (unicodedata.normalize("NFC", n) if isinstance(n, str) else n for n in (option, in_file))
    if retire_all and not empty:
        raise ValueError(f"--retire-all: {printable(str(path))} lists prompts; it retires a catalog through a file "
                         "that lists none")
    if empty and (not retire_all or option is None and in_file is None):
        raise ValueError(f"catalog: {printable(str(path))} lists no prompts; to retire every prompt of a catalog, "
                         "run a file with no prompts (prompts: [] or a CSV header) under its name (--name NAME or "
                         "name: NAME) with --retire-all")
    if option is not None and in_file is not None and option != in_file:
        raise ValueError(f"--name {shown(option)} differs from the catalog's name: {shown(in_file)}; give one")
    given = option if option is not None else in_file
    name = given if given is not None else unicodedata.normalize("NFC", Path(path).stem)
    why = ("must be a string" if not isinstance(name, str)
           else "must not be empty" if not name.strip()
           else f"is longer than {NAME_MAX} characters" if len(name) > NAME_MAX
           else "must not be a path (no / or \\, not . or ..)" if "/" in name or "\\" in name or name in (".", "..")
           else "must be printable (no control characters or invalid Unicode)" if not name.isprintable()
           else "must not start or end with a space" if name != name.strip() else None)
    if why and option is not None:
        raise ValueError(f"--name {shown(name)} {why}")
    if why:
        src = "name: in the catalog" if in_file is not None else f"from the file name {printable(Path(path).name)}"
        raise ValueError(f"catalog name {shown(name)} ({src}) {why}; give a valid one with --name")
    return name


def owned(records: list[ManifestRecord], name: str, ids: set[str],
          ) -> tuple[list[ManifestRecord], list[ManifestRecord], int]:
    """The ownership rule, the only one: which records at the output are this catalog's. Returns (this catalog's
    previous records, every other record, how many it adopts). A record without a name was written before catalogs
    had names: this catalog adopts it when its id is one of this run's (`ids`); any other stays unclaimed
    (`catalog` None) for the catalog that lists it. Other catalogs' records and unclaimed ones are written back
    untouched, and what their current prompts use is never deleted (`retire.purge`'s `shared`)."""
    adopt = [r for r in records if r.catalog is None and r.id in ids]
    mine = [*adopt, *(r for r in records if r.catalog == name)]  # (its own record of an id comes last: it wins)
    others = [r for r in records if r.catalog != name and not (r.catalog is None and r.id in ids)]
    return mine, others, len(adopt)


def look_alike(records: list[ManifestRecord], others: list[ManifestRecord]) -> list[str]:
    """Other catalogs at the output all (or all but one in ten) of whose current prompts (same id and content) are
    this one's: perhaps this catalog under its earlier name (the file was renamed). Asked on a name's first run
    only: two different catalogs may share some prompts, and taking the other's name would retire its own."""
    here = {(r.id, r.key) for r in records if r.status in LIVE}
    same: dict[str, list[bool]] = {}
    for r in others:
        if r.status in LIVE and r.catalog is not None:
            same.setdefault(r.catalog, []).append((r.id, r.key) in here)
    return sorted(c for c, s in same.items() if 10 * sum(s) >= 9 * len(s))


def turned_over(previous: list[ManifestRecord], current: list[ManifestRecord]) -> int:
    """How many current prompts of this catalog's previous run this pass would retire or replace when it keeps
    none of them (no id unchanged, no object still used), else 0. Two catalog files of one name (en/menus.yaml and
    es/menus.yaml) do that on every run, each deleting the other's audio: such a pass warns, and deletes nothing
    when it turns over more than one prompt (one is as likely a one-prompt catalog that replaced its prompt)."""
    now = {(r.id, r.key if r.status in LIVE else None) for r in current}  # a failed render keeps its old version
    keys = {r.key for r in current if r.status in LIVE}
    live = [r for r in previous if r.status in LIVE]
    kept = any({(r.id, r.key), (r.id, None)} & now or r.key in keys for r in live)
    return 0 if not current or kept else len(live)


def catalog_defaults(given: dict[Any, Any], defaults: RowDefaults, path: Path) -> RowDefaults:
    """A YAML catalog's `defaults:` over the command line's, checked by the row rules (`check_row`, so there is one
    copy of them): a wrong value here would fail every prompt, or crash the layout or the manifest, so it is a
    ValueError (exit 2) naming the field before anything is written, as is a key that is not a row default (a
    misspelt `langauge` was dropped silently). `speaker` is `voice`, as in a row."""
    allowed = set(RowDefaults.__dataclass_fields__) | {"speaker"}
    unknown = sorted(map(str, set(given) - allowed))
    if unknown:
        raise ValueError(f"catalog: {path.name}: defaults: unknown field(s) {unknown}; a default is one of "
                         f"{sorted(allowed)}")
    known = {k: v for k, v in given.items() if v is not None}
    merged = check_row({**known, "id": "defaults", "text": "-"}, defaults, f"catalog: {path.name}: defaults")
    if merged.error:
        raise ValueError(merged.error)
    return RowDefaults(voice=merged.voice, language=merged.language, instruct=merged.instruct, model=merged.model,
                       seed=merged.seed, format=merged.format, sample_rate=merged.sample_rate)


def previous_manifest(sink: Sink) -> tuple[list[ManifestRecord], list[tuple[str, dict[str, Any]]]]:
    """The output's stored manifest: (its records, (why, the row as stored) for each row that is not a record:
    quarantined, `manifest.read_stored`). ValueError naming the file (exit 2, before any synthesis) when it is not
    Parquet or its columns are not the manifest's (a missing `status` column: every row of every catalog)."""
    raw = sink.get(MANIFEST_KEY)
    if raw is None:   # (an empty object is a damaged manifest, not none: other catalogs' records were in it)
        return [], []
    try:
        return read_stored(raw)
    except ManifestSchemaError as e:
        raise ValueError(f"catalog: {sink.uri}/{MANIFEST_KEY}: {e}; nothing done: restore the manifest (or fix the "
                         "column) and run again") from e
    except Exception as e:  # noqa: BLE001 - pyarrow's errors for bytes that are not (complete) Parquet vary
        raise ValueError(f"catalog: {sink.uri}/{MANIFEST_KEY} cannot be read ({type(e).__name__}: {e}); restore "
                         "it or move it aside (a run without it renders nothing unchanged again, but never retires "
                         "or deletes what it listed)") from e


def keep_quarantined(sink: Sink, bad: list[tuple[str, dict[str, Any]]]) -> tuple[list[dict[str, Any]], int]:
    """Add the manifest rows this pass quarantined to the output's quarantine file (QUARANTINE_KEY, beside the
    manifest; a row already there is not added twice) before anything else is written: the manifest this pass writes
    lists records only, and a row dropped from it would leave its objects unlisted for ever. Returns (every row the
    file holds, as stored, and how many this pass added). Every key those rows name is kept from deletion
    (`retire.held_keys`) and each pass exits 1 while the file holds any: an operator fixes each row back into the
    manifest, or deletes its line once its objects are dealt with. A StorageError (exit 2, nothing done yet) when
    the file cannot be written."""
    raw = sink.get(QUARANTINE_KEY) or b""
    lines = [ln for ln in raw.decode("utf-8", "replace").split("\n") if ln.strip()]
    seen = set()
    for ln in lines:
        with contextlib.suppress(ValueError, RecursionError, AttributeError):
            seen.add(json.dumps(json.loads(ln).get("row"), sort_keys=True, default=str))
    added = []
    for why, row in bad:
        canon = json.dumps(row, sort_keys=True, default=str)
        if canon not in seen:
            seen.add(canon)
            added.append(json.dumps({"why": why.split(": ", 1)[-1], "row": row}, sort_keys=True, default=str))
    if added:
        sink.put(QUARANTINE_KEY, "".join(f"{ln}\n" for ln in [*lines, *added]).encode(), "application/x-ndjson")
        log.warning("%d manifest row(s) quarantined into %s/%s (%d held in all): nothing they name is deleted; fix "
                    "each back into the manifest or delete its line (jobs/README.md)", len(added), sink.uri,
                    QUARANTINE_KEY, len(lines) + len(added))
    rows = []
    for ln in [*lines, *added]:
        try:
            held = json.loads(ln)
        except (ValueError, RecursionError):
            held = None
        rows.append(held.get("row") if isinstance(held, dict) else {"unreadable": ln[:200]})
    return rows, len(added)


def run_once(catalog: str, defaults: RowDefaults, render: RenderConfig, opts: RunOptions, retire: str,
             quiet: bool = True, limits: InputLimits | None = None, stop: threading.Event | None = None,
             layout: str = "none", name: str | None = None, lease_wait: float = 0.0, retire_all: bool = False,
             ) -> tuple[int, dict[str, Any]]:
    """One regeneration pass; returns (exit code, summary). A pass stopped by SIGTERM writes nothing more (no
    reconcile, no manifest): what it committed is found by the next pass; it returns 1 (it did not finish: a Job
    or CronJob killed mid-pass must not read as succeeded; `run` exits 0 for it under --every).

    The manifest holds every catalog's records at the output; this pass replaces its own (`owned`). A pass that
    adopts records without a name deletes nothing (as `--retire mark`): an adopted id may have been another
    catalog's prompt before names existed. A pass that keeps none of its name's current prompts (`turned_over`)
    deletes nothing either. A catalog with no prompts (explicitly named, `retire_all`) retires all of its name's."""
    t0 = time.perf_counter()
    rows, in_file = load_catalog(catalog, defaults, limits)
    name = catalog_name(name, in_file, catalog, empty=not rows, retire_all=retire_all)
    if layout != "none":  # ids that cannot be file names fail before any synthesis
        rows = layouts.check_rows(rows)
    rows, render, opts, backend = prepare(rows, defaults, render, opts)
    sink = open_sink(opts.output, opts.retry)
    sink.preflight()
    # one pass at a time: from reading the previous manifest to writing this one
    with lease.hold(sink, wait_s=lease_wait, stop=stop) as held:
        before, bad = previous_manifest(sink)
        kept_rows, quarantined = keep_quarantined(sink, bad)  # (first: a row is in the file before a manifest drops it)
        first = not any(r.catalog == name for r in before)
        previous, others, adopted = owned(before, name, {r.id for r in rows})
        unclaimed = sum(r.catalog is None for r in others)
        if adopted:
            log.warning("adopting %d record(s) written before catalogs had names as catalog %r; this pass deletes "
                        "nothing", adopted, name)
        if unclaimed:
            log.warning("%d record(s) written before catalogs had names are not in this catalog: kept for the "
                        "catalog that lists them (jobs/README.md: records nobody claims)", unclaimed)
        # what this pass may create, journalled before it renders (a pass cut off before its manifest leaves
        # nothing unlisted: a later --retire delete pass deletes it); a StorageError here: exit 2, nothing rendered
        held_rows = held_keys(kept_rows)
        journal = pending.begin(sink, name, rows, render, layout, pending.listed(before) | held_rows)
        # S3: each write of the rendering (here or in a worker) checks the lease first: a pass whose lease lapsed
        # writes nothing the pass that took over could have journalled, reconciled or deleted already
        current = run_rows(rows, render, opts, sink=sink, desc="catalog", backend=backend, stop=stop,
                           fence=held.fence())
        guarded = lease.fenced(sink, held.fence())   # the sink whose writes and deletes check the lease (S3)
        if stop is not None and stop.is_set():
            done = sum(r.status in LIVE for r in current)  # exit 1 as narrate's (rows not rendered); --every: 0
            return 1, {"stopped": True, "rendered_before_stop": done, "total": len(current), "output": sink.uri,
                       "note": "outputs committed before the stop are kept; the next run reuses them",
                       "wall_s": round(time.perf_counter() - t0, 2)}
        if lost_lease := _lease_lost(held, guarded, current, sink.uri, t0):
            return lost_lease
        if lost := turned_over(previous, current):
            log.warning("catalog %r: this pass keeps none of its %d current prompt(s) at this output%s. If two "
                        "catalog files have this name (e.g. en/menus.yaml and es/menus.yaml), they retire each "
                        "other's prompts on every run: give each its own --name", name, lost,
                        ", so it deletes nothing" if lost > 1 else "")
        retire = "mark" if adopted else "hold" if lost > 1 and retire == "delete" else retire
        packages = (layouts.write_packages(current, rows, guarded, others)
                    if layout != "none" else None)
        records, counts = reconcile(current, previous, retire)
        for r in records:
            r.catalog = name
        for other in look_alike(records, others) if first else []:
            log.warning("catalog %r (its first run at this output) has all current prompts of catalog %r: if this "
                        "catalog was renamed from %r, run it with --name %r (else %r's prompts stay and are never "
                        "retired)", name, other, other, other, other)
        if lost_lease := _lease_lost(held, guarded, current, sink.uri, t0):
            return lost_lease
        # the manifest first, then the deletes it lists: a stored manifest never lists a deleted object as current
        url, extra = write_manifest([*records, *others], opts, MANIFEST_KEY)
        counts["delete_failed"], lease_lost, journalled = 0, None, {}
        if retire == "delete" and not extra:
            try:
                _own(held, guarded)
                counts["delete_failed"], changed, refused = purge(records, guarded, shared=others,
                                                                  prefix=render.key_prefix, held=held_rows | journal.held)
                if refused:  # keys a stored manifest or sidecar lists that this job never writes: not deleted
                    counts["delete_refused"] = refused
                if layout != "none":  # (another catalog's live package files are kept)
                    live_elsewhere = [r for r in others if r.status != "retired"]
                    counts["delete_failed"] += layouts.remove_packages([*records, *live_elsewhere], guarded,
                                                                       held=held_rows | journal.held)
                    changed = True
                if changed:
                    _own(held, guarded)   # another pass may own the output now: its manifest is not ours to replace
                    url, extra = write_manifest([*records, *others], opts, MANIFEST_KEY)
                _own(held, guarded)
                journalled = pending.finish(guarded, journal, [*records, *others], held_rows, render.key_prefix,
                                            delete=True)
            except lease.LeaseLost as e:
                # the manifest written above lists this pass's records with their deletes pending (the next
                # --retire delete pass does them): this pass rendered and recorded, it did not finish deleting
                log.warning("%s; the manifest lists this pass's deletes as pending", e)
                lease_lost = str(e)
        elif not extra:   # the stored manifest lists this pass's records: the journal keeps only what none lists
            try:
                _own(held, guarded)
                journalled = pending.finish(guarded, journal, [*records, *others], held_rows, render.key_prefix,
                                            delete=False)
            except lease.LeaseLost as e:   # (another pass may be rewriting the journal: it is not ours now)
                log.warning("%s; the pending journal is left as it was", e)
                lease_lost = str(e)
    summary = summarize(records)
    summary.update(counts, catalog=name, output=sink.uri, manifest=url, wall_s=round(time.perf_counter() - t0, 2),
                   **extra, **({"adopted": adopted} if adopted else {}), **({"unclaimed": unclaimed} if unclaimed else {}),
                   **({"turned_over": lost} if lost else {}),
                   **({"quarantined": {"rows": len(kept_rows), "new": quarantined, "file": f"{sink.uri}/{QUARANTINE_KEY}",
                                       "why": [why for why, _ in bad[:10]]}} if kept_rows else {}))
    if packages is not None:
        summary["layout"] = {"name": layout, **packages}
    if not quiet:
        print_manifest(records)
    if lease_lost:
        summary["lease_lost"] = lease_lost
    if journalled:
        summary["pending"] = {**journalled, "file": f"{sink.uri}/{journal.key}"}
    failed = (summary["failed"] or counts["delete_failed"] or lease_lost or kept_rows or (packages or {}).get("failed")
              or journalled.get("failed") or journalled.get("damaged"))
    return (3 if extra else 1 if failed else 0), summary


def _own(held: Any, guarded: Sink) -> None:
    """Raises LeaseLost unless this pass still holds its lease, as it knows it (its renewals) and as the store has
    it (S3: `guarded` is fenced; a takeover its renewals have not seen yet, after the pass was paused past the
    lease's TTL). A lease that cannot be read counts as lost: the manifest must not be written on a guess."""
    held.check()
    try:
        lease.check_writes(guarded)
    except lease.LeaseLost:
        raise
    except StorageError as e:
        raise lease.LeaseLost(f"cannot read the catalog lease ({e}); this pass writes nothing more: the outputs "
                              "written are kept and the next pass reconciles them") from e


def _lease_lost(held: Any, guarded: Sink, current: list[ManifestRecord], output: str, t0: float,
                ) -> tuple[int, dict[str, Any]] | None:
    """(1, summary) when this pass lost its lease before writing its manifest (it wrote nothing after the loss, and
    must not write the manifest, reconcile or delete: another pass may own the output now), else None."""
    try:
        _own(held, guarded)
    except lease.LeaseLost as e:
        log.error("%s", e)
        return 1, {"lease_lost": str(e), "rendered_before_loss": sum(r.status in LIVE for r in current),
                   "total": len(current), "output": output,
                   "note": "outputs committed before the loss are kept; the next pass reuses and reconciles them",
                   "wall_s": round(time.perf_counter() - t0, 2)}
    return None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_every(text: str) -> float:
    """'90', '30s', '15m', '1h', '1d' -> seconds (> 0, and no longer than a wait can be: threading.TIMEOUT_MAX)."""
    m = _DURATION.match(text or "")
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"every: expected a positive duration like 30s, 15m, 1h or 1d, got {text!r}")
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds > threading.TIMEOUT_MAX:   # (the wait for the next pass would raise OverflowError after the first)
        raise ValueError(f"every: {text!r} is longer than this machine can wait ({threading.TIMEOUT_MAX:.0f} s)")
    return seconds


def run(args: argparse.Namespace) -> int:
    """Run once, or every `--every` until SIGTERM (exit 0 after the current pass finishes or is abandoned). A
    single pass (no --every) that SIGTERM stopped before it finished, or before it began, exits 1, as narrate does."""
    stop = stop_on_sigterm()
    try:
        conf = load_config(args.config, "catalog")
        every_text = option_value(args, conf, "every", None)
        every = parse_every(every_text) if every_text else None
        retire = option_value(args, conf, "retire", "mark")
        if retire not in RETIRE_MODES:
            raise ValueError(f"retire must be one of {list(RETIRE_MODES)}, got {retire!r}")
        name = option_value(args, conf, "name", None)
        if name is not None:
            catalog_name(name, None, args.catalog)
        lease_wait = float(option_value(args, conf, "lease_wait", 0) or 0)
        if not 0 <= lease_wait <= 86400:
            raise ValueError(f"lease-wait must be 0..86400 seconds, got {lease_wait}")
        max_runs = option_value(args, conf, "max_runs", 0)
        quiet = bool(option_value(args, conf, "quiet", False))
        defaults, render, opts, limits = build_options(args, "prompts", conf)
        layout = layouts.check_layout(option_value(args, conf, "layout", None))
        render = replace(render, master=layouts.master_for(layout, render.master))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runs, code = 0, 0
    while not stop.is_set():
        try:
            code, summary = run_once(args.catalog, defaults, render, opts, retire, quiet=quiet,
                                     limits=limits, stop=stop, layout=layout, name=name, lease_wait=lease_wait,
                                     retire_all=args.retire_all)
            print(json.dumps(summary), flush=True)
            if every is not None and summary.get("stopped"):
                code = 0  # --every: SIGTERM abandons the current pass and ends the schedule cleanly
        except (ValueError, StorageError) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            code = 2
            if every is None:
                return code
        except Exception as e:  # noqa: BLE001 - with --every one broken pass must not end the schedule
            if every is None:
                raise
            log.exception("catalog run failed")
            print(f"error: catalog run failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            code = 1
        runs += 1
        if every is None or (max_runs and runs >= max_runs):
            return code
        if not stop.is_set():
            log.info("next catalog run in %.0f s", every)
            stop.wait(every)
    log.info("stopped by SIGTERM after %d run(s)", runs)
    if every is None and not runs:   # a one-off pass (a Job) that never began must not read as succeeded
        print("error: stopped by SIGTERM before the pass began; nothing was done", file=sys.stderr, flush=True)
        return 1
    return 0


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m jobs.catalog", description=__doc__.split("\n")[0])
    p.add_argument("catalog", help="catalog file (.yaml/.yml/.csv)")
    add_common_args(p)
    p.add_argument("--retire", choices=RETIRE_MODES, help="prompts that left the catalog: mark (default) or delete "
                   "(delete also removes superseded versions of changed prompts)")
    p.add_argument("--name", help="the catalog's name at the output (default: the YAML's name:, else the file name "
                   "without extension): catalogs with different names share an output safely, each retiring only "
                   "its own prompts; keep the name when renaming the file")
    p.add_argument("--retire-all", action="store_true", help="with a catalog file that lists no prompts (prompts: "
                   "[] or a CSV header) and an explicit name: retire every prompt of that name (without it such a "
                   "file exits 2: a failed export must not retire a catalog); command line only")
    p.add_argument("--lease-wait", type=float, metavar="SECONDS", help="when another catalog pass holds the "
                   "output's lease, try again for up to this long (default 0: exit 2 at once); for catalogs sharing "
                   "an output on one schedule")
    p.add_argument("--every", help="regenerate periodically on this machine, e.g. 1h (default: run once)")
    p.add_argument("--max-runs", type=int, help="with --every: stop after N runs (default 0: forever)")
    p.add_argument("--layout", choices=layouts.LAYOUTS, help="asterisk: also write sounds/<lang>/<name>.<ext> "
                   f"packages, one folder per codec ({', '.join(layouts.ASTERISK_CODECS)}), from 16 kHz "
                   "telephony masters")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
