"""The data that flows between the engine's stages and out to its callers.

text request -> Prompt -> (talker step -> code predictor) -> FrameCodes -> codec chunk -> AudioChunk -> bytes
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Literal

import numpy as np

from .errors import RequestError, shown

SAMPLE_RATE = 24000
MAX_TOP_K = 1 << 20          # above any vocabulary: the same as 0 (off); keeps per-slot values in device integers
MAX_NEW_TOKENS = 1 << 24     # frames (~15 days of audio); a bound so device counters cannot overflow
FLOAT32_MAX = float(np.finfo(np.float32).max)  # sampling floats are kept in fp32 device tensors: no larger value
SAMPLES_PER_FRAME = 1920  # 12.5 frames per second

ModelKind = Literal["custom_voice", "voice_design", "voice_clone"]
Priority = Literal["interactive", "bulk"]
FinishReason = Literal["eos", "max_new_tokens", "guard", "cancelled", "error"]


@dataclass(frozen=True)
class SamplingParams:
    """Sampling for the talker (codebook 0) and the code predictor (codebooks 1..15, `subtalker_*`)."""

    do_sample: bool = True
    top_k: int = 50
    top_p: float = 1.0
    temperature: float = 0.9
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    subtalker_temperature: float = 0.9
    max_new_tokens: int = 2048

    def __post_init__(self) -> None:
        self._take_loose_forms()
        for name in ("do_sample", "subtalker_dosample"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise RequestError(name, f"must be true or false, got {shown(getattr(self, name))}")
        for name in ("top_k", "subtalker_top_k", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Integral):
                raise RequestError(name, f"must be an integer, got {shown(v)}")
        for name in ("temperature", "subtalker_temperature", "top_p", "subtalker_top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool | np.bool_) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise RequestError(name, f"must be a finite number, got {shown(v)}")
            if abs(v) > FLOAT32_MAX:  # fp32 device tensors: storing it would fail the prefill it shares
                raise RequestError(name, f"must be at most {FLOAT32_MAX:.4g} (float32), got {shown(v)}")
        for name in ("temperature", "subtalker_temperature"):
            if not getattr(self, name) > 0:
                raise RequestError(name, f"must be > 0, got {shown(getattr(self, name))}")
        for name in ("top_p", "subtalker_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise RequestError(name, f"must be in (0, 1], got {shown(getattr(self, name))}")
        for name in ("top_k", "subtalker_top_k"):  # bounded: per-slot values live in int64 device tensors
            if not 0 <= getattr(self, name) <= MAX_TOP_K:
                raise RequestError(name, f"must be in [0, {MAX_TOP_K}] (0 disables), got {shown(getattr(self, name))}")
        if not self.repetition_penalty > 0:
            raise RequestError("repetition_penalty", f"must be > 0, got {self.repetition_penalty!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise RequestError("max_new_tokens", f"must be in [1, {MAX_NEW_TOKENS}], got {shown(self.max_new_tokens)}")

    def _take_loose_forms(self) -> None:
        """What the reference's callers pass and it runs: 0/1 for a switch, 50.0 for a count, and the greedy idiom
        temperature=0 / top_p=0 beside do_sample=False (unused when a stage does not sample: set to 1.0, so no
        device row ever divides by 0). NumPy scalars become Python's (np.bool_ and np.float32 could not be stored
        in the device's per-slot tensors: the prefill failed). Anything else is judged by the checks."""
        set_ = object.__setattr__
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, np.generic) and isinstance(v, np.bool_ | np.integer | np.floating):
                set_(self, f.name, v.item())
        for name in ("do_sample", "subtalker_dosample"):
            v = getattr(self, name)
            if isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_) and v in (0, 1):
                set_(self, name, bool(v))
        for name in ("top_k", "subtalker_top_k", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, float | np.floating) and math.isfinite(v) and float(v).is_integer():
                set_(self, name, int(v))
        for switch, names in (("do_sample", ("temperature", "top_p")),
                              ("subtalker_dosample", ("subtalker_temperature", "subtalker_top_p"))):
            if getattr(self, switch) is False or getattr(self, switch) is np.False_:
                for name in names:
                    v = getattr(self, name)
                    if isinstance(v, numbers.Real) and not isinstance(v, bool | np.bool_) and v == 0:
                        set_(self, name, 1.0)

    def with_overrides(self, **kw) -> SamplingParams:
        unknown = sorted(set(kw) - set(SAMPLING_FIELDS))
        if unknown:
            raise RequestError(unknown[0], f"unknown sampling argument(s) {unknown}; supported: "
                               f"{list(SAMPLING_FIELDS)}")
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


SAMPLING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))


@dataclass
class SynthesisRequest:
    """One utterance to synthesize. `text=None` opens an incremental session (append_text / end_text)."""

    kind: ModelKind
    text: str | None
    speaker: str | None = None          # custom_voice
    language: str = "auto"
    instruct: str | None = None         # custom_voice (1.7B) / voice_design
    voice_clone_prompt: object | None = None  # voice_clone: a VoiceClonePromptItem
    non_streaming_mode: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    priority: Priority = "interactive"
    first_chunk_frames: int = 1
    chunk_frames: int = 4
    decode_audio: bool = True           # False: codes only (no codec decode)


@dataclass
class AudioChunk:
    """Mono float32 PCM at 24 kHz for one session; `is_last` marks the end of the utterance.

    Every session added to an engine ends with exactly one chunk with `is_last=True`. When the session failed
    (`finish_reason == "error"`), that chunk carries `error` (what went wrong) and, when the failure was a
    RequestError, `error_field` (the request field at fault), so no caller can take a failure for success."""

    session_id: int
    pcm: np.ndarray
    frame_start: int
    num_frames: int
    is_last: bool = False
    finish_reason: FinishReason | None = None
    sample_rate: int = SAMPLE_RATE
    error: str | None = None
    error_field: str | None = None
