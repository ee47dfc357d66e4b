"""Times the official package (runs under the oracle's python): load, per-frame cost with the code predictor's
share, decode cost, and frames/s for 8 texts in one call. Prints one JSON line.

usage: reference_worker.py CHECKPOINT DTYPE FRAMES [single]   (single: skip the batch of 8)
"""

import json
import os
import sys
import time

import torch
from _measure import peak_rss_mb
from engine_vs_reference import TEXT, TEXTS8  # noqa: F401  (same texts as ours)
from qwen_tts import Qwen3TTSModel


def main() -> None:
    ckpt, dtype, frames = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    tts = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=getattr(torch, dtype))
    load_s = time.perf_counter() - t0
    cp = tts.model.talker.code_predictor
    timers = {"cp": 0.0, "decode": 0.0}
    gen = cp.generate

    def timed_cp(*a, **k):
        t = time.perf_counter()
        r = gen(*a, **k)
        timers["cp"] += time.perf_counter() - t
        return r

    cp.generate = timed_cp
    dec = tts.model.speech_tokenizer.decode
    frames_seen = []

    def timed_decode(items, *a, **k):
        frames_seen.extend(int(it["audio_codes"].shape[0]) for it in items)
        t = time.perf_counter()
        r = dec(items, *a, **k)
        timers["decode"] += time.perf_counter() - t
        return r

    tts.model.speech_tokenizer.decode = timed_decode
    kw = dict(speaker="ryan", language="english", max_new_tokens=frames + 1)
    tts.generate_custom_voice("Warm up.", **dict(kw, max_new_tokens=3))
    timers.update(cp=0.0, decode=0.0)
    frames_seen.clear()
    torch.manual_seed(0)
    t = time.perf_counter()
    wavs, sr = tts.generate_custom_voice(TEXT, **kw)
    total = time.perf_counter() - t
    n1 = frames_seen[0]
    gen_s = total - timers["decode"]
    cp_pf = timers["cp"] / n1
    decode_per_audio_s = timers["decode"] / (len(wavs[0]) / sr)
    out = dict(load_s=load_s, peak_rss_mb=peak_rss_mb(), frames=n1, s_per_frame=gen_s / n1,
               talker_s_per_frame=gen_s / n1 - cp_pf, code_predictor_s_per_frame=cp_pf, frames_per_s_1=n1 / gen_s,
               decode_s_per_audio_s=decode_per_audio_s, time_to_first_audio_s=total)
    if len(sys.argv) <= 4 or sys.argv[4] != "single":
        frames_seen.clear()
        timers["decode"] = 0.0
        t = time.perf_counter()
        tts.generate_custom_voice(TEXTS8, **kw)
        eight = time.perf_counter() - t - timers["decode"]
        out["frames_per_s_8"] = sum(frames_seen) / eight
    print(json.dumps(out))


if __name__ == "__main__":
    main()
