"""Stored clone voices: one `save_voice_prompt` safetensors file per voice, in a local folder or under s3://.

    store = VoiceStore.from_uri("~/.cache/qwen-tts-fleet/voices")      # or "s3://bucket/prefix"
    vid = store.put(file_bytes, name="alice", model="tiny-base")         # -> "voice_3f2a..."
    item = store.load(vid)                                               # VoiceClonePromptItem (cached)
    store.list(); store.delete(vid)

The prompt is encoded once (by a Base replica, from the uploaded reference audio) and stored; later requests name
`voice=<id>` and no audio is encoded again. For s3:// the endpoint comes from AWS_ENDPOINT_URL (boto3's own rule).
"""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

VOICE_ID = re.compile(r"^voice_[0-9a-f]{16}$")
_SUFFIX = ".safetensors"


def new_voice_id() -> str:
    return "voice_" + secrets.token_hex(8)


def _check_id(voice_id: str) -> None:
    if not isinstance(voice_id, str) or not VOICE_ID.match(voice_id):
        raise KeyError(voice_id)


def _metadata(data: bytes) -> dict[str, str]:
    """Header metadata of a safetensors blob (JSON header; no tensor data read)."""
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise ValueError("not a safetensors file")
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


class VoiceStore:
    """Local-folder backend; `S3VoiceStore` overrides the four byte-level methods."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()
        self._cache: dict[str, Any] = {}
        self._lock = threading.Lock()

    @staticmethod
    def from_uri(uri: str) -> VoiceStore:
        if uri.startswith("s3://"):
            return S3VoiceStore(uri)
        if "://" in uri and not uri.startswith("file://"):
            raise ValueError(f"voices_uri must be a folder, file:// or s3:// URI, got {uri!r}")
        return VoiceStore(uri.removeprefix("file://"))

    # --- bytes (backend) --------------------------------------------------------------------------------------
    def _put_bytes(self, voice_id: str, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{voice_id}.tmp"
        tmp.write_bytes(data)
        tmp.replace(self.root / f"{voice_id}{_SUFFIX}")

    def _get_bytes(self, voice_id: str) -> bytes:
        path = self.root / f"{voice_id}{_SUFFIX}"
        if not path.is_file():
            raise KeyError(voice_id)
        return path.read_bytes()

    def _delete_bytes(self, voice_id: str) -> None:
        path = self.root / f"{voice_id}{_SUFFIX}"
        if not path.is_file():
            raise KeyError(voice_id)
        path.unlink()

    def _exists(self, voice_id: str) -> bool:
        return (self.root / f"{voice_id}{_SUFFIX}").is_file()

    def _ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name[:-len(_SUFFIX)] for p in self.root.glob(f"voice_*{_SUFFIX}"))

    # --- API --------------------------------------------------------------------------------------------------
    def put(self, data: bytes, voice_id: str | None = None) -> str:
        """Store a voice prompt file (bytes written by `save_voice_prompt`); returns its id."""
        voice_id = voice_id or new_voice_id()
        _check_id(voice_id)
        _metadata(data)
        self._put_bytes(voice_id, data)
        return voice_id

    def get_bytes(self, voice_id: str) -> bytes:
        _check_id(voice_id)
        return self._get_bytes(voice_id)

    def info(self, voice_id: str) -> dict[str, Any]:
        meta = _metadata(self.get_bytes(voice_id))
        return {"id": voice_id, "object": "voice", "name": meta.get("name", voice_id),
                "model": meta.get("model"), "created": int(meta.get("created", "0") or 0),
                "x_vector_only_mode": meta.get("x_vector_only_mode") == "true"}

    def list(self) -> list[dict[str, Any]]:
        out = []
        for vid in self._ids():
            try:
                out.append(self.info(vid))
            except (KeyError, ValueError):
                log.warning("skipping unreadable voice %s", vid)
        return out

    def delete(self, voice_id: str) -> None:
        _check_id(voice_id)
        self._delete_bytes(voice_id)
        with self._lock:
            self._cache.pop(voice_id, None)

    def load(self, voice_id: str):
        """The stored VoiceClonePromptItem (cached per process). KeyError when unknown."""
        from qwen_tts_core import load_voice_prompt

        _check_id(voice_id)
        with self._lock:
            cached = self._cache.get(voice_id)
        if cached is not None:
            if self._exists(voice_id):  # deleted through another replica: drop the cached copy
                return cached
            self.forget(voice_id)
            raise KeyError(voice_id)
        data = self._get_bytes(voice_id)
        with tempfile.NamedTemporaryFile(suffix=_SUFFIX) as f:
            f.write(data)
            f.flush()
            item = load_voice_prompt(f.name)
        with self._lock:
            self._cache[voice_id] = item
        return item

    def forget(self, voice_id: str) -> None:
        """Drop a cached prompt (after a delete seen by another process)."""
        with self._lock:
            self._cache.pop(voice_id, None)


class S3VoiceStore(VoiceStore):
    def __init__(self, uri: str) -> None:
        super().__init__("/nonexistent")
        rest = uri[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise ValueError(f"voices_uri: no bucket in {uri!r}")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        import boto3

        self.s3 = boto3.client("s3")

    def _key(self, voice_id: str) -> str:
        return f"{self.prefix}{voice_id}{_SUFFIX}"

    def _put_bytes(self, voice_id: str, data: bytes) -> None:
        self.s3.upload_fileobj(io.BytesIO(data), self.bucket, self._key(voice_id))

    def _get_bytes(self, voice_id: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(voice_id))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise KeyError(voice_id) from None

    def _exists(self, voice_id: str) -> bool:
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self._key(voice_id))
        except self.s3.exceptions.ClientError:
            return False
        return True

    def _delete_bytes(self, voice_id: str) -> None:
        self._get_bytes(voice_id)  # KeyError when absent (S3 deletes are silent)
        self.s3.delete_object(Bucket=self.bucket, Key=self._key(voice_id))

    def _ids(self) -> list[str]:
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix):
            for obj in page.get("Contents", []):
                name = obj["Key"][len(self.prefix):]
                if name.endswith(_SUFFIX) and VOICE_ID.match(name[:-len(_SUFFIX)]):
                    out.append(name[:-len(_SUFFIX)])
        return sorted(out)
