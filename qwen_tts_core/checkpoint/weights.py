"""Checkpoint folders and safetensors weights: local folder or hub id in, named tensors out, checked by name and
shape. Safetensors only; nothing is ever unpickled."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: Any, name: str = "dtype") -> torch.dtype:
    """A torch dtype from a torch.dtype or a name (float32/fp32, bfloat16/bf16, float16/fp16); None -> float32.
    ("auto", the checkpoint's own, is `checkpoint_dtype`'s; here it gives float32.)
    `name`: the argument or config field the error names."""
    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"{name} must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[str(dtype)]


CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors*", "vocab.json", "merges.txt",
                    "tokenizer*.json", "*.txt", "preprocessor_config.json", "speech_tokenizer/*"]


def resolve_checkpoint(path_or_id: str | Path, revision: str | None = None,
                       cache_dir: str | None = None) -> Path:
    """A local checkpoint folder, or a hub id downloaded (or found in the local cache) with huggingface_hub."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise ValueError(f"pretrained_model_name_or_path: {str(p)!r} is not a Qwen3-TTS checkpoint folder "
                             "(expected config.json, model.safetensors, speech_tokenizer/)")
        return p
    repo = str(path_or_id)
    if repo.count("/") != 1 or repo.startswith(("/", ".", "~")):
        raise ValueError(f"pretrained_model_name_or_path: {repo!r} is neither an existing folder nor a hub id "
                         "like 'Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=CHECKPOINT_FILES))
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise ValueError(f"pretrained_model_name_or_path: could not fetch {repo!r} from the hub and it is not in "
                         f"the local cache ({type(e).__name__}: {e}). Download it on a connected machine "
                         "(huggingface-cli download ...) or pass a local folder.") from e


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """dtype="auto", as transformers reads it: config.json's `torch_dtype` (or `dtype`), else the dtype of the
    checkpoint's first floating-point tensor (the official checkpoints are bfloat16)."""
    raw = json.loads((folder / "config.json").read_text())
    for key in ("torch_dtype", "dtype"):
        if isinstance(raw, dict) and raw.get(key) not in (None, "auto"):
            return resolve_dtype(raw[key], f"config.json {key}")
    from safetensors import safe_open

    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                dt = st.get_slice(name).get_dtype()
                if dt in ("F32", "BF16", "F16"):
                    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dt]
    return torch.float32


def safetensors_files(folder: Path, stem: str = "model") -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / f"{stem}.safetensors"
    if not single.is_file():
        raise ValueError(f"{folder}: missing {stem}.safetensors (only safetensors weights are supported)")
    return [single]


def read_tensors(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose names start with `prefix`, with the prefix removed (memory-mapped, CPU)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable  # noqa: SIM118 (safe_open is not a mapping)
                if name.startswith(prefix):
                    out[name[len(prefix):]] = st.get_tensor(name)
    return out


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], what: str,
                device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """Load `tensors` into `module` (built on the meta device or not) by name, checking names and shapes first.
    Floating tensors are cast to `dtype`; the module ends on `device`."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{what}: checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise ValueError(f"{what}: tensor {k!r} has shape {tuple(tensors[k].shape)}, expected {tuple(shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensor(s), e.g. %s", what, len(unexpected), unexpected[:3])
    sd = {k: (tensors[k].to(device=device, dtype=dtype) if tensors[k].is_floating_point()
              else tensors[k].to(device)) for k in expected}
    module.load_state_dict(sd, strict=True, assign=True)
    return module
