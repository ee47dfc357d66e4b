"""`qtts demo` and the Serve app it deploys or finds, without Ray (its Ray steps are stand-ins): the app it deployed
is deleted when the job fails as when it finishes, and a `--model` that a running app would ignore is refused."""

from __future__ import annotations

import argparse

import pytest
from ray import serve

from jobs import demo
from jobs.storage import StorageError


def _args(tmp_path, **over) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo", "--output-dir", str(tmp_path / "out")])
    return argparse.Namespace(**{**vars(args), **over})


@pytest.fixture
def no_ray(monkeypatch):
    """Ray and Serve stood in for: what the demo deletes is recorded."""
    deleted: list[str] = []
    monkeypatch.setattr(demo, "connect_ray", lambda address: None)
    monkeypatch.setattr(demo, "tiny_checkpoint", lambda folder: str(folder / "tiny"))
    monkeypatch.setattr(serve, "delete", lambda name, *a, **k: deleted.append(name))
    # the rows as prepared for the app (asking Serve which models it runs is a Ray step)
    monkeypatch.setattr(demo, "prepare", lambda rows, defaults, render, opts: (rows, render, opts, "serve"))
    return deleted


def test_the_app_the_demo_deployed_is_deleted_when_the_job_fails(tmp_path, monkeypatch, no_ray):
    """An output that refuses writes (run_rows raises before any row) ended the demo with its Serve app left
    deployed: on a joined cluster its replica kept holding a CPU after the command had failed."""
    monkeypatch.setattr(demo, "serve_app_running", lambda name: False)
    monkeypatch.setattr(demo, "deploy_serve_app", lambda *a, **k: "demo")

    def refuse(*a, **k):
        raise StorageError("file:///x: not writable")

    monkeypatch.setattr(demo, "run_rows", refuse)
    with pytest.raises(StorageError):
        demo.run(_args(tmp_path))
    assert no_ray == [demo.DEMO_APP]


def test_keep_serve_keeps_it_and_a_found_app_is_never_deleted(tmp_path, monkeypatch, no_ray):
    monkeypatch.setattr(demo, "deploy_serve_app", lambda *a, **k: "demo")
    monkeypatch.setattr(demo, "run_rows", lambda *a, **k: [])
    monkeypatch.setattr(demo, "finish", lambda *a, **k: 0)
    monkeypatch.setattr(demo, "serve_app_running", lambda name: False)
    assert demo.run(_args(tmp_path, keep_serve=True)) == 0
    assert no_ray == []
    assert demo.run(_args(tmp_path)) == 0
    assert no_ray == [demo.DEMO_APP]
    monkeypatch.setattr(demo, "serve_app_running", lambda name: True)   # someone else's app: used, left running
    assert demo.run(_args(tmp_path)) == 0
    assert no_ray == [demo.DEMO_APP]


def test_a_model_the_running_app_would_ignore_is_refused(tmp_path, monkeypatch, no_ray):
    """With the app already running, the rows went to its model and `--model` was dropped without a word: the
    narration came out in another model's voice than the one asked for."""
    monkeypatch.setattr(demo, "serve_app_running", lambda name: True)
    monkeypatch.setattr(demo, "run_rows", lambda *a, **k: pytest.fail("rendered with the running app's model"))
    with pytest.raises(SystemExit) as e:
        demo.run(_args(tmp_path, model=str(tmp_path / "my-checkpoint")))
    assert "--model" in str(e.value) and "--no-serve" in str(e.value) and "--serve-model" in str(e.value)
    assert no_ray == []
