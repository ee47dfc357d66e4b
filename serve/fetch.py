"""Reference audio by URL (`audio_url`), only from the allow-list `allowed_audio_url_prefixes`.

    allow = AllowList(["https://media.example.com/voices/"])
    data = await fetch_allowed(url, allow, max_bytes=10 << 20)     # FetchRefused (400) | FetchTooLarge (413)

Rules (each hop of a redirect is checked again; at most `max_redirects` hops):
* http or https only; no user:password@; scheme, host (lower case, IDNA) and port (default 80/443) must EQUAL a
  prefix's — compared as parsed fields, never as text (`https://ok.example.com@evil.example/` is host
  evil.example; `https://ok.example.com.evil.example/` is another host);
* no character below "!" (controls, space), DEL, backslash or lone surrogate anywhere (httpx refuses them with an
  error of its own; here they are a 400 naming audio_url); other non-ASCII is percent-encoded as UTF-8;
* the path is normalised before the check: percent-escapes decoded per segment, empty and "." segments dropped, ".."
  resolved (above the root: refused); an escaped "/" or "\\" inside a segment, a backslash, or a NUL is refused, and
  so is a segment that servers read as "." or ".." once they drop ";" parameters (servlet containers) or trailing
  dots and spaces (IIS): `..;`, `%2e%2e;jsessionid=1`, `...`, `..%20`. The
  prefix's path must be a whole-segment prefix (`/ok/` allows `/ok/a.wav`, not `/okay/a.wav` nor `/ok/../x`);
* the NORMALISED URL is what is requested, so the server sees exactly the path that was checked;
* the body is read in pieces up to `max_bytes` (413 beyond), with a total timeout; environment proxies are ignored;
* no content coding: the request asks for `Accept-Encoding: identity` and the RAW bytes are read, so `max_bytes`
  bounds what is held in memory. A server that answers with a Content-Encoding anyway (gzip, br, ...) is refused
  (400): httpx would decode it before any check could run, and a few hundred bytes of stacked gzip decode to
  hundreds of MiB in one piece. Reference audio (wav, flac, mp3) gains nothing from gzip.
httpx does the HTTP (async, redirects off so each Location can be checked here).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit

from qwen_tts_core.errors import shown

_DEFAULT_PORT = {"http": 80, "https": 443}


class FetchRefused(ValueError):
    status = 400


class FetchTooLarge(FetchRefused):
    status = 413


def check_identity(content_encoding: str) -> None:
    """FetchRefused unless the Content-Encoding header says the body is the bytes themselves (absent, or only
    `identity`): a coded body would be decoded past the size limit (see the module's rules)."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    if any(c != "identity" for c in codings):
        raise FetchRefused(f"the server sent a compressed body (Content-Encoding: {shown(content_encoding)}); "
                           "serve the audio uncompressed")


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    segments: tuple[str, ...]
    query: str

    def url(self) -> str:
        netloc = self.host if ":" not in self.host else f"[{self.host}]"
        if self.port != _DEFAULT_PORT[self.scheme]:
            netloc += f":{self.port}"
        path = "/" + "/".join(quote(s, safe="!$&'()*+,;=:@-._~") for s in self.segments)
        return urlunsplit((self.scheme, netloc, path, self.query, ""))


def parse(url: str, *, folder: bool = False) -> Target:
    """`url` -> its normalised parts; FetchRefused saying why when it cannot be fetched safely."""
    if not isinstance(url, str) or not url or len(url) > 4096:
        raise FetchRefused("must be an http(s) URL of at most 4096 characters")
    if any(c == "\\" or c <= " " or c == "\x7f" for c in url):   # httpx's InvalidURL, refused here (400)
        raise FetchRefused("backslashes, spaces and control characters are not accepted in URLs")
    try:
        url.encode("utf-8")
    except UnicodeEncodeError:
        raise FetchRefused("the URL is not valid Unicode (a lone surrogate)") from None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise FetchRefused(f"not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORT:
        raise FetchRefused(f"scheme {scheme!r} is not accepted; only http and https")
    if parts.username is not None or parts.password is not None:
        raise FetchRefused("user:password@ in URLs is not accepted")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise FetchRefused("the URL has no host")
    if ":" not in host:  # a name (an IPv6 literal stays as written, lower case)
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise FetchRefused("the host name is not valid") from None
    host = host.lower()
    segments: list[str] = []
    for raw in parts.path.split("/"):
        try:
            seg = unquote(raw, errors="strict") if "%" in raw else raw
        except UnicodeDecodeError:
            raise FetchRefused("the path has escapes that are not UTF-8") from None
        if "/" in seg or "\\" in seg or "\0" in seg:
            raise FetchRefused("an escaped '/', '\\' or NUL in the path is not accepted")
        base = seg.split(";", 1)[0]
        if seg not in (".", "..") and "." in base and not base.rstrip(". "):
            raise FetchRefused(f"the path segment {shown(seg)} is not accepted: servers read it as '.' or '..'")
        if seg in ("", "."):
            continue
        if seg == "..":
            if not segments:
                raise FetchRefused("the path climbs above the root ('..')")
            segments.pop()
            continue
        segments.append(seg)
    return Target(scheme, host, port or _DEFAULT_PORT[scheme], tuple(segments), "" if folder else parts.query)


class AllowList:
    """URL prefixes (folders) from the config; `check(url)` -> the normalised URL to request."""

    def __init__(self, prefixes: Iterable[str]) -> None:
        self.prefixes: list[Target] = []
        for p in prefixes:
            try:
                self.prefixes.append(parse(p, folder=True))
            except FetchRefused as e:
                raise ValueError(f"allowed_audio_url_prefixes: {p!r}: {e}") from None

    def __bool__(self) -> bool:
        return bool(self.prefixes)

    def check(self, url: str) -> Target:
        t = parse(url)
        for p in self.prefixes:
            if (t.scheme, t.host, t.port) == (p.scheme, p.host, p.port) and \
                    t.segments[:len(p.segments)] == p.segments:
                return t
        raise FetchRefused("this URL is not under any of allowed_audio_url_prefixes")


async def fetch_allowed(url: str, allow: AllowList, max_bytes: int, timeout_s: float = 15.0,
                        max_redirects: int = 3) -> bytes:
    """GET an allow-listed URL (each redirect re-checked); FetchRefused / FetchTooLarge with the reason."""
    import httpx

    if not allow:
        raise FetchRefused("fetching URLs is disabled unless allowed_audio_url_prefixes lists it")
    target = allow.check(url)

    async def get(client) -> bytes:
        nonlocal target
        for _hop in range(max_redirects + 1):
            async with client.stream("GET", target.url(), headers={"Accept-Encoding": "identity"}) as r:
                if r.is_redirect and r.headers.get("location"):   # a 3xx without one: "HTTP 3xx" below
                    target = allow.check(urljoin(target.url(), r.headers["location"]))
                    continue
                if r.status_code != 200:
                    raise FetchRefused(f"the server answered HTTP {r.status_code}")
                check_identity(r.headers.get("content-encoding", ""))
                if int(r.headers.get("content-length") or 0) > max_bytes:
                    raise FetchTooLarge(f"larger than {max_bytes} bytes")
                body = bytearray()
                async for piece in r.aiter_raw():   # raw: never decoded (check_identity), so counted as held
                    body += piece
                    if len(body) > max_bytes:
                        raise FetchTooLarge(f"larger than {max_bytes} bytes")
                return bytes(body)
        raise FetchRefused(f"more than {max_redirects} redirects")

    try:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=timeout_s) as client:
            return await asyncio.wait_for(get(client), timeout_s)
    except asyncio.TimeoutError:
        raise FetchRefused(f"no complete answer within {timeout_s:g} s") from None
    except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:   # InvalidURL is no HTTPError (httpx 0.2x)
        if isinstance(e, FetchRefused):
            raise
        raise FetchRefused(f"could not fetch ({type(e).__name__})") from None
