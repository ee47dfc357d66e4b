"""Reusable voice-clone prompts: what `create_voice_clone_prompt` returns, and their storage as safetensors files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import RequestError, shown

FORMAT_PREFIX = "qwen-tts-fleet/voice-prompt/"
"""The `format` metadata of a voice prompt file begins so; the version follows."""


@dataclass
class VoiceClonePromptItem:
    """One reference voice: ICL codes of the reference audio (None in x-vector-only mode) and its speaker vector."""

    ref_code: torch.Tensor | None      # [T, 16] long
    ref_spk_embedding: torch.Tensor    # [D]
    x_vector_only_mode: bool
    icl_mode: bool
    ref_text: str | None = None


_PROMPT_FIELDS = ("ref_code", "ref_spk_embedding", "x_vector_only_mode", "icl_mode")


def prompt_items(prompt: Any) -> list[VoiceClonePromptItem]:
    """VoiceClonePromptItem(s) from what the reference's generate_voice_clone takes: items (ours, or any object with
    their fields, such as the reference's own class) or its dict of per-text lists (`ref_text` optional there). What
    the fields hold is checked when the request is (`generate.requests.check_voice_prompt`)."""
    field = "voice_clone_prompt"
    if isinstance(prompt, dict):
        missing = [k for k in _PROMPT_FIELDS if k not in prompt]
        if missing:
            raise RequestError(field, f"a dict prompt needs {list(_PROMPT_FIELDS)} (a list each, one entry per "
                                      f"text); missing {missing}")
        cols = {k: _column(k, v) for k, v in prompt.items() if k in (*_PROMPT_FIELDS, "ref_text")}
        n = len(cols["ref_spk_embedding"])
        for k in ("ref_code", "ref_text"):   # None for the whole key: none for any text, as the reference reads it
            if k in cols and len(cols[k]) == 1 and cols[k][0] is None:
                cols[k] = [None] * n
        if any(len(v) != n for v in cols.values()):
            raise RequestError(field, f"a dict prompt's lists must have one length, got "
                                      f"{ {k: len(v) for k, v in cols.items()} }")
        return [VoiceClonePromptItem(**{k: v[i] for k, v in cols.items()}) for i in range(n)]
    items = prompt if isinstance(prompt, list) else [prompt]
    out = []
    for it in items:
        if not isinstance(it, VoiceClonePromptItem):
            if not all(hasattr(it, f) for f in _PROMPT_FIELDS):
                raise RequestError(field, "must be VoiceClonePromptItem(s) from create_voice_clone_prompt (or the "
                                          f"reference's dict of {list(_PROMPT_FIELDS)}), got {type(it).__name__}")
            it = VoiceClonePromptItem(**{f: getattr(it, f) for f in _PROMPT_FIELDS},
                                      ref_text=getattr(it, "ref_text", None))
        out.append(it)
    return out


def _column(key: str, value: Any) -> list[Any]:
    """A dict prompt's entry as one value per text: a list as given, a batched tensor by its rows (speaker vectors
    [B, D], codes [B, T, 16]: the reference indexes them per text), anything else as one value."""
    if isinstance(value, list):
        return value
    if isinstance(value, torch.Tensor) and value.dim() == {"ref_spk_embedding": 2, "ref_code": 3}.get(key):
        return list(value)
    return [value]


def save_voice_prompt(item: VoiceClonePromptItem, path: str | Path, **metadata: str) -> Path:
    """Write the item as one safetensors file (tensors + JSON metadata). An x-vector item's transcript is never used:
    one that is not a valid transcript (not a str, past the core's limit) is stored as None. An ICL item's must be a
    str (ValueError naming ref_text; its length is judged where the voice is used, as a voice stored before the
    limit is); a file safetensors cannot write is a ValueError naming the path. `metadata` (e.g. a store's name,
    owner) is written as str values beside the file's own keys, which it may not replace (ValueError naming them)."""
    from safetensors.torch import save_file

    from .generate.requests import check_ref_text

    ref_text = item.ref_text
    if item.icl_mode and ref_text is not None and not isinstance(ref_text, str):
        raise ValueError(f"cannot save this voice prompt: ref_text must be a str, got {type(ref_text).__name__}")
    if not item.icl_mode and ref_text is not None:
        try:
            check_ref_text(ref_text)
        except RequestError:
            ref_text = None
    tensors = {"ref_spk_embedding": item.ref_spk_embedding.detach().float().cpu().contiguous()}
    if item.ref_code is not None:
        tensors["ref_code"] = item.ref_code.detach().long().cpu().contiguous()
    meta = {"format": FORMAT_PREFIX + "1", "x_vector_only_mode": json.dumps(item.x_vector_only_mode),
            "icl_mode": json.dumps(item.icl_mode), "ref_text": json.dumps(ref_text)}
    taken = sorted(set(metadata) & set(meta))
    if taken:
        raise ValueError(f"cannot save this voice prompt: metadata {taken} would replace the file's own "
                         f"{', '.join(taken)}")
    meta.update((k, str(v)) for k, v in metadata.items())
    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=meta)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' own error type (a header past its size limit)
        raise ValueError(f"{path}: cannot write this voice prompt ({str(e)[:200]})") from None
    return path


def load_voice_prompt(path: str | Path) -> VoiceClonePromptItem:
    """Read a file written by `save_voice_prompt`. A file that is not one, or that lacks or garbles a part, raises
    ValueError naming the path and the part (FileNotFoundError when there is no file); what the tensors hold is
    judged against a model when a request uses the item (`generate.requests.check_voice_prompt`)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a file that is not one
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    with handle as f:
        meta = f.metadata() or {}
        if not meta.get("format", "").startswith(FORMAT_PREFIX):
            raise ValueError(f"{path}: not a voice prompt file (metadata 'format' is not {FORMAT_PREFIX}...)")
        names = set(f.keys())
        if "ref_spk_embedding" not in names:
            raise ValueError(f"{path}: the tensor ref_spk_embedding is missing")
        return VoiceClonePromptItem(
            ref_code=_tensor(f, "ref_code", path) if "ref_code" in names else None,
            ref_spk_embedding=_tensor(f, "ref_spk_embedding", path),
            x_vector_only_mode=_meta_value(meta, "x_vector_only_mode", (bool,), path),
            icl_mode=_meta_value(meta, "icl_mode", (bool,), path),
            ref_text=_meta_value(meta, "ref_text", (str, type(None)), path),
        )


def _tensor(f, name: str, path: str | Path) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except Exception as e:  # noqa: BLE001 - safetensors' own error type: a header that lies about the data
        raise ValueError(f"{path}: the tensor {name} cannot be read ({e})") from None


_NOT_JSON = object()


def _meta_value(meta: dict[str, str], key: str, kinds: tuple[type, ...], path: str | Path):
    """The JSON value of metadata `key`, of one of `kinds`; ValueError naming the path and the key otherwise."""
    if key not in meta:
        raise ValueError(f"{path}: metadata {key!r} is missing")
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = _NOT_JSON
    if not isinstance(value, kinds):
        want = " or ".join("null" if k is type(None) else "true/false" if k is bool else k.__name__ for k in kinds)
        raise ValueError(f"{path}: metadata {key!r} must be JSON {want}, got {shown(meta[key])}")
    return value
