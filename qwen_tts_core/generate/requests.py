"""Request validation and request -> prompt (tokenization + embeddings). Errors name the argument and the allowed
values, before any work is queued."""

from __future__ import annotations

import logging

from ..text.prompt import Prompt, build_prompt
from ..types import SamplingParams, SynthesisRequest

log = logging.getLogger(__name__)

KIND_TO_MODEL_TYPE = {"custom_voice": "custom_voice", "voice_design": "voice_design", "voice_clone": "base"}


def instruct_supported(model_size: str) -> bool:
    """The reference drops instruct for 0.6B CustomVoice with a substring test of the size tag."""
    return not (model_size and model_size in "0b6")


def validate(model, req: SynthesisRequest) -> None:
    cfg = model.cfg
    want = KIND_TO_MODEL_TYPE.get(req.kind)
    if want is None:
        raise ValueError(f"kind must be one of {sorted(KIND_TO_MODEL_TYPE)}, got {req.kind!r}")
    if cfg.tts_model_type != want:
        raise ValueError(f"kind={req.kind!r} needs a {want!r} checkpoint; this one is {cfg.tts_model_type!r}")
    if req.text is not None:
        if not isinstance(req.text, str):
            raise ValueError(f"text must be a string, got {type(req.text).__name__}")
        if not req.text.strip():
            raise ValueError("text must not be empty")
    lang = (req.language or "auto").lower()
    langs = model.get_supported_languages()
    if lang not in langs and lang not in cfg.talker.codec_language_id:
        raise ValueError(f"language {req.language!r} is not supported; choose one of {langs}")
    if req.kind == "custom_voice":
        speakers = model.get_supported_speakers() or []
        if not req.speaker or req.speaker.lower() not in speakers:
            raise ValueError(f"speaker {req.speaker!r} is not supported; choose one of {speakers}")
    if req.kind == "voice_clone":
        if req.voice_clone_prompt is None:
            raise ValueError("voice_clone_prompt is required for voice_clone (see create_voice_clone_prompt)")
        if getattr(req.voice_clone_prompt, "icl_mode", False) and req.text is None:
            raise ValueError("text: incremental text is not available with ICL voice clone prompts "
                             "(use x_vector_only_mode=True or send the whole text)")
    if req.first_chunk_frames < 1:
        raise ValueError(f"first_chunk_frames must be >= 1, got {req.first_chunk_frames}")
    if req.chunk_frames < 1:
        raise ValueError(f"chunk_frames must be >= 1, got {req.chunk_frames}")
    if not isinstance(req.sampling, SamplingParams):
        raise ValueError("sampling must be a SamplingParams")
    if req.priority not in ("interactive", "bulk"):
        raise ValueError(f"priority must be 'interactive' or 'bulk', got {req.priority!r}")
    if req.non_streaming_mode and req.text is None:
        raise ValueError("non_streaming_mode=True needs the whole text (text=None opens incremental text)")


def make_prompt(model, req: SynthesisRequest, text_ids: list[int], text_ended: bool) -> Prompt:
    tok = model.tokenizer
    instruct_ids = None
    if req.instruct and req.kind in ("custom_voice", "voice_design"):
        if req.kind == "custom_voice" and not instruct_supported(model.cfg.tts_model_size):
            log.warning("instruct is not supported by the 0.6B CustomVoice model; ignored (as the reference does)")
        else:
            instruct_ids = tok.instruct(req.instruct)
    speaker_vector = ref_codes = ref_ids = None
    speaker = req.speaker if req.kind == "custom_voice" else None
    vp = req.voice_clone_prompt
    if vp is not None:
        if vp.x_vector_only_mode or vp.icl_mode:
            speaker_vector = vp.ref_spk_embedding
        if vp.icl_mode and vp.ref_code is not None:
            if not vp.ref_text:
                raise ValueError("ref_text is required when x_vector_only_mode=False (ICL mode)")
            ref_codes, ref_ids = vp.ref_code, tok.ref(vp.ref_text)
    return build_prompt(
        model.talker, model.cfg, role_ids=model.role_ids, text_ids=text_ids, language=req.language or "auto",
        speaker=speaker, speaker_vector=speaker_vector, instruct_ids=instruct_ids,
        non_streaming_mode=req.non_streaming_mode, ref_ids=ref_ids, ref_codes=ref_codes, text_ended=text_ended)
