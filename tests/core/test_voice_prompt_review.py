"""What a voice-clone prompt brings in, under attack (review of this stop): every refusal is a RequestError naming
the argument, never an error deep in a step or garbage out.

- A float64 speaker vector of 1e300 passed the finite check and became inf in the model's dtype: NaN logits at every
  step, codes garbage, no error.
- ref_code stored as uint16/32/64 (valid safetensors dtypes) raised NotImplementedError from min/max in the range
  check; a float8_e4m3fn speaker vector the same from isfinite; meta tensors a RuntimeError from .item().
- x_vector_only_mode given as an array or a tensor raised a raw "truth value is ambiguous"; an x-vector item with a
  bytes or megabyte ref_text (kept, as the official keeps it) failed save_voice_prompt with a raw TypeError /
  SafetensorError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_tts_core import VoiceClonePromptItem
from qwen_tts_core.errors import RequestError
from qwen_tts_core.generate.engine import Engine
from qwen_tts_core.generate.requests import MAX_REF_TEXT_CHARS
from qwen_tts_core.types import SamplingParams, SynthesisRequest
from qwen_tts_core.voice_prompt import load_voice_prompt, save_voice_prompt

GREEDY = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=3)


def _item(model, spk=None, codes=None, icl=True) -> VoiceClonePromptItem:
    t = model.cfg.talker
    g = torch.Generator().manual_seed(0)
    if spk is None:
        spk = torch.randn(t.hidden_size, generator=g)
    if codes is None and icl:
        codes = torch.randint(0, t.codebook_size, (6, t.num_code_groups), generator=g)
    return VoiceClonePromptItem(ref_code=codes, ref_spk_embedding=spk, x_vector_only_mode=not icl, icl_mode=icl,
                                ref_text="A reference sentence." if icl else None)


def _add(model, item):
    return Engine(model, max_sessions=1).add(SynthesisRequest(kind="voice_clone", text="Hello.", language="english",
                                                              voice_clone_prompt=item, sampling=GREEDY,
                                                              decode_audio=False))


def test_a_speaker_vector_finite_in_float64_but_not_in_the_models_dtype_is_refused(base):
    spk = torch.full((base.cfg.talker.hidden_size,), 1e300, dtype=torch.float64)
    with pytest.raises(RequestError, match="NaN or infinite") as e:
        _add(base, _item(base, spk=spk))
    assert e.value.field == "voice_clone_prompt"
    _add(base, _item(base, spk=torch.ones(base.cfg.talker.hidden_size, dtype=torch.float64)))  # fits: accepted


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.int32, torch.complex64])
def test_a_speaker_vector_of_another_dtype_is_refused_naming_the_prompt(base, dtype):
    spk = torch.zeros(base.cfg.talker.hidden_size).to(dtype)
    with pytest.raises(RequestError, match="ref_spk_embedding") as e:
        _add(base, _item(base, spk=spk))
    assert e.value.field == "voice_clone_prompt"


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_ref_code_of_wide_unsigned_dtypes_is_checked_not_crashed(base, dtype):
    t = base.cfg.talker
    good = torch.randint(0, t.codebook_size, (6, t.num_code_groups)).to(dtype)
    _add(base, _item(base, codes=good))  # in range: accepted (the engine takes them as int64)
    bad = good.clone()
    bad[0, 0] = t.codebook_size  # past the codebook
    with pytest.raises(RequestError, match="ref_code") as e:
        _add(base, _item(base, codes=bad))
    assert e.value.field == "voice_clone_prompt"
    if dtype != torch.uint64:
        return
    huge = good.numpy().astype(np.uint64)
    huge[0, 0] = 2**63 + 5  # past int64's range: negative once compared as int64, and refused
    bad = torch.from_numpy(huge)
    with pytest.raises(RequestError, match="ref_code") as e:
        _add(base, _item(base, codes=bad))
    assert e.value.field == "voice_clone_prompt"


@pytest.mark.parametrize("which", ["spk", "codes"])
def test_meta_tensors_are_refused_naming_the_prompt(base, which):
    t = base.cfg.talker
    item = _item(base, spk=torch.empty(t.hidden_size, device="meta")) if which == "spk" else \
        _item(base, codes=torch.empty(6, t.num_code_groups, dtype=torch.long, device="meta"))
    with pytest.raises(RequestError, match="meta") as e:
        _add(base, item)
    assert e.value.field == "voice_clone_prompt"


@pytest.mark.parametrize("which", ["spk", "codes"])
def test_sparse_tensors_are_refused_naming_the_prompt(base, which):
    """Second review: sparse tensors still raised NotImplementedError from isfinite / min."""
    t = base.cfg.talker
    item = _item(base, spk=torch.ones(t.hidden_size).to_sparse()) if which == "spk" else \
        _item(base, codes=torch.ones(6, t.num_code_groups, dtype=torch.long).to_sparse())
    with pytest.raises(RequestError, match="dense") as e:
        _add(base, item)
    assert e.value.field == "voice_clone_prompt"


@pytest.mark.parametrize("mode", [np.array([True, False]), torch.tensor([True]), "False", 2, 0.5])
def test_x_vector_only_mode_must_be_a_bool(base, ref_wav_path, mode):
    with pytest.raises(RequestError, match="x_vector_only_mode") as e:
        base.create_voice_clone_prompt(str(ref_wav_path), ref_text="A reference sentence.", x_vector_only_mode=mode)
    assert e.value.field == "x_vector_only_mode"


def test_numpy_bools_and_0_1_are_modes(base, ref_wav_path):
    (item,) = base.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=np.bool_(True))
    assert item.x_vector_only_mode is True and item.ref_code is None
    for falsy in (0, None):  # None: False, as the official's `if x_vector_only_mode` reads it
        (item,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Words.", x_vector_only_mode=falsy)
        assert item.icl_mode is True and item.x_vector_only_mode is False


@pytest.mark.parametrize("text", [b"bytes text", "x" * (MAX_REF_TEXT_CHARS + 1), "\ud800"])
def test_an_x_vector_prompt_saves_without_a_transcript_it_cannot_store(base, ref_wav_path, tmp_path, text):
    (item,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text=text, x_vector_only_mode=True)
    assert item.ref_text == text  # kept on the item, as the official keeps it (never spoken)
    loaded = load_voice_prompt(save_voice_prompt(item, tmp_path / "v.safetensors"))
    assert loaded.x_vector_only_mode and loaded.ref_text is None
    (item,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Kept as given.", x_vector_only_mode=True)
    assert load_voice_prompt(save_voice_prompt(item, tmp_path / "w.safetensors")).ref_text == "Kept as given."


def test_an_icl_prompt_with_a_bad_transcript_is_not_saved(base, tmp_path):
    item = _item(base)
    item.ref_text = b"bytes"
    with pytest.raises(ValueError, match="ref_text"):
        save_voice_prompt(item, tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()
    item.ref_text = "word " * 21_000_000   # past safetensors' 100 MB header: a ValueError naming the file, not raw
    with pytest.raises(ValueError, match="cannot write this voice prompt"):
        save_voice_prompt(item, tmp_path / "w.safetensors")
    item.ref_text = "word " * 1000   # past the core's limit but storable: judged where the voice is used
    assert load_voice_prompt(save_voice_prompt(item, tmp_path / "x.safetensors")).ref_text == item.ref_text


@pytest.mark.parametrize("key", ["format", "icl_mode", "x_vector_only_mode", "ref_text"])
def test_a_callers_metadata_cannot_replace_the_files_own_keys(tmp_path, key):
    """A store's metadata (name, owner, ...) sits beside the file's own keys; one named like them is refused, never
    written over them (it would turn an ICL voice into an x-vector one, or the file into no voice prompt)."""
    item = VoiceClonePromptItem(torch.zeros(3, 16, dtype=torch.long), torch.ones(8), False, True, "Words.")
    with pytest.raises(ValueError, match=f"metadata \\['{key}'\\] would replace"):
        save_voice_prompt(item, tmp_path / "v.safetensors", **{key: "false"})
    assert not (tmp_path / "v.safetensors").exists()
    back = load_voice_prompt(save_voice_prompt(item, tmp_path / "v.safetensors", name="icl", owner="k1"))
    assert back.icl_mode and back.ref_text == "Words."


def test_a_transcript_stored_as_plain_text_not_json_is_refused_naming_it(tmp_path):
    """Every value a voice prompt file holds for itself is JSON (as save_voice_prompt writes it); a bare string is a
    file not written by it, refused naming the key, not read as the transcript."""
    from safetensors.torch import save_file

    from qwen_tts_core.voice_prompt import FORMAT_PREFIX

    path = tmp_path / "v.safetensors"
    meta = {"format": FORMAT_PREFIX + "1", "x_vector_only_mode": "false", "icl_mode": "true"}
    tensors = {"ref_spk_embedding": torch.ones(8), "ref_code": torch.zeros(3, 16, dtype=torch.long)}
    save_file(tensors, str(path), metadata={**meta, "ref_text": '"Words."'})
    assert load_voice_prompt(path).ref_text == "Words."
    save_file(tensors, str(path), metadata={**meta, "ref_text": "Words."})
    with pytest.raises(ValueError, match="metadata 'ref_text' must be JSON str or null, got 'Words.'"):
        load_voice_prompt(path)
