"""The main job (`make demo` / `qtts demo`): narrate the sample book on the embedded default setup.

Ray: the head at `--ray-address`, else at RAY_ADDRESS, else an in-process cluster that ends with the command.
cluster/env.sh does not set RAY_ADDRESS, so to use the head that cluster/local.sh started:
`export RAY_ADDRESS=$RAY_ADDRESS_HOSTPORT` (or `--ray-address $RAY_ADDRESS_HOSTPORT`). Then the Serve
app "qtts" (deployed here when not already running; `--no-serve` uses engine actors instead), a tiny
random checkpoint when no model is given, `examples/book` -> `./output` (file://), manifest printed.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .inputs import read_inputs
from .narrate import build_options, finish, prepare
from .runner import connect_ray, run_rows, stop_on_sigterm
from .serve_backend import serve_app_running

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
DEMO_APP = "qtts"


def tiny_checkpoint(folder: Path) -> str:
    """Build (once) the tiny random custom_voice checkpoint the demo uses when no model is given."""
    from qwen_tts_core import make_checkpoint

    path = folder / "tiny-custom-voice"
    if not (path / "config.json").exists():
        log.info("building a tiny random checkpoint in %s (random weights: the audio is noise-like)", path)
        make_checkpoint(str(path), model_type="custom_voice", size="tiny", seed=0)
    return str(path)


def deploy_serve_app(checkpoint: str, max_new_tokens: int, http_port: int = 8000) -> str:
    """Deploy the project's Serve app with one model on `checkpoint` (Serve's HTTP proxy on 127.0.0.1:`http_port`
    when this starts Serve; SystemExit naming --http-port when another program holds it); returns the served model
    name."""
    from ray import serve

    from serve.app import build_app
    from serve.cli import start_http
    from serve.config import ServiceConfig

    name = "demo"
    cfg = ServiceConfig.from_dict({"models": [{"name": name, "checkpoint": checkpoint, "num_cpus": 0.5,
                                               "max_new_tokens": max(64, max_new_tokens), "warmup": False}]})
    start_http("127.0.0.1", http_port, explicit=False, command="qtts demo", flag="--http-port")  # a taken port: named
    serve.run(build_app(cfg), name=DEMO_APP, route_prefix="/")
    return name


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    out_dir = Path(args.output_dir).resolve()
    tiny = args.model is None
    model = args.model or tiny_checkpoint(out_dir / ".checkpoints")
    backend = "engine"
    deployed = False
    connect_ray(args.ray_address)
    if not args.no_serve:
        if serve_app_running(DEMO_APP):
            if args.model is not None:  # the running app would narrate with its own model, not this one
                raise SystemExit(f"qtts demo: the Serve app {DEMO_APP!r} already runs on this Ray cluster with its "
                                 "own models, so --model would be ignored; drop --model to narrate with the running "
                                 "app (--serve-model NAME picks one of its models), or add --no-serve to render "
                                 "with engine actors on --model")
            log.info("using the running Serve app %r", DEMO_APP)
            model, backend = args.serve_model, "serve"  # None: the app's only model
        else:
            try:
                model = deploy_serve_app(model, args.max_new_tokens, args.http_port)
                backend, deployed = "serve", True
            except ImportError as e:
                log.warning("Serve app unavailable (%s); using engine actors", e)
    argv = [str(args.input), *(["--model", model] if model else []), "--out", f"file://{out_dir}",
            "--backend", backend, "--voice", args.voice, "--max-new-tokens", str(args.max_new_tokens),
            "--num-cpus", "0.5", "--batch-size", "1"]
    if tiny:
        argv += ["--retry-on", "guard"]  # random weights rarely say EOS: the frame cap ends each chunk
    from .narrate import build_parser

    try:
        nargs = build_parser().parse_args(argv)
        defaults, render, opts, limits = build_options(nargs, "audio")
        rows, render, opts, backend = prepare(read_inputs(nargs.input, defaults, limits), defaults, render, opts)
        records = run_rows(rows, render, opts, desc="demo", backend=backend, stop=stop_on_sigterm())
        return finish(records, opts, "manifest.parquet", t0, quiet=False)
    finally:  # the app this demo deployed goes with it, whether the job finished or failed (a joined cluster
        if deployed and not args.keep_serve:  # keeps running: the replica would hold its CPU there)
            from ray import serve

            serve.delete(DEMO_APP)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1-65535, got {text[:40]!r}")
    return port


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="main job: narrate examples/book into ./output on local Ray + Serve")
    p.add_argument("--input", default=str(ROOT / "examples" / "book"),
                   help="what to narrate, as qtts narrate reads it: a text/Markdown file, a folder of chapters, or "
                        ".jsonl/.parquet rows (default examples/book)")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id the demo deploys (default: a tiny random one); "
                        "refused when the Serve app qtts already runs (it has its own: see --serve-model)")
    p.add_argument("--output-dir", default="output", help="local output folder (default ./output)")
    p.add_argument("--voice", default="vivian", help="speaker of the narration (default vivian)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="frame cap per chunk (default 48, ~4 s)")
    p.add_argument("--no-serve", action="store_true", help="engine actors instead of the Serve app")
    p.add_argument("--serve-model", default=None, help="model name in an already running Serve app")
    p.add_argument("--keep-serve", action="store_true", help="leave the deployed Serve app running")
    p.add_argument("--http-port", type=_port, default=8000,
                   help="Serve's HTTP port on 127.0.0.1 when the demo starts Serve (default 8000, as configs/serve.yaml)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster address to use (default RAY_ADDRESS, else a local Ray the demo starts)")
    p.set_defaults(func=run)
    return p
