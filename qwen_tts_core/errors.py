"""Typed errors of the core. A rejected request names the argument at fault in `field`, so every caller (the Python
API, the HTTP service, the batch jobs) reports the same field without parsing messages."""

from __future__ import annotations

import math
import reprlib

ECHO_CHARS = 40
"""The most characters of a caller's value (an unknown language, speaker, model, voice id or field name) that an
error message repeats: an error never carries a client's input back in full."""


class _Shown(reprlib.Repr):
    """reprlib's bounded repr (a 10 MB list costs a few elements, not a full repr cut afterwards), with integers too
    long to write as their digit count (repr of one of more than 4300 digits raises), and bytes and bytearray cut
    before their repr is made."""

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() >= 100:   # 31 digits and more
            return f"<an integer of about {int(x.bit_length() * math.log10(2)) + 1} digits>"
        return super().repr_int(x, level)

    def repr_bytes(self, x: bytes, level: int) -> str:   # (reprlib has none: a full repr, cut afterwards)
        return self._cut(repr(x[:self.maxstring + 1]), len(x) > self.maxstring)

    def repr_bytearray(self, x: bytearray, level: int) -> str:
        return self._cut(repr(x[:self.maxstring + 1]), len(x) > self.maxstring)

    def _cut(self, text: str, longer: bool) -> str:
        return text[:self.maxstring - 3] + "..." if longer or len(text) > self.maxstring else text


_SHOWN = _Shown()   # (Python 3.11's Repr takes no arguments)
_SHOWN.maxlevel, _SHOWN.maxdict = 2, 3
_SHOWN.maxtuple = _SHOWN.maxlist = _SHOWN.maxarray = _SHOWN.maxset = _SHOWN.maxfrozenset = _SHOWN.maxdeque = 4
_SHOWN.maxstring = _SHOWN.maxlong = _SHOWN.maxother = ECHO_CHARS


def shown(value: object) -> str:
    """A caller's bad value as an error message repeats it: a short repr (valid Unicode: lone surrogates come
    escaped), at most about ECHO_CHARS characters."""
    text = _SHOWN.repr(value)
    return text if len(text) <= ECHO_CHARS + 8 else f"{text[:ECHO_CHARS]}..."


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


class RequestTypeError(RequestError, TypeError):
    """An argument of a type the API does not take; also a TypeError, as the reference raises there."""


class RequestFileNotFound(RequestError, FileNotFoundError):
    """Reference audio named by a path that does not exist; also a FileNotFoundError, as the reference raises."""


class RequestFetchError(RequestError, OSError):
    """Reference audio at a URL that could not be fetched; also an OSError (the reference's urllib errors are)."""


class SessionEnded(RequestError):
    """Text sent to an incremental session that has already ended (finished, cancelled or failed): it would never be
    spoken. The service answers it as a session that has ended, not as bad text."""

    def __init__(self, field: str = "text", message: str = "the session has already ended") -> None:
        super().__init__(field, message)


__all__ = ["ECHO_CHARS", "RequestError", "RequestFetchError", "RequestFileNotFound", "RequestTypeError", "SessionEnded",
           "shown"]
