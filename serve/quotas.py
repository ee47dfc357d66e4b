"""Fair shares between API keys at the ingress: how many client streams (`StreamQuota`) and voice uploads
(`UploadQuota`) one key may hold at once.

    quota = StreamQuota(cfg.max_streams_per_key, client_streams, retry_after_s=1)
    place = quota.take(caller)      # ApiError 429 when this key already holds its share; before any replica work
    ...                             # HTTP: ReplicaStream.open(..., counter=place); WebSocket: held by the session
    place.closed()                  # on EVERY ending (idempotent); ReplicaStream.close calls it

HTTP speech streams and WebSocket sessions count together. Admission in the replicas is global (slots + queue,
scheduler.py), so without this one key could hold every slot and queue place and every other key got 503.

Who is counted: each non-admin API key (by its digest). Admin keys are the operator's and are not counted, and
neither is a service without API keys: there every caller is the one anonymous admin caller (auth.py), and the client
address does not tell tenants apart (behind the gateway serve/README.md asks for, every request has the gateway's
address, so a per-address limit would be one limit for everybody).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from .auth import Caller
from .metrics import ClientStreams
from .schemas import ApiError


class Place:
    """One open stream of one caller. Has the `opened()`/`closed()` interface of `ClientStreams`, so a
    `ReplicaStream` counts it in the ingress's open client streams while it lives and gives it back on close."""

    def __init__(self, quota: StreamQuota | None, who: str | None) -> None:
        self.quota, self.who = quota, who
        self._counted = self._done = False

    def opened(self) -> None:
        if not self._counted and self.quota is not None:
            self._counted = True
            self.quota.total.opened()

    def closed(self) -> None:
        """Give the place back (and the open-stream count, when it was counted). Safe to call more than once."""
        if self._done or self.quota is None:
            return
        self._done = True
        if self._counted:
            self.quota.total.closed()
        self.quota._release(self.who)


class _PerKey:
    """How many of something each non-admin key holds at once, at most `limit` (None: no limit; admin keys are not
    counted). The one counter behind `StreamQuota` and `UploadQuota`."""

    def __init__(self, limit: int | None, retry_after_s: int = 1) -> None:
        self.limit, self.retry_after_s = limit, retry_after_s
        self.held: Counter[str] = Counter()          # key digest -> held now

    def _claim(self, caller: Caller, what: str, tail: str) -> str | None:
        """Count one more for `caller`'s key (its digest, None when not counted); ApiError 429 at the limit."""
        who = None if caller.admin or self.limit is None else caller.owner
        if who is not None:
            if self.held[who] >= self.limit:
                raise ApiError(429, f"too many {what} for this API key: at most {self.limit} at once{tail}", None,
                               headers={"Retry-After": str(self.retry_after_s)})
            self.held[who] += 1
        return who

    def _release(self, who: str | None) -> None:
        if who is None:
            return
        self.held[who] -= 1
        if self.held[who] <= 0:
            del self.held[who]


class StreamQuota(_PerKey):
    def __init__(self, limit: int | None, total: ClientStreams, retry_after_s: int = 1) -> None:
        super().__init__(limit, retry_after_s)
        self.total = total

    def take(self, caller: Caller) -> Place:
        """A place for one more stream of `caller`; ApiError 429 when its key holds `limit` already."""
        return Place(self, self._claim(caller, "open streams",
                                       " (HTTP speech streams and WebSocket sessions together)"))


class UploadQuota(_PerKey):
    """Voice uploads of one key in progress at once (`max_uploads_per_key`). Each holds up to a form body's bound in
    memory or a fetched `audio_url`, and the ingress takes many requests at once, so without this one key could hold
    hundreds of uploads (and their fetches) together. Counted like `StreamQuota`: non-admin keys only.

        with uploads.hold(caller):      # ApiError 429 when this key has `limit` uploads in progress
            ...                         # read the body, fetch, create; the place is given back on ANY exit
    """

    @contextlib.contextmanager
    def hold(self, caller: Caller) -> Iterator[None]:
        who = self._claim(caller, "voice uploads in progress", "; send the next when one has been answered")
        try:
            yield
        finally:   # success, an error, or the client gone (the handler cancelled)
            self._release(who)


__all__ = ["Place", "StreamQuota", "UploadQuota"]
