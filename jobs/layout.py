"""`qtts catalog --layout asterisk`: the catalog as sound packages a PBX can point at, one folder per codec:

    asterisk/ulaw/sounds/<lang>/<name>.ulaw     8 kHz G.711 u-law, headerless
    asterisk/alaw/sounds/<lang>/<name>.alaw     8 kHz G.711 A-law, headerless
    asterisk/sln16/sounds/<lang>/<name>.sln16   16 kHz signed 16-bit little-endian, headerless
    asterisk/g722/sounds/<lang>/<name>.g722     16 kHz G.722 (64 kbit/s)

(point Asterisk's astdatadir, or copy the folder's `sounds/`, at the codec you want). Every file comes from the
prompt's telephony master at 16 kHz, is set to -19 dBm0 for its own codec and measured again after encoding; a file
off by more than 1 dB flags its prompt (`layout:<codec>:speech_level`). `asterisk/index.json` records, per file
name, the master the files were made from and each file's measured level: a later run that keeps the files (same
master) flags the prompt again from those levels, so a flag is never lost because nothing was re-encoded.

Prompt ids become file names: accents are dropped, whitespace becomes "-", "/" makes subfolders (`digits/1`);
anything else (quotes, "*", "?", ":", non-Latin letters, "." or ".." as a folder) cannot be a portable file name and
is refused with a clear error before any synthesis, as is a second id that maps to the same file name ignoring case.
`<lang>` is the prompt's language (english -> en, ...); "auto" goes under `en`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from . import codecs, levels, mastering
from .audio import resample
from .inputs import Utterance
from .manifest import ManifestRecord
from .storage import Sink, StorageError

log = logging.getLogger(__name__)
LAYOUTS = ("none", "asterisk")
ASTERISK_CODECS = ("ulaw", "alaw", "sln16", "g722")
ROOT = "asterisk"
# <lang>/<name> -> {"master": content key of the master the package files were made from,
#                   "dbm0": {codec: the file's measured active speech level, or None}}
INDEX_KEY = f"{ROOT}/index.json"
LANG_CODES = {"english": "en", "chinese": "zh", "japanese": "ja", "korean": "ko", "german": "de", "french": "fr",
              "russian": "ru", "portuguese": "pt", "spanish": "es", "italian": "it", "sichuan_dialect": "zh",
              "beijing_dialect": "zh", "auto": "en"}
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_layout(layout: str | None) -> str:
    layout = layout or "none"
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def master_for(layout: str, master: mastering.MasterConfig) -> mastering.MasterConfig:
    """The master a layout needs: --layout asterisk renders every prompt as a 16 kHz telephony master."""
    if layout == "none":
        return master
    if master.preset not in ("none", "telephony"):
        raise ValueError(f"layout {layout!r} needs the telephony preset (or none), got master {master.preset!r}")
    if master.codec not in (None, "sln16"):
        raise ValueError(f"codec: --layout {layout} makes every codec from a 16 kHz master; leave --codec unset "
                         f"(got {master.codec!r})")
    return mastering.MasterConfig("telephony", "sln16", master.tail_silence_s)


def safe_name(prompt_id: str) -> str:
    """A prompt id -> a relative file name without extension; ValueError saying why when it cannot be one."""
    text = unicodedata.normalize("NFKD", prompt_id)
    text = "".join(c for c in text if not unicodedata.combining(c))
    parts = [re.sub(r"\s+", "-", p.strip()) for p in text.split("/")]
    for p in parts:
        if p in ("", ".", ".."):
            raise ValueError(f"id {prompt_id!r} cannot be a file name: empty, '.' or '..' path component")
        if not _COMPONENT.match(p):
            bad = sorted({c for c in p if not (c.isascii() and (c.isalnum() or c in "_.-"))})
            why = f"characters {''.join(bad)!r} are not allowed" if bad else \
                "components must start with a letter, digit or '_' and be at most 64 characters"
            raise ValueError(f"id {prompt_id!r} cannot be a file name: {why} (use letters, digits, '_', '-', "
                             "'.' and '/' for subfolders)")
    if len(parts) > 4:
        raise ValueError(f"id {prompt_id!r} cannot be a file name: at most 3 subfolders")
    return "/".join(parts)


def lang_code(language: str | None) -> str:
    return LANG_CODES.get((language or "auto").lower(), "en")


def package_key(codec: str, lang: str, name: str) -> str:
    return f"{ROOT}/{codec}/sounds/{lang}/{name}.{codecs.get(codec).ext}"


def is_package_key(key: str) -> bool:
    """Whether `key` is exactly what `package_key` makes for some codec, language and file name (`safe_name`'s)."""
    parts = key.split("/", 4) if isinstance(key, str) else []
    if len(parts) != 5 or parts[0] != ROOT or parts[2] != "sounds" or parts[1] not in ASTERISK_CODECS:
        return False
    codec, lang, (name, dot, _) = parts[1], parts[3], parts[4].rpartition(".")
    if not dot or lang not in set(LANG_CODES.values()):
        return False
    try:
        return safe_name(name) == name and package_key(codec, lang, name) == key
    except ValueError:
        return False


def check_rows(rows: Iterable[Utterance]) -> list[Utterance]:
    """Refuse (row.error) ids that cannot be file names or that collide with an earlier one (ignoring case)."""
    seen: dict[tuple[str, str], str] = {}
    out = []
    for r in rows:
        if r.error is None:
            try:
                name = safe_name(r.id)
                k = (lang_code(r.language), name.lower())
                if k in seen:
                    raise ValueError(f"id {r.id!r} maps to the same file name as {seen[k]!r} ({name})")
                seen[k] = r.id
            except ValueError as e:
                r = replace(r, error=f"layout: {e}")
        out.append(r)
    return out


def _package_files(pcm: np.ndarray, sr: int) -> dict[str, tuple[bytes, float | None]]:
    """The master's audio -> {codec: (file bytes, measured dBm0)}; each set to the target for its own codec."""
    target = mastering.TELEPHONY["level_target_dbm0"]
    out = {}
    for name in ASTERISK_CODECS:
        c = codecs.get(name)
        x = resample(pcm, sr, c.sample_rate)
        tmax = mastering.TMAX_DBM0.get(name, mastering.TMAX_DBM0["sln16"])
        level = levels.active_speech_level(x, c.sample_rate)[0]
        if level is not None:  # resampling to 8 kHz drops the 4-8 kHz band: put the level back
            now = level + 10 * np.log10(2) + tmax
            x = np.clip(x * np.float32(10 ** ((target - now) / 20)), -1.0, 1.0)
        data = codecs.encode(x, c)
        y, ysr = codecs.decode(data, name)
        got = levels.active_speech_level(y, ysr)[0]
        out[name] = (data, None if got is None else got + 10 * np.log10(2) + tmax)
    return out


def _level_flags(dbm0: dict[str, float | None]) -> list[str]:
    """`layout:<codec>:speech_level` for each package file whose measured level is off the telephony target."""
    target, tol = mastering.TELEPHONY["level_target_dbm0"], mastering.TELEPHONY["level_tolerance"]
    return [f"layout:{c}:speech_level" for c in ASTERISK_CODECS
            if c in dbm0 and (dbm0[c] is None or abs(dbm0[c] - target) > tol)]


def _read_index(sink: Sink) -> dict[str, Any]:
    """The stored index ({} when there is none). One that is not a JSON object (cut short, edited, `[]`) is taken as
    empty, with a warning naming it: it only records the files' masters and levels, and is written again (the
    package files are then made again, and measured)."""
    raw = sink.get(INDEX_KEY)
    if raw is None:
        return {}
    try:
        index = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
        index, why = None, f"not JSON ({type(e).__name__}: {str(e)[:100]})"
    else:
        why = f"a JSON {type(index).__name__}, not an object"
    if isinstance(index, dict):
        return index
    log.warning("%s/%s is %s: taken as empty and written again (package files are made again)", sink.uri,
                INDEX_KEY, why)
    return {}


def _kept_levels(entry: object, master: str) -> dict[str, float | None] | None:
    """The stored levels of package files made from `master`, or None when the files must be written again: made
    from another master, an index entry from before levels were stored (a bare key: levels unknown), or one that is
    not what this job writes (the index is read back from storage, not trusted): every name a codec of the layout,
    every level None or a finite number."""
    if not isinstance(entry, dict) or entry.get("master") != master or not isinstance(entry.get("dbm0"), dict):
        return None
    levels_ = entry["dbm0"]
    ok = all(c in ASTERISK_CODECS and (v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and math.isfinite(v)) for c, v in levels_.items())
    return levels_ if ok else None


def write_packages(records: list[ManifestRecord], rows: list[Utterance], sink: Sink,
                   elsewhere: list[ManifestRecord] = ()) -> dict[str, int]:
    """Write (or keep) the package files of every written prompt; records get `layout` keys and flags.

    A prompt whose files exist and were made from its current master is left alone, and flagged from the levels
    the index holds for them. A package file that a current prompt of another catalog at this output (`elsewhere`)
    lists with other audio (same id and language, or ids that differ only in case) is that prompt's: this prompt
    gets no package, flag `layout:taken` and an error naming the owner (before, the catalogs overwrote the file in
    turn on every run, and a retired prompt's audio stayed in it). A prompt whose files are to be written has its
    index entry removed, in storage, before any of them is: a set that a refused write or a kill left half-written
    is never kept, the next pass writes it all again. What the storage refuses (the index, the master, a file)
    flags the prompt `layout:storage` with error `layout: ...`, counted in `failed` (the pass exits 1); nothing
    raises. Returns counts.
    """
    by_id = {r.id: r for r in rows}
    taken = {k.lower(): r for r in elsewhere if r.status != "retired" for k in r.layout or []}
    counts = {"written": 0, "kept": 0}   # and "taken", "failed", when some are
    todo: list[tuple[ManifestRecord, str, str]] = []
    for rec in records:
        row = by_id.get(rec.id)
        if row is None or rec.status not in ("ok", "suspect") or not rec.key:
            continue
        lang, name = lang_code(row.language), safe_name(row.id)
        keys = [package_key(c, lang, name) for c in ASTERISK_CODECS]
        ident = f"{lang}/{name}"
        owner = next((taken[k.lower()] for k in keys if k.lower() in taken and taken[k.lower()].key != rec.key), None)
        if owner is not None:
            rec.layout = []
            _flag(rec, ["layout:taken"])
            rec.error = (f"layout: {ident} is the package of prompt {owner.id!r} of catalog "
                         f"{owner.catalog or '(unclaimed, written before catalog names)'!r} at this output, with "
                         "other audio; give this prompt another id (or language)")
            counts["taken"] = counts.get("taken", 0) + 1
            continue
        rec.layout = keys
        todo.append((rec, lang, name))
    try:
        index = _read_index(sink)
    except StorageError as e:
        return _all_failed([rec for rec, _, _ in todo], e, counts)
    write = []
    for rec, lang, name in todo:
        try:
            kept = _kept_levels(index.get(f"{lang}/{name}"), rec.key)
            if kept is not None and all(sink.size(k) for k in rec.layout):
                _flag(rec, _level_flags(kept))
                counts["kept"] += 1
            else:
                write.append((rec, lang, name))
        except StorageError as e:
            _failed(rec, e, counts)
    stale = [ident for ident in (f"{lang}/{name}" for _, lang, name in write) if ident in index]
    if stale:  # out of the stored index before any of their files changes
        for ident in stale:
            del index[ident]
        try:
            _write_index(sink, index)
        except StorageError as e:
            return _all_failed([rec for rec, _, _ in write], e, counts)
    written = []
    for rec, lang, name in write:
        dbm0: dict[str, float | None] = {}
        try:
            data = sink.get(rec.key)
            if data is None:
                _flag(rec, ["layout:missing_master"])
                continue
            pcm, sr = codecs.decode(data)
            for codec, (blob, level) in _package_files(pcm, sr).items():
                sink.put(package_key(codec, lang, name), blob, codecs.get(codec).media_type)
                dbm0[codec] = level
        except StorageError as e:
            _failed(rec, e, counts, _level_flags(dbm0))
            continue
        _flag(rec, _level_flags(dbm0))
        index[f"{lang}/{name}"] = {"master": rec.key, "dbm0": dbm0}
        written.append(rec)
        counts["written"] += 1
    if written:
        try:
            _write_index(sink, index)
        except StorageError as e:
            _all_failed(written, f"{e} (its files are written; the index does not list them: the next pass writes "
                                 "them again)", counts)
    return counts


def _write_index(sink: Sink, index: dict[str, Any]) -> None:
    sink.put(INDEX_KEY, json.dumps(index, sort_keys=True, indent=1).encode(), "application/json")


def _failed(rec: ManifestRecord, e: object, counts: dict[str, int], flags: list[str] = ()) -> None:
    """A package the storage refused: flag `layout:storage`, the error, one more `failed`."""
    _flag(rec, [*flags, "layout:storage"])
    rec.error = f"layout: {e}"
    counts["failed"] = counts.get("failed", 0) + 1


def _all_failed(recs: list[ManifestRecord], e: object, counts: dict[str, int]) -> dict[str, int]:
    """`_failed` for each of `recs` (a storage step they all needed was refused); returns `counts`."""
    for rec in recs:
        _failed(rec, e, counts)
    return counts


def _flag(rec: ManifestRecord, flags: list[str]) -> None:
    if flags:
        rec.flags, rec.status = [*rec.flags, *flags], "suspect"


def _ident(path: str) -> str:
    """A package file's index entry: asterisk/<codec>/sounds/<lang>/<name>.<ext> -> <lang>/<name>."""
    return path.split("/sounds/", 1)[-1].rsplit(".", 1)[0]


def remove_packages(records: list[ManifestRecord], sink: Sink, held: set[str] = frozenset()) -> int:
    """Delete the package files of retired prompts (catalog --retire delete); returns how many prompts still have
    files that could not be deleted (kept in their `layout`, error "retired: delete failed: ...", tried again next
    run). A file a current prompt also lists is never deleted: ids map to file names lossily ("main menu" and
    "main-menu" are both main-menu), and a current prompt whose render failed still lists (and uses) the files of
    its last written version (retire._carry). A file that matches a current prompt's only ignoring case (one file on
    a case-insensitive store, another on a case-sensitive one), or that a quarantined manifest row names (`held`,
    retire.held_keys), stays in the retired prompt's `layout`, pending, until none does (retire.Live)."""
    from .retire import DELETED, KEPT, Live, refusal, refused_error  # (retire imports this module)

    try:
        index = _read_index(sink)
    except StorageError as e:  # nothing deleted: the files stay listed, for the next pass
        pending = [r for r in records if r.status == "retired" and r.layout]
        for rec in pending:
            rec.error = f"retired: delete failed: {e}"
        return len(pending)
    live = Live({k for r in records if r.status != "retired" for k in r.layout or []}, held)
    live_idents = {_ident(k) for k in live.folded}
    failed, dropped = 0, []   # dropped: (record, its layout before) for each that removed an index entry
    for rec in records:
        if rec.status != "retired" or not rec.layout:
            continue
        left, errors, refused, waiting, before = [], [], [], [], rec.layout
        for key in rec.layout:
            if (use := live.use(key)) == "live":
                continue
            if why := refusal(key, package=True):
                refused.append(refused_error(key, why))
                log.warning("not deleting %s, listed as a package file of retired prompt %r: %s", key, rec.id, why)
                continue
            if use == "wait":  # (on a case-insensitive store Welcome.ulaw is welcome.ulaw)
                waiting.append(key)
                continue
            try:
                sink.delete(key)
            except (StorageError, ValueError) as e:
                log.warning("could not delete %s: %s", key, e)
                left.append(key)
                errors.append(str(e))
        gone = [ident for ident in {_ident(k) for k in rec.layout if not refusal(k, package=True)} if ident in index
                and ident.casefold() not in live_idents and not any(_ident(k) == ident for k in (*left, *waiting))]
        for ident in gone:
            del index[ident]
        if gone:
            dropped.append((rec, before))
        rec.layout = [k for k in rec.layout if k in left or k in waiting]
        if left:
            failed += 1
            rec.error = f"retired: delete failed: {errors[0]}"
        elif refused and rec.error in (DELETED, KEPT):  # (a failed delete of its objects stays the error)
            rec.error = refused[0]
    if dropped:
        try:
            _write_index(sink, index)
        except StorageError as e:  # their files stay listed (deleted again next pass, with the index entries)
            for rec, before in dropped:
                failed += not str(rec.error).startswith("retired: delete failed")
                rec.layout, rec.error = before, f"retired: delete failed: {e}"
    return failed
