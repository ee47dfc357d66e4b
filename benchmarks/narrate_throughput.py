"""Narration throughput: audio seconds produced per wall second for a sample book.

Compares, on the same rows and the same engine settings:
  * plain_loop   - one process, the engine fed one chunk at a time (no batching, no Ray);
  * local_batch  - one process, all chunks of the book in one engine batch (continuous batching, no Ray);
  * ray_actors_N - Ray Data `map_batches` with N engine actors (N = 1, 2, 4), each loading the model once.
Ray timings include actor start-up and model loading (what a job pays); `load_s` reports the one-process
model load separately. Every run writes to a fresh folder, so nothing is reused. The last stdout line is JSON.

    python benchmarks/narrate_throughput.py                      # tiny random checkpoint, CPU
    python benchmarks/narrate_throughput.py --model CKPT --device cuda --actors 1 2 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def book_rows(chapters: int, voice: str):
    """The sample book's chapters, repeated with new ids until there are `chapters` rows."""
    from jobs.inputs import RowDefaults, read_inputs

    base = read_inputs(ROOT / "examples" / "book", RowDefaults(voice=voice))
    rows = []
    for i in range(chapters):
        r = base[i % len(base)]
        rows.append(type(r)(**{**r.__dict__, "id": f"{r.id}-{i}", "seed": i}))
    return rows


def plain_loop(rows, render, opts) -> tuple[float, float, float]:
    """One process, one chunk at a time. Returns (load_s, wall_s, audio_s)."""
    from jobs.audio import join_chunks
    from jobs.render import _chunk_jobs
    from jobs.split import split_text
    from jobs.synth import EngineBackend

    t0 = time.perf_counter()
    be = EngineBackend(opts.engine)
    be._engine(render.model)  # load once, outside the timed loop
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    audio = 0.0
    for row in rows:
        pcm = []
        for job in _chunk_jobs(row, render, split_text(row.text, render.max_chars), 0):
            (res,) = be.synthesize([job])
            pcm.append(res.pcm)
        audio += len(join_chunks(pcm, 24000, render.pause_s)) / 24000
    return load, time.perf_counter() - t0, audio


def run_mode(rows, render, opts, out: Path) -> tuple[float, float, int]:
    """run_rows end to end into a fresh folder. Returns (wall_s, audio_s, failed)."""
    from jobs.runner import run_rows

    t0 = time.perf_counter()
    recs = run_rows(rows, render, opts)
    wall = time.perf_counter() - t0
    return wall, sum(r.duration_s for r in recs), sum(r.status == "failed" for r in recs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: a tiny random custom_voice one)")
    p.add_argument("--chapters", type=int, default=6)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-sessions", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-cpus", type=float, default=0.25, help="CPUs reserved per actor")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (e.g. 0.25 to share one)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per engine")
    p.add_argument("--voice", default="vivian")
    p.add_argument("--batch-size", type=int, default=0,
                   help="rows per map_batches batch (default: rows spread evenly over the actors)")
    a = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from jobs.render import RenderConfig, model_revision
    from jobs.runner import RunOptions, connect_ray
    from jobs.synth import EngineOptions

    tmp = Path(tempfile.mkdtemp(prefix="qtts-bench-"))
    model = a.model
    if model is None:
        from qwen_tts_core import make_checkpoint

        model = str(tmp / "tiny")
        make_checkpoint(model, model_type="custom_voice", size="tiny", seed=0)
    render = RenderConfig(model=model, revision=model_revision(model), max_chars=200, pause_s=0.4,
                          sampling={"max_new_tokens": a.max_new_tokens},
                          retry_on=("guard",) if a.model is None else ("guard", "max_new_tokens"))
    eng = EngineOptions(device=a.device, dtype=a.dtype, max_sessions=a.max_sessions, torch_threads=a.threads)
    rows = book_rows(a.chapters, a.voice)
    results = []

    load, wall, audio = plain_loop(rows, render, RunOptions(engine=eng, runner="local"))
    results.append({"mode": "plain_loop", "actors": 0, "wall_s": round(wall, 2), "audio_s": round(audio, 2),
                    "audio_s_per_wall_s": round(audio / wall, 3), "load_s": round(load, 2)})
    opts = RunOptions(output=f"file://{tmp / 'local'}", backend="engine", runner="local", progress=False,
                      batch_size=len(rows), engine=eng)
    wall, audio, failed = run_mode(rows, render, opts, tmp / "local")
    results.append({"mode": "local_batch", "actors": 0, "wall_s": round(wall, 2), "audio_s": round(audio, 2),
                    "audio_s_per_wall_s": round(audio / wall, 3), "failed": failed, "includes_load": True})
    connect_ray(None)
    for n in a.actors:
        opts = RunOptions(output=f"file://{tmp / f'ray{n}'}", backend="engine", runner="ray", progress=False,
                          actors=n, num_cpus=a.num_cpus, num_gpus=a.num_gpus, engine=eng,
                          batch_size=a.batch_size or max(1, -(-len(rows) // n)))
        wall, audio, failed = run_mode(rows, render, opts, tmp / f"ray{n}")
        results.append({"mode": f"ray_actors_{n}", "actors": n, "wall_s": round(wall, 2),
                        "audio_s": round(audio, 2), "audio_s_per_wall_s": round(audio / wall, 3),
                        "failed": failed, "includes_load": True})
    for r in results:
        logging.getLogger("bench").warning("%s", r)
    print(json.dumps({"benchmark": "narrate_throughput", "model": "tiny-random" if a.model is None else a.model,
                      "device": a.device, "chapters": len(rows), "max_new_tokens": a.max_new_tokens,
                      "cpu_count": os.cpu_count(), "machine": platform.machine(), "results": results}))


if __name__ == "__main__":
    main()
