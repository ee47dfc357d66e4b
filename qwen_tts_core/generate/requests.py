"""Requests: fields -> SynthesisRequest (`request_from_fields`, the one mapping the service and the jobs use),
validation (`validate`, run by `Engine.add` before any work is queued; RequestError names the argument), and
request -> prompt (tokenization + embeddings)."""

from __future__ import annotations

import logging
import math
import numbers
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..audio_io import AudioLimits
from ..codec.decoder import check_codes
from ..errors import ECHO_CHARS, RequestError, shown
from ..text.prompt import Prompt, build_prompt
from ..types import (
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    SAMPLING_FIELDS,
    SamplingParams,
    SynthesisRequest,
)

log = logging.getLogger(__name__)

KIND_TO_MODEL_TYPE = {"custom_voice": "custom_voice", "voice_design": "voice_design", "voice_clone": "base"}


INSTRUCT_DROPPED = "instruct is not supported by the 0.6B CustomVoice model; ignored (as the reference does)"


def instruct_supported(model_size: str) -> bool:
    """The reference drops instruct for 0.6B CustomVoice with a substring test of the size tag (so also when the
    config has no size tag: "" is in every string)."""
    return model_size not in "0b6"


def check_text(text: object, field: str = "text", allow_blank: bool = False) -> str:
    """A str that encodes as UTF-8 (no lone surrogates) and, unless `allow_blank`, has something to say."""
    if not isinstance(text, str):
        raise RequestError(field, f"must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(field, f"is not valid Unicode (a lone surrogate at character {e.start})") from None
    if not allow_blank and is_blank(text):
        raise RequestError(field, "must not be empty" if not text.strip() else
                           "has no visible character (only control, format or zero-width characters)")
    return text


class PieceJoiner:
    """The one rule for text that arrives in str pieces (an incremental Session's append_text; the service's
    SessionTable.take_text for the WebSocket's messages): a character outside the BMP may be cut between its UTF-16
    surrogates (JavaScript's `slice` cuts by code unit, and JSON then sends each half as a lone escape). `push`
    joins such pairs, holds a piece's last high surrogate back for the next piece, and checks the rest
    (`check_text`: any other lone surrogate is refused naming `field`); `finish` refuses an end that leaves a half
    held."""

    __slots__ = ("field", "high")

    def __init__(self, field: str = "text") -> None:
        self.field, self.high = field, ""

    def push(self, piece: str) -> str:
        """`piece` joined with a held half, its pairs made characters, a trailing high half held back. Nothing is
        taken from a refused piece (the held half stays as it was)."""
        text = self.high + piece
        high = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, high = text[:-1], text[-1]
        if any("\ud800" <= c <= "\udfff" for c in text):
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
        check_text(text, self.field, allow_blank=True)
        self.high = high
        return text

    def finish(self) -> None:
        if self.high:
            raise RequestError(self.field, f"ends with half of a surrogate pair ({self.high!a})")


_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")
"""Characters Python counts printable that show nothing: the Hangul fillers and the braille blank."""


def _visible(c: str) -> bool:
    return (c.isprintable() and not c.isspace() and c not in _BLANK_LETTERS
            and unicodedata.category(c) not in ("Mn", "Me"))


def is_blank(text: str) -> bool:
    """Nothing to say: no character that is printable, not a space and shows something (NULs, zero-width and other
    format characters alone made the model babble up to max_new_tokens; so do variation selectors, the combining
    grapheme joiner and other nonspacing or enclosing marks with no letter, and the Hangul fillers, which Python
    counts printable)."""
    return not any(map(_visible, text))


MAX_REF_TEXT_CHARS = 2000
"""The longest transcript (`ref_text`) of a voice clone reference. A reference is a few seconds of speech (30 s at
the most that helps): its transcript is a few hundred characters, and 2000 leaves room for slow, dense scripts.
The core owns this limit, not a deployment, because a transcript is paid for again by EVERY request that uses the
voice: it is tokenized, embedded and fed on the engine's one step loop, and it goes into the trailing text, not the
prefill, so the prompt's length alone does not bound it (a stored voice with a 2,000,000-character transcript held
every other session of its replica for 21 s and grew it by 900 MiB). Checked where a prompt is made
(`create_voice_clone_prompt`) and where one is used (`check_voice_prompt`: voices stored before the limit)."""


def check_ref_text(text: object, field: str = "ref_text", allow_blank: bool = False) -> str:
    """`check_text` with the transcript's length limit (MAX_REF_TEXT_CHARS), measured first: a megabyte string is
    refused without a pass over its characters."""
    if isinstance(text, str) and len(text) > MAX_REF_TEXT_CHARS:
        raise RequestError(field, f"is {len(text)} characters long; a reference transcript may have at most "
                                  f"{MAX_REF_TEXT_CHARS} (the words spoken in the reference audio, a few seconds)")
    return check_text(text, field, allow_blank=allow_blank)


MAX_INSTRUCT_CHARS = 8192
"""The longest instruction (`instruct`: a style, or VoiceDesign's description of the voice). It is tokenized when
the session's prompt is built, on the engine's step thread, where every other session waits for it: unbounded, a
2,000,000-character one stalled them 1.3 s (tiny model, 2-core CPU) before max_len refused it. A description is a few
sentences; 8192 characters cost a few milliseconds there (the service asks for at most 2000)."""


def check_instruct(text: object, field: str = "instruct") -> str:
    """`check_text` (blank allowed: no instruction) with MAX_INSTRUCT_CHARS, measured before any scan."""
    if isinstance(text, str) and len(text) > MAX_INSTRUCT_CHARS:
        raise RequestError(field, f"is {len(text)} characters long; an instruction may have at most "
                                  f"{MAX_INSTRUCT_CHARS}")
    return check_text(text, field, allow_blank=True)


SEED_MAX = 2**63
"""Seeds are integers in [0, SEED_MAX): the engine's per-row generator takes 63 bits."""


def check_seed(seed: object) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_MAX:
        raise RequestError("seed", "must be an integer in [0, 2**63)")
    return int(seed)


MAX_REF_CODE_FRAMES = math.ceil(AudioLimits.max_seconds * SAMPLE_RATE / SAMPLES_PER_FRAME) + 1
"""The codes of the longest reference: its frames at 24 kHz, plus one for voices stored before `to_24k` capped its
length at the duration limit (the official's float ceiling made 120 s at 44.1 kHz 2,880,001 samples, 1501 frames):
a voice create_voice_clone_prompt made must be one generation takes."""


SPEAKER_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""The dtypes a speaker vector may come in (fp8 and others lack the checks made on it, and no encoder makes them)."""


def check_voice_prompt(vp: object, talker_cfg, dtype: torch.dtype | None = None) -> None:
    """A voice clone prompt must fit this model before anything is built from it: a speaker vector of the talker's
    width with finite values, exactly one of icl_mode and x_vector_only_mode, and for ICL its transcript and codes
    [T >= 1, 16] inside the codebooks. A prompt made for another model size (a
    voice store shared by 0.6B and 1.7B replicas) or a damaged file otherwise failed deep inside a step, or, on a GPU,
    an out-of-range code is a device-side assert that ends every session of the replica; NaN gave noise silently.
    dtype: the model's: the speaker vector must be finite in it too (1e300 in float64 is inf in bf16: NaN logits)."""
    field = "voice_clone_prompt"
    width, groups, size = talker_cfg.hidden_size, talker_cfg.num_code_groups, talker_cfg.codebook_size
    for flag in ("x_vector_only_mode", "icl_mode"):
        if not isinstance(getattr(vp, flag, None), bool):
            raise RequestError(field, f"{flag} must be True or False")
    if vp.icl_mode == vp.x_vector_only_mode:  # the reference would use no speaker vector, or ignore one mode
        raise RequestError(field, f"exactly one of icl_mode and x_vector_only_mode must be True, got icl_mode="
                                  f"{vp.icl_mode}, x_vector_only_mode={vp.x_vector_only_mode}")
    spk = getattr(vp, "ref_spk_embedding", None)
    _check_plain(spk, "ref_spk_embedding")   # first: a nested tensor has no .shape to check (a raw RuntimeError)
    if not isinstance(spk, torch.Tensor) or spk.dtype not in SPEAKER_DTYPES or spk.shape not in ((width,), (1, width)):
        shown = (tuple(spk.shape), str(spk.dtype)) if isinstance(spk, torch.Tensor) else type(spk).__name__
        raise RequestError(field, f"ref_spk_embedding must be a float tensor [{width}] or [1, {width}] (this model's "
                                  f"speaker vector; a voice made with another model size does not fit) of "
                                  f"float16, bfloat16, float32 or float64, got {shown}")
    if not bool(torch.isfinite(spk if dtype is None else spk.to(dtype)).all()):   # (NaN and inf survive the cast)
        raise RequestError(field, "ref_spk_embedding has NaN or infinite values" + (
            "" if dtype is None else f" (in {str(dtype).removeprefix('torch.')}, the model's dtype)"))
    if vp.icl_mode:  # the reference's transcript is part of an ICL prompt (without it the prompt fails at admission)
        text = getattr(vp, "ref_text", None)
        try:
            check_ref_text(text)   # a voice stored before the limit is refused here, before it is tokenized
        except RequestError as e:
            raise RequestError(field, f"an ICL prompt's {e}") from None
    codes = getattr(vp, "ref_code", None)
    _check_plain(codes, "ref_code")   # first, as the speaker vector: a nested tensor has no length or shape
    if vp.icl_mode and (codes is None or isinstance(codes, torch.Tensor) and codes.dim() == 2 and not len(codes)):
        # without them an ICL prompt ran as x-vector-only, its ref_text unused: another voice, silently
        raise RequestError(field, "an ICL prompt needs ref_code, the codes of at least one frame of its reference "
                                  "audio")
    if codes is not None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.shape[1] != groups:
            shown = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise RequestError(field, f"ref_code must be an integer tensor [frames, {groups}], got {shown}")
        if len(codes) > MAX_REF_CODE_FRAMES:  # decoded as left context on the step thread before the first chunk
            raise RequestError(field, f"ref_code has {len(codes)} frames; at most {MAX_REF_CODE_FRAMES} (the codes "
                                      f"of a {AudioLimits.max_seconds:g} s reference)")
        try:
            check_codes(codes.t()[None], groups, size)
        except ValueError as e:
            raise RequestError(field, f"ref_code: {e}") from None


def _check_plain(t: Any, name: str) -> None:
    """A tensor `t` is a dense one with values: not one on the meta device (a shape without values), nor sparse or
    nested (the checks and the model's ops are not implemented for them: a raw NotImplementedError deep inside
    otherwise). Anything else passes here: the caller's type check names it."""
    if not isinstance(t, torch.Tensor):
        return
    if t.device.type == "meta":
        raise RequestError("voice_clone_prompt", f"{name} is a tensor on the meta device (it holds no values)")
    if t.layout != torch.strided or t.is_nested:
        raise RequestError("voice_clone_prompt", f"{name} must be a dense tensor, got layout {t.layout}"
                                                 f"{' (nested)' if t.is_nested else ''}")


def check_language(model, language: Any) -> None:
    """A language `model` speaks ('auto' included; case-insensitive), or RequestError naming `language`."""
    if not isinstance(language, str):
        raise RequestError("language", f"must be a string, got {type(language).__name__}")
    if not language:   # as the reference: only an absent language (None, before here) means auto
        raise RequestError("language", "must name a language (or 'auto'), got ''")
    langs = model.get_supported_languages()  # a dialect is not one: it comes with its speaker, as the reference's
    if language.lower() not in langs:
        raise RequestError("language", f"{shown(language)} is not supported; choose one of {langs}")


def validate(model, req: SynthesisRequest) -> None:
    """Every check of a request against one model, in one place (engine.add calls it). Raises RequestError."""
    cfg = model.cfg
    want = KIND_TO_MODEL_TYPE.get(req.kind) if isinstance(req.kind, str) else None
    if want is None:
        raise RequestError("kind", f"must be one of {sorted(KIND_TO_MODEL_TYPE)}, got {shown(req.kind)}")
    if cfg.tts_model_type != want:
        raise RequestError("kind", f"{shown(req.kind)} needs a {want!r} checkpoint; this one is {cfg.tts_model_type!r}")
    if req.text is not None:
        check_text(req.text)
    check_language(model, req.language)
    if req.instruct is not None:
        check_instruct(req.instruct)
    # None or "": no speaker embedding, as the reference (not `in (None, "")`: an array compares elementwise)
    if req.kind == "custom_voice" and not (req.speaker is None or isinstance(req.speaker, str) and not req.speaker):
        speakers = model.get_supported_speakers()
        if not isinstance(req.speaker, str) or req.speaker.lower() not in speakers:
            raise RequestError("speaker", f"{shown(req.speaker)} is not supported; choose one of {speakers}")
    if req.kind != "voice_clone" and req.voice_clone_prompt is not None:  # unchecked, it failed inside a step
        raise RequestError("voice_clone_prompt", f"only a voice_clone request takes one, not {req.kind}")
    if req.kind == "voice_clone":
        if req.voice_clone_prompt is None:
            raise RequestError("voice_clone_prompt", "is required for voice_clone (see create_voice_clone_prompt)")
        check_voice_prompt(req.voice_clone_prompt, cfg.talker, model.talker.codec_head.weight.dtype)
        if req.voice_clone_prompt.icl_mode and req.text is None:
            raise RequestError("text", "incremental text is not available with ICL voice clone prompts "
                               "(use x_vector_only_mode=True or send the whole text)")
    check_seed(req.seed)
    for name in ("first_chunk_frames", "chunk_frames"):
        v = getattr(req, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise RequestError(name, f"must be an integer >= 1, got {shown(v)}")
        setattr(req, name, int(v))  # a numpy integer is taken as the int the audio decoder works in
    if not isinstance(req.sampling, SamplingParams):
        raise RequestError("sampling", "must be a SamplingParams")
    if req.priority not in ("interactive", "bulk"):
        raise RequestError("priority", f"must be 'interactive' or 'bulk', got {shown(req.priority)}")
    for name in ("non_streaming_mode", "decode_audio"):  # a truthy "false" must not pass for True
        if not isinstance(getattr(req, name), bool | np.bool_):
            raise RequestError(name, f"must be true or false, got {shown(getattr(req, name))}")
    if req.non_streaming_mode and req.text is None:
        raise RequestError("non_streaming_mode", "True needs the whole text (text=None opens incremental text)")


@dataclass(frozen=True)
class RequestPolicy:
    """A deployment's limits on requests built from fields (the service's model config, a job's options)."""

    max_new_tokens: int | None = None          # hard cap; a request asking for more is refused
    default_max_new_tokens: int | None = None  # when a request does not say (None: the checkpoint's default)
    max_text_chars: int | None = None          # whole-text requests; incremental text is limited by the caller
    first_chunk_frames: int = 1
    chunk_frames: int = 4


def request_from_fields(model, *, text: str | None, voice: str | None = None, instructions: str | None = None,
                        language: str | None = None, seed: int | None = None, non_streaming_mode: bool = False,
                        priority: str = "interactive", sampling: Mapping[str, Any] | None = None,
                        voices: Callable[[str], Any] | None = None, policy: RequestPolicy = RequestPolicy(),
                        ) -> SynthesisRequest:
    """The one mapping from request fields (as the service and the batch jobs take them) to a SynthesisRequest.

    `voice` means, by checkpoint type: CustomVoice, a speaker name (default: the first speaker); Base, a stored voice
    that `voices(voice)` loads (KeyError when unknown); VoiceDesign takes no voice (the voice is described in
    `instructions`). `text=None` opens an incremental-text session. Raises RequestError naming the field (`text`,
    `voice`, `instruct`, `language`, `seed`, `non_streaming_mode` or a sampling field); the rest of the checks
    (`priority` among them) run in `validate` when the request reaches the engine.
    """
    kind = {v: k for k, v in KIND_TO_MODEL_TYPE.items()}[model.tts_model_type]
    if text is not None:
        if isinstance(text, str) and policy.max_text_chars is not None and len(text) > policy.max_text_chars:
            raise RequestError("text", f"is longer than {policy.max_text_chars} characters")  # before any scan
        check_text(text)
    if instructions is not None:
        check_instruct(instructions)
    for name, v in (("voice", voice), ("language", language)):
        if v is not None:
            check_text(v, name, allow_blank=True)
    for name, v in (("non_streaming_mode", non_streaming_mode),):
        if not isinstance(v, bool | np.bool_):
            raise RequestError(name, f"must be true or false, got {shown(v)}")
    speaker, prompt = None, None
    if kind == "custom_voice":
        speakers = model.get_supported_speakers() or []
        speaker = voice.lower() if voice else (speakers[0] if speakers else None)
    elif kind == "voice_design":
        if voice:
            raise RequestError("voice", "a VoiceDesign model takes no voice name; describe the voice in "
                               "instructions")
        if instructions is None or is_blank(instructions):  # the Python API takes none, as the reference; a
            #                      service asks for one (with a visible character: zero-width ones alone describe nothing)
            raise RequestError("instruct", "a VoiceDesign model needs a voice description")
    else:
        if not voice:
            raise RequestError("voice", "a Base model needs a stored voice (create one from reference audio)")
        if voices is None:
            raise RequestError("voice", "no voice store is configured")
        try:
            prompt = voices(voice)
        except KeyError:
            raise RequestError("voice", f"{shown(voice)} is not a stored voice") from None
        except ValueError as e:  # a damaged file (load_voice_prompt); what is wrong stays in the chained exception
            raise RequestError("voice", f"{shown(voice)} is a stored voice that cannot be read") from e
        instructions = None
    if sampling is not None and not isinstance(sampling, Mapping):
        raise RequestError("sampling", f"must be a mapping of sampling fields, got {type(sampling).__name__}")
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    unknown = sorted((k for k in sampling if k not in SAMPLING_FIELDS), key=shown)  # keys of any type (a job's row)
    if unknown:
        # a caller's keys, repeated bounded (shown); the field is the first one's name when it is a short name
        first = unknown[0]
        field = first if isinstance(first, str) and first.isidentifier() and len(first) <= ECHO_CHARS else "sampling"
        raise RequestError(field, f"unknown sampling field(s) {shown(unknown)}; supported: {list(SAMPLING_FIELDS)}")
    params = model.sampling_params(**sampling)
    want = sampling.get("max_new_tokens")
    if want is not None and policy.max_new_tokens is not None and want > policy.max_new_tokens:
        raise RequestError("max_new_tokens", f"must be <= {policy.max_new_tokens} here, got {want}")
    if want is None:
        cap = policy.default_max_new_tokens or policy.max_new_tokens
        if cap is not None:
            params = params.with_overrides(max_new_tokens=min(params.max_new_tokens, cap))
    language = "auto" if language is None else language.lower()
    return SynthesisRequest(kind=kind, text=text, speaker=speaker, language=language,
                            instruct=instructions or None, voice_clone_prompt=prompt,
                            non_streaming_mode=bool(non_streaming_mode), sampling=params, seed=check_seed(seed),
                            priority=priority, first_chunk_frames=policy.first_chunk_frames,
                            chunk_frames=policy.chunk_frames)


def make_prompt(model, req: SynthesisRequest, role_ids: list[int], text_ids: list[int], text_ended: bool,
                max_len: int | None = None) -> Prompt:
    """role_ids, text_ids: `TargetIds` of the text (the role is the text's own: a text that starts with a newline
    merges it into the role's last token, "assistant\n\n", as the reference's prompt has it). With `max_len` (the
    engine's positions per session), a prompt whose token ids alone need `max_len` positions or more is refused
    before any of it is embedded (`check_positions`)."""
    tok = model.tokenizer
    instruct_ids = None
    if req.instruct and req.kind in ("custom_voice", "voice_design"):
        if req.kind == "custom_voice" and not instruct_supported(model.cfg.tts_model_size):
            log.warning(INSTRUCT_DROPPED)
        else:
            instruct_ids = tok.instruct(req.instruct)
    speaker_vector = ref_codes = ref_ids = None
    speaker = (req.speaker or None) if req.kind == "custom_voice" else None
    vp = req.voice_clone_prompt
    if vp is not None:
        if vp.x_vector_only_mode or vp.icl_mode:
            speaker_vector = vp.ref_spk_embedding
        if vp.icl_mode and vp.ref_code is not None:
            ref_codes, ref_ids = vp.ref_code, tok.ref(vp.ref_text)
    if max_len is not None:
        if instruct_ids and min_positions(role_ids, text_ids[:1], True, instruct_ids, ref_ids, ref_codes) >= max_len:
            # even a one-token text would not fit: the instruction is what is too long (not the text)
            raise RequestError("instruct", f"takes {len(instruct_ids)} positions; with the rest of the prompt this "
                                           f"engine's {max_len} per session (max_len) leave no room for the text")
        check_positions(min_positions(role_ids, text_ids, text_ended, instruct_ids, ref_ids, ref_codes), max_len)
    return build_prompt(
        model.talker, model.cfg, role_ids=role_ids, text_ids=text_ids, language=req.language or "auto",
        speaker=speaker, speaker_vector=speaker_vector, instruct_ids=instruct_ids,
        non_streaming_mode=req.non_streaming_mode, ref_ids=ref_ids, ref_codes=ref_codes, text_ended=text_ended)


def min_positions(role_ids: list[int], text_ids: list[int], text_ended: bool, instruct_ids: list[int] | None = None,
                  ref_ids: list[int] | None = None, ref_codes: torch.Tensor | None = None) -> int:
    """At least the positions a prompt's prefill and trailing text take together, from its token ids alone (no
    embedding): each text token (instruction, role, an ICL transcript, the text, tts_eos once it has ended) has a
    position of its own, and so do the codec's bos and each ICL reference frame, which pair with the transcript and
    text. A lower bound in every layout of text/prompt.py (they add the codec prefix), so it never refuses a prompt
    that fits; the exact count is the built prompt's (`Engine._prepare`)."""
    fixed = len(instruct_ids or ()) + len(role_ids)
    text = len(ref_ids or ()) + len(text_ids) + int(text_ended)
    frames = 0 if ref_codes is None else 1 + len(ref_codes)
    return fixed + max(text, frames)


def check_positions(positions: int, max_len: int) -> None:
    """RequestError naming `text` when a session needs `max_len` positions or more for its prompt and the text it
    will be fed (the trailing text too: text that does not fit would never be spoken)."""
    if positions >= max_len:
        raise RequestError("text", f"the prompt and its text need at least {positions} positions; this engine holds "
                                   f"{max_len} per session (max_len)")
