"""The replica's table of open sessions: ownership, text limits, idle timeout, deadline and consumer leases.

    table = SessionTable(owner="a1b2c3", limits=SessionLimits(max_text_chars=4096, idle_text_timeout_s=30))
    s = table.open(ticket, incremental=True, leased=True)   # s.sid: "a1b2c3-<uuid hex>", routed back here
    table.get(sid)                                          # UnknownSession unless this replica holds it
    text = table.take_text(s, "more text", False)           # RequestError("text") past the total-text limit
    for s, failure in table.expired(): ...                  # the watchdog ends these (failure None: lease lapsed)
    table.lapsed(s, consumer_alive)                         # ... settled: True -> cancel it; False -> lease extended

No Ray and no engine here; the replica (replica.py) acts on what this table decides.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.requests import PieceJoiner, is_blank

from .routing import new_session_id
from .scheduler import Failure


class UnknownSession(LookupError):
    """A call about a session this replica does not hold (never opened here, ended, or its replica restarted).
    Picklable with its fields (it crosses Ray)."""

    def __init__(self, session_id: str, reason: str = "is not open on this replica") -> None:
        super().__init__(f"session {session_id!r} {reason}")
        self.session_id, self.reason = session_id, reason

    def __reduce__(self):
        return (type(self), (self.session_id, self.reason))


@dataclass(frozen=True)
class SessionLimits:
    max_text_chars: int = 4096         # total text of one incremental session
    idle_text_timeout_s: float = 30.0  # an incremental session with no text (before `end`) this long fails (408)
    deadline_s: float = 600.0          # wall time of any session from entering the engine; then it fails (504);
    #                                    a leased stream still waiting (parked bulk) this long after opening: 503
    lease_s: float = 15.0              # a leased session whose consumer has not renewed this long is cancelled

    def __post_init__(self) -> None:
        if self.max_text_chars < 1 or min(self.idle_text_timeout_s, self.deadline_s, self.lease_s) <= 0:
            raise ValueError("session limits must be positive")


@dataclass(eq=False)
class OpenSession:
    sid: str
    ticket: Any                        # scheduler.Ticket
    incremental: bool
    leased: bool
    opened: float
    last_text: float
    lease_until: float | None = None
    consumer: Any = None               # who renews the lease (liveness.py identity), asked before a cancel
    started: float | None = None       # entered the engine (bulk sessions may wait parked before)
    text_chars: int = 0
    has_text: bool = False             # a non-blank piece arrived
    ended: bool = False                # `end` received (incremental)
    pieces: PieceJoiner = field(default_factory=PieceJoiner)   # a character cut between messages is joined


class SessionTable:
    def __init__(self, owner: str, limits: SessionLimits = SessionLimits(), clock=time.monotonic) -> None:
        self.owner, self.limits, self.clock = owner, limits, clock
        self._open: dict[str, OpenSession] = {}
        # lease: cancelled (consumer gone); lease_late: lapsed, but the consumer lives (its renewals were late)
        self.expired_counts: dict[str, int] = {"idle": 0, "deadline": 0, "lease": 0, "lease_late": 0}
        self._last_check: float | None = None

    def __len__(self) -> int:
        return len(self._open)

    def open(self, ticket, incremental: bool, leased: bool, consumer: Any = None) -> OpenSession:
        now = self.clock()
        s = OpenSession(new_session_id(self.owner), ticket, incremental, leased, now, now,
                        now + self.limits.lease_s if leased else None, consumer if leased else None)
        self._open[s.sid] = s
        return s

    def close(self, sid: str) -> None:
        self._open.pop(sid, None)

    def get(self, sid: Any) -> OpenSession:
        s = self._open.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise UnknownSession(str(sid)[:100])
        return s

    def renew(self, sids: list[str]) -> list[str]:
        """Extend the leases of sessions whose consumer is alive; returns the ids not held here."""
        now, unknown = self.clock(), []
        for sid in sids:
            s = self._open.get(sid)
            if s is None:
                unknown.append(sid)
            elif s.leased:
                s.lease_until = now + self.limits.lease_s
        return unknown

    def take_text(self, s: OpenSession, text: str, end: bool) -> str:
        """Account a text message (and `end`) against the session's limits; RequestError('text') when refused.
        Returns the text to feed: a character cut between its UTF-16 surrogates across messages joined, a last high
        half held for the next message (the core's PieceJoiner), so limits count and see characters."""
        if not s.incremental:
            raise RequestError("text", "this session was opened with its full text")
        if s.ended:
            raise RequestError("text", "text after end")
        if not isinstance(text, str):
            raise RequestError("text", f"must be a string, got {type(text).__name__}")
        text = s.pieces.push(text)
        if end:
            s.pieces.finish()
        total = s.text_chars + len(text)
        if total > self.limits.max_text_chars:
            raise RequestError("text", f"the session's text is longer than {self.limits.max_text_chars} characters")
        visible = not is_blank(text)  # the core's rule: spaces, NULs, zero-width and format characters are no text
        has_text = s.has_text or visible
        if end and not has_text:
            raise RequestError("text", "end before any text")
        s.text_chars, s.has_text = total, has_text
        if visible or end:  # a blank message is no text: sent every few seconds, it held a slot or queue place past
            s.last_text = self.clock()  # the idle timeout (a space between words is followed by the word)
        s.ended = s.ended or end
        return text

    def expired(self, period_s: float | None = None) -> list[tuple[OpenSession, Failure | None]]:
        """Sessions to end now: (session, failure to report), or (session, None) when its lease lapsed: settle
        those with `lapsed` (the consumer may be alive and only late).

        `period_s`: how often the caller checks. A check later than that means this process was stalled (a busy
        host, a long pause), and the renewals sent meanwhile may still wait unread: the extra time is credited to
        every lease, so a stall here never reads as a consumer gone."""
        now, lim, out = self.clock(), self.limits, []
        if period_s is not None and self._last_check is not None:
            stalled = now - self._last_check - period_s
            if stalled > 0:
                for s in self._open.values():
                    if s.lease_until is not None:
                        s.lease_until += stalled
        self._last_check = now
        for s in list(self._open.values()):
            t = s.ticket
            if t.finished or t.failure is not None or t.cancelled:
                continue
            if s.started is None and t.session is not None:
                s.started = now
            if s.leased and s.lease_until is not None and now > s.lease_until:
                out.append((s, None))
            elif s.started is not None and now - s.started > lim.deadline_s:
                self.expired_counts["deadline"] += 1
                out.append((s, Failure(504, f"session deadline: not finished after {lim.deadline_s:g} s")))
            elif s.started is None and s.leased and now - s.opened > lim.deadline_s:
                # a stream parked as bulk behind steady interactive load: its live consumer renews the lease, so
                # only this ends the wait (and frees its places); `synthesize` (not leased) waits on, as jobs expect
                self.expired_counts["deadline"] += 1
                out.append((s, Failure(503, f"replica busy: no slot for this bulk stream after {lim.deadline_s:g} s "
                                            "of waiting; retry later")))
            elif s.incremental and not s.ended and now - s.last_text > lim.idle_text_timeout_s:
                self.expired_counts["idle"] += 1
                out.append((s, Failure(408, f"no text for {lim.idle_text_timeout_s:g} s", "text")))
        return out

    def lapsed(self, s: OpenSession, consumer_alive: bool) -> bool:
        """Settle a lapsed lease: True -> cancel the session (its consumer is gone); False -> the consumer lives
        (renewals were late: a loaded host, a slow route), so the lease is extended and the session goes on."""
        if consumer_alive:
            self.expired_counts["lease_late"] += 1
            s.lease_until = self.clock() + self.limits.lease_s
            return False
        self.expired_counts["lease"] += 1
        return True


__all__ = ["OpenSession", "SessionLimits", "SessionTable", "UnknownSession"]
