"""A catalog pass's pending journal: what it is about to create, written before it renders, so a pass cut off
before its manifest (killed, or the storage refusing the manifest: exit 3) leaves nothing no later pass can find.

Under the lease and before any synthesis, `begin` writes `catalog-manifest.pending-<hash of the name>.json` beside
the manifest: {"catalog": name, "objects": [...], "packages": [...]}, the output objects this pass may create (content
keys no stored record lists and that do not exist yet) and the --layout package files it may write or replace (no
stored record lists them), merged with what an earlier pass of the name left there. A journal that cannot be
written stops the pass before rendering (StorageError: exit 2). Once the pass has stored its manifest, `finish`
drops every key a record lists (the manifest tracks it now); a `--retire delete` pass deletes the others, with the
same rules as `retire.purge` (`retire.refusal`: only keys of the shape this job writes; never one a current prompt
uses or that matches one ignoring case, or that a quarantined manifest row names), removes their `asterisk/index.json`
entries, and deletes the journal once it lists nothing. Only journalled keys are ever deleted: several catalogs may
share a prefix, and nothing is found by listing it.

A journal that is not one this job writes is moved, as stored, to `<journal>.damaged` (added to what is there): every
key-like string in that file is kept from deletion and every pass of the name exits 1 while it exists (the summary's
`pending.damaged`); an operator deletes the file once its objects are dealt with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from . import layout as layouts
from .captions import caption_keys
from .inputs import Utterance
from .manifest import ManifestRecord
from .render import RenderConfig, base_record, sidecar_key
from .storage import Sink, StorageError

log = logging.getLogger(__name__)
_TOKEN = re.compile(r"[^\s\"'\[\]{},]+/[^\s\"'\[\]{},]+")


def journal_key(name: str) -> str:
    """The journal of catalog `name` (a hash: a name may hold characters a key should not)."""
    return f"catalog-manifest.pending-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}.json"


@dataclass
class Journal:
    key: str
    name: str
    objects: list[str] = field(default_factory=list)
    packages: list[str] = field(default_factory=list)
    held: set[str] = field(default_factory=set)   # key-like strings of a damaged journal: never deleted
    damaged: str | None = None                      # the .damaged file's key while it exists


def listed(records: list[ManifestRecord]) -> set[str]:
    """Every key a record lists (any status): its object, earlier versions, package files."""
    return {k for r in records for k in (r.key, *r.previous_keys, *r.layout) if k}


def _parse(raw: bytes, name: str) -> tuple[list[str], list[str]] | None:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("catalog") != name:
        return None
    objects, packages = doc.get("objects", []), doc.get("packages", [])
    ok = all(isinstance(v, list) and all(isinstance(k, str) and k for k in v) for v in (objects, packages))
    return (objects, packages) if ok else None


def _held(raw: bytes) -> set[str]:
    """Every key-like string of a damaged journal, as written and with its JSON escapes read (the journal is JSON:
    it spells `prompts/欢迎-...` as `prompts/\\u6b22\\u8fce-...`), with the sidecar and captions of each."""
    keys = set(_TOKEN.findall(raw.decode("utf-8", "replace")))
    keys |= {u for k in keys if "\\" in k and (u := _unescaped(k)) is not None}
    return {x for k in keys for x in (k, sidecar_key(k), *caption_keys(k))}


def _unescaped(token: str) -> str | None:
    try:
        value = json.loads(f'"{token}"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def begin(sink: Sink, name: str, rows: list[Utterance], cfg: RenderConfig, layout: str, claimed: set[str],
          ) -> Journal:
    """Write the journal of a pass about to render `rows` (`claimed`: every key a stored record or a quarantined row
    lists). Raises StorageError when it cannot be read or written: the pass must not render then."""
    j = Journal(journal_key(name), name)
    damaged_key = f"{j.key}.damaged"
    raw, parsed = sink.get(j.key), None
    if raw is not None:
        parsed = _parse(raw, name)
        if parsed is None:
            before = sink.get(damaged_key) or b""
            sink.put(damaged_key, before + (b"\n" if before else b"") + raw, "application/octet-stream")
            log.warning("%s/%s is not a pending journal of catalog %r: moved to %s; nothing it names is deleted, and "
                        "each pass exits 1 until that file is deleted (jobs/README.md)", sink.uri, j.key, name,
                        damaged_key)
        else:
            j.objects, j.packages = list(parsed[0]), list(parsed[1])
    damaged = sink.get(damaged_key)
    if damaged is not None:
        j.held, j.damaged = _held(damaged), damaged_key
    objects, packages = list(j.objects), list(j.packages)
    for row in rows:
        if row.error is not None:
            continue
        key = base_record(row, cfg).key
        if not key:
            continue
        if key not in claimed and sink.size(key) is None:
            objects.append(key)
        if layout != "none":
            lang, stem = layouts.lang_code(row.language), layouts.safe_name(row.id)
            packages += [k for c in layouts.ASTERISK_CODECS
                         if (k := layouts.package_key(c, lang, stem)) not in claimed]
    objects, packages = list(dict.fromkeys(objects)), list(dict.fromkeys(packages))
    stored = None if raw is None else (j.objects, j.packages) if parsed is not None else ([], ["(damaged)"])
    if stored != (objects, packages) and (stored is not None or objects or packages):
        _write(sink, j, objects, packages)   # (a damaged one is replaced: it is kept in the .damaged file)
    j.objects, j.packages = objects, packages
    return j


def _exists(sink: Sink, *keys: str) -> bool:
    """Whether any of `keys` is in storage (True when the storage cannot say: kept journalled)."""
    try:
        return any(sink.size(k) is not None for k in keys)
    except (StorageError, ValueError):
        return True


def _write(sink: Sink, j: Journal, objects: list[str], packages: list[str]) -> None:
    if objects or packages:
        sink.put(j.key, json.dumps({"catalog": j.name, "objects": objects, "packages": packages}, indent=1).encode(),
                 "application/json")
    else:
        sink.delete(j.key)


def finish(sink: Sink, j: Journal, records: list[ManifestRecord], held: set[str], prefix: str, delete: bool,
           ) -> dict[str, Any]:
    """After the pass stored its manifest (`records`: every record it lists, all catalogs'): drop what a record
    lists; with `delete`, delete the rest (and their index entries); write what is left. Returns the summary's
    `pending` ({} when there is nothing to say); its `failed` counts deletes or writes the storage refused (exit 1)."""
    from .retire import Live, _delete, refusal  # (retire imports layout, as this module does)

    held = set(held) | j.held
    mine = listed(records)
    objects_live = Live({x for k in mine for x in (k, sidecar_key(k), *caption_keys(k))}, held)
    packages_live = Live({k for r in records for k in r.layout}, held)
    keep_o, keep_p, gone_p, out = [], [], [], {"deleted": 0, "refused": 0, "failed": 0}
    for key in j.objects:
        if (use := objects_live.use(key)) == "live":
            continue
        if not delete and not _exists(sink, key, sidecar_key(key), *caption_keys(key)):
            continue   # never written (its row failed), or all deleted: nothing to delete
        if not delete or use == "wait":
            keep_o.append(key)
        elif why := refusal(key, prefix):
            out["refused"] += 1
            log.warning("not deleting %s, listed by the pending journal of catalog %r: %s", key, j.name, why)
        elif _delete(sink, key):
            keep_o.append(key)
            out["failed"] += 1
        else:
            out["deleted"] += 1
    for key in j.packages:
        if (use := packages_live.use(key)) == "live":
            continue
        if not delete and not _exists(sink, key):
            continue
        if not delete or use == "wait":
            keep_p.append(key)
        elif why := refusal(key, package=True):
            out["refused"] += 1
            log.warning("not deleting %s, listed by the pending journal of catalog %r: %s", key, j.name, why)
        else:
            try:
                sink.delete(key)
                gone_p.append(key)
                out["deleted"] += 1
            except (StorageError, ValueError) as e:
                log.warning("could not delete %s: %s", key, e)
                keep_p.append(key)
                out["failed"] += 1
    if gone_p:   # their index entries, unless a listed (or held) package file has the same name
        used = {layouts._ident(k).casefold() for k in (*packages_live.exact, *held)}
        try:
            index = layouts._read_index(sink)
            drop = {i for i in map(layouts._ident, gone_p) if i in index and i.casefold() not in used}
            if drop:
                for ident in drop:
                    del index[ident]
                layouts._write_index(sink, index)
        except StorageError as e:   # the files stay journalled: deleted again, with the entries, next time
            log.warning("could not update %s: %s", layouts.INDEX_KEY, e)
            keep_p += gone_p
            out["failed"] += 1
    try:
        _write(sink, j, keep_o, keep_p)
    except (StorageError, ValueError) as e:   # (it lists only what is journalled still, or what a record lists)
        log.warning("could not write %s: %s", j.key, e)
        out["failed"] += 1
    if keep_o or keep_p:
        out["left"] = len(keep_o) + len(keep_p)
    if j.damaged:
        out["damaged"] = f"{sink.uri}/{j.damaged}"
    return {k: v for k, v in out.items() if v}
