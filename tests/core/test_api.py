"""The drop-in API surface: loading, supported names, defaults, and clear errors for bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_core import Qwen3TTSModel, load_voice_prompt, save_voice_prompt
from qwen_tts_core.config import TTSConfig, make_config
from qwen_tts_core.text.tokenizer import TextTokenizer, assistant_text

G = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)


def test_supported_speakers_and_languages(cv, model_factory):
    assert cv.get_supported_speakers() == sorted(["aiden", "dylan", "eric", "ono_anna", "ryan", "serena", "sohee",
                                                  "uncle_fu", "vivian"])
    langs = cv.get_supported_languages()
    assert langs[0] == "auto" and "english" in langs and not any("dialect" in x for x in langs)
    assert model_factory("voice_design", "tiny").get_supported_speakers() == []  # as the reference


def test_config_round_trip(checkpoint_factory):
    raw = json.loads((checkpoint_factory("custom_voice", "tiny") / "config.json").read_text())
    cfg = TTSConfig.from_dict(raw)
    assert cfg == TTSConfig.from_dict(cfg.to_json_dict())
    assert cfg.talker.spk_id["vivian"] == 3065 and cfg.talker.codec_eos_token_id == 2150


def test_tokenizer_layout(checkpoint_factory):
    tok = TextTokenizer(checkpoint_factory("custom_voice", "tiny"))
    ids = tok.encode(assistant_text("Hello world."))
    assert ids[:3] == tok.target("x").role and ids[0] == 151644
    assert ids[-5:] == [151645, 198, 151644, ids[1], 198]


def test_generate_returns_float32_list_at_24k(cv):
    wavs, sr = cv.generate_custom_voice(["Hi there.", "Good morning!"], speaker="Ryan", language="English", **G)
    assert sr == 24000 and len(wavs) == 2
    assert all(w.dtype == np.float32 and w.ndim == 1 and len(w) == 5 * 1920 for w in wavs)


def test_defaults_come_from_generation_config(cv):
    sp = cv.sampling_params()
    assert sp.max_new_tokens == 8192 and sp.top_k == 50 and sp.repetition_penalty == 1.05
    assert cv.sampling_params(top_k=7).top_k == 7


@pytest.mark.parametrize("call,match", [
    (lambda m: m.generate_custom_voice("Hi", speaker="nobody"), "speaker"),
    (lambda m: m.generate_custom_voice("Hi", speaker="ryan", language="klingon"), "language"),
    (lambda m: m.generate_custom_voice("", speaker="ryan"), "text"),
    (lambda m: m.generate_custom_voice(["a", "b"], speaker=["ryan", "eric", "vivian"]), "speaker"),
    (lambda m: m.generate_custom_voice("Hi", speaker="ryan", bogus_arg=1), "bogus_arg"),
    (lambda m: m.generate_custom_voice("Hi", speaker="ryan", temperature=0), "temperature"),
    (lambda m: m.generate_custom_voice("Hi", speaker="ryan", top_p=1.5), "top_p"),
    (lambda m: m.generate_voice_design("Hi", instruct="calm"), "voice_design"),
    (lambda m: m.generate_voice_clone("Hi", ref_audio="x.wav"), "Base"),
    (lambda m: m.create_voice_clone_prompt("x.wav"), "Base"),
], ids=["speaker", "language", "empty-text", "batch-mismatch", "unknown-kwarg", "temperature", "top_p",
        "design-on-cv", "clone-on-cv", "prompt-on-cv"])
def test_bad_input_raises_value_error_naming_it(cv, call, match):
    with pytest.raises(ValueError, match=match):
        call(cv)


def test_voice_clone_errors(model_factory, ref_wav_path, tmp_path):
    base = model_factory("base", "tiny")
    with pytest.raises(ValueError, match="ref_text"):
        base.create_voice_clone_prompt(str(ref_wav_path))
    for bad in ("\x00\x00", "\u200b", 123):  # nothing visible (was stored as a voice's transcript), not text
        with pytest.raises(ValueError, match="ref_text"):
            base.create_voice_clone_prompt(str(ref_wav_path), ref_text=bad)
    with pytest.raises(ValueError, match="ref_audio"):
        base.generate_voice_clone("Hi")
    silent = tmp_path / "silent.wav"
    import soundfile as sf

    sf.write(silent, np.zeros(24000, np.float32), 24000)
    with pytest.raises(ValueError, match="ref_audio"):
        base.create_voice_clone_prompt(str(silent), ref_text="hello")
    with pytest.raises(ValueError, match="ref_audio"):
        base.create_voice_clone_prompt(str(tmp_path / "missing.wav"), ref_text="hello")


def test_voice_prompt_round_trip_and_reuse(model_factory, ref_wav_path, tmp_path):
    base = model_factory("base", "tiny")
    wav, sr = __import__("soundfile").read(ref_wav_path, dtype="float32")
    (item,) = base.create_voice_clone_prompt((wav, sr), ref_text="Good morning, how are you today?")
    n24 = math.ceil(len(wav) * 24000 / sr)
    assert item.icl_mode and tuple(item.ref_code.shape) == (math.ceil(n24 / 1920), 16)
    path = save_voice_prompt(item, tmp_path / "v.safetensors", name="test")
    back = load_voice_prompt(path)
    assert torch.equal(back.ref_code, item.ref_code) and back.ref_text == item.ref_text
    a, _ = base.generate_voice_clone("Hello.", voice_clone_prompt=[item], **G)
    b, _ = base.generate_voice_clone("Hello.", voice_clone_prompt=back, **G)
    assert np.array_equal(a[0], b[0])
    (x,) = base.create_voice_clone_prompt((wav, sr), x_vector_only_mode=True)
    assert x.ref_code is None and x.x_vector_only_mode and not x.icl_mode


def test_voice_prompts_that_do_not_fit_the_model_are_refused_naming_them(model_factory, ref_wav_path, tmp_path):
    """A prompt from another model size (a voice store shared by 0.6B and 1.7B replicas), a damaged file or a
    hand-made item is refused before any work, with a RequestError naming voice_clone_prompt: out-of-range codes are
    a device-side assert on a GPU (every session of the replica ends), NaN speaker vectors gave noise silently. A
    good prompt saved and loaded still works."""
    from dataclasses import replace

    from qwen_tts_core import Engine, SamplingParams, SynthesisRequest
    from qwen_tts_core.errors import RequestError

    base = model_factory("base", "tiny")
    wav, sr = __import__("soundfile").read(ref_wav_path, dtype="float32")
    (item,) = base.create_voice_clone_prompt((wav, sr), ref_text="Good morning, how are you today?")
    width = base.cfg.talker.hidden_size
    codes = item.ref_code
    bad = {
        "another model's width": replace(item, ref_spk_embedding=torch.randn(2 * width)),
        "a [2, D/2] vector": replace(item, ref_spk_embedding=item.ref_spk_embedding.reshape(2, -1)),
        "NaN": replace(item, ref_spk_embedding=torch.full((width,), float("nan"))),
        "inf": replace(item, ref_spk_embedding=item.ref_spk_embedding.clone().index_fill_(0, torch.tensor([3]),
                                                                                          float("inf"))),
        "integer vector": replace(item, ref_spk_embedding=torch.zeros(width, dtype=torch.long)),
        "code too large": replace(item, ref_code=codes.clone().index_fill_(0, torch.tensor([1]), 2048)),
        "negative code": replace(item, ref_code=codes.clone().index_fill_(0, torch.tensor([0]), -1)),
        "8 codebooks": replace(item, ref_code=codes[:, :8]),
        "float codes": replace(item, ref_code=codes.float()),
        "flag not a bool": replace(item, icl_mode="yes"),
        "ICL without its transcript": replace(item, ref_text="  "),
        "ICL transcript not text": replace(item, ref_text=None),
        "ICL without codes": replace(item, ref_code=None),      # ran as x-vector-only, its ref_text unused
        "ICL with 0 frames": replace(item, ref_code=codes[:0]),
        "both modes": replace(item, x_vector_only_mode=True),
        "neither mode": replace(item, icl_mode=False),            # no speaker vector at all
    }
    sp = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=4)
    eng = Engine(base, max_sessions=1)
    for name, vp in bad.items():
        req = SynthesisRequest(kind="voice_clone", text="Hello.", language="english", sampling=sp,
                               voice_clone_prompt=vp)
        with pytest.raises(RequestError) as err:
            eng.add(req)
        assert err.value.field == "voice_clone_prompt", name
        with pytest.raises(ValueError, match="voice_clone_prompt"):
            base.generate_voice_clone("Hello.", voice_clone_prompt=vp, **G)
    assert eng.num_queued == 0 and eng.num_active == 0          # nothing was queued or held
    back = load_voice_prompt(save_voice_prompt(item, tmp_path / "ok.safetensors"))
    a, _ = base.generate_voice_clone("Hello.", voice_clone_prompt=back, **G)
    assert len(a[0]) > 0
    # a [1, D] speaker vector is the same vector (it worked before the check, so it keeps working)
    row = replace(back, ref_spk_embedding=back.ref_spk_embedding[None])
    b, _ = base.generate_voice_clone("Hello.", voice_clone_prompt=row, **G)
    assert np.array_equal(a[0], b[0])


def test_damaged_voice_prompt_files_raise_value_errors_naming_the_part(tmp_path):
    """A voice prompt file is read from a store or a path users name: whatever is wrong with it is a ValueError
    naming the file and the part (a KeyError from it meant "not a stored voice" to the service and the jobs)."""
    import json

    from safetensors.torch import save_file

    spk, code = torch.randn(64), torch.zeros(3, 16, dtype=torch.long)
    meta = {"format": "qwen-tts-fleet/voice-prompt/1", "x_vector_only_mode": "false", "icl_mode": "true",
            "ref_text": json.dumps("Hello.")}
    files = {
        "metadata 'icl_mode' is missing": ({"ref_spk_embedding": spk}, {k: v for k, v in meta.items()
                                                                        if k != "icl_mode"}),
        "'icl_mode' must be JSON true/false": ({"ref_spk_embedding": spk}, {**meta, "icl_mode": "yes"}),
        "'x_vector_only_mode' must be JSON true/false": ({"ref_spk_embedding": spk},
                                                          {**meta, "x_vector_only_mode": "1"}),
        "'ref_text' must be JSON str or null": ({"ref_spk_embedding": spk}, {**meta, "ref_text": "[1]"}),
        "ref_spk_embedding is missing": ({"ref_code": code}, meta),
        "not a voice prompt file": ({"ref_spk_embedding": spk}, {**meta, "format": "other"}),
    }
    for i, (want, (tensors, m)) in enumerate(files.items()):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata=m)
        with pytest.raises(ValueError, match=want) as err:
            load_voice_prompt(path)
        assert str(path) in str(err.value)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"hello, not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_voice_prompt(garbage)
    good = tmp_path / "good.safetensors"
    save_file({"ref_spk_embedding": spk, "ref_code": code}, str(good), metadata=meta)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-8])                       # a header that promises more than the file has
    with pytest.raises(ValueError, match="cut.safetensors"):
        load_voice_prompt(cut)
    with pytest.raises(FileNotFoundError):
        load_voice_prompt(tmp_path / "missing.safetensors")
    back = load_voice_prompt(good)
    assert back.icl_mode and not back.x_vector_only_mode and back.ref_text == "Hello." and torch.equal(back.ref_code,
                                                                                                        code)


def test_a_stored_voice_that_cannot_be_read_is_a_request_error_naming_voice(model_factory, tmp_path):
    """The voice loaders of the service and the jobs raise ValueError for a damaged file: the request fails naming
    `voice` (a 400 there), not as an unknown voice and not as an internal error."""
    from qwen_tts_core.errors import RequestError
    from qwen_tts_core.generate.requests import request_from_fields

    base = model_factory("base", "tiny")
    damaged = tmp_path / "v.safetensors"
    damaged.write_bytes(b"not a voice")
    for loader, want in ((load_voice_prompt, "cannot be read"), ({}.__getitem__, "not a stored voice")):
        with pytest.raises(RequestError, match=want) as e:
            request_from_fields(base, text="Hello.", voice=str(damaged), voices=loader)
        assert e.value.field == "voice"


@pytest.mark.parametrize("seed", [1.9, "5", True, float("nan"), float("inf"), -1, 2**63])
def test_a_seed_that_is_not_an_integer_is_refused_naming_seed(cv, seed):
    """seed=1.9 ran as seed 1 and "5" as 5 (int() took them), while the list form refused 1.5; nan and inf raised
    errors that named nothing."""
    from qwen_tts_core.errors import RequestError

    for form in (seed, [seed]):
        with pytest.raises(RequestError, match="seed") as e:
            cv.generate_custom_voice("Hello.", speaker="ryan", seed=form, max_new_tokens=3)
        assert e.value.field == "seed"
    with pytest.raises(RequestError, match="seed"):   # seed + i past the range, for the second text of a batch
        cv.generate_custom_voice(["Hello.", "Bye."], speaker="ryan", seed=2**63 - 1, max_new_tokens=3)


def test_the_references_loose_generation_forms_run_as_it_runs_them(cv):
    """do_sample=0, top_k=50.0, max_new_tokens=6.0 and the greedy idiom temperature=0 / top_p=0 beside
    do_sample=False run on the reference; they were refused here. They give the codes of the strict forms; what the
    reference would not run either (temperature=0 while sampling, do_sample=2, top_k=1.5) is still refused."""
    from qwen_tts_core.errors import RequestError

    strict = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=6)
    loose = dict(do_sample=0, subtalker_dosample=0, temperature=0.0, top_p=0.0, subtalker_temperature=0,
                 subtalker_top_p=0, top_k=50.0, max_new_tokens=6.0)
    a, _ = cv.generate_custom_voice("Hello.", speaker="ryan", **strict)
    b, _ = cv.generate_custom_voice("Hello.", speaker="ryan", **loose)
    assert np.array_equal(a[0], b[0])
    for bad, field in ((dict(temperature=0), "temperature"), (dict(do_sample=2), "do_sample"),
                       (dict(top_k=1.5), "top_k"), (dict(do_sample=False, temperature=-1), "temperature")):
        with pytest.raises(RequestError) as e:
            cv.generate_custom_voice("Hello.", speaker="ryan", max_new_tokens=3, **bad)
        assert e.value.field == field


def test_no_device_map_is_the_cpu_as_in_transformers_and_auto_picks_cuda(monkeypatch):
    """from_pretrained(path) without a device_map put the model on cuda:0 whenever CUDA was there, where the
    reference (transformers) loads on the CPU: a drop-in's memory and numbers changed silently on a GPU host."""
    from qwen_tts_core.api import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device(None) == torch.device("cpu")
    assert _resolve_device("auto") == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device("auto") == torch.device("cpu")


def test_voice_prompts_in_the_references_other_forms(model_factory, ref_wav_path):
    """The reference's generate_voice_clone also takes its dict of per-text lists, and items of its own class (any
    object with the fields); they were refused. Same audio as our items; a dict missing a field is named."""
    from types import SimpleNamespace

    from qwen_tts_core.errors import RequestError

    base = model_factory("base", "tiny")
    (x,) = base.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)
    (icl,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    texts = ["Hello.", "Bye."]
    want, _ = base.generate_voice_clone(texts, voice_clone_prompt=[x, icl], **G)
    as_dict = {"ref_code": [None, icl.ref_code], "ref_spk_embedding": [x.ref_spk_embedding, icl.ref_spk_embedding],
               "x_vector_only_mode": [True, False], "icl_mode": [False, True], "ref_text": [None, icl.ref_text]}
    foreign = [SimpleNamespace(**vars(x)), SimpleNamespace(**vars(icl))]
    for form in (as_dict, foreign):
        got, _ = base.generate_voice_clone(texts, voice_clone_prompt=form, **G)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
    with pytest.raises(RequestError, match="missing \\['icl_mode'\\]"):
        base.generate_voice_clone("Hi.", voice_clone_prompt={k: v for k, v in as_dict.items() if k != "icl_mode"})
    with pytest.raises(RequestError, match="voice_clone_prompt"):
        base.generate_voice_clone("Hi.", voice_clone_prompt="a voice")


def test_from_pretrained_hands_hub_arguments_on_and_refuses_quantization(checkpoint_factory, tmp_path, monkeypatch):
    """token, local_files_only and force_download reach huggingface_hub (they were dropped with a warning: a
    private repo failed), subfolder finds a checkpoint inside a repo or folder, and quantization arguments are
    refused (a quantized load ran unquantized)."""
    import shutil

    import huggingface_hub

    ck = checkpoint_factory("custom_voice", "tiny")
    nested = tmp_path / "repo"
    shutil.copytree(ck, nested / "cv")
    seen = {}

    def download(repo, **kw):
        seen.update(kw, repo=repo)
        return str(nested)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    m = Qwen3TTSModel.from_pretrained("Org/Repo", device_map="cpu", token="t0ken", local_files_only=True,
                                      force_download=False, subfolder="cv")
    assert m.path == nested / "cv" and seen["token"] == "t0ken" and seen["local_files_only"] is True
    assert all(p.startswith("cv/") for p in seen["allow_patterns"])
    assert Qwen3TTSModel.from_pretrained(nested, device_map="cpu", subfolder="cv").path == nested / "cv"
    for bad in ({"subfolder": "../x"}, {"subfolder": "missing"}, {"load_in_8bit": True},
                {"quantization_config": {"bits": 4}}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Qwen3TTSModel.from_pretrained(nested, device_map="cpu", **bad)


def test_not_a_checkpoint_folder(tmp_path):
    with pytest.raises(ValueError, match="not a Qwen3-TTS checkpoint"):
        Qwen3TTSModel.from_pretrained(tmp_path)


def test_hub_id_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="could not fetch"):
        Qwen3TTSModel.from_pretrained("Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice")


def _edit_weights(src, dst, fn):
    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    fn(t)
    save_file(t, str(dst / "model.safetensors"))
    return dst


def test_missing_tensor_is_named(checkpoint_factory, tmp_path):
    name = "talker.model.layers.1.self_attn.k_norm.weight"
    ck = _edit_weights(checkpoint_factory("custom_voice", "tiny"), tmp_path / "c", lambda t: t.pop(name))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_norm.weight"):
        Qwen3TTSModel.from_pretrained(ck)


def test_misshaped_tensor_is_named(checkpoint_factory, tmp_path):
    name = "talker.codec_head.weight"
    ck = _edit_weights(checkpoint_factory("custom_voice", "tiny"), tmp_path / "c",
                       lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match="codec_head.weight"):
        Qwen3TTSModel.from_pretrained(ck)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_loads_and_runs(checkpoint_factory, dtype):
    m = Qwen3TTSModel.from_pretrained(checkpoint_factory("custom_voice", "tiny"), device_map="cpu", dtype=dtype)
    assert m.dtype == getattr(torch, dtype)
    (w,), _ = m.generate_custom_voice("Hello.", speaker="ryan", **G)
    assert np.isfinite(w).all() and len(w) == 5 * 1920


def test_bad_dtype_and_device(checkpoint_factory):
    ck = checkpoint_factory("custom_voice", "tiny")
    with pytest.raises(ValueError, match="dtype"):
        Qwen3TTSModel.from_pretrained(ck, dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device_map"):
            Qwen3TTSModel.from_pretrained(ck, device_map="cuda:0")


def test_instruct_dropped_for_0b6_custom_voice_with_warning(checkpoint_factory, tmp_path, caplog):
    src = checkpoint_factory("custom_voice", "tiny")
    dst = tmp_path / "c06"
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    raw["tts_model_size"] = "0b6"
    (dst / "config.json").write_text(json.dumps(raw))
    m = Qwen3TTSModel.from_pretrained(dst)
    with caplog.at_level("WARNING"):
        a, _ = m.generate_custom_voice("Hello.", speaker="ryan", instruct="Whisper.", **G)
    b, _ = m.generate_custom_voice("Hello.", speaker="ryan", **G)
    assert np.array_equal(a[0], b[0]) and "instruct" in caplog.text


def test_make_config_rejects_unknowns():
    with pytest.raises(ValueError, match="size"):
        make_config("custom_voice", "7b")
    with pytest.raises(ValueError, match="model_type"):
        make_config("music", "tiny")


def test_make_checkpoint_rejects_bad_dtype(tmp_path):
    from qwen_tts_core import make_checkpoint

    with pytest.raises(ValueError, match="dtype"):
        make_checkpoint(tmp_path / "c", dtype="int8")


@pytest.mark.parametrize("field,value", [
    ("top_k", 10**30), ("subtalker_top_k", -1), ("max_new_tokens", 10**30), ("max_new_tokens", 0),
    ("max_new_tokens", True), ("top_k", 2.5), ("temperature", float("inf")), ("top_p", float("nan")),
    ("do_sample", 2), ("do_sample", "yes"), ("temperature", 1e308), ("subtalker_temperature", 3.5e38),
    ("repetition_penalty", 1e39),
])
def test_sampling_values_out_of_range_name_their_field(field, value):
    """Huge integers must be refused up front: per-slot sampling values become int64 device tensors in a step."""
    from qwen_tts_core import SamplingParams
    from qwen_tts_core.errors import RequestError

    with pytest.raises(RequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field
    if value == 10**30:
        assert "digits" in str(e.value) and len(str(e.value)) < 200  # the number is not echoed back whole


def test_sampling_floats_up_to_float32_max_are_accepted():
    """Finite values beyond float32 cannot be kept in the per-slot device tensors (storing one failed the whole
    prefill batch it shared); float32's largest value still is a valid request."""
    from qwen_tts_core import SamplingParams
    from qwen_tts_core.types import FLOAT32_MAX

    sp = SamplingParams(temperature=FLOAT32_MAX, repetition_penalty=FLOAT32_MAX, subtalker_temperature=1e-300)
    assert sp.temperature == FLOAT32_MAX


def test_dtype_auto_is_the_checkpoints_and_device_map_may_be_a_dict(tmp_path):
    """As transformers: dtype="auto" takes the checkpoint's dtype (the official ones are bf16: loading them in fp32
    doubled memory and changed outputs), None takes float32; device_map={"": "cpu"} is one device."""
    from qwen_tts_core import make_checkpoint

    bf16 = make_checkpoint(tmp_path / "bf16", model_type="custom_voice", size="tiny", seed=0, dtype="bfloat16")
    auto = Qwen3TTSModel.from_pretrained(bf16, device_map={"": "cpu"}, dtype="auto")
    assert auto.talker.codec_head.weight.dtype == torch.bfloat16
    assert Qwen3TTSModel.from_pretrained(bf16, torch_dtype="auto").talker.codec_head.weight.dtype == torch.bfloat16
    assert Qwen3TTSModel.from_pretrained(bf16).talker.codec_head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="one device"):
        Qwen3TTSModel.from_pretrained(bf16, device_map={"a": "cpu", "b": "cuda:0"})


def test_reference_accepts_no_speaker_and_no_voice_description(cv, model_factory):
    """The reference generates a CustomVoice text with no speaker (no speaker embedding) and a VoiceDesign text with
    no description; the service still asks for the description (400 naming instructions)."""
    from qwen_tts_core.errors import RequestError
    from qwen_tts_core.generate.requests import request_from_fields

    g = dict(do_sample=False, subtalker_dosample=False, max_new_tokens=4)
    for speaker in (None, ""):
        wavs, _ = cv.generate_custom_voice("Hello.", speaker=speaker, **g)
        assert len(wavs[0]) == 3 * 1920
    vd = model_factory("voice_design", "tiny")
    for instruct in (None, ""):
        wavs, _ = vd.generate_voice_design("Hello.", instruct=instruct, **g)
        assert len(wavs[0]) == 3 * 1920
    with pytest.raises(RequestError) as e:
        request_from_fields(vd, text="Hello.")
    assert e.value.field == "instruct"


def test_a_list_of_references_at_different_rates_encodes_each_alone(model_factory, ref_wav_path):
    """The reference batches a list's encode only when its sample rates agree (a padded batch moves a few codes):
    a voice's codes must not depend on what else was in the list."""
    import soundfile as sf

    base = model_factory("base", "tiny")
    wav, sr = sf.read(ref_wav_path, dtype="float32")
    short = wav[: len(wav) // 2]
    mixed = base.create_voice_clone_prompt([(wav, sr), (short, 44100)], ref_text=["One.", "Two."])
    alone = [base.create_voice_clone_prompt((wav, sr), ref_text="One.")[0],
             base.create_voice_clone_prompt((short, 44100), ref_text="Two.")[0]]
    for got, want in zip(mixed, alone):
        assert torch.equal(got.ref_code, want.ref_code)


def test_the_first_voice_clone_call_leaves_torchs_generator_alone(checkpoint_factory, ref_wav_path):
    """Review: the reference-audio encoder was built on first use, its modules' initial weights drawn from torch's
    global generator inside the user's seeded call: the first `torch.manual_seed(0); generate_voice_clone(...)`
    sampled other codes than the reference and than the same call repeated."""
    m = Qwen3TTSModel.from_pretrained(str(checkpoint_factory("base", "tiny")), device_map="cpu", dtype="float32")
    torch.manual_seed(0)
    before = torch.get_rng_state()
    m.create_voice_clone_prompt(str(ref_wav_path), ref_text="Some reference words.")
    assert torch.equal(torch.get_rng_state(), before)
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        (w,), _ = m.generate_voice_clone("Hello there.", ref_audio=str(ref_wav_path),
                                         ref_text="Some reference words.", max_new_tokens=8)
        outs.append(w)
    assert np.array_equal(outs[0], outs[1])


@pytest.mark.parametrize("kw", [dict(do_sample=np.bool_(False), subtalker_dosample=np.bool_(False)),
                                dict(temperature=np.float32(0.7), top_p=np.float16(0.9), top_k=np.int32(20),
                                     subtalker_temperature=np.float32(0.5), max_new_tokens=np.int16(6))])
def test_numpy_scalars_as_generation_arguments_run(cv, kw):
    """Review: np.bool_ / np.float32 passed the checks and then failed the prefill storing them in the per-slot
    device tensors (the reference runs them)."""
    (wav,), sr = cv.generate_custom_voice("Hello there.", speaker="ryan", max_new_tokens=6, seed=1,
                                          **{k: v for k, v in kw.items() if k != "max_new_tokens"})
    assert sr == 24000 and wav.size > 0
    p = cv.sampling_params(**kw)
    assert all(type(getattr(p, k)) in (bool, int, float) for k in kw)


def test_an_x_vector_prompt_that_carries_codes_decodes_them_as_context_as_the_reference(model_factory, ref_wav_path):
    """Review: the reference decodes a prompt's ref_code as left context whenever it is there (then cuts it), an
    x-vector prompt's too (an ICL item with its mode flags flipped); ours only for ICL: the same codes, another
    waveform (max diff 0.90 against the reference's). Offline and streamed alike."""
    import dataclasses

    base = model_factory("base", "tiny")
    (icl,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    flipped = dataclasses.replace(icl, x_vector_only_mode=True, icl_mode=False)
    bare = dataclasses.replace(flipped, ref_code=None)
    (with_codes,), _ = base.generate_voice_clone("Hello there.", voice_clone_prompt=[flipped], **G)
    (without,), _ = base.generate_voice_clone("Hello there.", voice_clone_prompt=[bare], **G)
    assert with_codes.shape == without.shape and not np.allclose(with_codes, without, atol=1e-3)
    ctx = base.decode_codes([torch.zeros(0, 16, dtype=torch.long)], [icl.ref_code])[0]
    assert ctx.size == 0   # the context itself is cut
    streamed = np.concatenate(list(base.stream_voice_clone("Hello there.", voice_clone_prompt=flipped,
                                                           **G)))
    assert streamed.shape == with_codes.shape and np.abs(streamed - with_codes).max() <= 1e-4


def test_a_0b6_custom_voice_drops_instruct_before_checking_it(checkpoint_factory, tmp_path):
    """Review: the reference sets instruct to None for 0.6B CustomVoice before any check; ours refused an instruct
    list of another length, or a non-string, that it then ignored anyway."""
    dst = Path(shutil.copytree(checkpoint_factory("custom_voice", "tiny"), tmp_path / "c06"))
    raw = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**raw, "tts_model_size": "0b6"}))
    m = Qwen3TTSModel.from_pretrained(dst)
    plain, _ = m.generate_custom_voice(["Hello.", "Bye."], speaker="ryan", **G)
    for instruct in (["Whisper."], 5, ["a", "b", "c"]):
        got, _ = m.generate_custom_voice(["Hello.", "Bye."], speaker="ryan", instruct=instruct, **G)
        assert all(np.array_equal(a, b) for a, b in zip(got, plain))


@pytest.mark.parametrize("language", ["", ["english", None], ["", "english"]])
def test_an_empty_language_in_a_list_or_string_is_refused_as_the_reference_refuses_it(cv, language):
    texts = ["Hello.", "Bye."]
    with pytest.raises(ValueError, match="language"):
        cv.generate_custom_voice(texts, speaker="ryan", language=language, **G)
    cv.generate_custom_voice(texts, speaker="ryan", language=None, **G)   # None alone: auto


def test_reference_audio_errors_are_also_the_references_exception_types(model_factory, tmp_path):
    base = model_factory("base", "tiny")
    cases = [(str(tmp_path / "missing.wav"), FileNotFoundError), (123, TypeError),
             (([0.0] * 2400, 24000), TypeError), ("http://127.0.0.1:9/none.wav", OSError)]
    for audio, kind in cases:
        with pytest.raises(kind) as e:
            base.create_voice_clone_prompt(audio, x_vector_only_mode=True, **(
                {"allow_urls": True} if str(audio).startswith("http") else {}))
        assert isinstance(e.value, ValueError) and e.value.field == "ref_audio", e.value   # ours: still ValueError


def test_dict_prompts_with_ref_code_none_for_all_and_batched_tensors(model_factory, ref_wav_path):
    """Review: the reference reads `ref_code: None` as none for every text and indexes a batched speaker tensor
    [B, D] per text; ours refused both ("lists must have one length")."""
    base = model_factory("base", "tiny")
    (x,) = base.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)
    texts = ["Hello there.", "Second one."]
    want, _ = base.generate_voice_clone(texts, voice_clone_prompt=[x, x], **G)
    for d in (dict(ref_code=None, ref_spk_embedding=[x.ref_spk_embedding] * 2, x_vector_only_mode=[True, True],
                   icl_mode=[False, False]),
              dict(ref_code=[None, None], ref_spk_embedding=torch.stack([x.ref_spk_embedding] * 2),
                   x_vector_only_mode=[True, True], icl_mode=[False, False])):
        got, _ = base.generate_voice_clone(texts, voice_clone_prompt=d, **G)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_a_prompts_ref_code_is_bounded_like_its_reference_audio(model_factory, ref_wav_path):
    """Review: ref_code is decoded as left context before the first chunk on the step thread, and an x-vector prompt's
    is not bounded by max_len: 4000 hand-made frames delayed the first chunk 4.3 s. At most the codes of the longest
    reference audio taken (120 s)."""
    import dataclasses

    from qwen_tts_core.generate.requests import MAX_REF_CODE_FRAMES

    base = model_factory("base", "tiny")
    (icl,) = base.create_voice_clone_prompt(str(ref_wav_path), ref_text="Good morning, how are you today?")
    long = dataclasses.replace(icl, x_vector_only_mode=True, icl_mode=False,
                               ref_code=icl.ref_code[:1].repeat(MAX_REF_CODE_FRAMES + 1, 1))
    with pytest.raises(ValueError, match=f"ref_code has {MAX_REF_CODE_FRAMES + 1} frames; at most"):
        base.generate_voice_clone("Hello.", voice_clone_prompt=[long], **G)
