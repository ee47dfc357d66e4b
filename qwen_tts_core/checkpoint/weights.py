"""Checkpoint folders and safetensors weights: local folder or hub id in, named tensors out, checked by name, shape,
kind and finiteness. Safetensors only; nothing is ever unpickled."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import read_capped

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


# The files a checkpoint is loaded from (hub download patterns; `digest.checkpoint_file` matches them with `*` not
# crossing "/"). `model-*-of-*.safetensors`: the shards a `model.safetensors.index.json` names.
CHECKPOINT_FILES = ["config.json", "generation_config.json", "model.safetensors*", "model-*-of-*.safetensors",
                    "vocab.json", "merges.txt", "tokenizer*.json", "added_tokens.json", "special_tokens_map.json",
                    "*.txt", "preprocessor_config.json",
                    "speech_tokenizer/*"]
SHARD_PATTERN = "{stem}-*-of-*.safetensors"


def resolve_checkpoint(path_or_id: str | Path, revision: str | None = None,
                       cache_dir: str | None = None, subfolder: str | None = None,
                       hub: dict[str, Any] | None = None) -> Path:
    """A local checkpoint folder, or a hub id downloaded (or found in the local cache) with huggingface_hub.
    subfolder: the checkpoint sits in this folder of the repo or folder; hub: huggingface_hub's `token`,
    `local_files_only`, `force_download` for the download."""
    if not str(path_or_id).strip():  # Path("") is the current folder
        raise ValueError("pretrained_model_name_or_path: empty; name a checkpoint folder or a hub id")
    if subfolder:
        sub = Path(subfolder)
        if sub.is_absolute() or ".." in sub.parts:
            raise ValueError(f"subfolder: {subfolder!r} must be a relative path inside the checkpoint")
    try:
        p = Path(path_or_id).expanduser()
    except RuntimeError:   # "~nosuchuser/...": no such home; the hub-id check below refuses the name
        p = Path(path_or_id)
    if p.exists() and subfolder:
        p = p / subfolder
        if not p.is_dir():
            raise ValueError(f"subfolder: {str(p)!r} is not a folder")
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
        patterns = [f"{subfolder.strip('/')}/{x}" for x in CHECKPOINT_FILES] if subfolder else CHECKPOINT_FILES
        root = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      **(hub or {})))
        return root / subfolder if subfolder else root
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise ValueError(f"pretrained_model_name_or_path: could not fetch {repo!r} from the hub and it is not in "
                         f"the local cache ({type(e).__name__}: {e}). Download it on a connected machine "
                         "(huggingface-cli download ...) or pass a local folder.") from e


MAX_JSON_BYTES = 64 << 20  # a checkpoint's JSON files: configs of a few KB, a tokenizer.json of ~11 MB


def read_json(path: Path, kind: type = dict) -> Any:
    """The parsed JSON file at `path`, which must hold a `kind` (object by default); a ValueError names the file
    (also for a file over MAX_JSON_BYTES, read by nobody, and for nesting too deep for the parser)."""
    try:
        raw = json.loads(read_capped(path, MAX_JSON_BYTES).decode())
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as e:  # JSONDecodeError, over-long ints: ValueError
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(raw, kind):
        raise ValueError(f"{path}: must hold a JSON {'object' if kind is dict else kind.__name__}, "
                         f"got {type(raw).__name__}")
    return raw


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """`safe_open` of `path` (CPU, memory-mapped); a damaged or truncated file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        st = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    with st:
        yield st


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """dtype="auto", as transformers reads it: config.json's `torch_dtype` (or `dtype`), else the dtype of the
    checkpoint's first floating-point tensor (the official checkpoints are bfloat16)."""
    raw = read_json(folder / "config.json")
    for key in ("torch_dtype", "dtype"):
        if raw.get(key) not in (None, "auto"):
            return resolve_dtype(raw[key], f"config.json {key}")
    for f in safetensors_files(folder):
        with open_safetensors(f) as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                dt = st.get_slice(name).get_dtype()
                if dt in ("F32", "BF16", "F16"):
                    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dt]
    return torch.float32


def safetensors_files(folder: Path, stem: str = "model") -> list[Path]:
    """The weight files of `folder`: `{stem}.safetensors`, or the shards its `{stem}.safetensors.index.json` names
    (plain `{stem}-*-of-*.safetensors` names in the folder). Both at once is refused: one of them is stale."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file() and single.is_file():
        raise ValueError(f"{folder}: holds both {single.name} and {index.name}; one of them is stale "
                         "(remove the one that is not the checkpoint's)")
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: needs a non-empty 'weight_map' object (tensor name -> shard file)")
        pattern = SHARD_PATTERN.format(stem=stem)
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or not fnmatch(shard, pattern):
                raise ValueError(f"{index}: weight_map[{name!r}] must be a shard file name like "
                                 f"{pattern!r} in the same folder, got {shard!r}")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{index}: names shard(s) {missing[:3]} that are not in {folder}")
        return [folder / n for n in names]
    if not single.is_file():
        raise ValueError(f"{folder}: missing {stem}.safetensors (only safetensors weights are supported)")
    return [single]


class Tensors(dict):
    """name -> tensor, with `origin[name]` = (file, full tensor name) for error messages."""

    def __init__(self) -> None:
        super().__init__()
        self.origin: dict[str, tuple[Path, str]] = {}


def read_tensors(files: list[Path], prefix: str) -> Tensors:
    """Tensors whose names start with `prefix`, with the prefix removed (memory-mapped, CPU). A tensor held by two
    files is an error."""
    out = Tensors()
    for f in files:
        with open_safetensors(f) as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not iterable
                if name.startswith(prefix):
                    key = name[len(prefix):]
                    if key in out:
                        raise ValueError(f"tensor {name!r} is in both {out.origin[key][0]} and {f}")
                    try:
                        out[key] = st.get_tensor(name)
                    except Exception as e:  # noqa: BLE001 - safetensors' own error types: name the file
                        raise ValueError(f"{f}: cannot read tensor {name!r} ({e})") from None
                    out.origin[key] = (f, name)
    return out


def _label(tensors: Any, key: str, what: str, prefix: str = "") -> str:
    origin = getattr(tensors, "origin", {}).get(key)
    return f"tensor {origin[1]!r} of {origin[0]}" if origin else f"{what} tensor {prefix + key!r}"


def check_kind(value: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    """`value` may replace `expected` (a module's own tensor): same shape, floating-point exactly when it is."""
    if tuple(value.shape) != tuple(expected.shape):
        raise ValueError(f"{label} has shape {tuple(value.shape)}, expected {tuple(expected.shape)}")
    if value.is_floating_point() != expected.is_floating_point():
        want = "a floating-point tensor" if expected.is_floating_point() else str(expected.dtype)
        raise ValueError(f"{label} has dtype {value.dtype}, expected {want}")


def check_finite(value: torch.Tensor, label: str) -> None:
    """A ValueError naming `label` when a floating tensor holds NaN or inf (one min/max pass over it, no copy:
    about 0.06-0.15 s per GB on one CPU core, far less on a GPU)."""
    if not value.is_floating_point() or value.numel() == 0 or value.is_meta:
        return
    lo, hi = torch.aminmax(value)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{label} has {bad} non-finite value(s) (NaN or inf)")


def check_state(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], what: str,
                prefix: str = "") -> None:
    """`tensors` has exactly the names of `expected` (a module's state_dict, on the meta device or not), each with
    its shape and kind (floating or not). Reads no tensor data: a module built on the meta device is checked before
    anything is allocated for it. `prefix`: the checkpoint's name prefix of these tensors, for error messages."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ValueError(f"{what}: checkpoint is missing tensor(s) {[prefix + k for k in missing[:5]]}"
                         f"{' ...' if len(missing) > 5 else ''} (does config.json match the weights?)")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{what}: checkpoint has {len(unexpected)} tensor(s) that config.json does not describe, "
                         f"e.g. {[prefix + k for k in unexpected[:5]]} (does config.json match the weights?)")
    for k, exp in expected.items():
        check_kind(tensors[k], exp, f"{what}: {_label(tensors, k, what, prefix)}")


def check_materialised(module: nn.Module, what: str) -> None:
    """No parameter or buffer of `module` is left on the meta device (a buffer a meta-built module computes in its
    constructor and does not keep in its state_dict must be rebuilt by its loader)."""
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: {left[:5]} left on the meta device after loading")


def load_module(module: nn.Module, tensors: dict[str, torch.Tensor], what: str,
                device: torch.device | str, dtype: torch.dtype, prefix: str = "") -> nn.Module:
    """Load `tensors` into `module` (built on the meta device or not) by name. Every tensor the module has must be
    there with its shape and kind (floating or not), and every tensor given must be one of the module's (never a
    partial load); floating tensors are cast to `dtype` and must be finite after the cast. The module ends on
    `device` (buffers outside its state_dict stay where they are: on the meta device, the caller builds them). A
    ValueError names the tensor (and its file, for `read_tensors` output; else `prefix` + its name)."""
    expected = module.state_dict()
    check_state(expected, tensors, what, prefix)
    sd = {}
    for k in expected:
        t = tensors[k]
        sd[k] = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)
        label = f"{what}: {_label(tensors, k, what, prefix)}"
        if t.is_floating_point() and t.dtype != dtype:
            try:
                check_finite(sd[k], label)
            except ValueError:
                check_finite(t, label)  # NaN/inf in the file: say so; else the cast overflowed
                raise ValueError(f"{label} overflows {dtype} (values beyond its range)") from None
        else:
            check_finite(sd[k], label)
    module.load_state_dict(sd, strict=True, assign=True)
    return module
