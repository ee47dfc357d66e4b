"""Checkpoint weights pinned by a mutation review (qwen_tts_core/checkpoint/weights.py): each test here failed on a
one-line change (a "mutant") that the rest of the suite let pass, named in its docstring. dtype names and aliases,
what is a local folder and what a hub id (and what is asked of the hub), the shard index, the JSON reader, the
dtype "auto" reads, and the per-tensor checks (name, shape, kind, finiteness). Tiny safetensors files in tmp_path,
tiny modules, no model, no network."""

from __future__ import annotations

import json
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import qwen_tts_core.checkpoint.weights as weights
from qwen_tts_core.checkpoint.weights import (
    CHECKPOINT_FILES,
    check_finite,
    check_kind,
    check_materialised,
    check_state,
    checkpoint_dtype,
    load_module,
    read_json,
    read_tensors,
    resolve_checkpoint,
    resolve_dtype,
    safetensors_files,
)
from tests.core.test_checkpoint_safety import address_space_headroom


def _folder(tmp_path: Path, config: dict | None = None, **files: dict[str, torch.Tensor]) -> Path:
    """A folder with a config.json and `name.safetensors` files (keyword: stem with '.' as '_')."""
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config or {}))
    for stem, tensors in files.items():
        save_file(tensors, str(d / f"{stem.replace('_', '-')}.safetensors"))
    return d


class _Tiny(nn.Module):
    """One float parameter (2, 3) and one integer buffer (3,)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3))
        self.register_buffer("ids", torch.arange(3))


def _good() -> dict[str, torch.Tensor]:
    return {"w": torch.ones(2, 3), "ids": torch.arange(3)}


# --- dtype names ---------------------------------------------------------------------------------------------------
def test_dtype_aliases_and_defaults():
    """Each alias names its own dtype; None and "auto" give float32 (mutants: bf16 -> float16, fp16 -> bfloat16,
    "auto" no longer float32, None -> bfloat16)."""
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(None) is torch.float32 and resolve_dtype("auto") is torch.float32
    assert resolve_dtype(torch.bfloat16) is torch.bfloat16


@pytest.mark.parametrize("bad", [torch.float64, torch.int64, torch.bool])
def test_a_torch_dtype_outside_the_three_is_refused_naming_the_argument(bad):
    """A float64/int/bool torch.dtype is a ValueError naming the caller's field (mutants: the check dropped; the
    message says "dtype" whatever `name` is)."""
    with pytest.raises(ValueError, match=r"^models\.cv\.dtype must be float32, bfloat16 or float16"):
        resolve_dtype(bad, "models.cv.dtype")


@pytest.mark.parametrize("bad", ["float64", "BF16", "torch.float32", "int8"])
def test_an_unknown_dtype_name_is_a_value_error_naming_the_argument(bad):
    """An unknown name is a ValueError (not the dict's KeyError) naming the caller's field (mutants: the membership
    check dropped; the message says "dtype")."""
    with pytest.raises(ValueError, match=r"^config\.json torch_dtype must be one of \["):
        resolve_dtype(bad, "config.json torch_dtype")


# --- folder or hub id ----------------------------------------------------------------------------------------------
def test_a_folder_without_config_json_is_not_a_checkpoint(tmp_path):
    """An existing folder with no config.json is refused at once (mutant: only `is_dir` checked)."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a Qwen3-TTS checkpoint folder"):
        resolve_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("sub", ["/etc", "a/../../b"])
def test_a_subfolder_outside_the_checkpoint_is_refused(tmp_path, sub):
    """An absolute subfolder or one with '..' is refused before anything is looked up (mutants: either half of the
    check dropped)."""
    ck = _folder(tmp_path)
    with pytest.raises(ValueError, match="subfolder: .* must be a relative path inside the checkpoint"):
        resolve_checkpoint(ck, subfolder=sub)


def test_a_missing_local_subfolder_names_it_and_never_reaches_the_hub(tmp_path, monkeypatch):
    """subfolder that a local folder lacks: 'is not a folder', no download (mutant: the check dropped; the path
    then is not a folder and the error became "neither a folder nor a hub id")."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub reached"))
    ck = _folder(tmp_path)
    with pytest.raises(ValueError, match=r"^subfolder: .*missing.* is not a folder"):
        resolve_checkpoint(ck, subfolder="missing")


@pytest.mark.parametrize("name", ["Org/Repo/extra", "Repo", ".hidden/repo", "~/qtts-no-such-repo", "/abs/path",
                                  "~qtts-no-such-user/repo"])
def test_only_owner_slash_name_goes_to_the_hub(name, monkeypatch):
    """A name that is not an existing folder goes to the hub only as "owner/name" (one '/', not starting with '/',
    '.' or '~': a mistyped path is not sent to the hub); mutants: any '/' count, a leading '.' or '~' taken. The
    home of a user who does not exist is that same ValueError (it was pathlib's RuntimeError, "Could not determine
    home directory")."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("hub reached"))
    with pytest.raises(ValueError, match="is neither an existing folder nor a hub id"):
        resolve_checkpoint(name)


def test_a_hub_download_asks_for_the_checkpoint_files_only(tmp_path, monkeypatch):
    """The hub is asked for the listed patterns (under the subfolder when one is given) and the result is the
    subfolder of the snapshot (mutants: no allow_patterns, the patterns not prefixed, the subfolder dropped)."""
    import huggingface_hub

    seen = []

    def download(repo, **kw):
        seen.append((repo, kw))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert resolve_checkpoint("Org/Repo", revision="r1") == tmp_path
    assert resolve_checkpoint("Org/Repo", subfolder="cv/") == tmp_path / "cv/"
    (repo, kw), (_, kw_sub) = seen
    assert repo == "Org/Repo" and kw["revision"] == "r1" and kw["allow_patterns"] == CHECKPOINT_FILES
    assert kw_sub["allow_patterns"] == [f"cv/{p}" for p in CHECKPOINT_FILES]


def test_no_download_pattern_takes_a_pickle():
    """Weights are safetensors only: no pattern the hub is asked for matches a pickled checkpoint file at the
    checkpoint's top level (mutant: "*.bin" added to CHECKPOINT_FILES)."""
    for name in ("pytorch_model.bin", "model.bin", "model.pt", "model.pth", "model.ckpt", "model.pkl",
                 "pytorch_model-00001-of-00002.bin", "training_args.bin"):
        assert not any(fnmatch(name, p) and "/" not in p for p in CHECKPOINT_FILES), name


def test_a_hub_failure_is_one_value_error_naming_the_repo(monkeypatch):
    """Any error of the download (offline, unknown repo, auth) is a ValueError naming the repo and the cause
    (mutant: only ImportError wrapped)."""
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("no route")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match=r"could not fetch 'Org/Repo' .*ConnectionError: no route"):
        resolve_checkpoint("Org/Repo")


# --- JSON ----------------------------------------------------------------------------------------------------------
def test_json_size_cap_is_exact(tmp_path, monkeypatch):
    """A file of exactly MAX_JSON_BYTES is read, one byte more is refused (mutant: the cap lifted)."""
    monkeypatch.setattr(weights, "MAX_JSON_BYTES", 100)
    f = tmp_path / "c.json"
    f.write_text("{}" + " " * 98)
    assert read_json(f) == {}
    f.write_text("{}" + " " * 99)
    with pytest.raises(ValueError, match="larger than 100 bytes"):
        read_json(f)


def test_json_that_is_not_utf8_names_the_file(tmp_path):
    """Bytes that do not decode are a ValueError naming the file (mutant: UnicodeDecodeError not caught; it is a
    ValueError subclass, so the name of the error is what tells)."""
    f = tmp_path / "c.json"
    f.write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ValueError, match=r"c\.json: not a readable JSON file \(UnicodeDecodeError"):
        read_json(f)


def test_json_of_the_wrong_kind_is_refused_naming_the_file(tmp_path):
    """A list where an object is wanted (and the reverse) is a ValueError naming the file (mutant: kind unchecked)."""
    f = tmp_path / "c.json"
    f.write_text("[1]")
    with pytest.raises(ValueError, match=r"c\.json: must hold a JSON object, got list"):
        read_json(f)
    assert read_json(f, list) == [1]
    f.write_text("{}")
    with pytest.raises(ValueError, match="must hold a JSON list, got dict"):
        read_json(f, list)


# --- dtype "auto" --------------------------------------------------------------------------------------------------
def test_auto_dtype_reads_config_keys_then_the_first_floating_tensor(tmp_path):
    """config.json `dtype` counts as `torch_dtype` does; "auto" there means the weights'; an integer tensor first in
    the file does not decide (mutants: the `dtype` key ignored; "auto" passed to resolve_dtype (float32); the first
    tensor of any kind decides)."""
    ck = _folder(tmp_path, {"dtype": "float16"}, model={"w": torch.zeros(1, dtype=torch.bfloat16)})
    assert checkpoint_dtype(ck) is torch.float16
    (ck / "config.json").write_text(json.dumps({"torch_dtype": "auto"}))
    assert checkpoint_dtype(ck) is torch.bfloat16
    save_file({"a_ids": torch.arange(2), "b": torch.zeros(1, dtype=torch.float16)}, str(ck / "model.safetensors"))
    (ck / "config.json").write_text("{}")
    assert checkpoint_dtype(ck) is torch.float16


# --- shard index -----------------------------------------------------------------------------------------------------
def _sharded(tmp_path: Path, weight_map) -> Path:
    ck = _folder(tmp_path, model_00001_of_00001={"w": torch.ones(1)})
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ck


def test_the_index_names_its_shards(tmp_path):
    """A good index gives its shard files (control for the refusals below)."""
    ck = _sharded(tmp_path, {"w": "model-00001-of-00001.safetensors"})
    assert safetensors_files(ck) == [ck / "model-00001-of-00001.safetensors"]


@pytest.mark.parametrize("weight_map,match", [
    ({}, "needs a non-empty 'weight_map'"),
    ({"w": "model-1\\..\\x-of-1.safetensors"}, r"weight_map\['w'\] must be a shard file name"),
    ({"w": "model-1/../x-of-1.safetensors"}, r"weight_map\['w'\] must be a shard file name"),
    ({"w": "model.bin"}, r"weight_map\['w'\] must be a shard file name"),
    ({"w": "model-00001-of-00002.safetensors"}, r"names shard\(s\) \['model-00001-of-00002.safetensors'\] that are "),
])
def test_a_bad_index_is_refused(tmp_path, weight_map, match):
    """An empty weight_map, a shard name with '\\' or '/' (that the pattern's '*' would take), one not like
    model-*-of-*.safetensors, a shard that is not there: refused naming the index (mutants: each of these checks
    dropped; without the '/' and '\\' checks the error was the later "names shard(s) ... not in")."""
    ck = _sharded(tmp_path, weight_map)
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: " + match):
        safetensors_files(ck)


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    """The same tensor in two files is an error naming both (mutant: the later file's silently won)."""
    ck = _folder(tmp_path, model_00001_of_00002={"w": torch.ones(1)}, model_00002_of_00002={"w": torch.zeros(1)})
    files = [ck / "model-00001-of-00002.safetensors", ck / "model-00002-of-00002.safetensors"]
    with pytest.raises(ValueError, match=r"tensor 'w' is in both .*00001-of-00002.* and .*00002-of-00002"):
        read_tensors(files, "")


def test_a_damaged_file_is_a_value_error_naming_it(tmp_path):
    """A file that is no safetensors (a header length beyond the file) is a ValueError naming it, not safetensors'
    own error type (mutant: only OSError wrapped)."""
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        read_tensors([f], "")


# --- per-tensor checks -----------------------------------------------------------------------------------------------
def test_a_transposed_tensor_is_refused():
    """Same number of elements, other shape: refused (mutant: numel compared instead of shape)."""
    with pytest.raises(ValueError, match=r"has shape \(3, 2\), expected \(2, 3\)"):
        check_kind(torch.zeros(3, 2), torch.zeros(2, 3), "x")


def test_a_float_tensor_where_an_integer_one_belongs_is_refused():
    """Floating exactly when the module's is: a float tensor for an integer buffer is refused (mutant: only the
    other direction checked)."""
    with pytest.raises(ValueError, match=r"x has dtype torch.float32, expected torch.int64"):
        check_kind(torch.zeros(3), torch.arange(3), "x")


@pytest.mark.parametrize("value", [torch.tensor([float("nan")]), torch.tensor([float("-inf"), 1.0]),
                                   torch.tensor([[-1.0, float("-inf")]])])
def test_non_finite_values_are_found_wherever_they_are(value):
    """One NaN in a one-element tensor, a -inf beside finite values: refused (mutants: one-element tensors skipped;
    only the maximum looked at)."""
    with pytest.raises(ValueError, match=r"^lbl has 1 non-finite value\(s\)"):
        check_finite(value, "lbl")


def test_an_unexpected_tensor_is_refused_naming_it():
    """A tensor the module does not have is refused, with the prefix (mutant: extras accepted)."""
    got = {**_good(), "extra": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"blk: checkpoint has 1 tensor\(s\) .* e\.g\. \['p\.extra'\]"):
        check_state(_Tiny().state_dict(), got, "blk", "p.")


def test_load_module_checks_finiteness_in_both_paths(tmp_path):
    """A NaN is refused when no cast is needed, and named NaN (not an overflow) when one is; a value beyond float16
    is an overflow naming the file's tensor (mutants: the same-dtype check dropped; the cast path's check dropped;
    the file's own NaN reported as an overflow; the label without the file)."""
    bad = _good()
    bad["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blk tensor 'p\.w' has 1 non-finite"):
        load_module(_Tiny(), bad, "blk", "cpu", torch.float32, "p.")
    with pytest.raises(ValueError, match=r"blk tensor 'p\.w' has 1 non-finite"):
        load_module(_Tiny(), bad, "blk", "cpu", torch.float16, "p.")
    big = _good()
    big["w"][1, 2] = 1e6
    save_file(big, str(tmp_path / "model.safetensors"))
    tensors = read_tensors([tmp_path / "model.safetensors"], "")
    with pytest.raises(ValueError, match=r"blk: tensor 'w' of .*model\.safetensors overflows torch\.float16"):
        load_module(_Tiny(), tensors, "blk", "cpu", torch.float16)
    m = load_module(_Tiny(), tensors, "blk", "cpu", torch.float32)
    assert m.w.dtype is torch.float32 and m.ids.dtype is torch.int64


def test_a_buffer_left_on_meta_is_found():
    """A buffer outside the state_dict left on the meta device is an error (mutant: only parameters looked at)."""
    with torch.device("meta"):
        m = nn.Linear(2, 2)
    m.load_state_dict({"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}, assign=True)
    m.register_buffer("table", torch.zeros(4, device="meta"), persistent=False)
    with pytest.raises(RuntimeError, match=r"blk: \['table'\] left on the meta device"):
        check_materialised(m, "blk")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_a_config_json_that_is_a_device_is_refused_not_read_without_bound(tmp_path):
    """config.json linked to /dev/zero: its st_size is 0, so the size cap let it through and it was read until memory
    ran out (here, under an address-space limit, a MemoryError instead of a ValueError naming the file; a FIFO
    blocked for ever). Only a regular file is read, and at most one byte past the cap."""
    f = tmp_path / "config.json"
    f.symlink_to("/dev/zero")
    with address_space_headroom(256 << 20), pytest.raises(ValueError, match=r"config\.json: not a readable JSON"):
        read_json(f)
