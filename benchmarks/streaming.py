"""Streaming on CPU, full-size random 0.6B CustomVoice: ours vs the official package in the same run.

  - time to first audio chunk (ours: add() -> first chunk with first_chunk_frames=1; the reference does not stream,
    so its first audio comes after the whole utterance is generated and decoded), each side --reps runs: ours' p50
    and best, the reference's best (reference_worker.py), compared best to best in the same dtype;
  - steady per-frame cost while streaming;
  - aggregate frames/s with 1, 4 and 8 concurrent sessions in one engine, and that over the rate of one session
    alone (`speedup_cN_vs_one_session_rate`: what N sessions one after another would reach at that rate; the N
    sequential runs themselves are not timed);
  - chunk cost vs position and vs the reference's 25-frame left-context re-decode (benchmarks/codec_stream.py).
Per dtype of --dtypes, ours and the reference each in that dtype: result[dtype] = {ours, reference, ratio}.
Prints one JSON line last.

usage: python benchmarks/streaming.py [--frames 24] [--checkpoint DIR] [--dtypes float32,bfloat16] [--reps 3]
                                     [--skip-reference] [--skip-codec]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _measure import run_worker  # noqa: E402

TEXT = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."


def worker(ckpt: str, frames: int, dtype: str = "float32", reps: int = 3) -> dict:
    import torch

    from qwen_tts_core import Engine, Qwen3TTSModel, SynthesisRequest

    torch.set_num_threads(os.cpu_count() or 1)
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype=dtype)
    sp = model.sampling_params(max_new_tokens=frames + 1)

    def req(i):
        return SynthesisRequest(kind="custom_voice", text=TEXT, speaker="ryan", language="english", sampling=sp,
                                seed=i, first_chunk_frames=1, chunk_frames=4)

    Engine(model, max_sessions=1).run_all([SynthesisRequest(kind="custom_voice", text="Warm up.", speaker="ryan",
                                                            sampling=model.sampling_params(max_new_tokens=3))])
    ttfa, per_frame = [], []
    for i in range(max(1, reps)):
        eng = Engine(model, max_sessions=1)
        t = time.perf_counter()
        s = eng.add(req(i))
        stamps = []
        while eng.has_work():
            for ch in eng.step():
                if ch.pcm.size:
                    stamps.append((time.perf_counter() - t, ch.frame_start + ch.num_frames))
        ttfa.append(stamps[0][0])
        per_frame.append((stamps[-1][0] - stamps[0][0]) / max(stamps[-1][1] - stamps[0][1], 1))
        del s
    out = {"ttfa_s_p50": statistics.median(ttfa), "ttfa_s_best": min(ttfa), "ttfa_runs": len(ttfa),
           "stream_s_per_frame": statistics.median(per_frame)}
    one_rate = None
    for c in (1, 4, 8):
        eng = Engine(model, max_sessions=c)
        t = time.perf_counter()
        sessions = [eng.add(req(i)) for i in range(c)]
        while eng.has_work():
            eng.step()
        rate = sum(x.num_frames for x in sessions) / (time.perf_counter() - t)
        out[f"frames_per_s_c{c}"] = rate
        one_rate = one_rate or rate  # c=1 comes first: one session alone
        out[f"speedup_c{c}_vs_one_session_rate"] = rate / one_rate
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-codec", action="store_true")
    ap.add_argument("--dtypes", default="float32", help="comma-separated, e.g. float32,bfloat16")
    ap.add_argument("--reps", type=int, default=3, help="first-audio runs per side (ours: p50 and best; reference: best)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.checkpoint, args.frames, args.dtype, args.reps)))
        return
    tmp = None
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None or not (ckpt / "config.json").exists():
        from qwen_tts_core import make_checkpoint

        if ckpt is None:
            tmp = tempfile.TemporaryDirectory(prefix="qtts-stream-")
            ckpt = Path(tmp.name) / "ck"
        make_checkpoint(ckpt, model_type="custom_voice", size="0.6b", seed=0, dtype="bfloat16")
    result: dict = {"benchmark": "streaming", "frames": args.frames, "cpu_threads": os.cpu_count()}
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests" / "oracle" / "stubs"))
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        entry: dict = {"ours": run_worker(
            sys.executable, __file__, ["--worker", "--checkpoint", str(ckpt), "--frames", str(args.frames),
                                       "--dtype", dtype, "--reps", str(args.reps)])}
        if not args.skip_reference:  # the reference in the same dtype, best of as many runs
            ref = run_worker(str(ROOT / ".venv-oracle" / "bin" / "python"), str(HERE / "reference_worker.py"),
                             [str(ckpt), dtype, str(args.frames), "single", "--reps", str(max(1, args.reps) - 1)],
                             env=env)
            entry["reference"] = {"time_to_first_audio_s_best": ref["time_to_first_audio_s"],
                                  "s_per_frame": ref["s_per_frame"], "runs": ref["runs"]}
            entry["ttfa_best_speedup_vs_reference"] = (ref["time_to_first_audio_s"]
                                                       / entry["ours"]["ttfa_s_best"])
        result[dtype] = entry
    if not args.skip_codec:
        result["codec"] = run_worker(sys.executable, str(HERE / "codec_stream.py"),
                                     ["--frames", "1000", "--threads", str(os.cpu_count() or 1)]
                                     + ([] if args.skip_reference else ["--oracle"]))
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
