"""A CPU engine with and without `keep_freed_memory` (qwen_tts_core/cpu_alloc.py), same run, fresh processes.

Each worker loads a tiny-talker checkpoint with the FULL-size codec (so the step is the audio decode's large
activations, as in a CPU replica) and runs `--rounds` rounds of 8 sessions x `--frames` frames with streaming audio,
the engine stepping in its own thread as in a service replica. Per setting (default = kept; `QTTS_MALLOC_TUNE=0` =
glibc's default policy): wall seconds, minor page faults and kernel (sys) seconds of the rounds after the first,
best of --reps worker runs taken in turn. Prints one JSON line last.

usage: python benchmarks/cpu_alloc.py [--rounds 4] [--frames 24] [--reps 2] [--checkpoint DIR] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import run_worker  # noqa: E402

TEXTS = ["Once upon a time there was a small village by the sea.", "Please hold while we connect your call.",
         "It was the best of times, it was the worst of times.", "Good morning! How are you today?",
         "Read the chapter slowly and clearly.", "Press one for sales.",
         "The quick brown fox jumps over the lazy dog.", "Thank you for waiting, we will be right with you."]


def worker(ckpt: str, rounds: int, frames: int, threads: int, main_thread: bool) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest, cpu_alloc

    torch.set_num_threads(threads)
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    sp = SamplingParams(do_sample=True, subtalker_dosample=True, max_new_tokens=frames)
    out: dict = {"rounds": []}

    def run() -> None:
        for _ in range(rounds):
            eng = Engine(model, max_sessions=len(TEXTS))
            reqs = [SynthesisRequest(kind="custom_voice", text=t, speaker="ryan", language="english", sampling=sp,
                                     seed=i, decode_audio=True) for i, t in enumerate(TEXTS)]
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            done = eng.run_all(reqs)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            out["rounds"].append({"wall_s": time.perf_counter() - t0, "faults": r1.ru_minflt - r0.ru_minflt,
                                  "sys_s": r1.ru_stime - r0.ru_stime, "frames": sum(s.num_frames for s in done)})

    if main_thread:
        run()
    else:
        t = threading.Thread(target=run, name="engine-steps")  # a replica steps its engine in its own thread
        t.start()
        t.join()
    later = out["rounds"][1:] or out["rounds"]
    return {"kept": cpu_alloc.keep_freed_memory(), "wall_s": sum(r["wall_s"] for r in later),
            "faults": sum(r["faults"] for r in later), "sys_s": sum(r["sys_s"] for r in later),
            "frames": sum(r["frames"] for r in later)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per worker (the first is not counted)")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--reps", type=int, default=2, help="worker runs per setting, taken in turn (best kept)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: tiny talker, full codec)")
    ap.add_argument("--main-thread", action="store_true", help="step the engine in the main thread (as a batch job)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.rounds, args.frames, args.threads, args.main_thread)))
        return
    tmp = None
    ckpt = args.checkpoint
    if ckpt is None:
        sys.path.insert(0, str(ROOT))
        from qwen_tts_core import make_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="qtts-alloc-")
        ckpt = str(make_checkpoint(Path(tmp.name) / "ck", model_type="custom_voice", size="tiny", codec_size="full"))
    best: dict[str, dict] = {}
    wargs = ["--worker", "--checkpoint", ckpt, "--rounds", str(args.rounds), "--frames", str(args.frames),
             "--threads", str(args.threads)] + (["--main-thread"] if args.main_thread else [])
    for _ in range(args.reps):
        for name, tune in (("kept", "1"), ("default", "0")):
            r = run_worker(sys.executable, __file__, wargs, env=dict(os.environ, QTTS_MALLOC_TUNE=tune))
            if name not in best or r["wall_s"] < best[name]["wall_s"]:
                best[name] = r
    if tmp is not None:
        tmp.cleanup()
    kept, default = best["kept"], best["default"]
    assert kept["frames"] == default["frames"], "both settings must do the same work (same seeds)"
    print(json.dumps({"benchmark": "cpu_alloc", "checkpoint": args.checkpoint or "tiny talker, full-size codec",
                      "sessions": len(TEXTS), "engine_thread": "main" if args.main_thread else "own", "frames_counted": kept["frames"],
                      "kept": {k: round(v, 3) if isinstance(v, float) else v for k, v in kept.items()},
                      "default": {k: round(v, 3) if isinstance(v, float) else v for k, v in default.items()},
                      "speedup": round(default["wall_s"] / kept["wall_s"], 2),
                      "faults_per_frame_kept": round(kept["faults"] / kept["frames"], 1),
                      "faults_per_frame_default": round(default["faults"] / default["frames"], 1)}))


if __name__ == "__main__":
    main()
