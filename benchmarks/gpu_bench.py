"""The stages of the one-shot GPU check (benchmarks/gpu_check.sh runs each in its own process under its own timeout).

    python3 benchmarks/gpu_bench.py --stage NAME --device cuda --out RESULTS.jsonl [--work DIR]
    python3 benchmarks/gpu_bench.py --summary RESULTS.jsonl       # the final one-line JSON (pass/fail per goal;
                                                                  # a stage that did not end ok: its goals "missing")

Stages (each appends one JSON line to --out and prints it):
  versions   torch/CUDA/GPU; the SDPA kernel torch picks for the talker's and the code predictor's decode shapes
             (0.6B and 1.7B) in each attention layout, and for a prefill
  tiny       tiny fp32: CPU vs GPU eager vs GPU graphs with staggered sessions crossing buckets (1->2->4->3), a
             paused incremental session, frames not all equal, seeded sampled codes in range and equal across graphs
             and eager, finite audio, stream == offline, a Base voice saved, loaded and used on the GPU, the
             sampler's noise finite at the top of its uniform grid (GPU only)
  build      a random 1.7B CustomVoice checkpoint (bf16) in --work, reused by the next stages
  parity     1.7B bf16 greedy: graphs == eager (same buckets) for 4 staggered sessions
  timings    1.7B bf16, CUDA events: talker and code-predictor replays at 1/8/32/64 rows and 512/4096 keys, prefill
             (a short prompt's graph vs eager, 8 starting together vs one by one),
             codec decode batched vs per session, host time and syncs of Engine.step, capture time and memory
  e2e        1.7B bf16, production settings (max_len 4096, chunks of 4): first audio p50/p95 idle and with 32
             sessions running, single-stream real-time factor, audio-seconds per second at 8/32/64 (with and
             without seeds), peak memory
  e2e_compiled  the same with the fused ops compiled (Engine(compile=True)); its goals are prefixed compiled_
  compile    1.7B bf16 with graphs, plain vs compiled fused ops (Engine(compile=True)): engine start (capture and
             compiling), talker and code-predictor replay times and kernels at 1 and 8 rows, greedy codes compared,
             the compiled noise finite at the top of its grid (GPU only)
--device cpu is the dry run CI uses: tiny models everywhere, the CUDA-graph stand-in instead of graphs, small sizes.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

_T0 = time.monotonic()  # about when this process started (its stage's timeout counts from then)

# --- the final summary: plain Python, defined before torch is imported, so that gpu_check.sh prints its one-line
# JSON even where importing torch or the project fails (every stage's line then says so)
_E2E_GOALS = ("ttfa_p50_idle_le_30ms", "ttfa_p95_busy32_le_50ms", "single_stream_rtf_ge_15", "audio_s_per_s_c64_ge_200")
# The goals each stage is responsible for: a stage that crashed, was killed by its timeout or skipped reports none,
# and the summary must not read their absence as "nothing failed" (tests/core/test_gpu_check.py keeps this in step
# with what the stages report).
STAGE_GOALS: dict[str, tuple[str, ...]] = {
    "versions": tuple(f"sdpa_fused_{n}_{s}" for s in ("0.6b", "1.7b") for n in ("talker", "cp")),
    "tiny": ("tiny_graphs_eq_eager", "tiny_gpu_eq_cpu", "frames_distinct", "paused_incremental_ok", "sampled_ok",
             "noise_finite", "stream_eq_offline", "stored_voice_on_device"),
    "build": (),
    "parity": ("bf16_graph_eq_eager",),
    "timings": ("syncs_per_step_le_2",),
    "e2e": _E2E_GOALS,
    "e2e_compiled": tuple(f"compiled_{g}" for g in _E2E_GOALS),
    "compile": ("compiled_ops_in_use", "compiled_noise_finite"),
}


def _parse(line: str) -> dict:
    """One results line; one that is not JSON (a stage's line cut off mid-write) fails its stage, not the summary."""
    try:
        rec = json.loads(line)
        if isinstance(rec, dict):
            return rec
    except ValueError:
        pass
    m = re.search(r'"stage": "([A-Za-z0-9_]+)"', line)
    return {"stage": m.group(1) if m else "?", "ok": False, "error": f"unreadable result line: {line[:120]}"}


def summary(path: Path) -> dict:
    """The final one-line JSON: per stage "ok" or why not, per goal "pass", "fail", None (not judged on this device)
    or "missing" (its stage did not report it: crashed, killed by its timeout, skipped). `failed` counts the failed
    and missing goals plus the stages that did not end ok, so a run with a dead stage never reads as all passed."""
    lines = [_parse(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    goals: dict = {}
    stages: dict = {}
    for rec in lines:
        name = rec.get("stage", "?")
        stages[name] = "ok" if rec.get("ok") else str(rec.get("error") or "failed")[:200]
        reported = rec.get("goals") or {}
        for k, v in reported.items():
            goals[k] = None if v is None else ("pass" if v else "fail")
        for k in STAGE_GOALS.get(name, ()):
            if k not in reported:
                goals[k] = "missing"
    device = next((r.get("device") for r in lines if r.get("stage") == "versions"), None)
    failed_stages = sorted(k for k, v in stages.items() if v != "ok")
    n_fail = sum(v == "fail" for v in goals.values())
    n_missing = sum(v == "missing" for v in goals.values())
    return {"benchmark": "gpu_check", "device": device, "stages": stages, "goals": goals,
            "passed": sum(v == "pass" for v in goals.values()), "failed": n_fail + n_missing + len(failed_stages),
            "goals_failed": n_fail, "goals_missing": n_missing, "stages_failed": failed_stages,
            "all_ok": bool(lines) and n_fail + n_missing + len(failed_stages) == 0}


if __name__ == "__main__" and sys.argv[1:2] == ["--summary"] and len(sys.argv) == 3:
    print(json.dumps(summary(Path(sys.argv[2]))))
    sys.exit(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tts_core import Engine, Qwen3TTSModel, SamplingParams, SynthesisRequest, make_checkpoint  # noqa: E402
from qwen_tts_core.generate.graphs import GraphCapture  # noqa: E402
from qwen_tts_core.generate.runner import Start  # noqa: E402
from qwen_tts_core.model import fused  # noqa: E402

TEXT = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."
TEXTS = [TEXT, "Please hold while we connect your call.", "Good morning! How are you today?",
         "The quick brown fox jumps over the lazy dog."]
GREEDY = dict(do_sample=False, subtalker_dosample=False)


class Ctx:
    def __init__(self, device: str, work: Path) -> None:
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"
        self.work = work
        self.big = "1.7b" if self.cuda else "tiny"
        # the stage's results so far: a stage fills it as it measures, so a stage killed by its timeout (SIGTERM,
        # see main) still writes what it had (its goals so far; the others then read "missing")
        self.out: dict = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.dev)

    def engine(self, model, graphs: bool, **kw) -> Engine:
        if graphs and not self.cuda:
            kw["graph_capture"] = GraphCapture("cpu", fake=True)
        else:
            kw["cuda_graphs"] = graphs
        kw.setdefault("static", True)  # eager runs use the graphs' shapes (batch buckets): comparable bit for bit
        return Engine(model, **kw)

    def checkpoint(self, kind: str, size: str, dtype: str = "float32", build: bool = True) -> Path:
        """The checkpoint in --work, built when missing if `build`. The folder appears whole or not at all (built
        beside it, then renamed), so a stage killed by its timeout while building leaves nothing half-written."""
        path = self.work / f"{kind}-{size}-{dtype}"
        if path.is_dir():
            return path
        if not build:
            raise RuntimeError(f"no {size} {kind} checkpoint in {self.work}: the build stage did not finish")
        part = path.with_name(path.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)
        make_checkpoint(part, kind, size, seed=0, dtype=dtype)
        os.replace(part, path)
        return path

    def big_checkpoint(self, build: bool = False) -> Path:
        """The bf16 model of the timed stages: built by the build stage only (a later stage that rebuilt it would
        spend its own, shorter slot on it and die the same way)."""
        return self.checkpoint("custom_voice", self.big, "bfloat16", build=build)

    def load(self, path: Path, dtype: str, device=None) -> Qwen3TTSModel:
        return Qwen3TTSModel.from_pretrained(path, device_map=str(device or self.dev), dtype=dtype)


def req(text, sampling: SamplingParams, **kw) -> SynthesisRequest:
    kw.setdefault("decode_audio", False)
    return SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english", sampling=sampling,
                            **kw)


def staggered(eng: Engine, sampling: SamplingParams, seeds=(None,) * 4) -> list[torch.Tensor]:
    """4 sessions joining at steps 0, 2, 4, 4, the first one short: batch 1 -> 2 -> 4 -> 3."""
    short = sampling.with_overrides(max_new_tokens=max(3, sampling.max_new_tokens // 3))
    sessions = [eng.add(req(TEXTS[0], short, seed=seeds[0], non_streaming_mode=True))]
    for i in range(6):
        if i == 2:
            sessions.append(eng.add(req(TEXTS[1], sampling, seed=seeds[1])))
        if i == 4:
            sessions += [eng.add(req(t, sampling, seed=s)) for t, s in zip(TEXTS[2:], seeds[2:])]
        eng.step()
    while not all(s.done for s in sessions):
        eng.step()
    return [s.codes() for s in sessions]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# --- stages -----------------------------------------------------------------------------------------------------
def stage_versions(c: Ctx) -> dict:
    import transformers

    from qwen_tts_core.config import make_config
    from qwen_tts_core.model.layers import probe_decode_layouts, sdpa_backend

    out = c.out
    out.update({"torch": torch.__version__, "transformers": transformers.__version__,
                "python": sys.version.split()[0], "cuda": torch.version.cuda,
                "device": torch.cuda.get_device_name(c.dev) if c.cuda else "cpu"})
    dt = torch.bfloat16 if c.cuda else torch.float32
    goals = out["goals"] = {}
    for size in ("0.6b", "1.7b"):
        t = make_config("custom_voice", size).talker
        found = probe_decode_layouts(t, 64, 512, dt, c.dev)   # what an engine's probe sees, at 64 rows, 512 keys
        per = {"talker": {k: found[k] for k in ("gqa", "grouped", "grouped_float")},
               "cp": {"gqa": found["cp_gqa"], "grouped": found["cp_grouped"]}}
        for name, got in per.items():
            out[f"sdpa_{name}_decode_{size}"] = got
            fused = [v for v in got.values() if v not in ("MATH", "ERROR", "UNKNOWN")]
            goals[f"sdpa_fused_{name}_{size}"] = bool(fused) if c.cuda else None
        out[f"decode_layouts_{size}"] = {"talker": found["layout"], "cp": found["cp_layout"]}
        T = 96
        qp = torch.randn(1, t.num_attention_heads, T, t.head_dim, dtype=dt, device=c.dev)
        kp = torch.randn(1, t.num_key_value_heads, T, t.head_dim, dtype=dt, device=c.dev)
        pm = torch.ones(T, T, dtype=torch.bool, device=c.dev).tril()[None, None]
        out[f"sdpa_prefill_{size}"] = sdpa_backend(qp, kp, kp, pm, enable_gqa=True)
    return out


def stage_tiny(c: Ctx) -> dict:
    if c.cuda:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    ck = c.checkpoint("custom_voice", "tiny")
    cpu, gpu = c.load(ck, "float32", "cpu"), c.load(ck, "float32")
    g = SamplingParams(max_new_tokens=24 if c.cuda else 12, **GREEDY)
    ref = staggered(Engine(cpu, max_sessions=4), g)
    eager = staggered(c.engine(gpu, False, max_sessions=4, max_len=256), g)
    geng = c.engine(gpu, True, max_sessions=4, max_len=256)
    graphs = staggered(geng, g)
    out = c.out
    out.update(frames=[len(x) for x in graphs], audio_graphs=geng.audio_graphs)
    goals = out["goals"] = {"tiny_graphs_eq_eager": same(graphs, eager), "tiny_gpu_eq_cpu": same(eager, ref),
                            "frames_distinct": all(len({tuple(f) for f in x.tolist()}) > 1 for x in graphs)}
    # a paused incremental session, with another one running
    full = Engine(cpu, max_sessions=1).run_all([req(TEXT, g)])[0].codes()
    s, other = geng.add(req(None, g)), geng.add(req(TEXTS[1], g))
    paused = 0
    words = TEXT.split(" ")
    for piece in [w + " " for w in words[:6]] + [" ".join(words[6:])]:  # word by word: the talker runs out of text
        if s.done:  # ended (max_new_tokens, or EOS from random weights) before all its text came
            break
        s.append_text(piece)
        for _ in range(2):
            geng.step()
            paused += int(s.prompt is not None and s.phase == "talker" and s.text_step >= len(s.prompt.trailing))
    if not s.done:
        s.end_text()
    while not (s.done and other.done):
        geng.step()
    goals["paused_incremental_ok"] = bool(paused > 0 and torch.equal(s.codes(), full))
    # seeded sampling: graphs == eager, codes in range; audio finite
    sp = SamplingParams(max_new_tokens=16 if c.cuda else 8)
    seeds = (11, 12, 13, 14)
    a, b = staggered(geng, sp, seeds), staggered(c.engine(gpu, False, max_sessions=4, max_len=256), sp, seeds)
    codes = torch.cat(a)
    s = geng.add(req(TEXT, sp, seed=3, decode_audio=True))
    chunks = []
    while not s.done:
        chunks += [ch for ch in geng.step() if ch.session_id == s.id]
    pcm = np.concatenate([ch.pcm for ch in chunks])
    goals["sampled_ok"] = bool(same(a, b) and codes.min() >= 0 and codes.max() < 2048 and np.isfinite(pcm).all()
                               and pcm.size > 0)
    goals["noise_finite"] = noise_finite_at_grid_top(c) if c.cuda else None  # CPU: tests/core/test_engine.py
    # stream == offline
    kw = dict(speaker="ryan", language="english", max_new_tokens=12, **GREEDY)
    (off,), _ = gpu.generate_custom_voice(TEXT, non_streaming_mode=False, **kw)
    s = geng.add(SynthesisRequest(kind="custom_voice", text=TEXT, speaker="ryan", language="english",
                                  sampling=SamplingParams(max_new_tokens=12, **GREEDY), chunk_frames=4))
    chunks = []
    while not s.done:
        chunks += [ch.pcm for ch in geng.step() if ch.session_id == s.id]
    st = np.concatenate(chunks)
    out["stream_max_diff"] = float(np.abs(st - off).max()) if st.shape == off.shape else None
    goals["stream_eq_offline"] = st.shape == off.shape and out["stream_max_diff"] <= 1e-3
    goals["stored_voice_on_device"] = stored_voice(c)
    return out


def stored_voice(c: Ctx) -> bool:
    from qwen_tts_core import load_voice_prompt, save_voice_prompt

    base = c.load(c.checkpoint("base", "tiny"), "float32")
    t = np.arange(48000) / 24000
    wav = (0.3 * np.sin(2 * np.pi * 150 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    (item,) = base.create_voice_clone_prompt((wav, 24000), ref_text="Good morning, how are you today?")
    back = load_voice_prompt(save_voice_prompt(item, c.work / "voice.safetensors"))  # CPU tensors
    eng = c.engine(base, True, max_sessions=2, max_len=256)
    r = SynthesisRequest(kind="voice_clone", text="Hello world.", language="english", voice_clone_prompt=back,
                         sampling=SamplingParams(max_new_tokens=10, **GREEDY))
    s = eng.add(r)
    chunks = []
    while not s.done:
        chunks += [ch for ch in eng.step() if ch.session_id == s.id]
    return s.finish_reason == "max_new_tokens" and chunks[-1].is_last and sum(ch.pcm.size for ch in chunks) > 0


def stage_build(c: Ctx) -> dict:
    t = time.perf_counter()
    c.big_checkpoint(build=True)
    return {"size": c.big, "build_s": round(time.perf_counter() - t, 1), "goals": {}}


def stage_parity(c: Ctx) -> dict:
    m = c.load(c.big_checkpoint(), "bfloat16")
    g = SamplingParams(max_new_tokens=24, **GREEDY)
    eager = staggered(c.engine(m, False, max_sessions=4, max_len=512), g)
    graphs = staggered(c.engine(m, True, max_sessions=4, max_len=512), g)
    diff = [int((a != b).any(-1).sum()) for a, b in zip(eager, graphs)] if all(
        a.shape == b.shape for a, b in zip(eager, graphs)) else None
    return {"size": c.big, "frames": [len(x) for x in graphs], "frames_differing": diff,
            "goals": {"bf16_graph_eq_eager": same(graphs, eager)}}


class Timer:
    """Milliseconds of GPU work (CUDA events) or wall time (CPU), median of `reps`."""

    def __init__(self, c: Ctx) -> None:
        self.c = c

    def __call__(self, fn, reps: int = 10) -> float:
        fn()
        ts = []
        for _ in range(reps):
            if self.c.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b))
            else:
                t = time.perf_counter()
                fn()
                ts.append(1000 * (time.perf_counter() - t))
        return round(float(np.median(ts)), 3)


def stage_timings(c: Ctx) -> dict:
    m = c.load(c.big_checkpoint(), "bfloat16")
    rows = (1, 8, 32, 64) if c.cuda else (1, 2, 4)
    lens = (512, 4096) if c.cuda else (64, 128)
    mem0 = torch.cuda.memory_allocated(c.dev) if c.cuda else 0
    eng = c.engine(m, True, max_sessions=max(rows), max_len=max(lens))
    r = eng.runner
    out = c.out
    out.update({"size": c.big, "capture_s": round(eng.capture_s, 2), "graphs": len(r.graphs), "sdpa": eng.sdpa,
                "capture_s_per_bucket": {f"{k[0]}/{'/'.join(map(str, k[1:]))}": round(v, 3)
                                         for k, v in r.capture_seconds.items()}})
    if c.cuda:
        out["cache_and_graph_mem_gb"] = round((torch.cuda.memory_allocated(c.dev) - mem0) / 1e9, 2)
        out["graph_pool_reserved_gb"] = round(torch.cuda.memory_reserved(c.dev) / 1e9, 2)
    timer = Timer(c)
    with torch.inference_mode():
        for B in rows:
            out[f"cp_replay_ms_b{B}"] = timer(r.graphs[("cp", B)].replay)
            out[f"cp_topk_replay_ms_b{B}"] = timer(r.graphs[("cp", B, "topk")].replay)
            for L in lens:
                out[f"talker_replay_ms_b{B}_l{L}"] = timer(r.graphs[("talker", B, L)].replay)
        emb = r.tts_pad.expand(64, -1).contiguous()
        out["prefill_ms_t64"] = timer(lambda: r.start(0, emb, [], SamplingParams(), seed=0), reps=5)
        # 8 sessions starting in one step: one batched prefill vs one each (both T=16)
        n8, e16 = min(8, max(rows)), r.tts_pad.expand(16, -1).contiguous()
        starts = [Start(i, e16, [], SamplingParams(), seed=i) for i in range(n8)]
        out[f"prefill_ms_batched_n{n8}_t16"] = timer(lambda: r.start_many(starts), reps=5)
        out[f"prefill_ms_serial_n{n8}_t16"] = timer(lambda: [r.start_many([x]) for x in starts], reps=5)
        # one short prompt (12 positions, a streaming-mode prompt): its prefill graph vs the same pass eagerly
        one = [Start(0, r.tts_pad.expand(12, -1).contiguous(), [], SamplingParams(), seed=0)]
        out["prefill_ms_graph_t12"] = timer(lambda: r._prefill_bucketed(one, 16), reps=5)
        out["prefill_ms_eager_t12"] = timer(lambda: r._prefill_exact(one), reps=5)
        codec = m.codec
        for n in rows:
            codes = torch.randint(0, 2048, (n, 16, 4), device=c.dev)
            state = codec.new_stream(n)
            out[f"codec_batched_ms_n{n}_f4"] = timer(
                lambda codes=codes, state=state: codec.decode_chunk(codes, state, check=False), reps=5)
            states = [codec.new_stream(1) for _ in range(n)]
            out[f"codec_per_session_ms_n{n}_f4"] = timer(
                lambda codes=codes, states=states: [codec.decode_chunk(codes[i:i + 1], st, check=False)
                                                    for i, st in enumerate(states)], reps=3)
    # host time and syncs of Engine.step with 8 sessions streaming
    n = 8 if c.cuda else 2
    sessions = [eng.add(req(TEXT, SamplingParams(max_new_tokens=40), seed=i, decode_audio=True)) for i in range(n)]
    for _ in range(3):
        eng.step()
    host, syncs, steps = [], 0, 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if c.cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            while not all(s.done for s in sessions) and steps < 20:
                t = time.perf_counter()
                eng.step()
                host.append(1000 * (time.perf_counter() - t))
                steps += 1
        finally:
            if c.cuda:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    for s in sessions:
        eng.cancel(s)
    while eng.has_work():
        eng.step()
    out["engine_step_host_ms_p50"] = round(float(np.median(host)), 2)
    out["syncs_per_step"] = round(syncs / max(steps, 1), 2) if c.cuda else None
    if c.cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(c.dev) / 1e9, 2)
    # one read of the ids per step, plus (every few steps) the audio chunk's copy to the host
    out["goals"] = {"syncs_per_step_le_2": (out["syncs_per_step"] <= 2) if c.cuda else None}
    return out


def stage_e2e(c: Ctx, compile: bool = False) -> dict:
    m = c.load(c.big_checkpoint(), "bfloat16")
    conc = (8, 32, 64) if c.cuda else (2, 4)
    busy_n = 32 if c.cuda else 3
    frames = 100 if c.cuda else 8
    eng = c.engine(m, True, max_sessions=max(conc), max_len=4096 if c.cuda else 256, compile=compile)
    out = c.out
    out.update({"size": c.big, "compile": compile, "capture_s": round(eng.capture_s, 2),
                "warm_up_s": round(eng.warm_up(), 2), "audio_graphs": eng.audio_graphs})

    def ttfa(runs: int) -> list[float]:
        got = []
        for i in range(runs):
            c.sync()
            t = time.perf_counter()
            s = eng.add(req(TEXT, SamplingParams(max_new_tokens=200), seed=i, decode_audio=True,
                            first_chunk_frames=1, chunk_frames=4))
            first: list[float] = []

            def take(chunks, s=s, first=first, t=t):  # as the serve scheduler: chunks handed over mid-step too
                if not first and any(ch.session_id == s.id and ch.pcm.size for ch in chunks):
                    first.append(1000 * (time.perf_counter() - t))

            while not first:
                take(eng.step(emit=take))
            got.append(first[0])
            eng.cancel(s)
            eng.step()
        return got

    idle = ttfa(10 if c.cuda else 3)
    out.update(ttfa_ms_p50_idle=round(float(np.percentile(idle, 50)), 1),
               ttfa_ms_p95_idle=round(float(np.percentile(idle, 95)), 1))
    background = [eng.add(req(TEXTS[i % 4], SamplingParams(max_new_tokens=3000), seed=100 + i, decode_audio=True))
                  for i in range(busy_n)]
    for _ in range(5):
        eng.step()
    busy = ttfa(20 if c.cuda else 3)
    for s in background:
        eng.cancel(s)
    while eng.has_work():
        eng.step()
    out.update(ttfa_ms_p50_busy=round(float(np.percentile(busy, 50)), 1),
               ttfa_ms_p95_busy=round(float(np.percentile(busy, 95)), 1))

    def throughput(n: int, seeded: bool) -> float:
        c.sync()
        t = time.perf_counter()
        ss = [eng.add(req(TEXTS[i % 4], SamplingParams(max_new_tokens=frames + 1), seed=i if seeded else None,
                          decode_audio=True)) for i in range(n)]
        samples = 0
        while not all(s.done for s in ss):
            samples += sum(ch.pcm.size for ch in eng.step())
        c.sync()
        return round(samples / 24000 / (time.perf_counter() - t), 2)

    out["single_stream_rtf_x"] = throughput(1, True)
    for n in conc:
        out[f"audio_s_per_s_c{n}"] = throughput(n, True)
    out[f"audio_s_per_s_c{conc[1]}_unseeded"] = throughput(conc[1], False)
    if c.cuda:
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(c.dev) / 1e9, 2)
    out["goals"] = {
        "ttfa_p50_idle_le_30ms": out["ttfa_ms_p50_idle"] <= 30 if c.cuda else None,
        "ttfa_p95_busy32_le_50ms": out["ttfa_ms_p95_busy"] <= 50 if c.cuda else None,
        "single_stream_rtf_ge_15": out["single_stream_rtf_x"] >= 15 if c.cuda else None,
        "audio_s_per_s_c64_ge_200": out.get("audio_s_per_s_c64", 0) >= 200 if c.cuda else None}
    if compile:
        out["goals"] = {f"compiled_{k}": v for k, v in out["goals"].items()}
    return out


def noise_finite_at_grid_top(c: Ctx) -> bool:
    """The sampler's Gumbel noise at the top of its uniform grid, on the device, where a float32 uniform once
    rounded to 1.0 (+inf noise, a NaN draw, any id): finite and the row's largest, plain (and compiled, inside
    `fused.compiled_ops`, whose log may be less exact near 1). The key is found by hash search for one token."""
    from qwen_tts_core.generate.sampling import grid_top_key, gumbel, token_hash

    tok, salt = 2370, token_hash(3072, device=c.dev)
    key = grid_top_key(salt, tok)
    if key is None:
        return False
    noise = gumbel(key, salt)
    return bool(torch.isfinite(noise).all() and noise[0, tok] == noise.max())


def stage_compile(c: Ctx) -> dict:
    """Plain vs compiled fused ops (`Engine(compile=True)`, model/fused.py) on the production path (graphs): capture
    time (compiling included), replay times, kernels per replay, and whether greedy codes stay the plain ones."""
    from torch.profiler import ProfilerActivity, profile

    m = c.load(c.big_checkpoint(), "bfloat16")
    out = c.out
    out["size"] = c.big
    timer, codes = Timer(c), {}
    L = 512 if c.cuda else 64
    for compiled in (False, True):
        key = "compiled" if compiled else "plain"
        t = time.perf_counter()
        eng = c.engine(m, True, max_sessions=8, max_len=L, batch_buckets=(1, 8), compile=compiled)
        out[f"{key}_engine_s"] = round(time.perf_counter() - t, 1)
        r = eng.runner
        with torch.inference_mode():
            for B in (1, 8):
                for name, g in ((f"cp_topk_replay_ms_b{B}", r.graphs[("cp", B, "topk")]),
                                (f"talker_replay_ms_b{B}_l{L}", r.graphs[("talker", B, L)])):
                    out[f"{key}_{name}"] = timer(g.replay)
                    if c.cuda and B == 1:
                        with profile(activities=[ProfilerActivity.CUDA]) as prof:
                            g.replay()
                            c.sync()
                        n = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
                        out[f"{key}_{name.split('_replay')[0]}_kernels_b1"] = n or None  # None: not traced
        greedy = SamplingParams(do_sample=False, subtalker_dosample=False, max_new_tokens=24)
        codes[key] = [x.codes() for x in eng.run_all([req(t, greedy) for t in TEXTS])]
        out[f"{key}_fused_ops_compiled"] = compiled and all(op.compiled is not None and not op.broken
                                                            for op in fused.OPS)
        print(json.dumps({"stage": "compile", "partial": True, **out}), file=sys.stderr, flush=True)
    same = [float((a == b).float().mean()) if a.shape == b.shape else 0.0
            for a, b in zip(codes["plain"], codes["compiled"])]
    out["greedy_codes_equal_frac"] = round(float(np.mean(same)), 3)  # bf16 rounding differs: drift is expected
    with fused.compiled_ops(True):
        finite = noise_finite_at_grid_top(c) if c.cuda else None
    out["goals"] = {"compiled_ops_in_use": out["compiled_fused_ops_compiled"] if c.cuda else None,
                    "compiled_noise_finite": finite}
    return out


STAGES = {"versions": stage_versions, "tiny": stage_tiny, "build": stage_build, "parity": stage_parity,
          "timings": stage_timings, "e2e": stage_e2e, "compile": stage_compile,
          "e2e_compiled": lambda c: stage_e2e(c, compile=True)}


class StageTimeout(BaseException):
    """SIGTERM from the stage's `timeout` (gpu_check.sh): raised in the stage so that main writes what it measured. A
    BaseException, as KeyboardInterrupt: code that keeps going past an Exception (Engine.step fails its sessions and
    carries on) must not swallow it, or a stage past its time went on and could report itself ok."""


def _on_sigterm(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second one (or timeout -k's SIGKILL) ends the process
    limit = os.environ.get("GPU_CHECK_STAGE_LIMIT_S")
    raise StageTimeout(f"killed after {limit}s (its timeout; results so far kept)" if limit else "SIGTERM")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=list(STAGES))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, help="JSON lines file the stage's result is appended to")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "qtts-gpu-check")
    ap.add_argument("--summary", type=Path, help="print the final one-line JSON of a results file")
    args = ap.parse_args()
    if args.summary:
        print(json.dumps(summary(args.summary)))
        return
    if not args.stage:
        ap.error("--stage or --summary is required")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu for the dry run)")
    # CPU dry run: one thread (tiny models; more threads only spin against each other on a small shared machine)
    torch.set_num_threads(min(8, os.cpu_count() or 1) if args.device != "cpu" else 1)
    args.work.mkdir(parents=True, exist_ok=True)
    c = Ctx(args.device, args.work)
    t = time.perf_counter()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # where it crashed (a segfault in a CUDA library) or hung (stuck in C, where SIGTERM cannot raise): every
    # thread's Python stack into the stage's log, a moment before its timeout
    faulthandler.enable()
    limit = float(os.environ.get("GPU_CHECK_STAGE_LIMIT_S") or 0)
    if limit:
        faulthandler.dump_traceback_later(max(1.0, limit - 2.0 - (time.monotonic() - _T0)))
    try:
        rec = {"stage": args.stage, **STAGES[args.stage](c), "ok": True}
    except (Exception, StageTimeout) as e:  # noqa: BLE001 - the result says what broke; the next stage still runs
        # what the stage measured before it broke (its goals so far: the summary marks the others "missing")
        rec = {"stage": args.stage, **c.out, "ok": False, "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc()[-3000:]}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a SIGTERM now must not cut the line (SIGKILL comes 5 s later)
    faulthandler.cancel_dump_traceback_later()
    rec["seconds"] = round(time.perf_counter() - t, 1)
    line = json.dumps(rec, default=str)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
