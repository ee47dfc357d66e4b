"""Request models of the HTTP/WebSocket API, the JSON error body, and the one map from core fields to API fields.

The models check SHAPE and STRICT TYPES only (a JSON `true` is not an integer, an object is not a string, unknown
fields are refused); every range and every rule about values lives in the core (`qwen_tts_core.generate.requests`,
`SamplingParams`), which raises `RequestError(field, message)`; `API_FIELD` turns its `field` into the name the
client sent. Errors follow OpenAI's shape so its client surfaces them:
`{"error": {"message", "type", "param", "code"}}`, `param` naming the offending field.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from qwen_tts_core.audio_fx import SPEED_MAX, SPEED_MIN, check_speed
from qwen_tts_core.errors import ECHO_CHARS, RequestError
from qwen_tts_core.types import SAMPLING_FIELDS, SamplingParams

ResponseFormat = Literal["wav", "pcm", "flac", "mp3", "opus", "aac"]
StreamFormat = Literal["audio", "sse"]

STRICT = ConfigDict(extra="forbid", strict=True)
# `instructions` become prompt tokens of every session (OpenAI allows 4096 characters; documented in serve/README)
MAX_INSTRUCTIONS_CHARS = 2000

# Core argument names (RequestError.field) -> the API field a client sent. The one table; nothing parses messages.
API_FIELD: dict[str, str] = {
    "text": "input", "speaker": "voice", "voice": "voice", "voice_clone_prompt": "voice",
    "instruct": "instructions", "language": "language", "seed": "seed", "kind": "model", "priority": "priority",
    "non_streaming_mode": "non_streaming_mode", "ref_audio": "file", "ref_text": "ref_text",
    "x_vector_only_mode": "x_vector_only", "name": "name",
    **{f: f for f in SAMPLING_FIELDS},
}
_SERVER_SIDE = {"first_chunk_frames", "chunk_frames", "sampling"}  # set by the service, never by a client


def api_field(core_field: str, audio_field: str = "file") -> str | None:
    """The API field a core RequestError is about (`audio_field`: where the reference audio came from)."""
    if core_field == "ref_audio" or core_field.startswith("ref_audio["):
        return audio_field
    if core_field in _SERVER_SIDE:
        return None
    return API_FIELD.get(core_field, core_field)


# Sampling extensions: the names and Python types of the engine's SamplingParams (None = the model's default).
_HINTS = typing.get_type_hints(SamplingParams)
SamplingFields: type[BaseModel] = create_model(
    "SamplingFields", __config__=STRICT,
    **{name: (_HINTS[name] | None, Field(None, description=f"sampling: {name} (default: the model's)"))
       for name in SAMPLING_FIELDS})


class VoiceRef(BaseModel):
    """OpenAI's object form of a custom voice, `{"id": "voice_..."}`: the same as the id as a string."""

    model_config = STRICT
    id: str


_VOICE_FORMS = 'expected a speaker name, a stored voice id, or {"id": "<voice id>"}'


class SynthesisFields(SamplingFields):  # type: ignore[misc, valid-type]
    """What selects the voice and the text conditioning (shared by HTTP, WebSocket and bulk requests)."""

    model: str | None = Field(None, description="served model name (GET /v1/models); default: the first")
    voice: str | VoiceRef | None = Field(None, description="speaker (CustomVoice) or stored voice id (Base), as a "
                                                           'string or as OpenAI\'s object {"id": "<voice id>"}')
    language: str | None = Field(None, description="'auto' or a language of the model")
    instructions: str | None = Field(None, max_length=MAX_INSTRUCTIONS_CHARS,
                                     description="style (CustomVoice 1.7B, VoiceDesign); at most "
                                                 f"{MAX_INSTRUCTIONS_CHARS} characters")
    seed: int | None = Field(None, description="integer in [0, 2**63)")
    non_streaming_mode: bool = False
    priority: str = Field("interactive", description="'interactive' or 'bulk'")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """An explicit `null` for an optional field means its default (`"speed": null`, `"response_format": null`:
        clients that serialize unset options as null); a required field stays required."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data

    @field_validator("voice", mode="before")
    @classmethod
    def _voice(cls, v: Any) -> Any:
        """`{"id": ...}` -> the id, so the field always holds a string; one message for every wrong shape."""
        if isinstance(v, dict):
            try:
                return VoiceRef.model_validate(v).id
            except ValidationError:
                raise ValueError(_VOICE_FORMS) from None
        if v is not None and not isinstance(v, str):
            raise ValueError(_VOICE_FORMS)
        return v


class SpeechRequest(SynthesisFields):
    """POST /v1/audio/speech (OpenAI-compatible, plus the extensions above)."""

    input: str = Field(..., description="text to speak")
    response_format: ResponseFormat = "mp3"
    stream_format: StreamFormat = "audio"
    speed: float = Field(1.0, description=f"playback speed in [{SPEED_MIN}, {SPEED_MAX}]; the pitch is kept "
                                          "(a streaming time stretch of the synthesized audio)")

    @field_validator("speed")
    @classmethod
    def _speed(cls, v: float) -> float:
        try:
            return check_speed(v)   # the rule lives in the core
        except RequestError as e:
            raise ValueError(e.message) from None


class WSConfig(SynthesisFields):
    """First WebSocket message: `{"type": "config", ...}`."""

    type: Literal["config"]
    response_format: Literal["pcm", "wav"] = "pcm"


class WSText(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str   # bounded by max_body_bytes per message and max_input_chars per session (the replica's SessionTable)


class WSEnd(BaseModel):
    model_config = STRICT
    type: Literal["end"]


class VoiceUpload(BaseModel):
    """POST /v1/audio/voices fields (multipart/urlencoded form, or JSON with `audio_base64` / `audio_url`). JSON is
    validated strictly; form values are text, so `x_vector_only` may be "true"/"false" there."""

    model_config = STRICT
    name: str
    ref_text: str | None = None
    x_vector_only: bool = False
    model: str | None = None
    audio_base64: str | None = None
    audio_url: str | None = None


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: str | None = Field(description="the request field the error is about (dotted path), or null")
    code: str = Field(description="the HTTP status as a string")


class ErrorResponse(BaseModel):
    """Every error answer's body (OpenAI's shape), as `ApiError.body` builds it; for the OpenAPI document."""

    error: ErrorDetail


class ApiError(Exception):
    """An error with an HTTP status and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        # model_construct: the documented shape, without a check that could fail inside an error answer
        detail = ErrorDetail.model_construct(message=self.message, type=kind, param=self.param,
                                             code=self.code or str(self.status))
        return ErrorResponse.model_construct(error=detail).model_dump()


def from_request_error(exc: RequestError, audio_field: str = "file", status: int = 400) -> ApiError:
    """A core RequestError -> 400 naming the API field (through `API_FIELD`)."""
    param = api_field(exc.field, audio_field)
    return ApiError(status, f"{param}: {exc.message}" if param else exc.message, param)


def bad_request(message: str, param: str | None) -> ApiError:
    return ApiError(400, f"{param}: {message}" if param else message, param)


def from_validation_error(exc: ValidationError, prefix: str = "", whole: str = "body") -> ApiError:
    """The first pydantic error -> 400 naming the field (dotted path). Messages never echo the input; a field name
    the client made up (an unknown key) is cut to ECHO_CHARS. An error with no location (a key pydantic cannot read:
    one holding a lone surrogate) names `whole`, the body or the WebSocket message."""
    err = exc.errors(include_url=False, include_input=False)[0]
    loc = ".".join(str(p)[:ECHO_CHARS] for p in err.get("loc", ()) if p != "__root__")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "missing":
        msg = "is required"
    param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or whole)
    return ApiError(400, f"{param}: {msg}" if param else msg, param)
