"""Kernels per step on CPU: the proxy for CUDA kernel launches that the GPU check cannot afford to find by trial.

    python benchmarks/gpu_opcount.py [--sizes 0.6b 1.7b] [--batches 1 8 64] [--dtype bfloat16]

Each body the engine captures in a CUDA graph is captured here with the CPU stand-in (`FakeCUDAGraph`), which records
the aten ops it dispatches; an op counts as a kernel unless it is a view or a no-op cast (`graphs.launches`). The
models have the real layer counts, heads and dtype of 0.6B / 1.7B (28 talker layers, 5 code-predictor layers, a
projection between them in 1.7B, the full codec's 8 transformer layers and 4 decoder blocks) but narrow widths: the op
sequence does not depend on widths, so the counts are those of the real models, at a fraction of the memory.

Reported per size and batch: `talker_step` (one talker graph), `cp_pass` (the 15-codebook code-predictor graph;
`cp_pass_topk`: its top-k-only variant, the one the official sampling defaults replay), each also as
`*_compiled_est` (an estimate for `Engine(compile=True)`: every call of a fused op, model/fused.py, one kernel,
or three around a sort or top-k),
`prefill_b1_t16` (one prompt of up to 16 positions prefilled and its first id drawn: the launches an eager prefill
costs the host, one with its graph),
`cp_sampler` / `talker_sampler` (one draw of the general captured sampler), `codec_call` (one batched decode of 4
frames per row: the ops of its body, and the ops the host launches per call with graphs), and `host_ms_per_step`
(tiny model, engine steps with the stand-in: wall time minus replays, i.e. the host's own work). One JSON line last.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qwen_tts_core.codec.config import tiny_config as codec_tiny  # noqa: E402
from qwen_tts_core.codec.decoder import CodecDecoder  # noqa: E402
from qwen_tts_core.codec.load import Codec  # noqa: E402
from qwen_tts_core.config import make_config  # noqa: E402
from qwen_tts_core.generate.graphs import FakeCUDAGraph, GraphCapture, OpCounter  # noqa: E402
from qwen_tts_core.generate.runner import TOPK_GRAPH_KMAX, StepRunner  # noqa: E402
from qwen_tts_core.generate.sampling import SamplePlan, gumbel, noise_key, sample_device, token_hash  # noqa: E402
from qwen_tts_core.model import fused  # noqa: E402
from qwen_tts_core.model.layers import RotaryTable, prepare_for_inference_  # noqa: E402
from qwen_tts_core.model.talker import Talker  # noqa: E402

REAL_LAYERS = {"talker": 28, "cp": 5, "codec": 8}


def shaped_talker_config(size: str):
    """The talker config of `size` ("0.6b", "1.7b") with narrow widths: same layers, same op sequence."""
    real = make_config("custom_voice", size).talker
    tiny = make_config("custom_voice", "tiny-proj" if size == "1.7b" else "tiny").talker  # 1.7B: CP narrower
    assert (real.hidden_size != real.code_predictor.hidden_size) == (tiny.hidden_size != tiny.code_predictor.hidden_size)
    cp = dataclasses.replace(tiny.code_predictor, num_hidden_layers=real.code_predictor.num_hidden_layers)
    return dataclasses.replace(tiny, num_hidden_layers=real.num_hidden_layers, code_predictor=cp)


def shaped_talker(size: str, dtype: torch.dtype = torch.bfloat16, max_positions: int = 256, seed: int = 0) -> Talker:
    torch.manual_seed(seed)
    cfg = shaped_talker_config(size)
    t = Talker(cfg, max_positions=max_positions).to(dtype)
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.05)
    # as `Qwen3TTSModel.from_pretrained`: the RoPE tables stay fp32 whatever the weights' dtype
    cp = cfg.code_predictor
    t.rope = RotaryTable(cfg.head_dim, cfg.rope_theta, max_positions)
    t.code_predictor.rope = RotaryTable(cp.head_dim, cp.rope_theta, cp.num_code_groups + 1)
    t.eval()
    prepare_for_inference_(t)
    return t


def shaped_codec(layers: int = REAL_LAYERS["codec"], seed: int = 0) -> Codec:
    """The full codec's structure (8 transformer layers, the 4 decoder blocks) with narrow widths, fp32."""
    torch.manual_seed(seed)
    cfg = dataclasses.replace(codec_tiny(), num_hidden_layers=layers)
    dec = CodecDecoder(cfg)
    with torch.no_grad():
        for p in dec.parameters():
            p.normal_(0, 0.05)
    return Codec(cfg, dec.eval())


def runner_for(talker: Talker, batches: tuple[int, ...], max_len: int = 64, capture=True) -> StepRunner:
    cfg = talker.cfg
    r = StepRunner(talker, max(batches), max_len, tts_pad=torch.zeros(cfg.hidden_size, dtype=talker.codec_head.weight.dtype),
                   eos_id=cfg.codec_eos_token_id, suppress_from=cfg.vocab_size - 1024, static=True,
                   capture=GraphCapture("cpu", fake=True) if capture else None, buckets=batches)
    r.choose_decode_layout()
    return r


@contextlib.contextmanager
def fused_savings():
    """Counts, while active, the kernels the plain fused ops (model/fused.py) launch beyond what they would as
    compiled: what `compile=True` saves if inductor makes each call one kernel (as it does for elementwise work and
    reductions), plus a kernel before and after each sort or top-k (inductor calls torch's for those). Yields a
    one-item list holding the count."""
    saved = [0]
    originals = [(op, op.fn) for op in fused.OPS]

    def counting(fn):
        def run(*args):
            with OpCounter() as c:
                out = fn(*args)
            saved[0] += c.kernels - 1 - 2 * (c.by_name["aten::sort"] + c.by_name["aten::topk"])
            return out
        return run

    try:
        for op, fn in originals:
            op.fn = counting(fn)
        yield saved
    finally:
        for op, fn in originals:
            op.fn = fn


def step_counts(talker: Talker, batches: tuple[int, ...]) -> dict:
    """Kernels of the captured talker step and code-predictor pass per batch bucket (one length bucket), and the
    estimate with the fused ops compiled (`*_compiled_est`: each fused call one kernel)."""
    r = runner_for(talker, batches)
    with torch.inference_mode():
        r.capture_all()
    out = {}
    L = r.len_buckets[0]
    topk = SamplePlan(sample=True, kmax=TOPK_GRAPH_KMAX, top_p=False)
    for B in batches:
        for name, key, body in ((f"talker_step_b{B}", ("talker", B, L), lambda B=B: r._talker_body(B, L)),
                                (f"cp_pass_b{B}", ("cp", B), lambda B=B: r._cp_body(B)),
                                (f"cp_pass_topk_b{B}", ("cp", B, "topk"), lambda B=B: r._cp_body(B, topk))):
            out[name] = r.graphs[key].num_kernels
            with torch.inference_mode(), fused_savings() as saved:
                body()  # every row masked (as at capture): the same ops, nothing advances
            out[f"{name}_compiled_est"] = out[name] - saved[0]
    # a prefill of one short prompt: its ops are what the host launches eagerly, one launch with its graph
    out["prefill_b1_t16"] = r.graphs[("prefill", 1, 16)].num_kernels
    return out


def sampler_counts(talker: Talker, B: int) -> dict:
    """Kernels of one draw of the captured (general) sampler: a code-predictor codebook and a talker id."""
    out = {}
    for name, V in (("cp_sampler", talker.cfg.code_predictor.vocab_size), ("talker_sampler", talker.cfg.vocab_size)):
        logits = torch.randn(B, V)
        do, temp = torch.ones(B, dtype=torch.bool), torch.full((B,), 0.9)
        top_k, top_p = torch.full((B,), 50, dtype=torch.long), torch.ones(B)
        key, frame, th = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), token_hash(V)
        with torch.inference_mode(), OpCounter() as c:
            sample_device(logits, do, temp, top_k, top_p, lambda key=key, frame=frame, th=th: gumbel(noise_key(key, frame, 1), th))
        out[name] = c.kernels
    return out


def codec_counts(codec: Codec, rows: tuple[int, ...], frames: int = 4) -> dict:
    """Ops of one batched decode call of `frames` frames per row: of its body, and launched by the host (graphs)."""
    from qwen_tts_core.generate.audio_stream import BatchedAudio

    out = {}
    for n in rows:
        audio = BatchedAudio(codec, max_rows=n, call_cost=float("inf"), max_call_frames=0)
        codes = torch.randint(0, 2048, (n, 16))
        with torch.inference_mode():
            for k in range(n):
                audio.open(k, frames, frames)
            for _ in range(frames):
                audio.push(list(range(n)), codes)
            with OpCounter() as c:
                audio.decode()
        out[f"codec_call_n{n}_f{frames}"] = c.kernels
    return out


def host_ms_per_step(sessions: int = 8, steps: int = 30) -> dict:
    """The host's own work per Engine.step on a tiny model with the graph stand-in, audio decoded: the aten ops it
    dispatches outside graph replays (each a launch the host pays for on a GPU), and the wall time of the step minus
    the time spent replaying graphs (on a GPU a replay is one launch; here it re-runs the tape). On CPU the eager
    ops also compute, so the milliseconds over-state what a GPU host spends; the op count is the portable figure."""
    from qwen_tts_core import (
        Engine,
        Qwen3TTSModel,
        SamplingParams,
        SynthesisRequest,
        make_checkpoint,
    )

    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(Path(tmp) / "m", "custom_voice", "tiny")
        model = Qwen3TTSModel.from_pretrained(path, device_map="cpu", dtype="float32")
    eng = Engine(model, max_sessions=sessions, max_len=256, graph_capture=GraphCapture("cpu", fake=True))
    eng.warm_up()
    replay_s = [0.0]
    orig = FakeCUDAGraph.replay

    def timed(self):
        t = time.perf_counter()
        with _disable_current_modes():  # the replay's ops are the device's work, not the host's
            orig(self)
        replay_s[0] += time.perf_counter() - t

    FakeCUDAGraph.replay = timed
    try:
        sp = SamplingParams(max_new_tokens=steps + 10)
        ss = [eng.add(SynthesisRequest(kind="custom_voice", text="Hello there, this is a test of the engine.",
                                       speaker="ryan", language="english", sampling=sp, seed=i))
              for i in range(sessions)]
        for _ in range(3):
            eng.step()
        host, ops = [], []
        for _ in range(steps):
            replay_s[0] = 0.0
            with OpCounter() as c:
                t = time.perf_counter()
                eng.step()
                dt = time.perf_counter() - t
            host.append(1000 * (dt - replay_s[0]))
            ops.append(c.ops)
        for s in ss:
            eng.cancel(s)
        while eng.has_work():
            eng.step()
    finally:
        FakeCUDAGraph.replay = orig
    return {f"host_ops_per_step_s{sessions}_mean": round(sum(ops) / len(ops), 1),
            f"host_ops_per_step_s{sessions}_max": max(ops),
            f"host_ms_per_step_s{sessions}_mean": round(sum(host) / len(host), 2),
            f"host_ms_per_step_s{sessions}_p50": round(sorted(host)[len(host) // 2], 2),
            f"host_ms_per_step_s{sessions}_max": round(max(host), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["0.6b", "1.7b"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--no-host", action="store_true", help="skip the host-time measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dt = getattr(torch, args.dtype)
    batches = tuple(sorted(set(args.batches)))
    res: dict = {"benchmark": "gpu_opcount", "dtype": args.dtype}
    for size in args.sizes:
        t = shaped_talker(size, dt)
        res[size] = {**step_counts(t, batches), **sampler_counts(t, 1)}
        print(json.dumps({size: res[size]}), file=sys.stderr)
    res["codec"] = codec_counts(shaped_codec(), batches)
    if not args.no_host:
        res.update(host_ms_per_step())
    print(json.dumps(res))


if __name__ == "__main__":
    main()
