"""`qtts`: the project's command line. Core subcommands live here; `serve`, `narrate`, `catalog` and `demo` come
from the serving and batch packages through the `qtts.commands` entry-point group, so the core never imports them."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path


def _make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint.build import make_checkpoint

    path = make_checkpoint(args.dir, model_type=args.type, size=args.size, seed=args.seed, dtype=args.dtype)
    print(path)
    return 0


_SAY_FLAGS = {"custom_voice": ("speaker", "instruct"), "voice_design": ("instruct",),
              "base": ("ref_audio", "ref_text", "x_vector_only")}
"""The type-specific `qtts say` options each checkpoint type uses (the others are refused, never silently dropped)."""
_FLAG_OF = {"ref_audio": "--ref-audio", "ref_text": "--ref-text", "x_vector_only_mode": "--x-vector-only",
            "max_new_tokens": "--max-new-tokens", "voice_clone_prompt": "--ref-audio"}


def _flag(name: str) -> str:
    return _FLAG_OF.get(name, "--" + name.replace("_", "-"))


def _out_format(out: str) -> str:
    """The soundfile format of `out` (by its extension), its folder checked: both before any model is loaded."""
    import soundfile as sf

    path = Path(out)
    fmt = path.suffix[1:].upper()
    known = sorted(f for f in sf.available_formats() if sf.default_subtype(f))  # RAW needs a sample format given
    if fmt not in known:
        raise SystemExit(f"qtts say: --out {out}: unknown audio file extension {path.suffix!r}; use one of "
                         f"{['.' + f.lower() for f in known]}")
    if not path.parent.is_dir():
        raise SystemExit(f"qtts say: --out {out}: no such folder {str(path.parent)!r}")
    return fmt


def _write_atomic(out: str, wav, sr: int, fmt: str) -> None:
    """Write the audio next to `out`, then rename it into place: an existing file is replaced whole or not at all."""
    import soundfile as sf

    path = Path(out)
    tmp = path.parent / f".{path.name}.{os.getpid()}.part"  # created with the usual permissions (umask)
    try:
        sf.write(tmp, wav, sr, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _say(args: argparse.Namespace) -> int:
    from .api import Qwen3TTSModel
    from .errors import RequestError

    fmt = _out_format(args.out)
    text = sys.stdin.read() if args.text == "-" else args.text
    try:
        model = Qwen3TTSModel.from_pretrained(args.model, device_map=args.device or "auto", dtype=args.dtype)
    except (OSError, ValueError) as e:
        raise SystemExit(f"qtts say: --model {args.model}: {e}") from None
    kind = model.tts_model_type
    given = [f for f in dict.fromkeys(f for fs in _SAY_FLAGS.values() for f in fs)
             if getattr(args, f) not in (None, False)]
    unused = [f for f in given if f not in _SAY_FLAGS.get(kind, ())]
    if unused:
        raise SystemExit(f"qtts say: {', '.join(_flag(f) for f in unused)}: not used by a {kind} checkpoint "
                         f"(its options: {', '.join(_flag(f) for f in _SAY_FLAGS.get(kind, ())) or 'none'})")
    kw = dict(language=args.language, seed=args.seed, max_new_tokens=args.max_new_tokens)
    try:
        if kind == "custom_voice":
            speaker = args.speaker or (model.get_supported_speakers() or [""])[0]
            wavs, sr = model.generate_custom_voice(text, speaker=speaker, instruct=args.instruct, **kw)
        elif kind == "voice_design":
            wavs, sr = model.generate_voice_design(text, instruct=args.instruct or "A clear, neutral voice.", **kw)
        else:
            if not args.ref_audio:
                raise SystemExit("qtts say: a Base checkpoint needs --ref-audio (and --ref-text, or --x-vector-only)")
            wavs, sr = model.generate_voice_clone(text, ref_audio=args.ref_audio, ref_text=args.ref_text,
                                                  x_vector_only_mode=args.x_vector_only, **kw)
    except RequestError as e:
        raise SystemExit(f"qtts say: {_flag(e.field)}: {e.message}") from None
    except ValueError as e:  # the API's other argument checks name the argument in their message
        raise SystemExit(f"qtts say: {e}") from None
    _write_atomic(args.out, wavs[0], sr, fmt)
    print(f"{args.out}: {len(wavs[0]) / sr:.2f} s at {sr} Hz")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qtts", description="Qwen3-TTS 12Hz: engine, service and batch jobs")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official format")
    mk.add_argument("dir", help="output folder")
    mk.add_argument("--type", default="custom_voice", choices=["custom_voice", "voice_design", "base"],
                    help="model type (default custom_voice)")
    mk.add_argument("--size", default="tiny", choices=["tiny", "tiny-proj", "0.6b", "1.7b"],
                    help="tiny (tests), tiny-proj (tiny with a code predictor narrower than the talker, as the "
                         "1.7B's), or a real size's shapes (default tiny)")
    mk.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    mk.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="dtype of the stored weights (default float32)")
    mk.set_defaults(func=_make_checkpoint)

    say = sub.add_parser("say", help="synthesize one text to an audio file",
                         description="Synthesize one text with a checkpoint's own voice: a CustomVoice speaker, a "
                                     "VoiceDesign description, or a Base clone of a reference recording. Options "
                                     "another checkpoint type uses are refused.")
    say.add_argument("text", help="the text to say; - reads it from standard input")
    say.add_argument("--model", required=True, help="checkpoint folder or hub id")
    say.add_argument("--out", default="out.wav",
                     help="audio file to write, its format by extension (.wav, .flac, .ogg, ...; default out.wav); "
                          "replaced whole once the audio is ready")
    say.add_argument("--speaker", default=None,
                     help="CustomVoice: one of the checkpoint's speakers (default: the first it lists)")
    say.add_argument("--language", default="auto", help="language of the text, or auto (default)")
    say.add_argument("--instruct", default=None,
                     help="CustomVoice: how to speak (optional); VoiceDesign: the voice to make (default: "
                          "'A clear, neutral voice.')")
    say.add_argument("--ref-audio", default=None, help="Base: the reference recording to clone (a path)")
    say.add_argument("--ref-text", default=None, help="Base: the transcript of --ref-audio")
    say.add_argument("--x-vector-only", action="store_true",
                     help="Base: clone from the speaker vector alone (no --ref-text)")
    say.add_argument("--seed", type=int, default=None, help="makes the audio reproducible (default: a fresh draw)")
    say.add_argument("--max-new-tokens", type=int, default=None,
                     help="at most this many frames (12.5 a second; default: the checkpoint's)")
    say.add_argument("--device", default=None, help="cpu, cuda, cuda:0 (default: cuda when available)")
    say.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="weights' dtype (default float32)")
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
