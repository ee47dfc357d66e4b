"""Read narration inputs (text/Markdown file, folder of chapters, JSONL, Parquet) into `Utterance` rows.

A malformed row never raises: it becomes an `Utterance` with `error` set, so the job records it in the
manifest and carries on (a row over `max_row_chars` too). An input that cannot be a narration input raises
ValueError naming the file, before any work starts: missing, unsupported type, binary (not UTF-8 text), empty
(no text, no rows) or larger than `max_input_bytes`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from jobs.md_text import first_heading, markdown_to_text
from qwen_tts_core.errors import shown
from qwen_tts_core.files import FileTooLarge, NotRegularFile, read_capped
from qwen_tts_core.generate.requests import SEED_MAX
from qwen_tts_core.types import SAMPLE_RATE

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
ROW_SUFFIXES = (".jsonl", ".parquet")
FORMATS = ("wav", "flac", "wav-ulaw", "wav-alaw")
ROW_FIELDS = ("id", "text", "voice", "speaker", "language", "instruct", "model", "seed", "format",
              "sample_rate", "title")
SAMPLE_RATES = (4000, 48000)


@dataclass(frozen=True)
class Utterance:
    """One output object: a chapter (joined from chunks) or one prompt/row.

    `voice` is a speaker name for custom_voice models, the voice description for voice_design models
    (or use `instruct`). `error` is set when the row could not be parsed; such rows are never synthesized.
    """

    id: str
    text: str
    voice: str | None = None
    language: str = "auto"
    instruct: str | None = None
    model: str | None = None
    seed: int = 0
    format: str = "wav"
    sample_rate: int = SAMPLE_RATE
    error: str | None = None
    title: str | None = None  # chapter title for --book (a Markdown file's first heading); not in the key


@dataclass(frozen=True)
class InputLimits:
    """Bounds on what one job reads: a row's text, and each input file."""

    max_row_chars: int = 200_000        # ~3-4 hours of speech; a longer row fails (naming the row)
    max_input_bytes: int = 256 << 20    # per input file; a larger file fails the job up front

    def __post_init__(self) -> None:
        if self.max_row_chars < 1 or self.max_input_bytes < 1:
            raise ValueError("max_row_chars and max_input_bytes must be >= 1")


@dataclass(frozen=True)
class RowDefaults:
    """Values used where a row (or a text file) does not say."""

    voice: str | None = None
    language: str = "auto"
    instruct: str | None = None
    model: str | None = None
    seed: int = 0
    format: str = "wav"
    sample_rate: int = SAMPLE_RATE


def _natural_key(p: Path) -> list[Any]:
    # isdecimal, what \d matches and int() reads: isdigit is also true of "²", which int() refuses
    return [int(t) if t.isdecimal() else t.lower() for t in re.split(r"(\d+)", p.name)]


def read_text(path: Path, limits: InputLimits) -> str:
    """The whole file as text. Raises ValueError naming the file: unreadable, too large, or binary."""
    try:
        data = read_capped(path, limits.max_input_bytes)
    except NotRegularFile:
        raise ValueError(f"input: {path} is not a regular file") from None
    except FileTooLarge as e:
        if e.size is None:
            raise ValueError(f"input: {path} grew past {e.limit} bytes while it was read (--max-input-bytes)") from None
        raise ValueError(f"input: {path} is {e.size} bytes; the limit is {e.limit} (--max-input-bytes)") from None
    except OSError as e:
        raise ValueError(f"input: cannot read {path} ({e})") from e
    if b"\0" in data[:1 << 20]:
        raise ValueError(f"input: {path} is a binary file, not UTF-8 text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"input: {path} is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         "binary file or another encoding?") from None


def _chapter(path: Path, limits: InputLimits) -> tuple[str, str | None]:
    """(text to narrate, title): a Markdown file's first heading is its title (for --book; not in the key)."""
    raw = read_text(path, limits)
    if path.suffix.lower() not in (".md", ".markdown"):
        return raw, None
    heading = first_heading(raw)
    return markdown_to_text(raw), (markdown_to_text(heading).strip() or None) if heading is not None else None


def _chapter_rows(files: list[Path], defaults: RowDefaults, limits: InputLimits, where: Path) -> list[Utterance]:
    chapters = [_chapter(f, limits) for f in files]
    if all(not t.strip() for t, _ in chapters):
        raise ValueError(f"input: {where} is empty (no text to narrate)" if where.is_file() else
                         f"input: every chapter file in {where} is empty")
    return [check_row({"id": f.stem, "text": t, "title": title}, defaults, where=str(f), limits=limits)
            for f, (t, title) in zip(files, chapters)]


def is_unicode(text: str) -> bool:
    """True when `text` can be written as UTF-8 (no lone surrogates, e.g. a JSON "\\ud800" or an undecodable
    file name): keys, sidecars and the manifest all need that."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with anything that is not valid Unicode escaped (for ids and messages of rows that failed)."""
    return text if is_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def check_seed(seed: Any, name: str = "seed") -> int:
    """An integer seed the engine accepts, [0, 2**63); ValueError naming `name` otherwise (strings of digits
    count: CSV catalogs are text)."""
    ok = not isinstance(seed, bool) and not (isinstance(seed, float) and not seed.is_integer())
    try:
        value = int(seed) if ok else -1
    except (TypeError, ValueError, OverflowError):
        value = -1
    if not 0 <= value < SEED_MAX:
        raise ValueError(f"{name} must be an integer in [0, 2**63), got {shown(seed)}")
    return value


def _integer(value: Any) -> int | None:
    """`value` as an int when it is one: an int, a float with no fraction, or a string of digits (CSV catalogs are
    text); None for anything else: a bool, 0.5, inf or nan (int(inf) raises OverflowError), "" or "fast"."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isascii() and value.isdigit() and len(value) <= 12 else None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, ArithmeticError):
        return None
    return number if number == value else None


def check_row(raw: Any, defaults: RowDefaults, where: str, limits: InputLimits = InputLimits()) -> Utterance:
    """Validate one raw row (dict) into an `Utterance`; problems end up in `error`, never raised."""
    where = printable(where)
    if not isinstance(raw, dict):
        return Utterance(id=where, text="", error=f"{where}: row must be an object, got {type(raw).__name__}")
    rid = raw.get("id")
    rid = str(rid).strip() if rid is not None and not isinstance(rid, (dict, list)) else ""
    ident = printable(rid) or where
    base = Utterance(id=ident, text="")
    unknown = sorted(set(raw) - set(ROW_FIELDS), key=repr)  # YAML keys may mix types (1: x, note: y)
    if unknown:
        log.debug("%s: ignoring unknown field(s) %s", where, unknown)
    if not rid:
        return replace(base, error=f"{where}: field 'id' is required and must be a non-empty string")
    for name in ROW_FIELDS:  # keys, sidecars and the manifest are UTF-8: a lone surrogate cannot be stored
        v = rid if name == "id" else raw.get(name)
        if isinstance(v, str) and not is_unicode(v):
            return replace(base, error=f"{where}: field {name!r} is not valid Unicode (a lone surrogate such as "
                                       f"\\ud800?): {shown(v)}")
    text = raw.get("text")
    if not isinstance(text, str) or not text.strip():
        return replace(base, error=f"{where}: field 'text' must be a non-empty string")
    if len(text) > limits.max_row_chars:
        return replace(base, error=f"{where}: row {shown(ident)} has {len(text)} characters of text; the limit is "
                                   f"{limits.max_row_chars} (--max-row-chars; split it into several rows)")
    # one field under two names: a null or empty one (a Parquet column or CSV cell the row leaves empty) is absent
    voice = next((v for v in (raw.get("voice"), raw.get("speaker")) if v is not None and v != ""), None)
    fields: dict[str, Any] = {}
    for name in ("language", "instruct", "model"):
        v = raw.get(name)
        if v is not None and not isinstance(v, str):
            return replace(base, error=f"{where}: field '{name}' must be a string, got {shown(v)}")
        fields[name] = v if v not in (None, "") else getattr(defaults, name)
    if voice is not None and not isinstance(voice, str):
        return replace(base, error=f"{where}: field 'voice' must be a string, got {shown(voice)}")
    seed = raw.get("seed", defaults.seed)
    if seed is None or seed == "":
        seed = defaults.seed
    try:
        seed = check_seed(seed, "field 'seed'")
    except ValueError as e:
        return replace(base, error=f"{where}: {e}")
    fmt = raw.get("format")
    fmt = defaults.format if fmt is None or fmt == "" else fmt   # absent (an empty CSV cell); 0 or false is no format
    if fmt not in FORMATS:
        return replace(base, error=f"{where}: field 'format' must be one of {list(FORMATS)}, got {shown(fmt)}")
    given = raw.get("sample_rate")
    came = "" if given is not None else " (the default sample rate)"
    given = defaults.sample_rate if given is None else given
    sr = _integer(given)
    if sr is None or not SAMPLE_RATES[0] <= sr <= SAMPLE_RATES[1]:
        return replace(base, error=f"{where}: field 'sample_rate' must be an integer in [{SAMPLE_RATES[0]}, "
                                   f"{SAMPLE_RATES[1]}], got {shown(given)}{came}")
    title = raw.get("title")
    return Utterance(id=rid, text=text, voice=voice or defaults.voice, language=fields["language"] or "auto",
                     instruct=fields["instruct"], model=fields["model"], seed=seed, format=fmt,
                     sample_rate=sr, title=title.strip() or None if isinstance(title, str) else None)


def _read_jsonl(path: Path, defaults: RowDefaults, limits: InputLimits) -> list[Utterance]:
    """One row per line. Lines end at "\n" (and a "\r" before it) only: str.splitlines() would also split at
    U+2028, U+2029, U+0085 and other separators that JSON writers leave raw inside strings (ensure_ascii=False),
    breaking a valid row into two malformed halves."""
    out = []
    for n, line in enumerate(read_text(path, limits).split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path.name}:{n}"
        try:
            raw = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: also an integer of over 4300 digits
            msg = (e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply" if isinstance(e, RecursionError)
                   else f"a number too long to read: {str(e).partition(':')[0][:80]}")
            out.append(Utterance(id=where, text="", error=f"{where}: malformed JSON ({msg})"))
            continue
        out.append(check_row(raw, defaults, where, limits))
    return out


_PARQUET_ROW_BYTES = 16   # what a row costs at least, counted against --max-input-bytes (a JSONL row takes ~20)
_PARQUET_BATCH_ROWS = 512
# Batches per row group at most (larger batches for larger groups): a column read as a dictionary hands every batch
# the group's dictionary, and where the writer fell back to plain pages (pyarrow's default writer does past 1 MiB of
# dictionary) the reader's dictionary grows with every batch, so each batch costs O(rows of its group) and 512-row
# batches made a file's read quadratic (800k rows: 59 s). A batch's size never bounds its memory (the batches are
# measured still encoded and the rows' decoded total is bounded by --max-input-bytes): larger ones are as safe.
_PARQUET_BATCHES_PER_GROUP = 32


class _Nested(list):
    """Stands for a list/struct/map value of a row field (never read: one such value can expand to any size). A
    list, so check_row refuses it as it refuses a JSON list (and does not take it as an id)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def __repr__(self) -> str:
        return f"<{self.kind} value>"


def _too_big(path: Path, what: str, limits: InputLimits) -> ValueError:
    return ValueError(f"input: {path} {what}; the limit is {limits.max_input_bytes} bytes (--max-input-bytes)")


def _text_like(t: Any) -> bool:
    """An Arrow type whose values are strings or bytes (read as dictionaries, measured by their byte length)."""
    import pyarrow as pa

    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _batch_bytes(batch: Any) -> int:
    """The bytes a batch's values take decoded (strings by their UTF-8 length, a dictionary's value as often as
    rows use it, a number 8), without decoding them: a small dictionary-encoded file can stand for gigabytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = _PARQUET_ROW_BYTES * batch.num_rows
    for col in batch.columns:
        t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
        if pa.types.is_nested(t):
            continue  # never decoded (_Nested)
        if not _text_like(t):
            total += 8 * len(col)
            continue
        if pa.types.is_dictionary(col.type):
            lengths = pc.take(pc.binary_length(col.dictionary), col.indices)
        else:
            lengths = pc.binary_length(col)
        total += pc.sum(lengths).as_py() or 0
    return total


def _read_parquet(path: Path, defaults: RowDefaults, limits: InputLimits) -> list[Utterance]:
    """Rows of a Parquet file, read a batch at a time. The file's size is checked, then its metadata (rows, the
    columns' uncompressed size), then each batch before it is decoded: the rows' values together may not exceed
    --max-input-bytes, what a JSONL file may hold (a 50 KB dictionary-encoded file can hold a gigabyte of rows).
    Only the row fields are read; a list/struct/map value is that row's error, never decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.stat().st_size > limits.max_input_bytes:
        raise _too_big(path, f"is {path.stat().st_size} bytes", limits)
    try:
        schema = pq.read_schema(path)
        meta = pq.read_metadata(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"input: {path} is not a readable Parquet file ({e})") from e
    if "text" not in schema.names or "id" not in schema.names:
        raise ValueError(f"input: {path} needs columns 'id' and 'text', has {schema.names}")
    columns = [n for n in ROW_FIELDS if n in schema.names]  # other columns are ignored: not read
    twice = [n for n in columns if schema.names.count(n) > 1]
    if twice:
        raise ValueError(f"input: {path} has more than one column named {twice[0]!r}")
    if meta.num_rows * _PARQUET_ROW_BYTES > limits.max_input_bytes:
        raise _too_big(path, f"holds {meta.num_rows} rows (at least {_PARQUET_ROW_BYTES} bytes each read)", limits)
    wanted = set(columns)
    stored = sum(rg.column(j).total_uncompressed_size for rg in map(meta.row_group, range(meta.num_row_groups))
                 for j in range(rg.num_columns) if rg.column(j).path_in_schema.split(".")[0] in wanted)
    if stored > limits.max_input_bytes:
        raise _too_big(path, f"holds {stored} bytes of row fields uncompressed", limits)
    text_like = [n for n in columns if _text_like(schema.field(n).type)]
    # Two passes: the first measures every batch, decoding nothing into Python objects, so a file over the limit is
    # refused before any row is built; the second builds the rows
    groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    batch_rows = max([_PARQUET_BATCH_ROWS, *(-(-n // _PARQUET_BATCHES_PER_GROUP) for n in groups)])
    total = 0
    for batch in _parquet_batches(path, columns, text_like, batch_rows):
        total += _batch_bytes(batch)
        if total > limits.max_input_bytes:
            raise _too_big(path, f"holds more than {limits.max_input_bytes} bytes of row fields once decoded",
                           limits)
    out: list[Utterance] = []
    for batch in _parquet_batches(path, columns, text_like, batch_rows):
        values = {}
        for name, col in zip(batch.schema.names, batch.columns):
            t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
            values[name] = ([_Nested(str(t)) if ok else None for ok in col.is_valid().to_pylist()]
                            if pa.types.is_nested(t) else _decoded(col).to_pylist())
        for i in range(batch.num_rows):
            out.append(check_row({name: v[i] for name, v in values.items()}, defaults, f"{path.name}:{len(out) + 1}",
                                 limits))
    return out


def _decoded(col: Any) -> Any:
    """A batch's column with its dictionary (if it has one) decoded: O(rows of the batch), where a dictionary
    array's own to_pylist() converts its whole dictionary (the row group's) for every batch."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.take(col.dictionary, col.indices) if pa.types.is_dictionary(col.type) else col


def _parquet_batches(path: Path, columns: list[str], text_like: list[str],
                     batch_rows: int = _PARQUET_BATCH_ROWS) -> Iterable[Any]:
    """The file's record batches of `columns`; a pyarrow error is a ValueError naming the file. `text_like`
    columns are read as dictionaries: a dictionary-encoded column stays encoded until it has been measured."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path, read_dictionary=text_like).iter_batches(batch_size=batch_rows,
                                                                               columns=columns)
        while (batch := next(batches, None)) is not None:
            yield batch
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise ValueError(f"input: {path} is not a readable Parquet file ({e})") from e


class _TooBig(ValueError):
    pass


DOWNLOAD_ATTEMPTS = 4   # a body read cut short mid-stream (a read timeout, a reset connection) is fetched again


def _transient(e: Exception) -> bool:
    """A download error worth another try: the connection, not the object (botocore already retries what S3 answers
    with an error status; a body read that fails mid-stream is the caller's to retry)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError, IncompleteReadError

    return isinstance(e, (HTTPClientError, IncompleteReadError, BotoConnectionError, ConnectionError, TimeoutError))


def _download(client: Any, bucket: str, key: str, target: Path, uri: str, budget: int) -> int:
    """Stream one object to `target`, refusing it past `budget` bytes (its listed size was checked: this holds
    when the object is replaced by a larger one meanwhile). A transient error mid-body (a read timeout, a
    connection reset) removes the partial file and fetches the object again, up to DOWNLOAD_ATTEMPTS times, with
    the same cap (download_file, used before the cap, retried so too). Returns its size."""
    import random
    import time

    for attempt in range(DOWNLOAD_ATTEMPTS):
        try:
            return _download_once(client, bucket, key, target, uri, budget)
        except _TooBig:
            raise
        except Exception as e:  # noqa: BLE001 - classified by _transient
            if not _transient(e) or attempt == DOWNLOAD_ATTEMPTS - 1:
                raise
            target.unlink(missing_ok=True)
            delay = min(5.0, 0.2 * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("input: reading %s failed (%s: %s); fetching it again in %.1f s (%d/%d)", uri,
                        type(e).__name__, e, delay, attempt + 1, DOWNLOAD_ATTEMPTS - 1)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _download_once(client: Any, bucket: str, key: str, target: Path, uri: str, budget: int) -> int:
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    size = 0
    try:
        with target.open("wb") as f:
            for chunk in body.iter_chunks(1 << 20):
                size += len(chunk)
                if size > budget:
                    raise _TooBig(f"input: {uri} grew while it was downloaded, past what --max-input-bytes leaves "
                                  f"it ({budget} bytes)")
                f.write(chunk)
    finally:
        body.close()
    return size


def fetch_s3_input(uri: str, dest: Path, max_bytes: int | None = None) -> Path:
    """Download `s3://bucket/key` (one file) or `s3://bucket/prefix/` (its chapter files) into `dest`.

    `max_bytes` (--max-input-bytes) is checked against the object's size (head_object), or the listed sizes of a
    prefix's chapter files added up, before anything is downloaded; the download stops if it runs past it."""
    import boto3

    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket or not key:
        raise ValueError(f"input: {uri!r} must name a bucket and an object or prefix")
    limit = max_bytes if max_bytes is not None else InputLimits().max_input_bytes
    client = boto3.client("s3")
    try:
        if key.endswith("/"):
            folder = dest / Path(key.rstrip("/")).name
            folder.mkdir(parents=True, exist_ok=True)
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            chapters, total = [], 0
            for obj in (o for page in pages for o in page.get("Contents", [])):
                name = obj["Key"][len(key):]
                if "/" not in name and name.lower().endswith(TEXT_SUFFIXES):
                    chapters.append((obj["Key"], name))
                    total += int(obj.get("Size", 0))
                    if total > limit:
                        raise _TooBig(f"input: {uri} holds more than {limit} bytes of chapter files (at least "
                                      f"{total} in {len(chapters)} files); the limit is {limit} for them together "
                                      "(--max-input-bytes)")
            left = limit
            for obj_key, name in chapters:
                left -= _download(client, bucket, obj_key, folder / name, f"s3://{bucket}/{obj_key}", left)
            return folder
        size = int(client.head_object(Bucket=bucket, Key=key)["ContentLength"])
        if size > limit:
            raise _TooBig(f"input: {uri} is {size} bytes; the limit is {limit} (--max-input-bytes)")
        target = dest / Path(key).name
        _download(client, bucket, key, target, uri, limit)
        return target
    except _TooBig:
        raise
    except Exception as e:  # noqa: BLE001 - botocore error types vary; all mean "input not readable"
        raise ValueError(f"input: cannot read {uri} ({type(e).__name__}: {e})") from e


def read_inputs(path: str | Path, defaults: RowDefaults = RowDefaults(),
                limits: InputLimits = InputLimits()) -> list[Utterance]:
    """Read a narration input into rows (one per output object).

    Args:
        path: a .txt/.md file (one chapter), a folder of such files (one chapter each, natural order),
            or a .jsonl/.parquet file of rows with fields id, text, voice|speaker, language, instruct,
            model, seed, format, sample_rate.
        defaults: values for fields a row leaves out.
        An `s3://bucket/key` (or `s3://bucket/prefix/` for a folder) is downloaded first, once its size (a
            prefix's chapter files: their sizes added up) is known to be within `limits.max_input_bytes`.

    Raises:
        ValueError: the path does not exist, has an unsupported type, is binary, too large or empty.
    """
    if str(path).startswith("s3://"):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="qtts-input-") as tmp:
            return read_inputs(fetch_s3_input(str(path), Path(tmp), limits.max_input_bytes), defaults, limits)
    p = Path(path)
    if not p.exists():
        raise ValueError(f"input: {p} does not exist")
    if p.is_dir():
        # chapter files only: a folder named like one ("notes.md/") or a hidden file ("._ch1.md" of macOS) is
        # skipped, not read; names that sort alike ("ch1", "ch01", "Ch1") keep one order, whatever the directory's
        files = sorted((f for f in p.iterdir() if f.suffix.lower() in TEXT_SUFFIXES and f.is_file()
                        and not f.name.startswith(".")), key=lambda f: (_natural_key(f), f.name))
        if not files:
            raise ValueError(f"input: folder {p} has no chapter files ({', '.join(TEXT_SUFFIXES)})")
        rows = _chapter_rows(files, defaults, limits, p)
    elif p.suffix.lower() in TEXT_SUFFIXES:
        rows = _chapter_rows([p], defaults, limits, p)
    elif p.suffix.lower() == ".jsonl":
        rows = _read_jsonl(p, defaults, limits)
    elif p.suffix.lower() == ".parquet":
        if not p.is_file():
            raise ValueError(f"input: {p} is not a regular file")
        rows = _read_parquet(p, defaults, limits)
    else:
        raise ValueError(f"input: unsupported file type {p.suffix!r}; use one of "
                         f"{list(TEXT_SUFFIXES + ROW_SUFFIXES)} or a folder")
    if not rows:
        raise ValueError(f"input: {p} has no rows")
    return mark_duplicates(rows)


def mark_duplicates(rows: Iterable[Utterance]) -> list[Utterance]:
    """Every id must be unique: later duplicates get an error (the first keeps its output)."""
    seen: set[str] = set()
    out = []
    for r in rows:
        if r.error is None and r.id in seen:
            r = replace(r, error=f"duplicate id {shown(r.id)}")
        seen.add(r.id)
        out.append(r)
    return out
