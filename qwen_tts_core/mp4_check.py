"""The MP4 boxes of untrusted audio, checked before FFmpeg opens the file (`audio_decode_av`).

FFmpeg allocates a track's index from the sample counts the boxes declare, when it opens the file: a 7 KiB m4a
declaring 50 M samples made it allocate 1.8 GB. `check_mp4` walks every box (at most `MAX_MP4_BOXES`), reads a
sample table only in its own place (FFmpeg applies one found under udta, tref, wave, meta or a sample entry to the
last track, so one anywhere else is refused), caps the samples of all tracks times their edits (`MAX_MP4_SAMPLES`,
`MAX_EDITS`), and refuses segment indexes (`sidx`, `mfra`: FFmpeg sorts them in quadratic time) and encryption.
"""

from __future__ import annotations

import struct

import numpy as np

from .errors import RequestError

MAX_MP4_SAMPLES = 1 << 21
"""Samples (packets) the tracks of an MP4 may declare, all tracks and each track's edits together (FFmpeg builds a
24-byte index entry for each when it opens the file). 120 s of AAC at 48 kHz are 5,625; PCM in MP4 counts one per
frame (43 s at 48 kHz)."""
MAX_EDITS = 4
"""Entries of an MP4 edit list (phones write 1 or 2): FFmpeg builds the track's index again for each."""
MAX_MP4_BOXES = 100_000
"""MP4 boxes (all levels) before a file is refused: a 120 s m4a has a few dozen."""
MAX_STREAMS = 2
"""Streams (MP4 tracks) a container may hold, here and in FFmpeg's probe (a video's picture and sound; FFmpeg opens
every stream's decoder at once while probing); of those one may be audio."""


# MP4 boxes whose payload is a table: (payload offset of the 32-bit entry count, bytes per entry at least;
# `_table` works out those that depend on the version or flags).
_TABLES = {b"stts": (4, 8), b"ctts": (4, 8), b"stsc": (4, 12), b"stco": (4, 4), b"co64": (4, 8), b"stss": (4, 4),
           b"stps": (4, 4), b"elst": (4, 12), b"sbgp": (8, 8), b"sgpd": (8, 1), b"stsd": (4, 8),
           b"dref": (4, 8), b"trun": (4, 0)}
_STBL = (b"moov", b"trak", b"mdia", b"minf", b"stbl")
_TRAF = (b"moof", b"traf")
_PLACES = {**dict.fromkeys((b"stsz", b"stz2", b"stts", b"ctts", b"stsc", b"stco", b"co64", b"stss", b"stps",
                            b"stsd"), (_STBL,)),
           b"sbgp": (_STBL, _TRAF), b"sgpd": (_STBL, _TRAF), b"trun": (_TRAF,),
           b"elst": ((b"moov", b"trak", b"edts"),), b"dref": ((b"moov", b"trak", b"mdia", b"minf", b"dinf"),)}
"""Where FFmpeg may read each table box: it reads one found under any parent (udta, tref, wave, meta, a sample
entry, ...) into the last track, so a table anywhere else is refused."""
_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts", b"moof", b"traf", b"mvex", b"dinf", b"udta",
               b"tref", b"wave", b"clip", b"tapt", b"iprp"}
_ONCE = {b"mdia", b"minf", b"stbl", b"edts", b"dinf"} | (_PLACES.keys() - {b"trun"})   # at most one per parent
_REFUSED = {b"senc", b"saiz", b"saio", b"pssh", b"tenc", b"sinf",   # encryption: FFmpeg sizes it by sample counts
            b"sidx", b"ssix", b"mfra", b"tfra", b"mfro"}   # segment indexes: FFmpeg sorts them in quadratic time
_PIFF_SENC = bytes.fromhex("a2394f525a9b4f14a2446c427c648df4")   # the same as a `uuid` box


def _boxes(data: memoryview, start: int, end: int):
    """(type, payload start, payload end, the type's offset) of the boxes in data[start:end]; ValueError when one
    overruns (a cut file's last mdat, free or skip box ends where the file does)."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        head = 8
        if size == 1:
            if pos + 16 > end:
                raise ValueError("truncated box header")
            size, head = struct.unpack_from(">Q", data, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            if kind == b"mdat" or end == len(data) and kind in (b"free", b"skip"):
                yield kind, min(pos + head, end), end, pos + 4
                return
            raise ValueError(f"box {kind!r} overruns its parent")
        yield kind, pos + head, pos + size, pos + 4
        pos += size


def _u32(view: memoryview, at: int) -> int:
    return struct.unpack_from(">I", view, at)[0]


def _table(kind: bytes, view: memoryview, a: int, b: int) -> tuple[int, int, int]:
    """(entry count, payload offset of the first entry, bytes per entry at least) of table box `kind`."""
    version_flags = _u32(view, a) if b - a >= 4 else 0
    version, flags = version_flags >> 24, version_flags & 0xFFFFFF
    at, entry = _TABLES[kind]
    if kind in (b"sbgp", b"sgpd"):   # grouping_type, then per version a parameter / default length / index
        at = 8 + (4 if version == 1 else 0) + (4 if kind == b"sgpd" and version >= 2 else 0)
    elif kind == b"elst":
        entry = 20 if version == 1 else 12
    elif kind == b"trun":   # data offset and first sample flags (optional), then per sample 0-4 fields
        entry = 4 * bin(flags & 0xF00).count("1")
    if b - a < at + 4:
        raise ValueError(f"short {kind.decode()} box")
    count = _u32(view, a + at)
    first = at + 4 + (((4 if flags & 1 else 0) + (4 if flags & 4 else 0)) if kind == b"trun" else 0)
    if count * entry > b - a - first:
        raise ValueError(f"{kind.decode()} declares {count} entries that its bytes do not hold")
    return count, a + first, entry


def _words(view: memoryview, at: int, n: int) -> np.ndarray:
    """n big-endian 32-bit words from `at`, as int64 (sums of them cannot wrap)."""
    return np.frombuffer(view, dtype=">u4", count=n, offset=at).astype(np.int64)


def check_mp4(data: bytes, argument: str, what: str, kind: str) -> None:
    """Refuse (RequestError naming `argument`) an MP4 that FFmpeg would spend memory or time on before a packet is
    read: more than MAX_MP4_BOXES boxes or MAX_STREAMS tracks; a table that declares more entries than its bytes
    hold, or outside its place (`_PLACES`); more samples than MAX_MP4_SAMPLES (all tracks, each times its edits);
    more than MAX_EDITS edits; a segment index; encryption."""
    view = memoryview(data)
    boxes, fragments = 0, 0
    tracks: list[list[int]] = []   # [samples, edits] of each trak
    placed: set[int] = set()       # offsets of the table boxes read in their place
    mdats: list[tuple[int, int]] = []

    def samples(what: str, n: int) -> None:
        total = fragments + sum(s * max(e, 1) for s, e in tracks)
        if n > MAX_MP4_SAMPLES:
            raise ValueError(f"{what} declares {n} samples; at most {MAX_MP4_SAMPLES} are read")
        if total > MAX_MP4_SAMPLES:
            raise ValueError(f"{what}: the tracks declare {total} samples (each times its edits); at most "
                             f"{MAX_MP4_SAMPLES} are read")

    def track(what: str, n: int) -> None:   # the current trak has (at least) n samples
        tracks[-1][0] = max(tracks[-1][0], n)
        samples(what, n)

    def walk(start: int, end: int, path: tuple[bytes, ...]) -> None:
        nonlocal boxes, fragments
        if len(path) > 12:
            raise ValueError("boxes nested too deep")
        tables: dict[bytes, tuple[int, int, int]] = {}
        seen: set[bytes] = set()
        for box, a, b, at_type in _boxes(view, start, end):
            boxes += 1
            if boxes > MAX_MP4_BOXES:
                raise ValueError(f"more than {MAX_MP4_BOXES} boxes")
            name = box.decode("latin-1")
            if box in _REFUSED or box == b"uuid" and bytes(view[a:a + 16]) == _PIFF_SENC:
                raise ValueError(f"encrypted or unsupported box {name!r}")
            if box in _ONCE:
                if box in seen:
                    raise ValueError(f"a second {name!r} box in {b'/'.join(path).decode('latin-1')}")
                seen.add(box)
            if box in _PLACES:
                if path not in _PLACES[box]:
                    raise ValueError(f"a {name!r} box outside its place ({'/'.join(p.decode() for p in path)})")
                placed.add(at_type)
            if not path and box == b"mdat":
                mdats.append((a, b))
            elif box == b"trak" and path == (b"moov",):
                tracks.append([0, 0])
                if len(tracks) > MAX_STREAMS:
                    raise ValueError(f"more than {MAX_STREAMS} tracks")
            if box in _CONTAINERS:
                walk(a, b, (*path, box))
            elif box in (b"stsz", b"stz2"):
                if b - a < 12:
                    raise ValueError(f"short {name} box")
                size_field, count = _u32(view, a + 4), _u32(view, a + 8)
                if count * ((0 if size_field else 4) if box == b"stsz" else (size_field & 0xFF) / 8) > b - a - 12:
                    raise ValueError(f"{name} declares {count} samples that its bytes do not hold")
                track("a track", count)
            elif box in _TABLES:
                count, at, _ = tables[box] = _table(box, view, a, b)
                if box in (b"stts", b"ctts") and count:   # (sample count, delta / offset) runs
                    track(f"a track's {name}", int(_words(view, at, 2 * count)[0::2].sum()))
                elif box == b"elst":
                    if count > MAX_EDITS:
                        raise ValueError(f"an edit list of {count} entries; at most {MAX_EDITS} are read")
                    tracks[-1][1] = count
                    samples("a track's edit list", 0)
                elif box == b"trun":
                    fragments += count
                    samples("the fragments", 0)
        if tables.get(b"stsc", (0,))[0]:   # (first chunk, samples per chunk, description) runs to the last chunk
            count, at, _ = tables[b"stsc"]
            chunks = (tables.get(b"stco") or tables.get(b"co64") or (0, 0, 0))[0]
            runs = _words(view, at, 3 * count).reshape(-1, 3)
            first = np.minimum(runs[:, 0], chunks + 1)
            span = np.maximum(np.diff(np.append(first, chunks + 1)), 0)
            track("a track's stsc", int((runs[:, 1] * span).sum()))

    def hidden() -> None:
        """A table's or an index's type anywhere outside the boxes read above (and the audio): inside a box this
        walk does not open (meta, a sample entry, ...), where FFmpeg may still read it."""
        cuts = [0, *(x for span in sorted(mdats) for x in span), len(data)]
        for start, end in zip(cuts[0::2], cuts[1::2]):
            for box in (*_PLACES, *_REFUSED):
                at = data.find(box, start, end)
                while at >= 0:
                    if at not in placed:
                        raise ValueError(f"a {box.decode()!r} box outside its place")
                    at = data.find(box, at + 1, end)

    try:
        walk(0, len(data), ())
        hidden()
    except (ValueError, struct.error) as exc:
        raise RequestError(argument, f"could not decode {what} as {kind} audio (malformed MP4: {exc})") from None
