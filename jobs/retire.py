"""What a catalog pass keeps, retires and deletes: `reconcile` classifies a pass against the catalog's previous run
and records every object that is no longer needed on its record; `purge` deletes them.

The order is the rule: the manifest listing the pass's records is written between the two (`catalog.run_once`),
so a stored manifest never lists as current an object that was already deleted. A pass stopped between the two
leaves its deletes listed (`previous_keys`, retired records with error PENDING) for the next `--retire delete`."""

from __future__ import annotations

import logging
import re

from . import audio, codecs
from . import layout as layouts
from .captions import caption_keys
from .manifest import ManifestRecord
from .render import sidecar_key
from .storage import Sink, StorageError, safe_stem

log = logging.getLogger(__name__)
RETIRE_MODES = ("mark", "delete")
LIVE = ("ok", "suspect")
DELETED = "retired: object deleted"
KEPT = "retired: object kept (a current prompt uses the same object)"
PENDING = "retired: delete pending (the next --retire delete pass deletes it)"
REFUSED = "retired: delete refused"
WAITING = ("retired: delete pending (a current prompt's key matches it ignoring case, or a quarantined manifest row "
           "names it; deleted by a --retire delete pass once none does)")
# what storage.content_key makes below the prefix: <stem>-<20 hex>.<ext>, the stem at most 80 characters
_OBJECT = re.compile(r"(?P<stem>[^/\\]{1,80})-[0-9a-f]{20}\.(?P<ext>[a-z0-9]+)")
_EXTS = {e[2] for e in audio.ENCODINGS.values()} | {c.ext for c in codecs.CODECS.values()}


def refusal(key: object, prefix: str | None = None, *, package: bool = False) -> str | None:
    """The rule, the only one, of what a catalog pass may delete: None for a key of the shape this job writes, else
    why not. `package`: a --layout package file, exactly as layout.package_key makes one; else an output object,
    as storage.content_key makes one below `prefix` (its sidecar and captions are derived from it). A stored
    manifest or a sidecar is not trusted: a key edited (or corrupted) to name anything else at the output (another
    job's files, the manifest, a path out of the folder) is refused, never deleted."""
    if not isinstance(key, str):
        return f"not a key ({type(key).__name__})"
    if package:
        return None if layouts.is_package_key(key) else "not a --layout package file this job writes"
    m = _OBJECT.fullmatch(key[len(prefix) + 1:]) if prefix and key.startswith(f"{prefix}/") else None
    stem = m.group("stem") if m else None
    # content_key's stem, as it cuts one now or cut one before stems had a byte limit (an 80-character CJK stem)
    if not (m and m.group("ext") in _EXTS and stem in (safe_stem(stem), safe_stem(stem, max_bytes=0))):
        return f"not an output this job writes ({prefix}/<id>-<20 hex>.<ext>)"
    return None


def refused_error(key: str, why: str) -> str:
    """A retired record's error when what it lists was refused (`refusal`): final, never tried again."""
    return f"{REFUSED}: {key[:200]!r} is {why}"


def live_keys(records: list[ManifestRecord]) -> set[str]:
    """Every object a current prompt uses: a written prompt's audio, sidecar and captions, and the last written
    version a failed prompt still holds (`previous_keys`, and its own key: a prompt whose text did not change
    failed on the very object it wrote before, which `_carry` leaves out of `previous_keys`). Keys are
    stem-hash(content) and the stem is lossy ("main menu" and "main_menu"), so a retired or superseded record may
    share a key with a live one."""
    keys: set[str] = set()
    for r in records:
        if r.status == "retired":
            continue
        used = [r.key] if r.status in LIVE else [r.key, *r.previous_keys]
        used = [k for k in used if k]
        for k in used:
            keys.update((k, sidecar_key(k), *caption_keys(k)))
    return keys


def _carry(rec: ManifestRecord, old: ManifestRecord) -> None:
    """A prompt whose render failed keeps what its earlier records left in storage: the last written object (and
    older ones not yet deleted) and its --layout package files, which stay in place. Carried on its record, they
    are deleted when the prompt is written again (superseded) or retired; dropped here, they were never deleted."""
    older = [k for k in dict.fromkeys([old.key, *old.previous_keys]) if k and k != rec.key]
    rec.previous_keys = list(dict.fromkeys([*rec.previous_keys, *older]))
    rec.layout = rec.layout or list(old.layout)


def _objects_done(rec: ManifestRecord) -> bool:
    """A retired record whose objects are all deleted (or kept for a current prompt); its --layout package files
    are another matter (layout.remove_packages)."""
    return (rec.error in (DELETED, KEPT) or str(rec.error).startswith(REFUSED)) and not rec.previous_keys


def _done(rec: ManifestRecord) -> bool:
    """A retired record with nothing left to delete."""
    return _objects_done(rec) and not rec.layout


def reconcile(current: list[ManifestRecord], previous: list[ManifestRecord], retire: str,
              ) -> tuple[list[ManifestRecord], dict[str, int]]:
    """Classify this pass's records against the catalog's previous run; deletes nothing. Returns the records to
    write (current ones, then retired ones) and the counts new/changed/unchanged/retired.

    `retire` "mark": prompts that left are kept as `retired`, superseded versions of changed prompts stay in
    storage unlisted. "delete" (and "hold", a pass that must not delete now): superseded versions are listed on
    their prompt's record (`previous_keys`) and newly retired prompts get error PENDING, for `purge` after the
    manifest is written; "delete" drops retired records whose objects are gone. A prompt whose render failed
    carries what its earlier versions left (`_carry`), so nothing is orphaned."""
    if retire not in (*RETIRE_MODES, "hold"):
        raise ValueError(f"retire must be one of {list(RETIRE_MODES)}, got {retire!r}")
    prev = {r.id: r for r in previous}
    counts = {"new": 0, "changed": 0, "unchanged": 0, "retired": 0}
    for r in current:
        old = prev.get(r.id)
        if old is None or old.status == "retired":
            counts["new"] += 1
            if old is not None and not _done(old):
                # back after a retirement whose delete failed or is pending: what it left goes with this version
                # (written or failed: the retired record is dropped, and its objects must stay listed somewhere)
                if r.status in LIVE:
                    left = [k for k in dict.fromkeys([old.key, *old.previous_keys]) if k and k != r.key]
                    r.previous_keys = list(dict.fromkeys([*r.previous_keys, *left]))
                else:
                    _carry(r, old)
            continue
        if r.status not in LIVE:
            _carry(r, old)
        counts["unchanged" if old.key == r.key and r.reused else "changed"] += 1
        if r.status in LIVE:
            # "mark" keeps superseded versions in storage unlisted, but never drops deletes already listed (a pass
            # stopped between its manifest and its deletes, a refused delete, a "hold" pass)
            superseded = [k for k in dict.fromkeys([old.key] if retire != "mark" else []) if k and k != r.key]
            listed = [k for k in old.previous_keys if k and k != r.key]
            r.previous_keys = list(dict.fromkeys([*r.previous_keys, *listed, *superseded]))
    ids = {r.id for r in current}
    out = list(current)
    for old in previous:
        if old.id in ids or (old.status == "retired" and retire == "delete" and _done(old)):
            continue
        if old.status != "retired":
            counts["retired"] += 1
            old.status, old.reused = "retired", False
            old.error = PENDING if retire != "mark" else old.error
        out.append(old)
    return out, counts


def held_keys(rows: list[dict]) -> set[str]:
    """Every key a quarantined manifest row (as stored, not trusted, `manifest.read_stored`) names: its key,
    previous_keys, layout and captions files, and each key's sidecar and captions. Never deleted while the row is
    held: it may be a current prompt's (another catalog's) whose record is damaged."""
    keys: set[str] = set()
    for row in rows:
        if not isinstance(row, dict):
            continue
        for name in ("key", "previous_keys", "layout", "captions"):
            v = row.get(name)
            for k in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
                if isinstance(k, str) and k:
                    keys.update((k, sidecar_key(k), *caption_keys(k)))
    return keys


class Live:
    """What a pass must not delete. `keys`: what current prompts use (`live_keys`): such a key is final (kept, and
    dropped from a retired or superseded record: a current one lists it). Keys that match one only ignoring case, or
    that a quarantined row names (`held`), wait: kept and left listed for a later pass. A case-insensitive store
    (macOS, SMB) holds prompts/Welcome-<h>.wav and prompts/welcome-<h>.wav as one object, so a case-only match is
    never deleted; on a case-sensitive store (S3, Linux) it is another object, deleted once no current key matches
    it even ignoring case (kept final, it stayed in storage unlisted for ever)."""

    def __init__(self, keys: set[str], held: set[str] = frozenset()) -> None:
        self.exact = set(keys)
        self.folded = {k.casefold() for k in (*keys, *held)}

    def use(self, key: str) -> str | None:
        """"live" (a current prompt's key), "wait" (a case-only match or held), or None (may be deleted)."""
        return "live" if key in self.exact else "wait" if key.casefold() in self.folded else None


def purge(records: list[ManifestRecord], sink: Sink, shared: list[ManifestRecord], prefix: str,
          held: set[str] = frozenset()) -> tuple[int, bool, int]:
    """Delete what `reconcile` listed, once the manifest listing it is written: superseded versions of written
    prompts (`previous_keys`) and retired prompts' objects (their --layout package files: layout.remove_packages).
    Never deletes an object a current prompt uses, this catalog's or another's at the same output (`shared`: their
    records; keys are content keys, so two catalogs with the same prompt share its object), nor one that matches
    such a key ignoring case or that a quarantined manifest row names (`held`, `held_keys`): those stay listed,
    pending (`Live`); nor a key that is not an output this job writes below `prefix` (`refusal`: dropped from the
    record with a warning; a retired record says so in its error). What the storage refuses stays listed (a retired
    record gets error "retired: delete failed: ..."), to try again next pass.
    Returns (how many prompts have a delete that failed, whether any record changed, how many keys were refused)."""
    live = Live(live_keys([*records, *shared]), held)
    failed, changed, refused = 0, False, 0
    for r in records:
        if r.status in LIVE and r.previous_keys:
            left, waiting = [], []
            for key in r.previous_keys:
                if why := refusal(key, prefix):
                    refused += 1
                    log.warning("not deleting %s, listed as a superseded version of %r: %s", key, r.id, why)
                elif (use := live.use(key)) is not None:
                    waiting += [key] if use == "wait" else []
                elif err := _delete(sink, key):
                    left.append(key)
                    log.warning("could not delete %s, a superseded version of %r: %s", key, r.id, err)
            kept = [k for k in r.previous_keys if k in left or k in waiting]
            changed |= kept != r.previous_keys
            r.previous_keys = kept
            failed += bool(left)
        elif r.status == "retired" and not _objects_done(r):
            f, n = _retire_delete(sink, r, live, prefix)
            failed, refused, changed = failed + f, refused + n, True
    return failed, changed, refused


def _retire_delete(sink: Sink, rec: ManifestRecord, live: Live, prefix: str) -> tuple[int, int]:
    """Delete a retired prompt's objects, its own and the earlier versions it still holds (`previous_keys`).
    Returns (1 when a delete failed (what is left stays listed, to try again), how many keys were refused)."""
    errors, left, refused, waiting = [], [], [], []
    for key in dict.fromkeys(k for k in (rec.key, *rec.previous_keys) if k):
        if why := refusal(key, prefix):
            refused.append(refused_error(key, why))
            log.warning("not deleting %s, listed by retired prompt %r: %s", key, rec.id, why)
        elif (use := live.use(key)) is not None:
            log.info("keeping %s: %s", key, "a current prompt uses it" if use == "live" else
                     "it matches a current prompt's key ignoring case, or a quarantined row names it (pending)")
            waiting += [key] if use == "wait" else []
        elif err := _delete(sink, key):
            errors.append(err)
            left += [key]
    rec.previous_keys = [k for k in (*left, *waiting) if k != rec.key]
    rec.error = (f"retired: delete failed: {errors[0]}" if errors else refused[0] if refused
                 else WAITING if waiting else KEPT if rec.key and live.use(rec.key) == "live" else DELETED)
    return (1 if errors else 0), len(refused)


def _delete(sink: Sink, key: str) -> str | None:
    """Delete an output (audio, sidecar, captions); the error, or None when done. `key` passed `refusal` and is
    no current prompt's (`Live`)."""
    try:
        for k in (key, sidecar_key(key), *caption_keys(key)):  # --captions files, when there are any
            sink.delete(k)
    except (StorageError, ValueError) as e:  # (ValueError: a key the sink refuses, e.g. out of a local folder)
        log.warning("could not delete %s: %s", key, e)
        return str(e)
    return None
