"""Request models of the HTTP/WebSocket API and the JSON error body.

Errors follow OpenAI's shape so its client surfaces them: `{"error": {"message", "type", "param", "code"}}`; `param`
names the offending field of the request.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ResponseFormat = Literal["wav", "pcm", "flac", "mp3", "opus"]
StreamFormat = Literal["audio", "sse"]

SAMPLING_FIELDS = ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty", "subtalker_dosample",
                   "subtalker_top_k", "subtalker_top_p", "subtalker_temperature", "max_new_tokens")


class SamplingFields(BaseModel):
    """Sampling extensions (same names as the engine's SamplingParams); None = the model's default."""

    model_config = ConfigDict(extra="forbid")

    do_sample: bool | None = None
    top_k: int | None = Field(None, ge=0, le=4096)
    top_p: float | None = Field(None, gt=0, le=1)
    temperature: float | None = Field(None, gt=0, le=10)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    subtalker_dosample: bool | None = None
    subtalker_top_k: int | None = Field(None, ge=0, le=4096)
    subtalker_top_p: float | None = Field(None, gt=0, le=1)
    subtalker_temperature: float | None = Field(None, gt=0, le=10)
    max_new_tokens: int | None = Field(None, ge=1, le=65536)

    def sampling(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in SAMPLING_FIELDS if getattr(self, k) is not None}


class SynthesisFields(SamplingFields):
    """What selects the voice and the text conditioning (shared by HTTP, WebSocket and bulk requests)."""

    model: str | None = Field(None, description="served model name (GET /v1/models); default: the first")
    voice: str | None = Field(None, description="speaker (CustomVoice) or stored voice id (Base)")
    language: str | None = Field(None, description="'auto' or a language of the model")
    instructions: str | None = Field(None, max_length=2000, description="style (CustomVoice 1.7B, VoiceDesign)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    non_streaming_mode: bool = False
    priority: Literal["interactive", "bulk"] = "interactive"


class SpeechRequest(SynthesisFields):
    """POST /v1/audio/speech (OpenAI-compatible, plus the extensions above)."""

    input: str = Field(..., description="text to speak")
    response_format: ResponseFormat = "mp3"
    stream_format: StreamFormat = "audio"
    speed: float = Field(1.0, description="only 1.0 is supported")

    @field_validator("speed")
    @classmethod
    def _only_unit_speed(cls, v: float) -> float:
        if v != 1.0:
            raise ValueError("only 1.0 is supported")
        return v


class WSConfig(SynthesisFields):
    """First WebSocket message: `{"type": "config", ...}`."""

    type: Literal["config"]
    response_format: Literal["pcm", "wav"] = "pcm"


class WSText(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str = Field(..., max_length=4096)


class WSEnd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["end"]


class ApiError(Exception):
    """An error with an HTTP status and the request field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.code or str(self.status)}}


# Engine/core argument names -> the API field a client sent.
_ENGINE_TO_API = {"text": "input", "speaker": "voice", "instruct": "instructions", "kind": "model",
                  "voice_clone_prompt": "voice", "ref_audio": "file", "ref_text": "ref_text",
                  "language": "language", "seed": "seed", "priority": "priority", "voice": "voice",
                  "input": "input", "instructions": "instructions", "model": "model", "file": "file"}
_WORD = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)")


def param_from_message(message: str) -> str | None:
    """The field a core ValueError is about: its messages start with the argument's name."""
    m = _WORD.match(message)
    if not m:
        return None
    word = m.group(1)
    if word in SAMPLING_FIELDS:
        return word
    return _ENGINE_TO_API.get(word)


def bad_request(exc: ValueError | str, param: str | None = None) -> ApiError:
    msg = str(exc)
    return ApiError(400, msg, param or param_from_message(msg) or "input")


def from_validation_error(exc: ValidationError, prefix: str = "") -> ApiError:
    """The first pydantic error -> 400 naming the field (dotted path)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid value")
    if not loc and msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        loc = param_from_message(msg) or msg.split(":")[0]
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    param = f"{prefix}{loc}" if loc else (prefix.rstrip(".") or None)
    return ApiError(400, f"{param}: {msg}" if param else msg, param)
