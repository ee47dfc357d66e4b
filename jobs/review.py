"""`qtts review OUTPUT_URI`: a local page over a job's manifest (file:// or s3://) to look at and listen to it.

One row per file: a player, its waveform, the measured figures, the preset's pass/fail rules, flags and captions;
filterable to flagged rows. The server reads the manifest again on every page load, so it follows a running
catalog. It serves only objects the manifest names (audio and captions); a key it does not list is a 404.
Formats a browser cannot play (G.711 WAV, headerless telephony files) are sent as 16-bit WAV.

    GET /                        the page
    GET /api/manifest            {"uri", "manifest", "rows": [...]}
    GET /api/audio?key=K         the object (Range requests honoured), or a 16-bit WAV of it
    GET /api/peaks?key=K&n=800   {"duration_s", "sample_rate", "min": [...], "max": [...]} for the waveform
    GET /api/captions?key=K      a caption object (.vtt / .srt) as text
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from . import audio, codecs
from .manifest import from_parquet
from .storage import StorageError, open_sink

log = logging.getLogger(__name__)
MANIFESTS = ("manifest.parquet", "catalog-manifest.parquet")
PLAYABLE = {"wav": "audio/wav", "flac": "audio/flac", "mp3-192": "audio/mpeg", "mp3-128": "audio/mpeg",
            "opus": "audio/ogg", "wav-8k": "audio/wav", "wav-16k": "audio/wav", "aac": "audio/mp4"}
MAX_PEAKS = 4000
OBJECT_CACHE_BYTES = 256 * 1024 * 1024


class ReviewError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Review:
    """The data side: the sink, the manifest, waveform peaks (cached)."""

    def __init__(self, uri: str, manifest: str | None = None) -> None:
        self.sink = open_sink(uri)
        self.manifest = manifest
        self._peaks: OrderedDict[tuple[str, int], dict] = OrderedDict()
        self._objects: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self._allowed: dict[str, str] = {}  # key -> format ("captions" for captions)

    def _manifest_name(self) -> str:
        if self.manifest:
            return self.manifest
        for name in MANIFESTS:
            if self.sink.size(name):
                return name
        raise ReviewError(404, f"no manifest in {self.sink.uri} (looked for {', '.join(MANIFESTS)})")

    def rows(self) -> dict[str, Any]:
        name = self._manifest_name()
        raw = self.sink.get(name)
        if raw is None:
            raise ReviewError(404, f"{name} is not in {self.sink.uri}")
        records = from_parquet(raw)
        allowed: dict[str, str] = {}
        rows = []
        for r in records:
            d = r.to_dict()
            d["rules"] = json.loads(d.get("rules") or "{}")
            d["flagged"] = bool(r.flags) or r.status in ("failed", "suspect")
            if r.key and r.status in ("ok", "suspect"):
                allowed[r.key] = r.format
            for k in r.captions or []:
                allowed[k] = "captions"
            rows.append(d)
        with self._lock:
            self._allowed = allowed
        return {"uri": self.sink.uri, "manifest": name, "rows": rows}

    def _check(self, key: str) -> str:
        if not self._allowed:
            self.rows()
        fmt = self._allowed.get(key)
        if fmt is None:
            raise ReviewError(404, f"{key!r} is not an object of this manifest")
        return fmt

    def _get(self, key: str) -> bytes:
        """The object's bytes; the last few are kept, since players fetch a file in many Range requests."""
        with self._lock:
            if key in self._objects:
                self._objects.move_to_end(key)
                return self._objects[key]
        data = self.sink.get(key)
        if data is None:
            raise ReviewError(404, f"{key!r} is listed in the manifest but missing from {self.sink.uri}")
        with self._lock:
            self._objects[key] = data
            while len(self._objects) > 1 and sum(len(v) for v in self._objects.values()) > OBJECT_CACHE_BYTES:
                self._objects.popitem(last=False)
        return data

    def audio(self, key: str) -> tuple[bytes, str]:
        fmt = self._check(key)
        if fmt == "captions":
            raise ReviewError(404, f"{key!r} is not audio")
        data = self._get(key)
        if fmt in PLAYABLE:
            return data, PLAYABLE[fmt]
        pcm, sr = codecs.decode(data, fmt if fmt in codecs.RAW_CODECS else None)
        return audio.encode(pcm, sr, "wav"), "audio/wav"

    def captions(self, key: str) -> tuple[bytes, str]:
        if self._check(key) != "captions":
            raise ReviewError(404, f"{key!r} is not a caption file")
        return self._get(key), "text/vtt; charset=utf-8" if key.endswith(".vtt") else "text/plain; charset=utf-8"

    def peaks(self, key: str, n: int) -> dict[str, Any]:
        fmt = self._check(key)
        n = max(16, min(MAX_PEAKS, n))
        with self._lock:
            if (key, n) in self._peaks:
                self._peaks.move_to_end((key, n))
                return self._peaks[(key, n)]
        pcm, sr = codecs.decode(self._get(key), fmt if fmt in codecs.RAW_CODECS else None)
        edges = np.linspace(0, pcm.size, n + 1).astype(np.int64)
        lo, hi = [], []
        for a, b in zip(edges[:-1], edges[1:]):
            seg = pcm[a:max(b, a + 1)] if pcm.size else np.zeros(1, np.float32)
            lo.append(round(float(seg.min()), 4))
            hi.append(round(float(seg.max()), 4))
        out = {"duration_s": round(pcm.size / sr, 4), "sample_rate": sr, "min": lo, "max": hi}
        with self._lock:
            self._peaks[(key, n)] = out
            while len(self._peaks) > 256:
                self._peaks.popitem(last=False)
        return out


_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def make_handler(review: Review) -> type[BaseHTTPRequestHandler]:
    page = resources.files("jobs").joinpath("static/review.html").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        server_version = "qtts-review"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj: Any) -> None:
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _bytes(self, body: bytes, ctype: str) -> None:
            m = _RANGE.match(self.headers.get("Range", "").strip())
            if not m or (not m.group(1) and not m.group(2)):
                return self._send(200, body, ctype, {"Accept-Ranges": "bytes"})
            size = len(body)
            if m.group(1):
                start, end = int(m.group(1)), int(m.group(2)) if m.group(2) else size - 1
            else:
                start, end = max(0, size - int(m.group(2))), size - 1
            end = min(end, size - 1)
            if start > end or start >= size:
                return self._send(416, b"", ctype, {"Content-Range": f"bytes */{size}"})
            self._send(206, body[start:end + 1], ctype, {"Accept-Ranges": "bytes",
                                                         "Content-Range": f"bytes {start}-{end}/{size}"})

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            q = {k: v[0] for k, v in parse_qs(url.query).items()}
            try:
                if url.path in ("/", "/index.html"):
                    return self._send(200, page, "text/html; charset=utf-8")
                if url.path == "/favicon.ico":
                    return self._send(204, b"", "image/x-icon")
                if url.path == "/api/manifest":
                    return self._json(200, review.rows())
                key = q.get("key", "")
                if url.path == "/api/audio":
                    return self._bytes(*review.audio(key))
                if url.path == "/api/captions":
                    return self._send(200, *review.captions(key))
                if url.path == "/api/peaks":
                    try:
                        n = int(q.get("n", "800"))
                    except ValueError:
                        raise ReviewError(400, "n must be an integer") from None
                    return self._json(200, review.peaks(key, n))
                raise ReviewError(404, f"no such page: {url.path}")
            except ReviewError as e:
                self._json(e.status, {"error": {"message": e.message}})
            except (StorageError, ValueError) as e:
                self._json(502, {"error": {"message": f"{type(e).__name__}: {e}"}})
            except (BrokenPipeError, ConnectionResetError):
                pass

    return Handler


def serve(uri: str, host: str = "127.0.0.1", port: int = 8765, manifest: str | None = None) -> ThreadingHTTPServer:
    """A started-but-not-running server (call serve_forever(), or run it in a thread)."""
    review = Review(uri, manifest)
    review.rows()  # fail fast: no manifest, unreadable storage
    server = ThreadingHTTPServer((host, port), make_handler(review))
    server.daemon_threads = True
    return server


def run(args: argparse.Namespace) -> int:
    try:
        server = serve(args.output, args.host, args.port, args.manifest)
    except (ReviewError, StorageError, ValueError, OSError) as e:
        print(f"error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    print(f"reviewing {args.output} at http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="python -m jobs.review", description=__doc__.split("\n")[0])
    p.add_argument("output", help="the job's output: file://DIR, a folder, or s3://bucket/prefix")
    p.add_argument("--manifest", help=f"manifest object name (default: the first of {', '.join(MANIFESTS)})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
