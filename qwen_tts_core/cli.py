"""`qtts`: the project's command line. Core subcommands live here; `serve`, `narrate`, `catalog` and `demo` come
from the serving and batch packages through the `qtts.commands` entry-point group, so the core never imports them."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import entry_points


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint.build import make_checkpoint

    path = make_checkpoint(args.dir, model_type=args.type, size=args.size, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


def _say(args: argparse.Namespace) -> int:
    import soundfile as sf

    from .api import Qwen3TTSModel

    model = Qwen3TTSModel.from_pretrained(args.model, device_map=args.device or "auto", dtype=args.dtype)
    kw = dict(language=args.language, seed=args.seed, max_new_tokens=args.max_new_tokens)
    if model.tts_model_type == "custom_voice":
        speaker = args.speaker or (model.get_supported_speakers() or [""])[0]
        wavs, sr = model.generate_custom_voice(args.text, speaker=speaker, instruct=args.instruct, **kw)
    elif model.tts_model_type == "voice_design":
        wavs, sr = model.generate_voice_design(args.text, instruct=args.instruct or "A clear, neutral voice.", **kw)
    else:
        if not args.ref_audio:
            raise SystemExit("qtts say: a Base checkpoint needs --ref-audio (and --ref-text, or --x-vector-only)")
        wavs, sr = model.generate_voice_clone(args.text, ref_audio=args.ref_audio, ref_text=args.ref_text,
                                              x_vector_only_mode=args.x_vector_only, **kw)
    sf.write(args.out, wavs[0], sr)
    print(f"{args.out}: {len(wavs[0]) / sr:.2f} s at {sr} Hz")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtts", description="Qwen3-TTS 12Hz: engine, service and batch jobs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official format")
    mk.add_argument("dir", help="output folder")
    mk.add_argument("--type", default="custom_voice", choices=["custom_voice", "voice_design", "base"])
    mk.add_argument("--size", default="tiny", choices=["tiny", "tiny-proj", "0.6b", "1.7b"])
    mk.add_argument("--seed", type=int, default=0)
    mk.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    mk.set_defaults(func=_make_checkpoint)

    say = sub.add_parser("say", help="synthesize one text to a WAV file")
    say.add_argument("text")
    say.add_argument("--model", required=True, help="checkpoint folder or hub id")
    say.add_argument("--out", default="out.wav")
    say.add_argument("--speaker", default=None)
    say.add_argument("--language", default="auto")
    say.add_argument("--instruct", default=None)
    say.add_argument("--ref-audio", default=None)
    say.add_argument("--ref-text", default=None)
    say.add_argument("--x-vector-only", action="store_true")
    say.add_argument("--seed", type=int, default=None)
    say.add_argument("--max-new-tokens", type=int, default=None)
    say.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda when available)")
    say.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    say.set_defaults(func=_say)

    for ep in entry_points(group="qtts.commands"):
        try:
            ep.load()(sub)
        except ImportError as e:  # an optional extra that is not installed
            logging.getLogger(__name__).debug("qtts: command group %s unavailable: %s", ep.name, e)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
