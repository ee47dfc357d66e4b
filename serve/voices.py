"""Stored clone voices: THE voice store, used by the ingress (list, delete) and by every replica (create, load).

    store = VoiceStore.from_uri("~/.cache/qwen-tts-fleet/voices")      # or "s3://bucket/prefix" (shared by nodes)
    info = store.create(item, name="alice", model="tiny-base", owner=digest)   # -> {"id": "voice_3f2a...", ...}
    item = store.load(info["id"], scope)         # VoiceClonePromptItem; KeyError when unknown or not visible
    store.list(scope); store.info(vid, scope); store.delete(vid, scope)

One `save_voice_prompt` safetensors file per voice, its metadata holding name, model, created time and OWNER (an API
key digest from serve/auth.py, never a key). `scope` is who is asking: a key digest sees only its own voices,
`ANYONE` (an admin key, or a service without keys) sees all; a voice outside the scope behaves exactly like one that
does not exist (KeyError -> 404 / "not a stored voice"). This class owns every rule about voices: ids, ownership,
names, sizes, and the per-process caches of decoded prompts and infos, which re-check that the file still exists on
each use (one stat or S3 HEAD), so a voice deleted through another replica, ingress or node is refused at once. For s3:// the endpoint
comes from AWS_ENDPOINT_URL (boto3's own rule); stored files are immutable (ids are never reused).

A stored file the store cannot read (storage damage: no request writes one) is a `DamagedVoice` (a ValueError) for
whoever may see it: its owner when the header still names one, else only `ANYONE`; to every other scope it does not
exist. A listing skips it; `delete` removes it. How many voices a key stores is counted in the store, never in a
process (`count`, `keep_within`), so every ingress replica and node applies one limit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from qwen_tts_core.errors import RequestError, shown

log = logging.getLogger(__name__)

ANYONE = "*"                      # the scope that sees every voice
VOICE_ID = re.compile(r"voice_[0-9a-f]{16}")   # use .fullmatch: with `$`, "voice_<16 hex>\n" would pass
MAX_VOICE_BYTES = 8 << 20         # a prompt is an x-vector plus (ICL) 16 codes per frame: tens of KiB in practice
MAX_NAME_CHARS = 100
CACHE_ITEMS = 256                 # decoded prompts kept per process
INFO_ITEMS = 16 * CACHE_ITEMS     # voice infos (header metadata, under 1 KiB each) kept per process
_SUFFIX = ".safetensors"
_HEAD_BYTES = 64 << 10            # enough for a prompt file's JSON header


class VoiceTooLarge(RequestError):
    """A voice prompt file over MAX_VOICE_BYTES. A RequestError (the client's input made it) that the service answers
    with `status` 413, naming the reference audio: its frames are nearly all of a prompt's bytes (the transcript is
    bounded by the core, `MAX_REF_TEXT_CHARS`)."""

    status = 413


def new_voice_id() -> str:
    return "voice_" + secrets.token_hex(8)


def _check_id(voice_id: object) -> str:
    if not isinstance(voice_id, str) or not VOICE_ID.fullmatch(voice_id):
        raise KeyError(voice_id)
    return voice_id


class DamagedVoice(ValueError):
    """A stored voice file that is not a voice prompt whose tensors fit the file (truncated, foreign bytes, a header
    that lies about sizes). `owner` is the owner its header names, None when even that cannot be read."""

    def __init__(self, voice_id: str, reason: str, owner: str | None = None) -> None:
        super().__init__(f"stored voice {voice_id} is damaged: {reason}")
        self.voice_id, self.reason, self.owner = voice_id, reason, owner


def _metadata(data: bytes, size: int | None = None, voice_id: str = "") -> dict[str, str]:
    """Header metadata of a safetensors blob of `size` bytes (default: `data` is all of it) whose first bytes are
    `data`: only the JSON header is read, and the tensors' byte ranges are checked against the size (a truncated file,
    or a header that lies about sizes, fails here, not when the voice is used). DamagedVoice naming what is wrong
    (its `owner` set once the metadata could be read)."""
    size = len(data) if size is None else size
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 2 <= n <= size - 8 or len(data) < 8 + n:
        raise DamagedVoice(voice_id, "not a safetensors file (or its header is cut)")
    try:
        header = json.loads(data[8:8 + n])
    except (ValueError, RecursionError):
        raise DamagedVoice(voice_id, "not a safetensors file (its header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DamagedVoice(voice_id, "not a safetensors voice prompt (no metadata of strings)")
    if not meta.get("format", "").startswith("qwen-tts-fleet/voice-prompt/"):
        raise DamagedVoice(voice_id, "not a voice prompt file")
    owner = meta.get("owner", "")
    if size > MAX_VOICE_BYTES:
        raise DamagedVoice(voice_id, f"larger than a voice prompt file may be ({size} bytes)", owner)
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        offsets = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise DamagedVoice(voice_id, f"tensor {shown(name)} has no valid data_offsets", owner)
        end = max(end, offsets[1])
    if 8 + n + end != size:
        raise DamagedVoice(voice_id, f"its header puts the tensors' end at byte {8 + n + end}, the file has {size}",
                           owner)
    return dict(meta)


def _visible(owner: str | None, scope: str) -> bool:
    """Whether `scope` may see a voice of `owner` (None: a damaged file whose owner cannot be read)."""
    return scope == ANYONE or (owner is not None and owner == scope)


def check_name(name: object) -> str:
    if not isinstance(name, str):
        raise RequestError("name", f"must be a string, got {type(name).__name__}")
    name = name.strip()
    if not 1 <= len(name) <= MAX_NAME_CHARS:
        raise RequestError("name", f"must have 1 to {MAX_NAME_CHARS} characters")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("name", "is not valid Unicode (a lone surrogate)") from None
    return name


class VoiceStore:
    """The rules (this class) over a byte backend: a local folder here, S3 in `S3VoiceStore`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._items: OrderedDict[str, tuple[str, Any]] = OrderedDict()   # id -> (owner, VoiceClonePromptItem)
        self._infos: OrderedDict[str, dict[str, Any]] = OrderedDict()     # id -> info (files are immutable), LRU
        self._lock = threading.Lock()

    @staticmethod
    def from_uri(uri: str) -> VoiceStore:
        if uri.startswith("s3://"):
            return S3VoiceStore(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"voices_uri must be a folder, file:// or s3:// URI, got {uri!r}")
        return VoiceStore(uri.removeprefix("file://"))

    # --- bytes (backend) --------------------------------------------------------------------------------------
    def _path(self, voice_id: str) -> Path:
        return self.root / f"{voice_id}{_SUFFIX}"

    def _put_bytes(self, voice_id: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{voice_id}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self._path(voice_id))

    def _get_bytes(self, voice_id: str) -> bytes:
        """The file's bytes; KeyError when absent, ValueError when too big."""
        try:
            with open(self._path(voice_id), "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_VOICE_BYTES:
                    raise ValueError(f"stored voice {voice_id} is larger than {MAX_VOICE_BYTES} bytes")
                return f.read()
        except FileNotFoundError:
            raise KeyError(voice_id) from None

    def _read_head(self, voice_id: str) -> tuple[bytes, int]:
        """(the file's first _HEAD_BYTES bytes, its size); KeyError when absent."""
        try:
            with open(self._path(voice_id), "rb") as f:
                return f.read(_HEAD_BYTES), os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            raise KeyError(voice_id) from None

    def _delete_bytes(self, voice_id: str) -> None:
        try:
            self._path(voice_id).unlink()
        except FileNotFoundError:
            raise KeyError(voice_id) from None

    def _exists(self, voice_id: str) -> bool:
        return self._path(voice_id).is_file()

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-len(_SUFFIX)] for p in self.root.glob(f"voice_*{_SUFFIX}")
                      if VOICE_ID.fullmatch(p.name[:-len(_SUFFIX)]))

    # --- API --------------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Whether the store can work as configured (S3: see S3VoiceStore.check); a local folder is made on use."""

    def create(self, item, *, name: str, model: str, owner: str) -> dict[str, Any]:
        """Store a VoiceClonePromptItem owned by `owner` (a key digest, "" without keys); returns its info."""
        from qwen_tts_core import save_voice_prompt

        name = check_name(name)
        fd, tmp = tempfile.mkstemp(suffix=_SUFFIX)
        os.close(fd)
        try:
            save_voice_prompt(item, tmp, name=name, model=model, owner=owner, created=str(int(time.time())))
            data = Path(tmp).read_bytes()
        finally:
            os.unlink(tmp)
        return self.info(self.put(data), owner or ANYONE)

    def put(self, data: bytes, voice_id: str | None = None) -> str:
        """Store a voice prompt file (bytes written by `save_voice_prompt`, owner in its metadata); returns its id."""
        voice_id = _check_id(voice_id or new_voice_id())
        if len(data) > MAX_VOICE_BYTES:
            raise VoiceTooLarge("ref_audio", f"the voice prompt file would be larger than {MAX_VOICE_BYTES} bytes "
                                             f"({len(data)}); use a shorter reference (a few seconds of speech)")
        try:
            _metadata(data)
        except DamagedVoice as e:
            raise ValueError(e.reason) from None
        self._put_bytes(voice_id, data)
        return voice_id

    def _info(self, voice_id: str, recheck: bool = False, scan: bool = False) -> dict[str, Any]:
        """The voice's info with its owner (cached: files are immutable). With `recheck`, a cached info is served
        only while the file still exists (one stat or S3 HEAD): the voice may have been deleted elsewhere.
        KeyError when there is no such file, DamagedVoice when it cannot be read (see `_checked`).

        The cache keeps the INFO_ITEMS most recently used infos. A listing (`scan`) uses it but evicts nothing:
        listing more voices than it holds would otherwise evict each info just before the next listing needs it
        (every listing would read every header); this way a listing reads only the headers past the cache's size."""
        with self._lock:
            cached = self._infos.get(voice_id)
            if cached is not None:
                self._infos.move_to_end(voice_id)
        if cached is not None:
            if recheck and not self._exists(voice_id):
                self.forget(voice_id)
                raise KeyError(voice_id)
            return cached
        head, size = self._read_head(voice_id)
        if len(head) < 8 + int.from_bytes(head[:8].ljust(8, b"\0"), "little") <= size <= MAX_VOICE_BYTES:
            head = self._get_bytes(voice_id)   # a header past _HEAD_BYTES: the whole file (at most MAX_VOICE_BYTES)
            size = len(head)
        meta = _metadata(head, size, voice_id)     # DamagedVoice (never cached): storage damage
        created = meta.get("created", "")
        info = {"id": voice_id, "object": "voice", "name": meta.get("name", voice_id), "model": meta.get("model"),
                "created": int(created) if re.fullmatch(r"[0-9]{1,18}", created) else 0,
                "x_vector_only_mode": meta.get("x_vector_only_mode") == "true", "owner": meta.get("owner", "")}
        with self._lock:
            if not scan or len(self._infos) < INFO_ITEMS:
                self._infos[voice_id] = info
                while len(self._infos) > INFO_ITEMS:
                    self._infos.popitem(last=False)
        return info

    @staticmethod
    def _public(info: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in info.items() if k != "owner"}

    def info(self, voice_id: str, scope: str) -> dict[str, Any]:
        """The voice's public info; KeyError when it does not exist (deleted through any replica, ingress or node)
        or `scope` may not see it; DamagedVoice when `scope` may see it but its file cannot be read."""
        info = self._checked(_check_id(voice_id), scope, recheck=True)
        return self._public(info)

    def _checked(self, voice_id: str, scope: str, recheck: bool = False) -> dict[str, Any]:
        """`_info` of a voice `scope` may see: KeyError when absent or another's, DamagedVoice when it is the
        caller's but damaged (a damaged file whose owner cannot be read is visible to ANYONE only)."""
        try:
            info = self._info(voice_id, recheck=recheck)
        except DamagedVoice as e:
            if not _visible(e.owner, scope):
                raise KeyError(voice_id) from None
            raise
        if not _visible(info["owner"], scope):
            raise KeyError(voice_id)
        return info

    def list(self, scope: str) -> list[dict[str, Any]]:
        """Public infos of the voices `scope` sees (every stored voice's header is read, from the cache when held)."""
        out = []
        for vid in self._ids():
            try:
                info = self._info(vid, scan=True)
            except KeyError:
                continue  # deleted while listing
            except DamagedVoice as e:
                log.warning("skipping %s", e)
                continue
            if _visible(info["owner"], scope):
                out.append(self._public(info))
        return out

    def delete(self, voice_id: str, scope: str) -> None:
        """Delete a voice `scope` sees, damaged or not (KeyError when unknown or not the caller's)."""
        # DamagedVoice: the caller's (or, its owner unreadable, an admin's); deleting it is how it goes away
        with contextlib.suppress(DamagedVoice):
            self._checked(_check_id(voice_id), scope, recheck=True)
        self._delete_bytes(voice_id)
        self.forget(voice_id)

    def count(self, owner: str) -> int:
        """How many (readable) voices `owner` stores, counted in the store: every process and node sees one count."""
        return len(self.list(owner))

    def keep_within(self, voice_id: str, owner: str, limit: int) -> int:
        """Call right after `voice_id` was stored for `owner`, who may store `limit` voices: counts what `owner`
        stores now and, when that is more than `limit`, deletes `voice_id`. Returns the count.

        Counting AFTER the write holds the limit for uploads that race on several processes (ingress replicas,
        nodes): of the voices kept, the last one written was counted with all the others stored, so at most
        `limit` are kept. Uploads that race at the limit may all be undone (each counts the others): retried, one
        passes."""
        have = self.count(owner)
        if have > limit:
            with contextlib.suppress(KeyError):   # already deleted (by its owner, through another ingress)
                self.delete(voice_id, owner)
        return have

    def load(self, voice_id: str, scope: str):
        """The stored VoiceClonePromptItem (cached per process, existence re-checked on each use). KeyError when
        unknown, deleted (through any replica or node) or not visible to `scope`."""
        from qwen_tts_core import load_voice_prompt

        _check_id(voice_id)
        with self._lock:
            cached = self._items.get(voice_id)
            if cached is not None:
                self._items.move_to_end(voice_id)
        if cached is not None:
            owner, item = cached
            if not _visible(owner, scope):
                raise KeyError(voice_id)
            if self._exists(voice_id):
                return item
            self.forget(voice_id)
            raise KeyError(voice_id)
        owner = self._checked(voice_id, scope)["owner"]
        data = self._get_bytes(voice_id)
        with tempfile.NamedTemporaryFile(suffix=_SUFFIX) as f:
            f.write(data)
            f.flush()
            item = load_voice_prompt(f.name)
        with self._lock:
            self._items[voice_id] = (owner, item)
            while len(self._items) > CACHE_ITEMS:
                self._items.popitem(last=False)
        return item

    def forget(self, voice_id: str) -> None:
        """Drop what this process cached about a voice."""
        with self._lock:
            self._items.pop(voice_id, None)
            self._infos.pop(voice_id, None)


class S3VoiceStore(VoiceStore):
    """The same store on S3 (any S3-compatible endpoint): one object per voice under `s3://bucket/prefix/`."""

    def __init__(self, uri: str) -> None:
        super().__init__("/nonexistent")
        rest = uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"voices_uri: no bucket in {uri!r}")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        import boto3

        self.s3 = boto3.client("s3")  # thread-safe; endpoint and credentials from the environment

    def _key(self, voice_id: str) -> str:
        return f"{self.prefix}{voice_id}{_SUFFIX}"

    def check(self) -> None:
        """At start (the ingress): ValueError naming voices_uri when the store cannot work as configured: no
        credentials, no region, no such bucket, access denied. Otherwise every voice call failed with a 500 under
        traffic while the service looked healthy. An endpoint that does not answer now (a blip while a replica
        restarts) is only logged: speech without stored voices must not go down with it."""
        import boto3
        from botocore.config import Config
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            NoRegionError,
        )

        quick = boto3.client("s3", config=Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 2}))
        try:
            quick.head_bucket(Bucket=self.bucket)
        except (NoCredentialsError, NoRegionError) as e:
            raise ValueError(f"voices_uri: s3://{self.bucket}/{self.prefix} cannot be used: {e} (set AWS credentials "
                             "and AWS_ENDPOINT_URL / AWS_DEFAULT_REGION where the service runs)") from None
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            what = {"404": "does not exist", "NoSuchBucket": "does not exist", "NotFound": "does not exist",
                    "403": "refuses these credentials", "AccessDenied": "refuses these credentials",
                    "Forbidden": "refuses these credentials"}.get(code)
            if what:
                raise ValueError(f"voices_uri: s3://{self.bucket}/{self.prefix}: the bucket {what} ({code})") from None
            log.warning("voices_uri: s3://%s could not be checked at start (%s); voice calls fail until it answers",
                        self.bucket, e)
        except EndpointConnectionError as e:
            log.warning("voices_uri: s3://%s could not be checked at start (%s); voice calls fail until it answers",
                        self.bucket, e)

    def _missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    def _put_bytes(self, voice_id: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._key(voice_id), Body=data)

    def _get_bytes(self, voice_id: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(voice_id))
        except ClientError as e:
            if self._missing(e):
                raise KeyError(voice_id) from None
            raise
        if obj.get("ContentLength", 0) > MAX_VOICE_BYTES:
            obj["Body"].close()
            raise ValueError(f"stored voice {voice_id} is larger than {MAX_VOICE_BYTES} bytes")
        return obj["Body"].read()

    def _read_head(self, voice_id: str) -> tuple[bytes, int]:
        from botocore.exceptions import ClientError

        try:
            obj = self.s3.get_object(Bucket=self.bucket, Key=self._key(voice_id), Range=f"bytes=0-{_HEAD_BYTES - 1}")
        except ClientError as e:
            if self._missing(e):
                raise KeyError(voice_id) from None
            if e.response.get("Error", {}).get("Code") == "InvalidRange":
                return b"", 0      # an empty object: no byte range of it exists
            raise
        head = obj["Body"].read()
        total = str(obj.get("ContentRange") or "").rpartition("/")[2]
        return head, int(total) if total.isdigit() else len(head)

    def _exists(self, voice_id: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(voice_id))
        except ClientError as e:
            if self._missing(e):
                return False
            raise
        return True

    def _delete_bytes(self, voice_id: str) -> None:
        if not self._exists(voice_id):  # S3 deletes of absent keys succeed silently
            raise KeyError(voice_id)
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(voice_id))

    def _ids(self) -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                if name.endswith(_SUFFIX) and VOICE_ID.fullmatch(name[:-len(_SUFFIX)]):
                    out.append(name[:-len(_SUFFIX)])
        return sorted(out)


__all__ = ["ANYONE", "MAX_VOICE_BYTES", "DamagedVoice", "S3VoiceStore", "VoiceStore", "VoiceTooLarge", "check_name",
           "new_voice_id"]
