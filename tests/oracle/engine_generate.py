"""Oracle: run the official Qwen3TTSModel generate_* on a checkpoint and save codes and waveforms.

usage: engine_generate.py CHECKPOINT SPEC.json OUT.safetensors
SPEC: {"calls": [{"method": "generate_custom_voice", "kwargs": {...}, "seed": 0}, ...], "dtype": "float32"}
OUT: call{i}.codes{j} [T,16] int64, call{i}.wav{j} [N] float32 for item j of call i.
"""

import json
import sys

import torch
from qwen_tts import Qwen3TTSModel
from safetensors.torch import save_file


def main() -> None:
    ckpt, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    tts = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=getattr(torch, spec.get("dtype", "float32")))
    captured = []
    original = tts.model.speech_tokenizer.decode

    def capture(items, *a, **kw):
        captured.append([it["audio_codes"].clone() for it in items])
        return original(items, *a, **kw)

    tts.model.speech_tokenizer.decode = capture
    out = {}
    for i, call in enumerate(spec["calls"]):
        captured.clear()
        torch.manual_seed(call.get("seed", 0))
        wavs, sr = getattr(tts, call["method"])(**call["kwargs"])
        assert sr == 24000
        for j, w in enumerate(wavs):
            out[f"call{i}.wav{j}"] = torch.from_numpy(w).float().contiguous()
        for j, c in enumerate(captured[0]):
            out[f"call{i}.codes{j}"] = c.long().contiguous()
    save_file(out, out_path)


if __name__ == "__main__":
    main()
