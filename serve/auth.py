"""API keys: who is calling, compared safely, and what they may see.

    ring = KeyRing(cfg.api_keys, cfg.admin_api_keys)          # from ServiceConfig.with_env_keys()
    caller = ring.check(bearer_token(request.headers))        # Caller | None (None: refuse with 401)
    caller.scope                                              # voices it sees: its key digest, or ANYONE

Presented tokens are handled as BYTES (the raw header bytes, or the UTF-8 of a query parameter): any byte string,
ASCII or not, is hashed and compared (`hmac.compare_digest` on SHA-256 digests), so a wrong or non-ASCII key is a
401, never a TypeError. Voices record their owner as `key_digest(key)` (a domain-separated SHA-256, never the key).
With no keys configured every caller is the anonymous ADMIN-like caller (scope ANYONE, owner "").
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .voices import ANYONE

_DOMAIN = b"qwen-tts-fleet/api-key/v1\0"


def key_digest(key: bytes | str) -> str:
    """The stable public name of a key (stored as a voice's owner). 32 hex characters."""
    return hashlib.sha256(_DOMAIN + _key_bytes(key)).hexdigest()[:32]


def _key_bytes(key: bytes | str) -> bytes:
    """A key's bytes, as a client sends them: a configured key's UTF-8, except that the bytes an environment variable
    held that are not UTF-8 (which os.environ gives as lone surrogates U+DC80-U+DCFF) are those bytes again, so
    such a key matches a header that carries them. Other lone surrogates (no client sends them) are hashed as they
    are, so that no key is matched by another text (never replaced by "?")."""
    if not isinstance(key, str):
        return bytes(key)
    try:
        return key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return key.encode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class Caller:
    owner: str          # digest recorded on what this caller creates ("" without keys)
    admin: bool

    @property
    def scope(self) -> str:
        """Whose voices this caller sees: ANYONE (admin, or a service without keys) or its own digest."""
        return ANYONE if self.admin else self.owner


ANONYMOUS = Caller(owner="", admin=True)


def cross_site(headers) -> bool:
    """A browser request this keyless service must refuse: made by a page of another site (or another port of this
    host, which is the same site), or by any page reached through a DNS name (DNS rebinding: a page of evil.example
    whose name was re-pointed at this machine is "same-origin" to the browser, so only the name gives it away).
    Browsers say so with `Sec-Fetch-Site` (all current ones) or `Origin` (compared with `X-Forwarded-Host` or
    `Host`, default ports dropped: a proxy may rewrite Host); clients that are not browsers send neither. An
    Origin that does not parse as a URL (`http://[`) names no site this one could be, so it is cross-site too.

    Why: without API keys any page a user opens could drive a local service (synthesize, create and delete
    voices): a JSON POST without a Content-Type, a form upload and a WebSocket need no CORS preflight. This service
    answers no CORS, so no page of another site can use it legitimately; with keys, the key is the guard (a page
    of another site may hold one, e.g. for the WebSocket's `?api_key=`). A keyless service's pages (the
    playground, /docs) work through localhost or an IP address."""
    site, origin = headers.get("sec-fetch-site"), headers.get("origin")
    if site is None and origin is None:
        return False
    host = _netloc(headers.get("x-forwarded-host") or headers.get("host") or "", None)
    if not _addressable(host):
        return True
    if site is not None:
        return site.strip().lower() in ("cross-site", "same-site")
    origin = origin.strip()
    try:
        parts = urlsplit(origin)
    except ValueError:   # e.g. "http://[" (an unclosed IPv6 bracket): no site it could be the same as
        return True
    return origin.lower() == "null" or _netloc(parts.netloc, parts.scheme) != host


def _netloc(netloc: str, scheme: str | None) -> str:
    """host[:port], lower case, without the scheme's default port (browsers drop it from Origin; Host may keep it)."""
    netloc = netloc.split(",")[0].strip().lower()
    for default in ((":80", ":443") if scheme is None else (":80",) if scheme == "http" else (":443",)):
        if netloc.endswith(default):
            return netloc[: -len(default)]
    return netloc


def _addressable(netloc: str) -> bool:
    """A name no DNS record can re-point: localhost (and *.localhost) or an IP literal."""
    name = netloc[1:].split("]")[0] if netloc.startswith("[") else netloc.rsplit(":", 1)[0]
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def bearer_token(headers) -> bytes | None:
    """The token of `Authorization: Bearer <token>` as raw bytes (None when absent or another scheme)."""
    raw = getattr(headers, "raw", None)
    values = [v for k, v in raw if k.lower() == b"authorization"] if raw is not None else \
        [v.encode("latin-1", "replace") for k, v in headers.items() if k.lower() == "authorization"]
    if not values:
        return None
    value = values[0].strip()
    if value[:7].lower() != b"bearer ":
        return None
    return value[7:].strip()


class KeyRing:
    def __init__(self, keys: Iterable[str] = (), admin_keys: Iterable[str] = ()) -> None:
        admin = {key_digest(k) for k in admin_keys}
        self._entries = [(hashlib.sha256(d.encode()).digest(), d, d in admin)
                         for d in dict.fromkeys([*(key_digest(k) for k in keys), *admin])]

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def check(self, token: bytes | str | None) -> Caller | None:
        """The caller a token stands for; None when keys are set and the token is missing or wrong."""
        if not self._entries:
            return ANONYMOUS
        if token is None:
            return None
        d = key_digest(token)
        probe = hashlib.sha256(d.encode()).digest()
        found = None
        for digest, owner, admin in self._entries:  # every entry compared: the time does not say which matched
            if hmac.compare_digest(probe, digest):
                found = Caller(owner=owner, admin=admin)
        return found
