"""GPU benchmark of the engine (also runs on CPU with --device cpu --size tiny as a smoke test).

For each size: build a random full-size CustomVoice checkpoint, load it in bf16, then measure
  - time to first audio (p50/p95): add() -> first AudioChunk, one session at a time;
  - single-stream real-time factor: audio seconds produced per wall second;
  - aggregate audio-seconds per second with 1/8/32/64 concurrent sessions;
  - peak GPU memory.
And check the CUDA path against the CPU fp32 path on a tiny checkpoint (greedy codes equal, waveforms close).
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest, make_checkpoint

TEXT = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."


def _req(sp, i=0, **kw):
    return SynthesisRequest(kind="custom_voice", text=TEXT, speaker="ryan", language="english", sampling=sp,
                            seed=i, **kw)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(model, frames: int, concurrency: list[int], ttfa_runs: int) -> dict:
    dev = model.device
    sp = SamplingParams(max_new_tokens=frames + 1)
    out: dict = {}
    eng = Engine(model, max_sessions=max(concurrency), max_len=512)
    # warm-up: captures the graphs of every bucket used below
    for c in sorted(set(concurrency)):
        sessions = [eng.add(_req(SamplingParams(max_new_tokens=4), i)) for i in range(c)]
        while eng.has_work():
            eng.step()
        del sessions
    ttfa = []
    for i in range(ttfa_runs):
        _sync(dev)
        t = time.perf_counter()
        s = eng.add(_req(sp, i, first_chunk_frames=1))
        got = False
        while eng.has_work():
            chunks = eng.step()
            if not got and any(ch.session_id == s.id and ch.pcm.size for ch in chunks):
                ttfa.append(time.perf_counter() - t)
                got = True
                eng.cancel(s)
    out["ttfa_ms_p50"] = round(1000 * float(np.percentile(ttfa, 50)), 1)
    out["ttfa_ms_p95"] = round(1000 * float(np.percentile(ttfa, 95)), 1)
    for c in concurrency:
        _sync(dev)
        t = time.perf_counter()
        sessions = [eng.add(_req(sp, i)) for i in range(c)]
        samples = 0
        while eng.has_work():
            samples += sum(ch.pcm.size for ch in eng.step())
        _sync(dev)
        wall = time.perf_counter() - t
        audio_s = samples / 24000
        out[f"audio_s_per_s_c{c}"] = round(audio_s / wall, 2)
        if c == 1:
            out["single_stream_rtf_x"] = round(audio_s / wall, 2)
        del sessions
    if dev.type == "cuda":
        out["peak_gpu_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return out


def cuda_vs_cpu(tmp: Path) -> dict:
    ck = make_checkpoint(tmp / "tiny", "custom_voice", "tiny", seed=0)
    kw = dict(speaker="vivian", language="english", do_sample=False, subtalker_dosample=False, max_new_tokens=24)
    cpu = Qwen3TTSModel.from_pretrained(ck, device_map="cpu", dtype="float32")
    (w_cpu,), _ = cpu.generate_custom_voice(TEXT, **kw)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = Qwen3TTSModel.from_pretrained(ck, device_map="cuda", dtype="float32")
    (w_gpu,), _ = gpu.generate_custom_voice(TEXT, **kw)
    eng = Engine(gpu, max_sessions=4)  # the static + CUDA-graph path
    sess = eng.run_all([_req(SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=24),
                             decode_audio=False)])
    ref = Engine(cpu, max_sessions=1).run_all([_req(SamplingParams(do_sample=False, subtalker_dosample=False,
                                                                   max_new_tokens=24), decode_audio=False)])
    n = min(len(w_cpu), len(w_gpu))
    return {"wave_max_abs_diff": float(np.abs(w_cpu[:n] - w_gpu[:n]).max()), "same_length": len(w_cpu) == len(w_gpu),
            "graph_codes_equal_cpu": bool(torch.equal(sess[0].codes(), ref[0].codes()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", default="0.6b,1.7b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--ttfa-runs", type=int, default=10)
    args = ap.parse_args()
    result: dict = {"benchmark": "gpu_bench", "device": args.device, "torch": torch.__version__}
    if args.device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    conc = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory(prefix="qtts-gpu-") as tmp:
        tmp = Path(tmp)
        for size in args.sizes.split(","):
            t = time.perf_counter()
            ck = make_checkpoint(tmp / size, "custom_voice", size, seed=0, dtype="bfloat16")
            build_s = time.perf_counter() - t
            t = time.perf_counter()
            model = Qwen3TTSModel.from_pretrained(ck, device_map=args.device, dtype=args.dtype)
            entry = {"build_s": round(build_s, 1), "load_s": round(time.perf_counter() - t, 1)}
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            entry.update(measure(model, args.frames, conc, args.ttfa_runs))
            result[size] = entry
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
            print(json.dumps({size: entry}), flush=True)
        if args.device == "cuda":
            result["cuda_vs_cpu_tiny"] = cuda_vs_cpu(tmp)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
