"""`--book m4b`: one audiobook file (AAC in MP4, brand M4B) with a chapter marker per chapter, tags and cover art.

Chapters are the job's written outputs in input order, decoded one at a time and streamed into the encoder (a book
of any length never sits in memory); each chapter marker starts where its audio starts. Titles come from the
chapter's first Markdown heading, else its file name (`03-the-storm` -> "The storm"). Tags: title (and album),
author (artist), narrator (composer, as audiobook players read it; default: the voice), genre Audiobook, media
kind audiobook, optional cover (JPEG or PNG). The book's key is a digest of its chapters' content keys and its
metadata, so an unchanged book is not written again.
"""

from __future__ import annotations

import fractions
import hashlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import codecs
from .manifest import ManifestRecord
from .storage import Sink

BOOK_FORMATS = ("m4b",)
SAMPLE_RATE = 44100
BIT_RATE = 64_000  # AAC-LC mono, spoken word


@dataclass(frozen=True)
class BookMeta:
    title: str | None = None
    author: str | None = None
    narrator: str | None = None
    cover: str | None = None  # path to a .jpg/.jpeg/.png

    def check(self) -> None:
        if self.cover:
            p = Path(self.cover)
            if not p.is_file():
                raise ValueError(f"cover: {p} does not exist")
            if p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                raise ValueError(f"cover: use a .jpg or .png image, got {p.name!r}")


def title_from(stem: str, heading: str | None) -> str:
    """A chapter title: its heading, else the file name without a leading number ("03-the-storm" -> "The storm")."""
    if heading and heading.strip():
        return " ".join(heading.split())
    words = re.sub(r"^\d+[\s._-]*", "", stem).replace("_", " ").replace("-", " ").strip()
    return (words[:1].upper() + words[1:]) if words else stem


def book_key(records: list[ManifestRecord], titles: list[str], meta: BookMeta) -> str:
    cover = hashlib.sha256(Path(meta.cover).read_bytes()).hexdigest() if meta.cover else None
    canon = json.dumps({"chapters": [[r.key, t] for r, t in zip(records, titles)], "meta": asdict(meta),
                        "cover": cover, "format": ["aac", SAMPLE_RATE, BIT_RATE]}, sort_keys=True)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", meta.title or "book").strip("-.")[:60] or "book"
    return f"book/{stem}-{digest}.m4b"


def _tag(path: str, meta: BookMeta) -> None:
    from mutagen.mp4 import MP4, MP4Cover

    f = MP4(path)
    if f.tags is None:
        f.add_tags()
    tags = f.tags
    for atom, value in (("\xa9nam", meta.title), ("\xa9alb", meta.title), ("\xa9ART", meta.author),
                        ("aART", meta.author), ("\xa9wrt", meta.narrator)):
        if value:
            tags[atom] = [value]
    if meta.narrator:
        tags["\xa9cmt"] = [f"Narrated by {meta.narrator} (Qwen3-TTS)"]
    tags["\xa9gen"] = ["Audiobook"]
    tags["stik"] = [2]  # media kind: audiobook
    if meta.cover:
        data = Path(meta.cover).read_bytes()
        fmt = MP4Cover.FORMAT_PNG if data[:8] == b"\x89PNG\r\n\x1a\n" else MP4Cover.FORMAT_JPEG
        tags["covr"] = [MP4Cover(data, imageformat=fmt)]
    f.save()


def write_book(records: list[ManifestRecord], titles: list[str], sink: Sink, meta: BookMeta) -> dict[str, Any]:
    """Assemble the chapters that were written (status ok/suspect) into one M4B; returns a summary entry
    {"key", "url", "chapters": [{"title", "start_s", "id"}], "duration_s", "missing": [ids], "reused"}.

    Raises:
        ValueError: no chapter was written, or a chapter's object cannot be read back.
    """
    import av

    meta.check()
    pairs = [(r, t) for r, t in zip(records, titles) if r.status in ("ok", "suspect") and r.key]
    missing = [r.id for r in records if r.status not in ("ok", "suspect", "retired") or not r.key]
    if not pairs:
        raise ValueError("book: no chapter was written, so there is no book to make")
    key = book_key([p[0] for p in pairs], [p[1] for p in pairs], meta)
    out: dict[str, Any] = {"key": key, "url": sink.url(key), "missing": missing, "reused": False}
    chapters, total = [], 0
    with tempfile.TemporaryDirectory(prefix="qtts-book-") as tmp:
        path = str(Path(tmp) / "book.m4b")
        with av.open(path, "w", format="ipod", options={"brand": "M4B "}) as container:
            stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            stream.bit_rate = BIT_RATE
            for rec, title in pairs:
                data = sink.get(rec.key)  # type: ignore[arg-type]
                if data is None:
                    raise ValueError(f"book: chapter {rec.id!r} ({rec.key}) is missing from the output")
                pcm, sr = codecs.decode(data, rec.format if rec.format in codecs.RAW_CODECS else None)
                if sr != SAMPLE_RATE:
                    import soxr

                    pcm = soxr.resample(pcm, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
                chapters.append({"id": rec.id, "title": title, "start": total, "end": total + pcm.size})
                total += pcm.size
                frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(np.clip(pcm, -1, 1)[None, :]),
                                                   format="flt", layout="mono")
                frame.sample_rate = SAMPLE_RATE
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
            tb = fractions.Fraction(1, SAMPLE_RATE)
            container.set_chapters([{"id": i + 1, "start": c["start"], "end": c["end"], "time_base": tb,
                                     "metadata": {"title": c["title"]}} for i, c in enumerate(chapters)])
        _tag(path, meta)
        sink.put(key, Path(path).read_bytes(), "audio/mp4")
    out["chapters"] = [{"id": c["id"], "title": c["title"], "start_s": round(c["start"] / SAMPLE_RATE, 3)}
                       for c in chapters]
    out["duration_s"] = round(total / SAMPLE_RATE, 3)
    return out


def book_or_reuse(records: list[ManifestRecord], titles: list[str], sink: Sink, meta: BookMeta) -> dict[str, Any]:
    """`write_book` unless the same book (same chapters, titles, metadata) is already in the output."""
    pairs = [(r, t) for r, t in zip(records, titles) if r.status in ("ok", "suspect") and r.key]
    if pairs:
        meta.check()
        key = book_key([p[0] for p in pairs], [p[1] for p in pairs], meta)
        raw = sink.get(key + ".json")
        if raw is not None and sink.size(key):
            info = json.loads(raw)
            info["reused"] = True
            return info
    info = write_book(records, titles, sink, meta)
    sink.put(info["key"] + ".json", json.dumps(info).encode(), "application/json")
    return info
