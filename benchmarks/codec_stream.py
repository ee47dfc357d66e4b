"""Streaming cost of the 12Hz codec decoder (random weights, fp32, CPU by default).

Measures (section `single`, full-size decoder):
  * ours: a 4-frame chunk decoded with the streaming state at frame ~10 and at frame ~N (default 1000), and the ratio;
  * the reference-style streaming alternative: re-decoding 25 frames of left context + the 4-frame chunk from
    scratch each time (timed on our decoder doing that recompute; with --oracle also on the official decoder);
  * offline decode: seconds of compute per second of audio (the N-frame warm-up, decoded in 100-frame steps).
Section `batched` (tiny and full-size decoders): one engine step's audio decode for R sessions sitting at
different positions, each with a 4-frame chunk due: `BatchedAudio` with its defaults (one host copy; on CPU calls
of at most 32 row-frames), `BatchedAudio` as one call over all rows, and one `AudioStreamer` per session (today's
path: a codec call and a host copy per session), at R = 1/8/32; and a ragged step (3 of 4 rows with 4 frames,
1 of 4 with 1, as first chunks are) with one padded call vs one call per length as well.
Section `icl` (full-size decoder, --dtype): opening a voice-clone row whose reference (--ref-frames) is its left
context: decoded the first time, its cached state copied in after that (`codec.context.ContextCache`).
Section `kernels` (full-size decoder, --dtype): one streaming call of R rows x t frames with the small-call
matrix-product convs (`codec.layers.MATMUL_ROWS`) on oneDNN-packed weights (the default) vs torch's conv kernels for
every layer, and vs the same products on torch's GEMM (QTTS_ONEDNN=0: no packed weights, for the matrix-product convs
and the linears), calls interleaved in one process; ms per call and the speedups, for (R, t) in --shapes.
The last stdout line is one JSON object.

    .venv/bin/python benchmarks/codec_stream.py [--sections single,batched,kernels,icl] [--shapes 1x1,1x4,8x4]
        [--frames 1000] [--threads 1] [--device cpu] [--oracle] [--rows 1,8,32] [--sizes tiny,full]
        [--batched-reps 2] [--dtype float32] [--ref-frames 37,125] [--reps 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qwen_tts_core.codec.build import random_decoder, write_random_speech_tokenizer  # noqa: E402
from qwen_tts_core.codec.config import full_config, preset  # noqa: E402
from qwen_tts_core.codec.decoder import CodecDecoder  # noqa: E402
from qwen_tts_core.codec.load import Codec  # noqa: E402
from qwen_tts_core.codec.state import CodecStreamState  # noqa: E402
from qwen_tts_core.generate.audio_stream import AudioStreamer, BatchedAudio  # noqa: E402

logger = logging.getLogger("codec_stream")
CHUNK = 4
CONTEXT = 25


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time_chunk(decoder: CodecDecoder, state: CodecStreamState, chunk: torch.Tensor, reps: int) -> float:
    """Median seconds of decode_chunk(chunk) from copies of `state` (the state itself is not advanced)."""
    device = state.device
    times = []
    for _ in range(reps + 1):
        trial = state.select(list(range(state.batch_size)))
        _sync(device)
        t0 = time.perf_counter()
        decoder.decode_chunk(chunk, trial, check=False)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _time_redecode(decoder: CodecDecoder, codes: torch.Tensor, reps: int) -> float:
    """Median seconds to decode CONTEXT+CHUNK frames from scratch and keep the last CHUNK frames' samples."""
    device = codes.device
    spf = decoder.cfg.samples_per_frame
    times = []
    for _ in range(reps + 1):
        _sync(device)
        t0 = time.perf_counter()
        wav = decoder.decode(codes, check=False)[:, CONTEXT * spf:]
        _sync(device)
        times.append(time.perf_counter() - t0)
    assert wav.shape[-1] == CHUNK * spf
    return statistics.median(times[1:])


def _oracle_redecode(codes: torch.Tensor, seed: int) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "oracle"))
    from common import run_oracle  # type: ignore[import-not-found]
    from safetensors.torch import save_file

    os.environ["CODEC_ORACLE_THREADS"] = str(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_random_speech_tokenizer(Path(tmp) / "st", "full", seed=seed)
        save_file({"codes": codes.cpu().contiguous()}, str(Path(tmp) / "codes.safetensors"))
        run_oracle("codec_ref.py", "chunked", str(folder), str(Path(tmp) / "codes.safetensors"),
                   str(Path(tmp) / "out.json"))
        return json.loads((Path(tmp) / "out.json").read_text())


def _best_times(fns: dict, device: torch.device, reps: int) -> dict:
    """Best of `reps` timed calls of each fn (after one untimed warm-up each), calls interleaved so that load
    from other processes falls on every variant alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _open_batched(codec: Codec, rows: int, chunks: list[int], **kwargs) -> BatchedAudio:
    audio = BatchedAudio(codec, max_rows=rows, **kwargs)
    for k in range(rows):
        audio.open(k, chunks[k], chunks[k])
    # rows at different positions (the cost does not depend on the position: fixed-size window and history)
    with torch.inference_mode():
        audio.bank.state.positions[:rows] = torch.arange(rows, device=audio.bank.device) * 37
    return audio


def _batched_step(audio: BatchedAudio, chunks: list[int], frames: torch.Tensor):
    """Row k (chunks of chunks[k] frames) gets chunks[k] frames, then one decode: every row has a chunk due."""
    rows = len(chunks)

    def step() -> None:
        for f in range(CHUNK):
            keys = [k for k in range(rows) if chunks[k] > f]
            audio.push(keys, frames[f, keys])
        outs = audio.decode()
        assert len(outs) == rows and all(o.num_frames == chunks[o.key] for o in outs)
    return step


def _per_session_step(codec: Codec, chunks: list[int], frames: torch.Tensor):
    """Today's path: one AudioStreamer per session, each decoding (and copying to the host) alone."""
    streamers = [AudioStreamer(codec, n, n) for n in chunks]

    def step() -> None:
        got = 0
        for f in range(CHUNK):
            for i, st in enumerate(streamers):
                if chunks[i] > f:
                    got += st.push(frames[f, i]) is not None
        assert got == len(streamers)
    return step


def _batched_section(size: str, rows_list: list[int], device: torch.device, reps: int, seed: int,
                     dtype: torch.dtype = torch.float32) -> dict:
    """One step's decode of R sessions with a chunk due: batched (defaults; and one call for all rows) vs one
    streamer per session; then a ragged step (a quarter of the rows with 1-frame chunks, e.g. first chunks)."""
    cfg = preset(size)
    codec = Codec(cfg, random_decoder(cfg, seed=seed).to(device=device, dtype=dtype))
    g = torch.Generator().manual_seed(seed + 2)
    one_call = {"call_cost": float("inf"), "max_call_frames": 0}
    res: dict = {}
    for rows in rows_list:
        frames = torch.randint(0, 2048, (CHUNK, rows, 16), generator=g).to(device)
        cases = [("", [CHUNK] * rows)]
        if rows >= 4:
            cases.append(("ragged_", [1 if i % 4 == 3 else CHUNK for i in range(rows)]))
        for tag, chunks in cases:
            fns = {"batched": _batched_step(_open_batched(codec, rows, chunks), chunks, frames)}
            if rows > 1:
                fns["one_call"] = _batched_step(_open_batched(codec, rows, chunks, **one_call), chunks, frames)
            if tag:
                split = {"call_cost": 0.0, "max_call_frames": 0}
                fns["split_by_length"] = _batched_step(_open_batched(codec, rows, chunks, **split), chunks, frames)
            fns["per_session"] = _per_session_step(codec, chunks, frames)
            best = _best_times(fns, device, reps)
            for name, t in best.items():
                res[f"{size}_r{rows}_{tag}{name}_s"] = round(t, 5)
            res[f"{size}_r{rows}_{tag}speedup"] = round(best["per_session"] / best["batched"], 2)
            logger.info("%s R=%d %s%s", size, rows, tag,
                        ", ".join(f"{k} {v:.4f} s" for k, v in best.items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="single,batched", help="comma list of: single, batched, kernels, icl")
    ap.add_argument("--ref-frames", default="37,125", help="icl section: reference lengths in frames (3 s, 10 s)")
    ap.add_argument("--shapes", default="1x1,1x4,4x4,8x1,8x4", help="kernels section: ROWSxFRAMES per call")
    ap.add_argument("--frames", type=int, default=1000, help="position of the late chunk (frames decoded before)")
    ap.add_argument("--threads", type=int, default=1,
                    help="1 by default: 2 threads on a shared 2-core box measure OpenMP contention")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--oracle", action="store_true", help="also time the official decoder's 25-frame re-decode")
    ap.add_argument("--rows", default="1,8,32", help="batched section: sessions per step")
    ap.add_argument("--sizes", default="tiny,full", help="batched section: decoder sizes")
    ap.add_argument("--batched-reps", type=int, default=2, help="batched section: timed steps (best of)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="batched, kernels and icl sections: decoder dtype (the single section is float32)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sections = set(args.sections.split(","))
    if not sections or not sections <= {"single", "batched", "kernels", "icl"}:
        raise SystemExit(f"--sections must name some of single, batched, kernels, icl; got {args.sections!r}")
    result: dict = {"device": str(device), "threads": args.threads}
    if "single" in sections:
        result.update(_single_section(args, device))
    if "batched" in sections:
        rows_list = [int(r) for r in args.rows.split(",")]
        result.update({"batched_chunk_frames": CHUNK, "batched_dtype": args.dtype})
        for size in args.sizes.split(","):
            result.update(_batched_section(size, rows_list, device, args.batched_reps, args.seed,
                                           getattr(torch, args.dtype)))
    if "kernels" in sections:
        result.update(_kernels_section(args, device))
    if "icl" in sections:
        result.update(_icl_section(args, device))
    print(json.dumps(result))


def _icl_section(args, device: torch.device) -> dict:
    """Opening a voice-clone row (full-size decoder): its reference decoded as left context the first time (the
    cost every session paid before the context cache), then the cached state copied in, for --ref-frames."""
    from qwen_tts_core.codec.context import ContextCache, codes_key

    cfg = full_config()
    codec = Codec(cfg, random_decoder(cfg, seed=args.seed).to(device=device, dtype=getattr(torch, args.dtype)))
    audio = BatchedAudio(codec, max_rows=2)
    g = torch.Generator().manual_seed(args.seed + 4)
    res: dict = {"icl_dtype": args.dtype}
    for n in (int(v) for v in args.ref_frames.split(",")):
        ref = torch.randint(0, 2048, (n, 16), generator=g).to(device)
        key = codes_key(ref)
        times = {}
        for name in ("cold", "cached", "cached_again"):
            if name == "cold":
                codec.decoder.context_cache = ContextCache()
            _sync(device)
            t0 = time.perf_counter()
            audio.open(0, 1, 4, ref_codes=ref, ref_key=key)
            _sync(device)
            times[name] = time.perf_counter() - t0
            audio.drop(0)
        cached = min(times["cached"], times["cached_again"])
        res[f"icl_open_ref{n}_cold_ms"] = round(times["cold"] * 1e3, 1)
        res[f"icl_open_ref{n}_cached_ms"] = round(cached * 1e3, 2)
        res[f"icl_open_ref{n}_speedup"] = round(times["cold"] / cached, 1)
        logger.info("ICL row with a %d-frame reference: %.1f ms cold, %.2f ms cached", n, times["cold"] * 1e3,
                    cached * 1e3)
    return res


def _kernels_section(args, device: torch.device) -> dict:
    """Default (small calls as matrix products) vs torch's conv kernels everywhere, same decoder, same run."""
    from qwen_tts_core.codec import layers

    dtype = getattr(torch, args.dtype)
    decoder = random_decoder(full_config(), seed=args.seed).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(args.seed + 3)
    default, never = dict(layers.MATMUL_ROWS), dict.fromkeys(layers.MATMUL_ROWS, float("inf"))
    onednn = os.environ.get("QTTS_ONEDNN")
    res: dict = {"kernels_dtype": args.dtype}
    try:
        for shape in args.shapes.split(","):
            try:
                rows, frames = (int(v) for v in shape.lower().split("x"))
            except ValueError:
                raise SystemExit(f"--shapes must be ROWSxFRAMES items like 8x4, got {shape!r}") from None
            codes = torch.randint(0, 2048, (rows, 16, frames), generator=g).to(device)
            state = decoder.new_state(rows)
            decoder.decode_chunk(codes, state, check=False)  # a state that has history

            def call(table: dict, packed: bool = True, codes=codes, state=state):
                layers.MATMUL_ROWS = table
                os.environ["QTTS_ONEDNN"] = "1" if packed else "0"
                decoder.decode_chunk(codes, state.select(list(range(state.batch_size))), check=False)

            best = _best_times({"matmul_small": lambda c=call: c(default), "conv_only": lambda c=call: c(never),
                                "unpacked": lambda c=call: c(default, False)}, device, args.reps)
            res[f"kernels_{rows}x{frames}_ms"] = round(best["matmul_small"] * 1e3, 1)
            res[f"kernels_{rows}x{frames}_conv_only_ms"] = round(best["conv_only"] * 1e3, 1)
            res[f"kernels_{rows}x{frames}_unpacked_ms"] = round(best["unpacked"] * 1e3, 1)
            res[f"kernels_{rows}x{frames}_speedup"] = round(best["conv_only"] / best["matmul_small"], 2)
            res[f"kernels_{rows}x{frames}_packed_speedup"] = round(best["unpacked"] / best["matmul_small"], 2)
            logger.info("%dx%d: %.1f ms (conv kernels only: %.1f ms, torch's GEMM unpacked: %.1f ms)", rows, frames,
                        best["matmul_small"] * 1e3, best["conv_only"] * 1e3, best["unpacked"] * 1e3)
    finally:
        layers.MATMUL_ROWS = default
        if onednn is None:
            os.environ.pop("QTTS_ONEDNN", None)
        else:
            os.environ["QTTS_ONEDNN"] = onednn
    return res


def _single_section(args, device: torch.device) -> dict:
    t0 = time.perf_counter()
    decoder = random_decoder(full_config(), seed=args.seed).to(device)
    n_params = sum(p.numel() for p in decoder.parameters())
    logger.info("built full decoder (%.1fM params) in %.1f s", n_params / 1e6, time.perf_counter() - t0)
    spf, sr = decoder.cfg.samples_per_frame, decoder.cfg.sample_rate
    g = torch.Generator().manual_seed(args.seed + 1)
    codes = torch.randint(0, 2048, (1, 16, args.frames + CHUNK), generator=g).to(device)

    # offline decode of the first `frames` frames (in 100-frame steps) = the warm-up to the late position
    state = decoder.new_state(1)
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, args.frames, 100):
        decoder.decode_chunk(codes[..., s: min(s + 100, args.frames)], state, check=False)
    _sync(device)
    offline_s = time.perf_counter() - t0
    audio_s = args.frames * spf / sr
    logger.info("offline: %d frames (%.1f s audio) in %.1f s", args.frames, audio_s, offline_s)
    late_chunk = codes[..., args.frames: args.frames + CHUNK]
    t_late = _time_chunk(decoder, state, late_chunk, args.reps)

    early = decoder.new_state(1)
    decoder.decode_chunk(codes[..., :10], early, check=False)
    t_early = _time_chunk(decoder, early, codes[..., 10: 10 + CHUNK], args.reps)
    logger.info("ours: 4-frame chunk at frame 10 %.3f s, at frame %d %.3f s", t_early, args.frames, t_late)

    if args.frames < CONTEXT:
        raise SystemExit(f"--frames must be >= {CONTEXT}")
    window = codes[..., args.frames - CONTEXT: args.frames + CHUNK]  # 25 frames of context + the chunk
    t_redecode = _time_redecode(decoder, window, args.reps)
    logger.info("re-decode 25+4 frames (ours, reference style): %.3f s", t_redecode)

    result = {
        "size": "full", "dtype": "float32",
        "decoder_params_m": round(n_params / 1e6, 2),
        "chunk_frames": CHUNK, "chunk_audio_s": CHUNK * spf / sr,
        "ours_chunk4_at_frame10_s": round(t_early, 4),
        f"ours_chunk4_at_frame{args.frames}_s": round(t_late, 4),
        "late_over_early_ratio": round(t_late / t_early, 3),
        "redecode_ctx25_chunk4_s_ours": round(t_redecode, 4),
        "redecode_over_streaming": round(t_redecode / t_late, 2),
        "offline_frames": args.frames,
        "offline_s_per_audio_s": round(offline_s / audio_s, 4),
        "streaming_rtf_chunk4": round(t_late / (CHUNK * spf / sr), 4),
    }
    if args.oracle:
        ref = _oracle_redecode(codes[..., : args.frames + CHUNK].cpu(), args.seed)
        result.update({f"oracle_{k}": round(v, 4) for k, v in ref.items()})
    return result


if __name__ == "__main__":
    main()
