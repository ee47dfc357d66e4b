"""Bounded JSON for every body and message the service parses (speech, JSON voice upload, WebSocket messages).

    data = loads_bounded(body, JsonLimits(max_bytes=1 << 20))    # JsonTooLarge | JsonRejected (both name "body")

The standard library's C scanner does the parsing (it keeps lone-surrogate escapes such as "\\ud800" as text, so
the core's text check can name the field they are in); the bounds come first:
* size: the caller's byte limit, before any parsing;
* depth: one linear pass over the text with the strings blanked out (a regular expression, no Python recursion)
  finds the deepest nesting; beyond `max_depth` the text is refused before the recursive scanner sees it;
* numbers: `parse_int` / `parse_float` hooks refuse literals longer than `max_number_chars` (a 5,000-digit integer
  never reaches `int()`, whose own 4,300-digit limit raises a bare ValueError), and floats that overflow to
  infinity (`1e999`); `NaN` / `Infinity` (not JSON) are refused.
Everything refused is a `JsonRejected` (a ValueError) whose message says what and where; RecursionError cannot escape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class JsonLimits:
    max_bytes: int = 1 << 20
    max_depth: int = 32            # requests are flat objects; 32 leaves room for any sane extension
    max_number_chars: int = 40     # a 64-bit integer has 20 digits, a double needs at most ~25 characters


class JsonRejected(ValueError):
    """Not JSON, or JSON outside the limits. `status` is the HTTP status to answer (400, or 413 for size)."""

    status = 400


class JsonTooLarge(JsonRejected):
    status = 413


# A JSON string from its opening quote to its closing one, or to the end of the text when it is never closed: the
# pattern cannot fail from a quote, so it never backtracks and `sub` runs in linear time on any input (a pattern
# that must find the closing quote would retry from every later quote: quadratic on a body of escaped quotes).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def max_depth(text: str) -> int:
    """Deepest [ / { nesting outside strings (for valid JSON exactly what the parser recurses through; for invalid
    JSON it agrees with the parser up to the first syntax error, which is where the parser stops). Linear time."""
    if text.count("[") + text.count("{") <= 1:
        return text.count("[") + text.count("{")
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def loads_bounded(data: bytes | bytearray | str, limits: JsonLimits = JsonLimits(), what: str = "body") -> Any:
    """Parse `data` (UTF-8 bytes or str) within `limits`; JsonRejected naming `what` otherwise."""
    size = len(data) if not isinstance(data, str) else len(data.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise JsonTooLarge(f"{what}: larger than {limits.max_bytes} bytes")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonRejected(f"{what}: not UTF-8 (byte {e.start})") from None
    else:
        text = data
    if text.startswith("\ufeff"):
        text = text[1:]
    depth = max_depth(text)
    if depth > limits.max_depth:
        raise JsonRejected(f"{what}: JSON nested {depth} deep; at most {limits.max_depth} levels are accepted")

    def parse_int(s: str) -> int:
        if len(s) > limits.max_number_chars:
            raise JsonRejected(f"{what}: a number of {len(s)} characters; at most {limits.max_number_chars}")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > limits.max_number_chars:
            raise JsonRejected(f"{what}: a number of {len(s)} characters; at most {limits.max_number_chars}")
        v = float(s)
        if not math.isfinite(v):
            raise JsonRejected(f"{what}: the number {s} is out of range")
        return v

    def parse_constant(s: str) -> Any:
        raise JsonRejected(f"{what}: {s} is not JSON")

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except JsonRejected:
        raise
    except json.JSONDecodeError as e:
        raise JsonRejected(f"{what}: malformed JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # defence in depth: the bounds above should make these unreachable
        raise JsonRejected(f"{what}: unreadable JSON ({type(e).__name__})") from None
