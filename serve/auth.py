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
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from .voices import ANYONE

_DOMAIN = b"qwen-tts-fleet/api-key/v1\0"


def key_digest(key: bytes | str) -> str:
    """The stable public name of a key (stored as a voice's owner). 32 hex characters."""
    raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else bytes(key)
    return hashlib.sha256(_DOMAIN + raw).hexdigest()[:32]


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
    """A browser request made by a page of another site (or another port of this host, which is the same site):
    `Sec-Fetch-Site` says so where browsers send it (all current ones); else an `Origin` that is not this host
    (or "null": a sandboxed or file page). Clients that are not browsers send neither.

    Why: without API keys any page a user opens could drive a local service (synthesize, create and delete
    voices): a JSON POST without a Content-Type, a form upload and a WebSocket need no CORS preflight. This service
    answers no CORS, so no page of another site can use it legitimately; with keys, the key is the guard (a page
    of another site may hold one, e.g. for the WebSocket's `?api_key=`)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        return site.strip().lower() in ("cross-site", "same-site")
    origin = headers.get("origin")
    if origin is None:
        return False
    host = (headers.get("host") or "").strip().lower()
    return origin.strip().lower() == "null" or urlsplit(origin.strip()).netloc.lower() != host


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
