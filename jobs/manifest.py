"""The Parquet manifest: one row per input, whatever happened to it."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from .serve_backend import model_changed

log = logging.getLogger(__name__)
Status = Literal["ok", "suspect", "failed", "retired"]
QUARANTINE_SHOWN = 20  # quarantined rows named one by one in the log


@dataclass
class ManifestRecord:
    """What a job knows about one input row.

    status: "ok" (written, checks passed), "suspect" (written, quality flags set), "failed" (no output;
    see `error`), "retired" (catalog only: the prompt left the catalog). `reused` is True when an existing
    valid output was kept instead of synthesizing again. `params` is canonical JSON of everything in the key;
    `revision` is the checkpoint's content digest; `retries` says what was retried on the way (a call sent again
    after its replica was lost, the row re-run after its worker was lost).
    """

    id: str
    key: str | None
    status: Status
    error: str | None = None
    attempts: int = 0
    duration_s: float = 0.0
    sample_rate: int = 0
    format: str = "wav"
    bytes: int = 0
    model: str | None = None
    revision: str | None = None
    voice: str | None = None
    language: str | None = None
    instruct: str | None = None
    seed: int = 0
    params: str = "{}"
    text_hash: str = ""
    num_chunks: int = 0
    flags: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    reused: bool = False
    url: str | None = None
    # delivery (jobs/deliver.py): preset, measured figures of the file as delivered, pass/fail per rule (JSON)
    master: str = "none"
    rules: str = "{}"
    rms_db: float | None = None
    peak_db: float | None = None
    noise_floor_db: float | None = None
    lufs: float | None = None
    true_peak_dbtp: float | None = None
    speech_level_dbm0: float | None = None
    head_s: float | None = None
    tail_s: float | None = None
    speed: float = 1.0
    lexicon: list[str] = field(default_factory=list)   # lexicon entries that fired
    captions: list[str] = field(default_factory=list)  # keys of the .srt and .vtt
    layout: list[str] = field(default_factory=list)    # catalog --layout package files
    # catalog: objects of earlier versions of this prompt still in storage: the last written one while its latest
    # render fails (what the PBX and its package files still use), or one whose delete failed. `--retire delete`
    # removes them once the prompt is written again or leaves the catalog.
    previous_keys: list[str] = field(default_factory=list)
    retries: list[str] = field(default_factory=list)
    # catalog: the catalog that owns this record at a shared output (jobs/catalog.py `owned`); None in a manifest
    # written before catalogs had names (adopted by the next catalog run) and in narration manifests
    catalog: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ManifestRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _field_ok(value: Any, arrow_type: Any) -> bool:
    """Whether a (non-None) `value` fits a column of `arrow_type`."""
    import pyarrow as pa

    if pa.types.is_string(arrow_type):
        return isinstance(value, str)
    if pa.types.is_boolean(arrow_type):
        return isinstance(value, bool)
    if pa.types.is_integer(arrow_type):
        bits = arrow_type.bit_width - 1
        whole = isinstance(value, float) and value.is_integer()  # (a pandas round trip makes an int column float64
        return (isinstance(value, int) and not isinstance(value, bool) or whole) and -2**bits <= value < 2**bits
    if pa.types.is_floating(arrow_type):  # an int only where a double holds it exactly (pyarrow refuses the rest)
        return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                            and -2**53 <= value <= 2**53)
    if pa.types.is_list(arrow_type):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return False


def from_sidecar(raw: bytes) -> ManifestRecord | None:
    """A committed output's JSON sidecar -> its record, or None when it is not one (not JSON, not an object,
    a field of the wrong type, not a written status): such an output counts as not done and is rendered again."""
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict) or d.get("status") not in ("ok", "suspect") or not isinstance(d.get("key"), str):
        return None
    import pyarrow as pa

    schema = _schema()
    nullable = {f.name: "None" in str(f.type) for f in fields(ManifestRecord)}
    for k, v in d.items():
        if k in nullable and not (nullable[k] if v is None else _field_ok(v, schema.field(k).type)):
            return None
    try:
        return ManifestRecord.from_dict({k: int(v) if isinstance(v, float) and k in nullable
                                         and pa.types.is_integer(schema.field(k).type) else v for k, v in d.items()})
    except (TypeError, ValueError):
        return None


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("key", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("attempts", pa.int32()), ("duration_s", pa.float64()), ("sample_rate", pa.int32()),
        ("format", pa.string()), ("bytes", pa.int64()), ("model", pa.string()), ("revision", pa.string()),
        ("voice", pa.string()), ("language", pa.string()), ("instruct", pa.string()), ("seed", pa.int64()),
        ("params", pa.string()), ("text_hash", pa.string()), ("num_chunks", pa.int32()),
        ("flags", pa.list_(pa.string())), ("finish_reasons", pa.list_(pa.string())), ("reused", pa.bool_()),
        ("url", pa.string()),
        ("master", pa.string()), ("rules", pa.string()), ("rms_db", pa.float64()), ("peak_db", pa.float64()),
        ("noise_floor_db", pa.float64()), ("lufs", pa.float64()), ("true_peak_dbtp", pa.float64()),
        ("speech_level_dbm0", pa.float64()), ("head_s", pa.float64()), ("tail_s", pa.float64()),
        ("speed", pa.float64()), ("lexicon", pa.list_(pa.string())), ("captions", pa.list_(pa.string())),
        ("layout", pa.list_(pa.string())), ("previous_keys", pa.list_(pa.string())),
        ("retries", pa.list_(pa.string())), ("catalog", pa.string()),
    ])


def to_parquet(records: list[ManifestRecord]) -> bytes:
    """Records (sorted by id) -> Parquet bytes with a fixed schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.to_dict() for r in sorted(records, key=lambda r: r.id)]
    table = pa.Table.from_pylist(rows, schema=_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def to_jsonl(records: list[ManifestRecord]) -> bytes:
    """Records (sorted by id) as JSON lines: the fallback when Parquet cannot hold them (never fails on a value:
    a lone surrogate is escaped, an integer of any size is kept, anything else becomes its str())."""
    lines = (json.dumps(r.to_dict(), default=str) for r in sorted(records, key=lambda r: str(r.id)))
    return ("\n".join(lines) + "\n").encode("ascii")


def from_parquet(data: bytes) -> list[ManifestRecord]:
    """A stored manifest's records, each checked (`read_manifest`); rows that are not records are left out, with a
    warning naming each. Raises what pyarrow raises for bytes that are not Parquet, ManifestSchemaError for a
    manifest whose columns are not this schema's."""
    return read_manifest(data)[0]


class ManifestSchemaError(ValueError):
    """A stored manifest whose columns are not this schema's: a column every record needs is missing, or a column
    has another type (no row could be a record: a schema problem, not a row problem)."""


REQUIRED_COLUMNS = ("id", "key", "status")  # the fields without a default (a record without an object: key null)


def _column_fits(got: Any, want: Any) -> bool:
    """Whether a stored column of Arrow type `got` can hold values of our column of type `want` (each value is
    checked by `_field_ok`): a null column, large/dictionary variants, any integer width (values range-checked),
    integers for floats and floats for integers (pandas makes an int column with a null float64; whole values
    only)."""
    import pyarrow as pa

    t = pa.types
    if t.is_dictionary(got):
        got = got.value_type
    if t.is_null(got):
        return True
    if t.is_string(want):
        return t.is_string(got) or t.is_large_string(got)
    if t.is_boolean(want):
        return t.is_boolean(got)
    if t.is_integer(want) or t.is_floating(want):
        return t.is_integer(got) or t.is_floating(got)
    if t.is_list(want):
        return (t.is_list(got) or t.is_large_list(got)) and _column_fits(got.value_type, want.value_type)
    return False


def _check_columns(table: Any) -> None:
    """ManifestSchemaError naming the column when the stored manifest's schema is not ours (every row would be
    quarantined: a stored manifest without a `status` column, or with `key` of type int64)."""
    import pyarrow as pa

    schema = _schema()
    for name in REQUIRED_COLUMNS:
        if name not in table.column_names:
            raise ManifestSchemaError(f"column {name!r} is missing (every record needs it)")
        if name != "key" and pa.types.is_null(table.schema.field(name).type) and table.num_rows:
            raise ManifestSchemaError(f"column {name!r} is null in every row (every record needs it)")
    for name in table.column_names:
        if name in schema.names and (table.column_names.count(name) > 1
                                     or not _column_fits(table.schema.field(name).type, schema.field(name).type)):
            got = "more than once" if table.column_names.count(name) > 1 else f"of type {table.schema.field(name).type}"
            raise ManifestSchemaError(f"column {name!r} is {got}, not {schema.field(name).type}")


def read_manifest(data: bytes) -> tuple[list[ManifestRecord], list[str]]:
    """A stored manifest -> (its records, why each row that is not one was left out); `read_stored` with the rows
    left out named only."""
    records, bad = read_stored(data)
    return records, [why for why, _ in bad]


def read_stored(data: bytes) -> tuple[list[ManifestRecord], list[tuple[str, dict[str, Any]]]]:
    """A stored manifest -> (its records, (why, the row as stored) for each row that is not one).

    A stored manifest is not trusted. Its columns must be this schema's (`_check_columns`: a column every record
    needs is missing, or one has another type: ManifestSchemaError naming it, a schema problem). Then a row is a
    record only when every field has the type this job writes (a missing column or a null becomes the field's
    default; a field without one, `id` and `status`, must be there, `status` one of Status's; a whole float is an
    integer). Any other row (an unknown status, a list holding a null, a number out of its column's range) is
    quarantined: left out with a warning naming it, never acted on; the caller keeps it (catalog: the quarantine
    file, and what it names is never deleted). Raises what pyarrow raises for bytes that are not Parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    _check_columns(table)
    records, bad = [], []
    for i, d in enumerate(table.to_pylist()):
        rec = _checked(d)
        if isinstance(rec, ManifestRecord):
            records.append(rec)
            continue
        ident = d.get("id")
        bad.append((f"row {i + 1}" + (f" (id {ident[:100]!r})" if isinstance(ident, str) else "") + f": {rec}", d))
        if len(bad) <= QUARANTINE_SHOWN:
            log.warning("manifest: %s; this row is left out (quarantined): not trusted, nothing it names is deleted",
                        bad[-1][0])
    if len(bad) > QUARANTINE_SHOWN:
        log.warning("manifest: %d more rows left out (quarantined)", len(bad) - QUARANTINE_SHOWN)
    return records, bad


def _checked(d: dict[str, Any]) -> ManifestRecord | str:
    """One stored row -> its record, or why it is not one."""
    import pyarrow as pa

    schema, out = _schema(), {}
    for f in fields(ManifestRecord):
        v = d.get(f.name)
        if v is None:
            if f.default is not MISSING or f.default_factory is not MISSING:
                continue  # the field's default (None where it is nullable)
            if f.name != "key":  # (a record without an object has key None)
                return f"field {f.name!r} is missing or null"
        elif not _field_ok(v, schema.field(f.name).type):
            return f"field {f.name!r} holds {type(v).__name__} {str(v)[:60]!r}, not {schema.field(f.name).type}"
        out[f.name] = int(v) if pa.types.is_integer(schema.field(f.name).type) and v is not None else v
    out.setdefault("key", None)
    if out["status"] not in get_args(Status):
        return f"status {str(out['status'])[:60]!r} is not one of {list(get_args(Status))}"
    return ManifestRecord(**out)


def summarize(records: list[ManifestRecord]) -> dict[str, Any]:
    """Counts by status plus totals, as printed at the end of a job."""
    out: dict[str, Any] = {"total": len(records), "ok": 0, "suspect": 0, "failed": 0, "retired": 0}
    for r in records:
        out[r.status] = out.get(r.status, 0) + 1
    out["reused"] = sum(r.reused for r in records)
    out["synthesized"] = sum(1 for r in records if r.status in ("ok", "suspect") and not r.reused)
    out["audio_seconds"] = round(sum(r.duration_s for r in records if r.status in ("ok", "suspect")), 3)
    out["failed_ids"] = sorted(r.id for r in records if r.status == "failed")[:50]
    retried = [r for r in records if r.retries]
    if retried:
        reasons: dict[str, int] = {}
        for r in retried:
            for why in r.retries:
                reasons[why] = reasons.get(why, 0) + 1
        out["retried"] = {"rows": len(retried), "reasons": reasons, "ids": sorted(r.id for r in retried)[:50]}
    changed = sorted(r.id for r in records if r.status == "failed" and model_changed(r.error))
    if changed:  # the Serve app was upgraded mid-job: run again to render these with the new model
        out["model_changed"] = {"rows": len(changed), "ids": changed[:50]}
    return out
