"""Mastering cost: seconds of mastering per hour of audio, per preset, against the synthesis time of the same audio.

Mastering: `jobs.mastering.master()` end to end (resample, gain, limiter, room tone / silence, encode, decode, measure
every figure, re-encode passes) on `--minutes` of speech-like audio at 24 kHz (a voiced harmonic source with a
syllable envelope, breath noise and sentence pauses), timed once per preset and scaled to one hour (the work is
linear in length). Speed: the offline and the streaming time stretchers (FFmpeg's atempo) on the same audio at 1.5x.
Quality: the stretcher's worst pitch and length error over test tones (110 Hz - 3 kHz) at 0.25x - 4x, and the
limiter's (FFmpeg's alimiter, x4 oversampled for true peak) sample and true peak on speech pushed 24 dB over it.
The FFmpeg build in use is named with any GPL parts it links (jobs.codecs.ffmpeg_report).

Synthesis: this machine's engine in bf16 on a random full-size 0.6B CustomVoice checkpoint (random weights cost the
same per frame as trained ones): after a warm-up, `--frames` frames for 1 session and for 4 concurrent sessions
(continuous batching, as jobs run it); the faster audio-seconds-per-wall-second sets the synthesis time of an hour
(seconds of synthesis per hour of audio = 3600 / that rate). The ratio mastering / synthesis is the target (< 1 %).
Prints one JSON line last.

    python benchmarks/mastering.py [--minutes 10] [--frames 24] [--checkpoint DIR] [--skip-synthesis]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SR = 24000
PRESETS = (("acx", None), ("podcast", "mp3"), ("podcast", "opus"), ("telephony", "ulaw"))


def speechy(seconds: float, seed: int = 0) -> np.ndarray:
    """Speech-like test audio: glottal-ish harmonics with a wandering pitch, 4 Hz syllables, 0.4 s pauses every
    ~4 s, a little breath noise; peaks well above the RMS as in real speech."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.3 * t) + 10 * np.sin(2 * np.pi * 1.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voiced = sum(np.sin(k * phase) / k**1.2 for k in range(1, 30))
    syll = np.abs(np.sin(2 * np.pi * 2.0 * t + 0.5 * np.sin(2 * np.pi * 0.37 * t))) ** 1.5
    x = voiced * syll + 0.05 * rng.standard_normal(n) * syll
    x[(t % 4.4) > 4.0] = 0.0  # sentence pauses (digital silence, as the engine's joins leave them)
    return (0.1 * x / np.max(np.abs(x))).astype(np.float32)


def bench_mastering(minutes: float) -> dict:
    from jobs import mastering

    pcm = speechy(minutes * 60)
    out = {}
    for preset, codec in PRESETS:
        cfg = mastering.MasterConfig(preset, codec)
        mastering.master(pcm[: 2 * SR], SR, cfg)  # warm-up: imports, codec initialisation
        t = time.perf_counter()
        res = mastering.master(pcm, SR, cfg)
        wall = time.perf_counter() - t
        out[f"{preset}-{cfg.codec_name}"] = {
            "s_per_hour": round(wall * 60 / minutes, 2), "passes": res.passes, "failed_rules": res.failed,
            "bytes_per_hour": int(len(res.data) * 60 / minutes), **{k: v for k, v in res.figures().items()
                                                                     if k in ("rms_db", "peak_db", "lufs",
                                                                              "true_peak_dbtp", "speech_level_dbm0")}}
    from qwen_tts_core.audio_fx import StreamingTimeStretcher, time_stretch

    t = time.perf_counter()
    time_stretch(pcm, SR, 1.5)
    out["speed_offline_1.5x"] = {"s_per_hour": round((time.perf_counter() - t) * 60 / minutes, 2)}
    st = StreamingTimeStretcher(SR, 1.5)
    t = time.perf_counter()
    for i in range(0, pcm.size, 1920):  # the engine's 80 ms frames
        st.push(pcm[i:i + 1920])
    st.finish()
    out["speed_streaming_1.5x"] = {"s_per_hour": round((time.perf_counter() - t) * 60 / minutes, 2)}
    return out


def bench_quality() -> dict:
    from jobs import levels, mastering
    from jobs.audio import resample
    from qwen_tts_core.audio_fx import time_stretch

    pitch, length = 0.0, 0
    for speed in (0.25, 0.5, 0.8, 1.25, 1.5, 2.0, 3.0, 4.0):
        for hz in (110.0, 220.0, 440.0, 1000.0, 3000.0):
            x = (0.3 * np.sin(2 * np.pi * hz * np.arange(2 * SR) / SR)).astype(np.float32)
            y = time_stretch(x, SR, speed)
            length = max(length, abs(y.size - round(x.size / speed)))
            mid = y[y.size // 8: y.size - y.size // 8]
            n = 1 << int(np.ceil(np.log2(mid.size * 4)))
            spec = np.abs(np.fft.rfft(mid * np.hanning(mid.size), n))
            k = int(np.argmax(spec[1:-1])) + 1
            a, b, c = np.log(spec[k - 1:k + 2] + 1e-12)
            pitch = max(pitch, abs((k + 0.5 * (a - c) / (a - 2 * b + c)) * SR / n / hz - 1))
    loud = resample(speechy(20), SR, 44100) * np.float32(10 ** (24 / 20))
    lim = {}
    for mode, tp in (("sample", False), ("true_peak", True)):
        y = mastering._limit(loud, 44100, -1.0, true_peak=tp)
        lim[f"{mode}_ceiling_-1"] = {"peak_db": round(levels.peak_db(y), 3),
                                     "true_peak_dbtp": round(levels.true_peak_dbtp(y, 44100), 3),
                                     "rms_change_db": round(levels.rms_db(y) - levels.rms_db(loud), 2)}
    return {"stretch_pitch_err_max_pct": round(100 * pitch, 3), "stretch_len_err_max_samples": length,
            "limiter_speech_plus_24db": lim}


def bench_synthesis(ckpt: str, frames: int) -> dict:
    import torch

    from qwen_tts_core import Engine, Qwen3TTSModel, SynthesisRequest

    torch.set_num_threads(os.cpu_count() or 1)
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="bfloat16")
    text = "Once upon a time there was a small village by the sea, and every morning the fishermen sang."

    def req(i: int, n: int) -> SynthesisRequest:
        return SynthesisRequest(kind="custom_voice", text=text, speaker="ryan", language="english",
                                sampling=model.sampling_params(max_new_tokens=n), seed=i, non_streaming_mode=True)

    Engine(model, max_sessions=1).run_all([req(0, 3)])  # warm-up
    out = {}
    for c in (1, 4):
        eng = Engine(model, max_sessions=c)
        t = time.perf_counter()
        for i in range(c):
            eng.add(req(i + 1, frames + 1))  # max_new_tokens n gives n - 1 frames (as the other benchmarks)
        samples = 0
        while eng.has_work():
            for ch in eng.step():
                samples += ch.pcm.size
        wall = time.perf_counter() - t
        out[f"c{c}"] = {"audio_s": round(samples / SR, 2), "wall_s": round(wall, 2),
                        "audio_s_per_wall_s": round(samples / SR / wall, 4)}
    best = max(v["audio_s_per_wall_s"] for v in out.values())
    out["s_per_hour"] = round(3600 / best, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="length of the mastered test audio")
    ap.add_argument("--frames", type=int, default=24, help="frames per synthesis session (80 ms each)")
    ap.add_argument("--checkpoint", help="a 0.6B checkpoint folder (default: build a random one in bf16)")
    ap.add_argument("--skip-synthesis", action="store_true")
    args = ap.parse_args()
    result: dict = {"benchmark": "mastering", "minutes_mastered": args.minutes, "cpu": platform.processor() or
                    platform.machine(), "cpu_count": os.cpu_count()}
    import av

    from jobs.codecs import ffmpeg_report

    result["ffmpeg"] = {"version": av.ffmpeg_version_info, "gpl_parts": ffmpeg_report()["gpl"]}
    result["mastering"] = bench_mastering(args.minutes)
    result["quality"] = bench_quality()
    import resource

    result["mastering_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if not args.skip_synthesis:
        with tempfile.TemporaryDirectory(prefix="qtts-master-bench-") as tmp:
            ckpt = args.checkpoint
            if not ckpt:
                from qwen_tts_core import make_checkpoint

                ckpt = str(make_checkpoint(Path(tmp) / "ck", model_type="custom_voice", size="0.6b", seed=0,
                                           dtype="bfloat16"))
            result["synthesis_bf16_0.6b"] = bench_synthesis(ckpt, args.frames)
        synth = result["synthesis_bf16_0.6b"]["s_per_hour"]
        result["mastering_percent_of_synthesis"] = {
            k: round(100 * v["s_per_hour"] / synth, 3) for k, v in result["mastering"].items()}
        result["target_percent"] = 1.0
    print(json.dumps(result))


if __name__ == "__main__":
    main()
