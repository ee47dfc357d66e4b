"""Typed errors of the core. A rejected request names the argument at fault in `field`, so every caller (the Python
API, the HTTP service, the batch jobs) reports the same field without parsing messages."""

from __future__ import annotations

ECHO_CHARS = 40
"""The most characters of a caller's value (an unknown language, speaker, model, voice id or field name) that an
error message repeats: an error never carries a client's input back in full."""


class RequestError(ValueError):
    """A request the engine refuses. `field` is the core argument's name (`text`, `speaker`, `voice`, `language`,
    `instruct`, `seed`, a sampling field, `ref_audio`, ...); `message` says what is wrong and what is allowed.

    A `ValueError`, so code written against the reference's API (`except ValueError`) keeps working. Picklable with
    its field (it crosses Ray process boundaries)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def __reduce__(self):
        return (type(self), (self.field, self.message))


class SessionEnded(RequestError):
    """Text sent to an incremental session that has already ended (finished, cancelled or failed): it would never be
    spoken. The service answers it as a session that has ended, not as bad text."""

    def __init__(self, field: str = "text", message: str = "the session has already ended") -> None:
        super().__init__(field, message)


__all__ = ["ECHO_CHARS", "RequestError", "SessionEnded"]
