"""Times the official package (runs under the oracle's python): load, per-frame cost with the code predictor's
share, decode cost, and frames/s for 8 texts in one call. Prints one JSON line.

usage: reference_worker.py CHECKPOINT DTYPE FRAMES [single] [--reps N]   (single: skip the batch of 8)

After an untimed warm-up, the one-text generation runs 1 + N times and the batch of 8 N times (at least once, after
a short untimed batch of 8), the best of each kept: what engine_vs_reference.py does for ours with the same --reps.
Per frame, defined as for ours: s_per_frame = generation wall (codec decode excluded) / frames, which holds prompt
building, prefill, sampling and overhead besides the steps; code_predictor_s_per_frame = the code predictor's calls;
talker_and_rest_s_per_frame = the difference. All from the fastest of the one-text runs; time_to_first_audio_s is
that run's whole call (the reference returns audio only at the end).
"""

import argparse
import json
import os
import time

import torch
from _measure import peak_rss_mb
from engine_vs_reference import TEXT, TEXTS8  # noqa: F401  (same texts as ours)
from qwen_tts import Qwen3TTSModel


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("dtype")
    ap.add_argument("frames", type=int)
    ap.add_argument("mode", nargs="?", choices=["single"])
    ap.add_argument("--reps", type=int, default=0, help="timed runs beyond the first (best kept)")
    a = ap.parse_args()
    ckpt, dtype, frames = a.checkpoint, a.dtype, a.frames
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

    def run(texts) -> dict:
        timers.update(cp=0.0, decode=0.0)
        frames_seen.clear()
        torch.manual_seed(0)
        t = time.perf_counter()
        wavs, sr = tts.generate_custom_voice(texts, **kw)
        total = time.perf_counter() - t
        return dict(total=total, gen_s=total - timers["decode"], cp=timers["cp"], decode=timers["decode"],
                    frames=list(frames_seen), audio_s=len(wavs[0]) / sr)

    best = min((run(TEXT) for _ in range(1 + max(0, a.reps))), key=lambda r: r["gen_s"])
    n1 = best["frames"][0]
    gen_s = best["gen_s"]
    cp_pf = best["cp"] / n1
    out = dict(load_s=load_s, peak_rss_mb=peak_rss_mb(), frames=n1, runs=1 + max(0, a.reps),
               s_per_frame=gen_s / n1, talker_and_rest_s_per_frame=gen_s / n1 - cp_pf,
               code_predictor_s_per_frame=cp_pf, frames_per_s_1=n1 / gen_s,
               decode_s_per_audio_s=best["decode"] / best["audio_s"], time_to_first_audio_s=best["total"])
    if a.mode != "single":
        tts.generate_custom_voice(TEXTS8, **dict(kw, max_new_tokens=3))  # untimed: the batch's first-call work
        eight = [run(TEXTS8) for _ in range(max(1, a.reps))]
        out["frames_per_s_8"] = max(sum(r["frames"]) / r["gen_s"] for r in eight)
        out["runs_8"] = len(eight)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
