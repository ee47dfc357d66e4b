"""Our Qwen3TTSTokenizer vs the official one (oracle virtualenv, tests/oracle/tokenizer_ref.py) on the same tiny
random 12Hz speech tokenizer, fp32: the same codes exactly, waveforms within the codec parity tolerance, for each
input form both take; and a perturbed weight breaks the comparison."""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_core import Qwen3TTSTokenizer

from .conftest import make_audios

pytestmark = pytest.mark.parity

TOL = 1e-4  # as tests/codec/test_parity.py
ORACLE_COMMON = Path(__file__).resolve().parents[1] / "oracle" / "common.py"
CODE_LENGTHS = (1, 40, 310)  # one frame; a short one; beyond the official decode's 300-frame pieces


def _run_oracle():
    spec = importlib.util.spec_from_file_location("oracle_common", ORACLE_COMMON)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run_oracle


def _inputs(work: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    audios = make_audios()
    t = np.arange(12000) / 16000.0
    g = torch.Generator().manual_seed(5)
    inputs = {f"audio_{i}": torch.from_numpy(a) for i, a in enumerate(audios)}
    inputs["tone16k"] = torch.from_numpy((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32))
    stereo = np.stack([audios[2][:30000], audios[1][:5000].repeat(6)], axis=1) * 0.8  # [N, 2] at 48 kHz
    inputs["stereo48k"] = torch.from_numpy(stereo.astype(np.float32))
    for i, n in enumerate(CODE_LENGTHS):
        inputs[f"codes_{i}"] = torch.randint(0, 2048, (n, 16), generator=g)
    wav_path = work / "chirp_22k.wav"
    sf.write(str(wav_path), audios[2][:30000], 22050, subtype="PCM_16")
    buf = work / "tone.wav"
    sf.write(str(buf), audios[0], 24000, subtype="FLOAT")
    data_uri = "data:audio/wav;base64," + base64.b64encode(buf.read_bytes()).decode()
    jobs = [
        {"id": "two", "encode": ["audio_0", "audio_1"], "sr": 24000},   # batch of two lengths (padded)
        {"id": "four", "encode": [f"audio_{i}" for i in range(4)], "sr": 24000},
        {"id": "single16k", "encode": ["tone16k"], "sr": 16000, "single": True},
        {"id": "stereo48k", "encode": ["stereo48k"], "sr": 48000},
        {"id": "files", "encode_paths": [str(wav_path), data_uri]},
        {"id": "dec_output", "decode_output_of": "four"},
        {"id": "dec_dict", "decode": ["codes_0", "codes_1", "codes_2"], "form": "dict"},
        {"id": "dec_list", "decode": ["codes_1", "codes_0"], "form": "list"},
        {"id": "dec_padded", "decode": ["codes_0", "codes_1"], "form": "padded"},
    ]
    return inputs, jobs


@pytest.fixture(scope="module")
def case(tiny_dir, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("tokenizer_oracle")
    inputs, jobs = _inputs(work)
    save_file(inputs, str(work / "inputs.safetensors"))
    (work / "jobs.json").write_text(json.dumps(jobs))
    _run_oracle()("tokenizer_ref.py", str(tiny_dir), str(work / "jobs.json"), str(work / "inputs.safetensors"),
                  str(work / "out.safetensors"), str(work / "out.json"))
    return {"inputs": inputs, "jobs": jobs, "ref": load_file(str(work / "out.safetensors")),
            "info": json.loads((work / "out.json").read_text())}


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Qwen3TTSTokenizer:
    return Qwen3TTSTokenizer.from_pretrained(tiny_dir, dtype=torch.float32)


def _decode_arg(codes: list[torch.Tensor], form: str):
    if form == "dict":
        return {"audio_codes": codes}
    if form == "list":
        return [{"audio_codes": c} for c in codes]
    return {"audio_codes": torch.nn.utils.rnn.pad_sequence(codes, batch_first=True, padding_value=-1)}


def _run_ours(tok: Qwen3TTSTokenizer, case: dict) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every job of `case` through our tokenizer, in the oracle's output layout."""
    inputs, out, rates, encoded = case["inputs"], {}, {}, {}
    for job in case["jobs"]:
        jid = job["id"]
        if "encode" in job or "encode_paths" in job:
            if "encode" in job:
                arrays = [inputs[k].numpy() for k in job["encode"]]
                enc = tok.encode(arrays[0] if job.get("single") else arrays, sr=job["sr"])
            else:
                enc = tok.encode(job["encode_paths"])
            encoded[jid] = enc
            out.update({f"{jid}/codes_{i}": c for i, c in enumerate(enc.audio_codes)})
            continue
        if "decode_output_of" in job:
            arg = encoded[job["decode_output_of"]]
        else:
            arg = _decode_arg([inputs[k] for k in job["decode"]], job["form"])
        wavs, rates[jid] = tok.decode(arg)
        out.update({f"{jid}/wav_{i}": torch.from_numpy(w) for i, w in enumerate(wavs)})
    return out, rates


def _differences(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[list[str], float]:
    """(code keys that differ, the largest |waveform difference|); a shape mismatch counts as infinite."""
    assert sorted(ours) == sorted(ref)
    codes = [k for k in ref if "/codes_" in k and not torch.equal(ours[k].cpu(), ref[k])]
    worst = 0.0
    for k in (k for k in ref if "/wav_" in k):
        if ours[k].shape != ref[k].shape:
            return codes, float("inf")
        worst = max(worst, float((ours[k] - ref[k]).abs().max()) if ref[k].numel() else 0.0)
    return codes, worst


def test_getters_equal_official(tok, case):
    info = case["info"]
    assert tok.get_model_type() == info["model_type"] == "qwen3_tts_tokenizer_12hz"
    assert tok.get_input_sample_rate() == info["input_sample_rate"] == 24000
    assert tok.get_output_sample_rate() == info["output_sample_rate"] == 24000
    assert tok.get_encode_downsample_rate() == info["encode_downsample_rate"] == 1920
    assert tok.get_decode_upsample_rate() == info["decode_upsample_rate"] == 1920


def test_encode_and_decode_match_official_for_every_input_form(tok, case):
    ours, rates = _run_ours(tok, case)
    ref = case["ref"]
    assert rates == case["info"]["decode_sr"]
    codes, worst = _differences(ours, ref)
    assert codes == []
    assert worst <= TOL, worst
    for k in ref:
        if "/codes_" in k:
            assert ours[k].dtype == torch.long and ours[k].shape[1] == 16
    # the batch of two lengths: codes trimmed per item as the official trims its padded batch
    assert [ref[f"two/codes_{i}"].shape[0] for i in range(2)] == [13, 3]
    assert [ref[f"dec_dict/wav_{i}"].shape[0] for i in range(3)] == [n * 1920 for n in CODE_LENGTHS]
    assert float(ref["dec_dict/wav_2"].pow(2).mean().sqrt()) > 0.1  # a real signal
    assert ref["single16k/codes_0"].shape[0] == 10  # 12000 samples at 16 kHz -> 18000 at 24 kHz


def _perturbed(tok: Qwen3TTSTokenizer, part: str, name: str, index: tuple[int, ...], delta: float):
    """A copy of `tok` with one weight moved. `name` may list alternatives split by "|" (transformers' Mimi names
    the encoder's modules differently across 5.x releases); exactly one of them must exist."""
    other = copy.copy(tok)
    other.codec = copy.copy(tok.codec)
    module = copy.deepcopy(getattr(tok.codec, part))
    params = dict(module.named_parameters())
    found = [n for n in name.split("|") if n in params]
    assert len(found) == 1, (name, found)
    with torch.no_grad():
        params[found[0]][index] += delta
    if part == "decoder":
        other.codec.decoder = module
    else:
        other.codec._encoder = module
    return other


@pytest.mark.parametrize("name,index", [
    pytest.param("pre_transformer.layers.0.self_attn.q_proj.weight", (0, 0), id="attn-q"),
    pytest.param("decoder.6.conv.bias", (0,), id="last-bias"),
])
def test_one_perturbed_decoder_weight_breaks_parity(tok, case, name, index):
    ours, _ = _run_ours(_perturbed(tok, "decoder", name, index, 0.05), case)
    codes, worst = _differences(ours, case["ref"])
    assert codes == []          # the encoder is untouched
    assert worst > 10 * TOL, worst


@pytest.mark.parametrize("name,index", [
    pytest.param("model.encoder.encoder_seanet.layers.0.conv.weight|model.encoder.layers.0.conv.weight", (0, 0, 3),
                 id="first-conv"),
    pytest.param("model.encoder.downsample.conv.weight|model.downsample.conv.weight", (0, 0, 0), id="downsample"),
    pytest.param("model.quantizer.acoustic_residual_vector_quantizer.input_proj.weight", (0, 0, 0), id="rvq-in"),
])
def test_one_perturbed_encoder_weight_breaks_parity(tok, case, name, index):
    ours, _ = _run_ours(_perturbed(tok, "encoder", name, index, 0.05), case)
    codes, _ = _differences(ours, case["ref"])
    assert codes != []
