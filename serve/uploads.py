"""Form bodies of POST /v1/audio/voices (multipart or urlencoded), read within bounds by starlette's own parsers.

    audio, fields = await read_form(request, max_upload_bytes)   # (bytes of `file` or None, text fields)

The body is counted AS IT STREAMS: past `form_body_limit(max_upload_bytes)` reading stops with a 413, whether or not
a Content-Length was sent (a chunked upload is never spooled whole first). The bound leaves room for `audio_base64`
sent as a form field (base64 is 4/3 of the audio, percent-encoding adds a little), so a text field may be that large
(starlette's own per-field default, 1 MiB, refused such fields as a bad form). Each field's own bound comes after:
`file` here, `audio_base64` in the ingress (at most `max_upload_bytes` once decoded); 413 naming the field.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

from starlette.datastructures import FormData
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from qwen_tts_core.errors import ECHO_CHARS

from .schemas import ApiError

MULTIPART, URLENCODED = "multipart/form-data", "application/x-www-form-urlencoded"
FORM_SLACK_BYTES = 64 * 1024      # field names, headers and boundaries around the audio
MAX_FIELDS = 16


def media_type(headers) -> str:
    """The Content-Type's media type without its parameters, lower case: media types are case-insensitive
    (RFC 9110 8.3.1), so `Multipart/Form-Data` is a form and `Application/JSON` is JSON."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def form_body_limit(max_upload_bytes: int) -> int:
    """Bytes a voice upload form may have: the audio as base64, percent-encoded, plus the other fields."""
    return 2 * max_upload_bytes + FORM_SLACK_BYTES


def too_large(max_upload_bytes: int) -> ApiError:
    return ApiError(413, f"body: larger than {form_body_limit(max_upload_bytes)} bytes (the reference audio may "
                         f"have at most {max_upload_bytes} bytes)", "body")


def body_timeout(timeout_s: float | None) -> ApiError:
    """408 naming `body`: a client that sends its body slower than this holds a handler and its partial body."""
    return ApiError(408, f"body: not received within {timeout_s:g} s", "body")


def declared_length(request: Request) -> int | None:
    """The Content-Length header as a number (None when absent); 400 naming it when it is not one."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "content-length: not a number", "content-length") from None


async def bounded(chunks: AsyncIterator[bytes], max_upload_bytes: int) -> AsyncIterator[bytes]:
    """`chunks` while the form's bound holds; `too_large` (413) instead of the first chunk past it."""
    total, limit = 0, form_body_limit(max_upload_bytes)
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise too_large(max_upload_bytes)
        yield chunk


async def read_form(request: Request, max_upload_bytes: int,
                    timeout_s: float | None = None) -> tuple[bytes | None, dict[str, str]]:
    """The uploaded `file` (None when none was sent) and the text fields of a multipart or urlencoded body.

    413 naming `body` past the form's bound (reading stops there), naming `file` when the file is larger than
    `max_upload_bytes`; 400 naming `body` for a malformed form (a second file, too many fields) or a client that
    left mid-body, `file` when it is a text field, and any other field sent as a file; 408 naming `body` when the
    body has not arrived within `timeout_s` (`body_timeout`)."""
    limit = form_body_limit(max_upload_bytes)
    declared = declared_length(request)
    if declared is not None and declared > limit:
        raise too_large(max_upload_bytes)
    async def parse() -> FormData:
        async with aclosing(request.stream()) as body, aclosing(bounded(body, max_upload_bytes)) as stream:
            if media_type(request.headers) == MULTIPART:
                parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=MAX_FIELDS,
                                         max_part_size=limit)
            else:
                parser = FormParser(request.headers, stream, max_fields=MAX_FIELDS, max_part_size=limit)
            return await parser.parse()
    try:  # wait_for, not asyncio.timeout: Python 3.10 is supported
        form = await asyncio.wait_for(parse(), timeout_s)
    except MultiPartException as e:
        raise ApiError(400, f"body: bad form ({e.message})", "body") from None
    except ClientDisconnect:
        raise ApiError(400, "body: the client left before the form was complete", "body") from None
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        raise body_timeout(timeout_s) from None
    try:
        return await _split(form, max_upload_bytes)
    finally:
        await form.close()


async def _split(form: FormData, max_upload_bytes: int) -> tuple[bytes | None, dict[str, str]]:
    audio, fields = None, {}
    for key, value in form.multi_items():
        if key == "file":
            if isinstance(value, str):
                raise ApiError(400, "file: expected a file upload, got a text field", "file")
            audio = await value.read(max_upload_bytes + 1)
            if len(audio) > max_upload_bytes:
                raise ApiError(413, f"file: larger than {max_upload_bytes} bytes", "file")
        elif not isinstance(value, str):  # e.g. OpenAI's voices API's `audio_sample`: this service's is `file`
            raise ApiError(400, f"{key[:ECHO_CHARS]}: a file is taken only as 'file' (the reference audio); this "
                           "field must be text", key[:ECHO_CHARS])
        else:
            fields[key] = value
    return audio, fields


__all__ = ["MULTIPART", "URLENCODED", "body_timeout", "form_body_limit", "media_type", "read_form"]
