"""Request -> talker prompt: the prefill embeddings and the text that trails into generation.

Layout (positions in order; P = projected text embedding, C = codec embedding):
  [P(instruct)]  P(<|im_start|>assistant\\n)  codec prefix summed with [tts_pad .. tts_pad, tts_bos]
  then one of
    streaming text    : P(text[0]) + C(bos);               trailing = P(text[1:]) ++ tts_eos
    non-streaming text: (P(text) ++ tts_eos) + C(pad) each, tts_pad + C(bos);   trailing = none
    ICL voice clone   : P(ref_text ++ text) ++ tts_eos against C(bos) ++ sum-of-codebooks(ref frames)
codec prefix = [nothink, think_bos, think_eos] (language auto) or [think, think_bos, lang, think_eos],
then the speaker vector (CustomVoice id / Base x-vector / none), then [pad, bos] (bos is the last prefill position).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import TTSConfig
from ..errors import RequestError
from ..model.talker import Talker


@dataclass
class Prompt:
    """Embeddings for one session (model dtype/device). `trailing` grows when text arrives piece by piece."""

    prefill: torch.Tensor              # [T, C]
    trailing: list[torch.Tensor]       # per-step text embeddings [C], consumed one per generated frame
    tts_pad: torch.Tensor              # [C], fed once trailing text is used up
    text_ended: bool = True            # False: more text may arrive (wait instead of feeding tts_pad)
    num_text_tokens: int = 0
    ref_codes: torch.Tensor | None = None  # [R, 16] ICL reference frames (decoded as left context)
    tts_eos: torch.Tensor | None = field(default=None, repr=False)


def resolve_language_id(cfg: TTSConfig, language: str, speaker: str | None) -> int | None:
    """The codec language id (None for auto), with the dialect rule of dialect speakers."""
    t = cfg.talker
    lang = (language or "auto").lower()
    lang_id = None if lang == "auto" else t.codec_language_id[lang]
    if speaker and lang in ("chinese", "auto"):
        dialect = t.spk_is_dialect.get(speaker.lower(), False)
        if dialect:
            lang_id = t.codec_language_id[dialect]
    return lang_id


@torch.no_grad()
def build_prompt(talker: Talker, cfg: TTSConfig, *, role_ids: list[int], text_ids: list[int],
                 language: str, speaker: str | None = None, speaker_vector: torch.Tensor | None = None,
                 instruct_ids: list[int] | None = None, non_streaming_mode: bool = False,
                 ref_ids: list[int] | None = None, ref_codes: torch.Tensor | None = None,
                 text_ended: bool = True) -> Prompt:
    """Build the prompt of one request. `text_ids` may be a prefix of the text when `text_ended` is False
    (incremental text; streaming layout only). ICL when `ref_codes` is given (with `ref_ids`)."""
    t = cfg.talker
    dev = talker.codec_head.weight.device
    ids = lambda xs: torch.tensor(xs, dtype=torch.long, device=dev)  # noqa: E731
    if not text_ids:
        raise RequestError("text", "must contain at least one token")
    bos_eos_pad = talker.embed_text(ids([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]))
    tts_bos, tts_eos, tts_pad = bos_eos_pad[0], bos_eos_pad[1], bos_eos_pad[2]

    lang_id = resolve_language_id(cfg, language, speaker)
    tags = ([t.codec_nothink_id, t.codec_think_bos_id, t.codec_think_eos_id] if lang_id is None
            else [t.codec_think_id, t.codec_think_bos_id, lang_id, t.codec_think_eos_id])
    codec = [talker.embed_codec(ids(tags))]
    if speaker_vector is not None:
        codec.append(speaker_vector.to(tts_pad.dtype).view(1, -1))
    elif speaker:
        codec.append(talker.embed_codec(ids([t.spk_id[speaker.lower()]])))
    codec.append(talker.embed_codec(ids([t.codec_pad_id, t.codec_bos_id])))
    codec_prefix = torch.cat(codec)                                     # [n, C]
    n = codec_prefix.shape[0]
    text_side = torch.cat([tts_pad.expand(n - 2, -1), tts_bos[None]])   # pairs with all but the final bos
    parts = []
    if instruct_ids:
        parts.append(talker.embed_text(ids(instruct_ids)))
    parts += [talker.embed_text(ids(role_ids)), text_side + codec_prefix[:-1]]
    bos = codec_prefix[-1]
    text_emb = talker.embed_text(ids(text_ids))                          # [N, C]
    trailing: list[torch.Tensor] = []

    if ref_codes is not None:
        if not ref_ids:
            raise RequestError("ref_text", "is required for in-context voice cloning (ICL)")
        txt = torch.cat([talker.embed_text(ids(ref_ids)), text_emb, tts_eos[None]])
        frames = talker.embed_frame(ref_codes.to(dev).long())           # [R, C]
        cod = torch.cat([bos[None], frames])
        if non_streaming_mode:
            pad = talker.embed_codec(ids([t.codec_pad_id]))
            parts += [txt + pad, cod + tts_pad]
        elif txt.shape[0] > cod.shape[0]:
            parts.append(txt[: cod.shape[0]] + cod)
            trailing = list(txt[cod.shape[0]:])
        else:
            parts.append(torch.cat([txt, tts_pad.expand(cod.shape[0] - txt.shape[0], -1)]) + cod)
    elif non_streaming_mode:
        if not text_ended:
            raise RequestError("non_streaming_mode", "needs the whole text up front (incremental text streams)")
        pad = talker.embed_codec(ids([t.codec_pad_id]))
        parts += [torch.cat([text_emb, tts_eos[None]]) + pad, (tts_pad + bos)[None]]
    else:
        parts.append((text_emb[0] + bos)[None])
        trailing = list(text_emb[1:]) + ([tts_eos] if text_ended else [])
    return Prompt(prefill=torch.cat(parts), trailing=trailing, tts_pad=tts_pad, text_ended=text_ended,
                  num_text_tokens=len(text_ids), ref_codes=ref_codes, tts_eos=tts_eos)


@torch.no_grad()
def extend_prompt(talker: Talker, prompt: Prompt, new_ids: list[int], end: bool) -> None:
    """Incremental text: append the embeddings of newly committed text tokens (and tts_eos at the end)."""
    if prompt.text_ended:
        raise RequestError("text", "already ended: append_text after end_text")
    if new_ids:
        dev = talker.codec_head.weight.device
        prompt.trailing.extend(talker.embed_text(torch.tensor(new_ids, dtype=torch.long, device=dev)))
        prompt.num_text_tokens += len(new_ids)
    if end:
        prompt.trailing.append(prompt.tts_eos)
        prompt.text_ended = True
