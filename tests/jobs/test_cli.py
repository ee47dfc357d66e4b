import argparse

import pytest

from jobs import catalog, cli, demo, narrate


def _parser():
    p = argparse.ArgumentParser(prog="qtts")
    cli.register(p.add_subparsers(dest="command", required=True))
    return p


def test_register_adds_the_job_commands():
    p = _parser()
    assert p.parse_args(["narrate", "book", "--model", "m"]).func is narrate.run
    assert p.parse_args(["catalog", "c.yaml", "--every", "1h"]).func is catalog.run
    assert p.parse_args(["demo"]).func is demo.run


def test_bad_options_are_rejected(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["narrate", "book", "--format", "mp3"])
    assert "invalid choice: 'mp3'" in capsys.readouterr().err
    args = _parser().parse_args(["narrate", "book", "--model", "m", "--runner", "local", "--backend", "nope"])
    assert narrate.run(args) == 2
    assert "backend must be one of" in capsys.readouterr().err
