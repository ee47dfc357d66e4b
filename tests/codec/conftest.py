"""Fixtures of the codec tests: one tiny random speech tokenizer and one oracle run shared by the session."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen_tts_core.codec.build import write_random_speech_tokenizer
from qwen_tts_core.codec.load import Codec, load_codec

ORACLE_COMMON = Path(__file__).resolve().parents[1] / "oracle" / "common.py"
DECODE_LENGTHS = (5, 90, 150)      # one batch, padded by the reference; 90 and 150 exceed the window of 72
FORWARD_FRAMES = 340               # one-shot reference forward beyond its 300-frame chunked decode
AUDIO_LENGTHS = (24000, 5000, 40001, 1920)


def _run_oracle():
    spec = importlib.util.spec_from_file_location("oracle_common", ORACLE_COMMON)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.run_oracle


def make_audios() -> list[np.ndarray]:
    """A tone, white noise, a chirp and a one-frame burst (float32, 24 kHz)."""
    rng = np.random.RandomState(3)
    t = np.arange(max(AUDIO_LENGTHS)) / 24000.0
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    chirp = 0.25 * np.sin(2 * np.pi * (100 + 400 * t) * t)
    sigs = [tone, 0.2 * rng.randn(t.size), chirp, 0.5 * rng.randn(t.size)]
    return [s[:n].astype(np.float32) for s, n in zip(sigs, AUDIO_LENGTHS)]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return write_random_speech_tokenizer(tmp_path_factory.mktemp("codec") / "speech_tokenizer", "tiny", seed=0)


@pytest.fixture(scope="session")
def codec(tiny_dir) -> Codec:
    return load_codec(tiny_dir)


@pytest.fixture(scope="session")
def oracle(tiny_dir, tmp_path_factory) -> dict:
    """Reference outputs on the tiny codec: keys, batched decode, one-shot forward, encode."""
    work = tmp_path_factory.mktemp("codec_oracle")
    g = torch.Generator().manual_seed(11)
    codes = [torch.randint(0, 2048, (n, 16), generator=g) for n in DECODE_LENGTHS]
    fwd = torch.randint(0, 2048, (1, 16, FORWARD_FRAMES), generator=g)
    audios = make_audios()
    save_file({f"codes_{i}": c for i, c in enumerate(codes)}, str(work / "codes.safetensors"))
    save_file({"codes": fwd}, str(work / "fwd.safetensors"))
    save_file({"codes_0": fwd[0].T.contiguous()}, str(work / "long.safetensors"))
    save_file({f"audio_{i}": torch.from_numpy(a) for i, a in enumerate(audios)}, str(work / "audio.safetensors"))
    jobs = [
        ["keys", str(tiny_dir), str(work / "keys.json")],
        ["decode", str(tiny_dir), str(work / "codes.safetensors"), str(work / "wav.safetensors")],
        ["decode", str(tiny_dir), str(work / "long.safetensors"), str(work / "long_wav.safetensors")],
        ["forward", str(tiny_dir), str(work / "fwd.safetensors"), str(work / "fwd_wav.safetensors")],
        ["encode", str(tiny_dir), str(work / "audio.safetensors"), str(work / "enc.safetensors")],
        ["ours_encode", str(tiny_dir), str(work / "audio.safetensors"), str(work / "ours457.safetensors")],
    ]
    (work / "jobs.json").write_text(json.dumps(jobs))
    _run_oracle()("codec_ref.py", "batch", str(work / "jobs.json"))
    wav = load_file(str(work / "wav.safetensors"))
    enc = load_file(str(work / "enc.safetensors"))
    ours457 = load_file(str(work / "ours457.safetensors"))
    return {
        "keys": json.loads((work / "keys.json").read_text()),
        "codes": codes,
        "wavs": [wav[f"wav_{i}"].numpy() for i in range(len(codes))],
        "fwd_codes": fwd,
        "fwd_wav": load_file(str(work / "fwd_wav.safetensors"))["wav"],
        "long_chunked_wav": load_file(str(work / "long_wav.safetensors"))["wav_0"],
        "audios": audios,
        "enc": [enc[f"codes_{i}"] for i in range(len(audios))],
        "ours_enc_tf457": [ours457[f"codes_{i}"] for i in range(len(audios))],
    }
