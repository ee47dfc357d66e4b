"""`--book m4b`: one audiobook file (AAC in MP4, brand M4B) with a chapter marker per chapter, tags and cover art.

Chapters are the job's written outputs in input order, decoded one at a time and streamed into the encoder (a book
of any length never sits in memory); each chapter marker starts where its audio starts (to the sample: the frames
carry their place in the book, so the encoder's priming is cut), and a chapter with no audio (a row flagged `empty`)
gets no marker and is listed in the summary's `empty`. Titles come from the chapter's first Markdown heading, else
its file name (`03-the-storm` -> "The storm"). Tags: title (and album), author (artist), narrator (composer, as
audiobook players read it; default: the voice), genre Audiobook, media kind audiobook, optional cover (JPEG or PNG).
FFmpeg's MP4 muxer (through PyAV) writes it all: chapters as a Nero `chpl` list and a QuickTime chapter track, tags
as iTunes `ilst` atoms, the cover as `covr`. The book's key is a digest of its chapters' content keys and its
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
            probe_cover(self.cover)


def title_from(stem: str, heading: str | None) -> str:
    """A chapter title: its heading, else the file name without a leading number ("03-the-storm" -> "The storm")."""
    if heading and heading.strip():
        return " ".join(heading.split())
    words = re.sub(r"^\d+[\s._-]*", "", stem).replace("_", " ").replace("-", " ").strip()
    return (words[:1].upper() + words[1:]) if words else stem


def book_key(records: list[ManifestRecord], titles: list[str], meta: BookMeta) -> str:
    """The book's object key: a digest of what shapes the file. ("pts": books from before the marks sat on their
    audio, 23 ms early, get a new key and are made again, from the chapters already written.)"""
    cover = hashlib.sha256(Path(meta.cover).read_bytes()).hexdigest() if meta.cover else None
    canon = json.dumps({"chapters": [[r.key, t] for r, t in zip(records, titles)], "meta": asdict(meta),
                        "cover": cover, "format": ["aac", SAMPLE_RATE, BIT_RATE, "pts"]}, sort_keys=True)
    digest = hashlib.sha256(canon.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", meta.title or "book").strip("-.")[:60] or "book"
    return f"book/{stem}-{digest}.m4b"


def _tags(meta: BookMeta) -> dict[str, str]:
    """Container metadata in FFmpeg's names; its MP4 muxer writes them as iTunes `ilst` atoms: title -> ©nam,
    album -> ©alb, artist -> ©ART, album_artist -> aART, composer -> ©wrt, comment -> ©cmt, genre -> ©gen,
    media_type -> stik (2: audiobook)."""
    tags: dict[str, str] = {}
    for names, value in ((("title", "album"), meta.title), (("artist", "album_artist"), meta.author),
                         (("composer",), meta.narrator)):
        if value:
            tags.update(dict.fromkeys(names, value))
    if meta.narrator:
        tags["comment"] = f"Narrated by {meta.narrator} (Qwen3-TTS)"
    tags["genre"] = "Audiobook"
    tags["media_type"] = "2"
    return tags


def probe_cover(path: str) -> tuple[str, int, int]:
    """(codec, width, height) of a cover image: "mjpeg" or "png".

    Raises:
        ValueError: the file is not a JPEG or PNG image FFmpeg can read.
    """
    import io

    import av

    name = Path(path).name
    try:
        with av.open(io.BytesIO(Path(path).read_bytes())) as probe:
            ctx = probe.streams.video[0].codec_context
            codec, width, height = ctx.name, ctx.width, ctx.height
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cover: {name} is not a readable image ({e})") from e
    if not width or not height:
        raise ValueError(f"cover: {name} is not a readable image (no picture size in it)")
    if codec not in ("mjpeg", "png"):
        raise ValueError(f"cover: {name} must be a JPEG or PNG image, got {codec!r}")
    return codec, width, height


def _cover_stream(container: Any, path: str) -> tuple[Any, bytes]:
    """A picture stream for the cover (stored as given); the MP4 muxer writes it as the `covr` atom.
    Returns (stream, image bytes): mux the image with `_mux_cover` once the audio is in."""
    import av

    codec, width, height = probe_cover(path)
    stream = container.add_mux_stream(codec, width=width, height=height)
    stream.disposition = av.stream.Disposition.attached_pic
    return stream, Path(path).read_bytes()


def _mux_cover(container: Any, stream: Any, data: bytes) -> None:
    import av

    packet = av.Packet(data)
    packet.stream, packet.pts, packet.dts = stream, 0, 0
    container.mux(packet)


def _chapter_pcm(sink: Sink, rec: ManifestRecord) -> np.ndarray:
    """A chapter's written audio, mono float32 at the book's rate.

    Raises:
        ValueError: its object is missing from the output.
    """
    data = sink.get(rec.key)  # type: ignore[arg-type]
    if data is None:
        raise ValueError(f"book: chapter {rec.id!r} ({rec.key}) is missing from the output")
    pcm, sr = codecs.decode(data, rec.format if rec.format in codecs.RAW_CODECS else None)
    if sr != SAMPLE_RATE and pcm.size:
        import soxr

        pcm = soxr.resample(pcm, sr, SAMPLE_RATE, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(np.clip(pcm, -1, 1), dtype=np.float32)


def _encode(container: Any, stream: Any, pcm: np.ndarray, start: int) -> None:
    """Encode one chapter's samples, stamped with their place in the book (`start`, in samples).

    Without a pts the AAC encoder's priming (1024 samples) stays in the timeline and every chapter's audio plays
    23 ms after its marker; with one, the muxer's edit list cuts the priming and the marks sit on the audio."""
    import av

    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="flt", layout="mono")
    frame.sample_rate = SAMPLE_RATE
    frame.pts, frame.time_base = start, fractions.Fraction(1, SAMPLE_RATE)
    for packet in stream.encode(frame):
        container.mux(packet)


def write_book(records: list[ManifestRecord], titles: list[str], sink: Sink, meta: BookMeta) -> dict[str, Any]:
    """Assemble the chapters that were written (status ok/suspect) into one M4B; returns a summary entry
    {"key", "url", "chapters": [{"title", "start_s", "id"}], "duration_s", "missing": [ids], "empty": [ids],
    "reused"}.

    A chapter with no audio (a row flagged `empty`: a WAV of zero samples) gets no chapter mark and is listed in
    `empty`: a mark of zero length would start where the next chapter starts, two marks at one time that players
    show or skip each their own way (and the AAC encoder refuses a frame of no samples).

    Raises:
        ValueError: no chapter was written, every written one is empty, or a chapter's object cannot be read back.
    """
    import av

    meta.check()
    pairs = [(r, t) for r, t in zip(records, titles) if r.status in ("ok", "suspect") and r.key]
    missing = [r.id for r in records if r.status not in ("ok", "suspect", "retired") or not r.key]
    if not pairs:
        raise ValueError("book: no chapter was written, so there is no book to make")
    key = book_key([p[0] for p in pairs], [p[1] for p in pairs], meta)
    out: dict[str, Any] = {"key": key, "url": sink.url(key), "missing": missing, "empty": [], "reused": False}
    chapters, total = [], 0
    with tempfile.TemporaryDirectory(prefix="qtts-book-") as tmp:
        path = str(Path(tmp) / "book.m4b")
        # the "mp4" muxer (the "ipod" one refuses picture streams) with M4B as the major brand
        with av.open(path, "w", format="mp4", options={"brand": "M4B "}) as container:
            for name, value in _tags(meta).items():
                container.metadata[name] = value
            stream = container.add_stream("aac", rate=SAMPLE_RATE, layout="mono")
            stream.bit_rate = BIT_RATE
            cover = _cover_stream(container, meta.cover) if meta.cover else None
            for rec, title in pairs:
                pcm = _chapter_pcm(sink, rec)
                if not pcm.size:
                    out["empty"].append(rec.id)
                    continue
                chapters.append({"id": rec.id, "title": title, "start": total, "end": total + pcm.size})
                _encode(container, stream, pcm, total)
                total += pcm.size
            if not chapters:
                raise ValueError(f"book: every written chapter is empty ({len(pairs)} without audio), so there is "
                                 "no book to make")
            for packet in stream.encode(None):
                container.mux(packet)
            if cover:
                _mux_cover(container, *cover)
            tb = fractions.Fraction(1, SAMPLE_RATE)
            container.set_chapters([{"id": i + 1, "start": c["start"], "end": c["end"], "time_base": tb,
                                     "metadata": {"title": c["title"]}} for i, c in enumerate(chapters)])
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
        info = _stored_record(raw, key) if raw is not None and sink.size(key) else None
        if info is not None:
            info["reused"] = True
            return info
    info = write_book(records, titles, sink, meta)
    sink.put(info["key"] + ".json", json.dumps(info).encode(), "application/json")
    return info


def _stored_record(raw: bytes, key: str) -> dict[str, Any] | None:
    """The book's stored JSON record, or None when it is none of this book's (not JSON, not an object, another key,
    no chapter list): the book is made again, as a row with a damaged sidecar is rendered again."""
    try:
        info = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    ok = isinstance(info, dict) and info.get("key") == key and isinstance(info.get("chapters"), list)
    return info if ok else None
