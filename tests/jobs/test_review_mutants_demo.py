"""`qtts demo` (jobs/demo.py, what `make demo` runs: the README's first set-up command) and jobs/scripts.py, pinned by
a mutation review: each test here failed on a one-line change (a "mutant", named in its docstring) that the rest of
the fast suite let pass.

The demo's Ray and Serve steps are stood in for (no cluster): what is checked is what the demo hands on, the
narrate command line it builds from its own flags, the Serve app config it deploys and where Serve listens. The
rules: every flag of the demo reaches the job (--voice, --max-new-tokens, --ray-address, --http-port,
--serve-model), the output is an absolute file:// URL, the app's frame cap is never below the job's, Serve listens
on loopback only, the exit status is the job's and a failed deploy fails the demo. jobs/scripts.py: the Unicode
blocks are inclusive and Hangul is spaced but syllabic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from ray import serve

from jobs import demo
from jobs.scripts import FULLWIDTH, HANGUL, SYLLABIC, UNBOUNDED, UNSPACED, in_blocks


class _Parsed(Exception):
    """Raised by the stand-in for build_options: carries the narrate arguments the demo built."""


def _args(tmp_path, *argv: str, **over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--output-dir", str(tmp_path / "out"), *argv])
    return argparse.Namespace(**{**vars(args), **over})


@pytest.fixture
def demo_calls(monkeypatch):
    """Ray, Serve and the job stood in for: the Ray address connected to, the deploy call, the narrate arguments."""
    calls: dict = {"connect": [], "deploy": [], "deleted": []}
    monkeypatch.setattr(demo, "connect_ray", lambda address: calls["connect"].append(address))
    monkeypatch.setattr(demo, "tiny_checkpoint", lambda folder: str(folder / "tiny"))
    monkeypatch.setattr(demo, "serve_app_running", lambda name: False)
    monkeypatch.setattr(serve, "delete", lambda name, *a, **k: calls["deleted"].append(name))

    def deploy(*a, **k):
        calls["deploy"].append((a, k))
        return "demo"

    monkeypatch.setattr(demo, "deploy_serve_app", deploy)

    def parsed(nargs, kind):
        calls["nargs"] = nargs
        raise _Parsed

    monkeypatch.setattr(demo, "build_options", parsed)
    return calls


def _run(args) -> None:
    with pytest.raises(_Parsed):
        demo.run(args)


def test_the_demos_flags_reach_the_job_it_runs(tmp_path, demo_calls, monkeypatch):
    """Mutants D05 (backend forced to engine), D06 (--voice dropped), D07 (--max-new-tokens dropped), D10
    (--ray-address dropped), D11 (--http-port not passed to the deploy), D02 (a relative file:// URL: the output
    went wherever the job's workers ran)."""
    monkeypatch.chdir(tmp_path)
    _run(_args(tmp_path, "--voice", "ryan", "--max-new-tokens", "70", "--ray-address", "127.0.0.1:6399",
               "--http-port", "8123", "--output-dir", "rel-out"))
    n = demo_calls["nargs"]
    assert demo_calls["connect"] == ["127.0.0.1:6399"]
    (dargs, dkw), = demo_calls["deploy"]
    assert dargs == (str(tmp_path / "rel-out" / ".checkpoints" / "tiny"), 70, 8123) and not dkw
    assert n.output == f"file://{tmp_path / 'rel-out'}" and Path(n.output[len("file://"):]).is_absolute()
    assert (n.voice, n.max_new_tokens, n.backend, n.model) == ("ryan", 70, "serve", "demo")
    assert n.input == str(demo.ROOT / "examples" / "book")


def test_the_running_apps_model_is_the_one_serve_model_names(tmp_path, demo_calls, monkeypatch):
    """With the app already running, rows go to `--serve-model` (the app's own model name). Mutant D04: the name
    dropped (rows went to the app's default model)."""
    monkeypatch.setattr(demo, "serve_app_running", lambda name: True)
    _run(_args(tmp_path, "--serve-model", "narrator"))
    n = demo_calls["nargs"]
    assert (n.model, n.backend) == ("narrator", "serve") and demo_calls["deploy"] == []



def test_the_demos_exit_status_is_the_jobs(tmp_path, demo_calls, monkeypatch):
    """`make demo` fails when the narration has failed rows: the status `finish` returns is the command's. Mutant
    D09: the status dropped (0 whatever happened)."""
    monkeypatch.setattr(demo, "build_options", lambda nargs, kind: ({}, None, None, None))
    monkeypatch.setattr(demo, "read_inputs", lambda *a: [])
    monkeypatch.setattr(demo, "prepare", lambda rows, defaults, render, opts: (rows, render, opts, "serve"))
    monkeypatch.setattr(demo, "run_rows", lambda *a, **k: [])
    monkeypatch.setattr(demo, "finish", lambda *a, **k: 3)
    assert demo.run(_args(tmp_path)) == 3
    assert demo_calls["deleted"] == [demo.DEMO_APP]


def test_a_serve_app_that_fails_to_deploy_fails_the_demo(tmp_path, demo_calls, monkeypatch):
    """Only a missing Serve install falls back to engine actors; a deploy that fails is the demo's error, not a
    silent switch of backend. Mutant D18: RuntimeError caught too."""
    def fail(*a, **k):
        raise RuntimeError("replica failed to start")

    monkeypatch.setattr(demo, "deploy_serve_app", fail)
    with pytest.raises(RuntimeError, match="replica failed"):
        demo.run(_args(tmp_path))
    assert "nargs" not in demo_calls and demo_calls["deleted"] == []


def test_the_tiny_checkpoint_is_built_once_with_seed_0(tmp_path, monkeypatch):
    """A rerun reuses the tiny checkpoint (its keys, so its outputs, stay the same); it is the custom_voice tiny one
    of seed 0. Mutants D19 (rebuilt on every run), D20 (another seed)."""
    import qwen_tts_core

    built = []

    def make(path, **kw):
        built.append(kw)
        Path(path).mkdir(parents=True)
        (Path(path) / "config.json").write_text("{}")
        return Path(path)

    monkeypatch.setattr(qwen_tts_core, "make_checkpoint", make)
    first = demo.tiny_checkpoint(tmp_path)
    assert demo.tiny_checkpoint(tmp_path) == first == str(tmp_path / "tiny-custom-voice")
    assert built == [{"model_type": "custom_voice", "size": "tiny", "seed": 0}]

def test_the_defaults_are_the_readmes(tmp_path):
    """`make demo`: examples/book into ./output, voice vivian, a 48-frame cap (~4 s) per chunk. Mutants D14, D15,
    D16."""
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    a = parser.parse_args(["demo"])
    assert (a.output_dir, a.voice, a.max_new_tokens, a.http_port) == ("output", "vivian", 48, 8000)
    assert a.input == str(demo.ROOT / "examples" / "book")


def test_the_deployed_app_caps_frames_at_least_at_the_jobs_cap_and_listens_on_loopback(monkeypatch):
    """deploy_serve_app: the app's max_new_tokens is never below the job's (a larger --max-new-tokens was refused by
    the app), Serve's proxy binds 127.0.0.1 (the demo's random-weight app is not for the network), the app is named
    qtts (the name the finally deletes). Mutants D03 (min for max), D22 (0.0.0.0), D23 (another app name)."""
    import importlib

    seen: dict = {}
    monkeypatch.setattr(importlib.import_module("serve.cli"), "start_http",
                        lambda host, port, **k: seen.update(host=host, port=port))
    monkeypatch.setattr(importlib.import_module("serve.app"), "build_app", lambda cfg: cfg)
    monkeypatch.setattr(serve, "run", lambda app, name, route_prefix: seen.update(cfg=app, name=name))
    for cap, want in ((200, 200), (10, 64)):
        assert demo.deploy_serve_app("/ck", cap, 8123) == "demo"
        assert (seen["host"], seen["port"], seen["name"]) == ("127.0.0.1", 8123, demo.DEMO_APP)
        model = seen["cfg"].models[0]
        assert model.max_new_tokens == want and model.checkpoint == "/ck"


@pytest.mark.parametrize("port,ok", [("1", True), ("65535", True), ("0", False), ("65536", False)])
def test_the_http_port_bounds_are_the_tcp_ports(port, ok):
    """Mutants D12 (port 0 taken), D13 (65535 refused)."""
    if ok:
        assert demo._port(port) == int(port)
    else:
        with pytest.raises(argparse.ArgumentTypeError):
            demo._port(port)


# --- jobs/scripts.py --------------------------------------------------------------------------------------------
def test_script_blocks_are_inclusive_and_hangul_is_spaced_but_syllabic():
    """Mutants S01/S02 (a bound made exclusive), S05 (Hangul joined without spaces), S06 (Hangul not syllabic), S07
    (Hangul lexicon words bounded), S08 (halfwidth forms not unspaced)."""
    for lo, hi in (HANGUL, FULLWIDTH):
        assert in_blocks(chr(lo), (HANGUL, FULLWIDTH)) and in_blocks(chr(hi), (HANGUL, FULLWIDTH))
    assert not in_blocks(chr(HANGUL[0] - 1), (HANGUL,)) and not in_blocks(chr(HANGUL[1] + 1), (HANGUL,))
    assert not in_blocks("한", UNSPACED) and in_blocks("한", SYLLABIC) and in_blocks("한", UNBOUNDED)
    assert in_blocks("\uff61", UNSPACED) and in_blocks("\u3002", UNSPACED) and in_blocks("\u2e80", SYLLABIC)
