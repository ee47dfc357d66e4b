"""`qtts narrate`, `qtts catalog`, `qtts review` and `qtts demo`: registered through the `qtts.commands` entry points."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the batch-job subcommands to `qtts` (each sets `func(args) -> exit code`)."""
    from . import catalog, demo, narrate, review

    narrate.build_parser(subparsers.add_parser("narrate", help="bulk narration to file:// or s3:// (Ray Data)"))
    catalog.build_parser(subparsers.add_parser("catalog", help="regenerate a prompt catalog (new/changed only)"))
    review.build_parser(subparsers.add_parser("review", help="a local page to look at and listen to a job's output"))
    demo.add_parser(subparsers)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.cli demo` etc., for when the `qtts` entry points are not installed."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m jobs.cli")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
