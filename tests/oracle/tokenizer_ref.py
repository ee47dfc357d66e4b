"""Oracle side of the speech tokenizer wrapper tests: the official `Qwen3TTSTokenizer` encode/decode on a folder.

Usage (through tests/oracle/common.py::run_oracle, with the oracle's python):
    tokenizer_ref.py <tokenizer_dir> <jobs.json> <inputs.safetensors> <out.safetensors> <out.json>

jobs.json is a list of jobs, each with an "id":
    {"id", "encode": [input keys], "sr": int, "single": bool}   numpy waveforms (float32) from inputs; "single" passes
                                                                 the one array itself, not a list
    {"id", "encode_paths": [file paths or base64 strings]}      strings as given
    {"id", "decode_output_of": job id}                         decode() of that encode job's own output object
    {"id", "decode": [input keys], "form": "dict" | "list" | "padded"}
        dict: {"audio_codes": [tensors]}; list: [{"audio_codes": t}, ...]; padded: {"audio_codes": one [B, T, 16]
        tensor right-padded with -1}
out.safetensors holds "<id>/codes_<i>" (Long [T, 16]) and "<id>/wav_<i>" (float32); out.json the getters and each
decode job's sample rate.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

torch.set_num_threads(int(os.environ.get("CODEC_ORACLE_THREADS", "2")))


def main() -> None:
    from qwen_tts.inference.qwen3_tts_tokenizer import Qwen3TTSTokenizer

    folder, jobs_path, inputs_path, out_path, json_path = sys.argv[1:]
    tok = Qwen3TTSTokenizer.from_pretrained(folder, dtype=torch.float32)
    inputs = load_file(inputs_path)
    with open(jobs_path) as f:
        jobs = json.load(f)
    tensors: dict[str, torch.Tensor] = {}
    encoded: dict[str, object] = {}
    info = {
        "model_type": tok.get_model_type(), "input_sample_rate": tok.get_input_sample_rate(),
        "output_sample_rate": tok.get_output_sample_rate(),
        "encode_downsample_rate": tok.get_encode_downsample_rate(),
        "decode_upsample_rate": tok.get_decode_upsample_rate(), "decode_sr": {},
    }
    for job in jobs:
        jid = job["id"]
        if "encode" in job or "encode_paths" in job:
            if "encode" in job:
                arrays = [inputs[k].numpy() for k in job["encode"]]
                enc = tok.encode(arrays[0] if job.get("single") else arrays, sr=job["sr"])
            else:
                enc = tok.encode(job["encode_paths"])
            encoded[jid] = enc
            for i, c in enumerate(enc.audio_codes):
                tensors[f"{jid}/codes_{i}"] = c.long().cpu().contiguous()
            continue
        if "decode_output_of" in job:
            arg = encoded[job["decode_output_of"]]
        else:
            codes = [inputs[k] for k in job["decode"]]
            form = job["form"]
            if form == "dict":
                arg = {"audio_codes": codes}
            elif form == "list":
                arg = [{"audio_codes": c} for c in codes]
            else:
                arg = {"audio_codes": torch.nn.utils.rnn.pad_sequence(codes, batch_first=True, padding_value=-1)}
        wavs, sr = tok.decode(arg)
        info["decode_sr"][jid] = sr
        for i, w in enumerate(wavs):
            tensors[f"{jid}/wav_{i}"] = torch.from_numpy(w).float().contiguous()
    save_file(tensors, out_path)
    with open(json_path, "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
