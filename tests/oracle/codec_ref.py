"""Oracle side of the codec tests: run the official 12Hz speech tokenizer on a folder, write results as safetensors.

Usage (through tests/oracle/common.py::run_oracle, with the oracle's python):
    codec_ref.py keys   <speech_tokenizer_dir> <out.json>
        -> {"model": {name: shape} of the official model built from config.json, "missing": [...], "unexpected": [...]}
           (missing/unexpected as reported by from_pretrained loading the folder)
    codec_ref.py decode <speech_tokenizer_dir> <codes.safetensors> <out.safetensors>
        codes.safetensors holds codes_0, codes_1, ... Long [T_i, 16]; out holds wav_0, ... via
        Qwen3TTSTokenizer.decode (batch padded with -1 like the reference does).
    codec_ref.py forward <speech_tokenizer_dir> <codes.safetensors> <out.safetensors>
        one-shot `model.decoder(codes[B,16,T])` (no 300-frame chunking), codes key "codes" [B, 16, T] -> "wav".
    codec_ref.py encode <speech_tokenizer_dir> <audio.safetensors> <out.safetensors>
        audio_0, ... float32 mono 24 kHz -> codes_0, ... Long [T_i, 16] via Qwen3TTSTokenizer.encode.
    codec_ref.py ours_encode <speech_tokenizer_dir> <audio.safetensors> <out.safetensors>
        like `encode` but with OUR qwen_tts_core.codec encoder, to check it under transformers 4.57.
    codec_ref.py chunked <speech_tokenizer_dir> <codes.safetensors> <out.json>
        times the reference-style re-decode: each 4-frame chunk with 25 frames of left context (benchmark aid).
    codec_ref.py batch <jobs.json>
        runs several of the above, [[cmd, arg, ...], ...], in one process.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(int(os.environ.get("CODEC_ORACLE_THREADS", "2")))


def _tokenizer(folder: str):
    from qwen_tts.inference.qwen3_tts_tokenizer import Qwen3TTSTokenizer

    return Qwen3TTSTokenizer.from_pretrained(folder, dtype=torch.float32)


def _keys(folder: str, out: str) -> None:
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from transformers import AutoConfig, AutoModel

    AutoConfig.register("qwen3_tts_tokenizer_12hz", Qwen3TTSTokenizerV2Config)
    AutoModel.register(Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model)
    model, info = AutoModel.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
    result = {
        "model": {k: list(v.shape) for k, v in model.state_dict().items()},
        "missing": sorted(info.get("missing_keys", [])),
        "unexpected": sorted(info.get("unexpected_keys", [])),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    with open(out, "w") as f:
        json.dump(result, f)


def _decode(folder: str, codes_path: str, out: str) -> None:
    tok = _tokenizer(folder)
    data = load_file(codes_path)
    codes = [data[f"codes_{i}"] for i in range(len(data))]
    wavs, sr = tok.decode([{"audio_codes": c} for c in codes])
    assert sr == 24000, sr
    save_file({f"wav_{i}": torch.from_numpy(w).contiguous() for i, w in enumerate(wavs)}, out)


def _forward(folder: str, codes_path: str, out: str) -> None:
    tok = _tokenizer(folder)
    codes = load_file(codes_path)["codes"]
    with torch.inference_mode():
        wav = tok.model.decoder(codes.long())
    save_file({"wav": wav.squeeze(1).float().contiguous()}, out)


def _encode(folder: str, audio_path: str, out: str) -> None:
    tok = _tokenizer(folder)
    data = load_file(audio_path)
    audios = [data[f"audio_{i}"].numpy() for i in range(len(data))]
    enc = tok.encode(audios, sr=24000)
    save_file({f"codes_{i}": c.long().contiguous() for i, c in enumerate(enc.audio_codes)}, out)


def _ours_encode(folder: str, audio_path: str, out: str) -> None:
    """OUR encoder wrapper (qwen_tts_core.codec) run under the oracle's transformers 4.57 (compatibility check)."""
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from qwen_tts_core.codec.load import load_codec

    data = load_file(audio_path)
    audios = [data[f"audio_{i}"].numpy() for i in range(len(data))]
    codes = load_codec(folder).encode(audios)
    save_file({f"codes_{i}": c.contiguous() for i, c in enumerate(codes)}, out)


def _chunked(folder: str, codes_path: str, out: str) -> None:
    tok = _tokenizer(folder)
    codes = load_file(codes_path)["codes"].long()  # [1, 16, T]
    dec = tok.model.decoder
    timings = {}
    with torch.inference_mode():
        for start in (10, codes.shape[-1] - 4):
            ctx = min(25, start)
            piece = codes[..., start - ctx: start + 4]
            dec(piece)  # warm-up
            t0 = time.perf_counter()
            reps = 3
            for _ in range(reps):
                dec(piece)
            timings[f"chunk4_ctx25_at_{start}_s"] = (time.perf_counter() - t0) / reps
    with open(out, "w") as f:
        json.dump(timings, f)


_COMMANDS = {"keys": _keys, "decode": _decode, "forward": _forward, "encode": _encode, "chunked": _chunked,
             "ours_encode": _ours_encode}


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "batch":  # batch <jobs.json>: [[cmd, arg, ...], ...] in one process (saves the import time)
        with open(args[0]) as f:
            for job in json.load(f):
                _COMMANDS[job[0]](*job[1:])
        return
    _COMMANDS[cmd](*args)


if __name__ == "__main__":
    main()
