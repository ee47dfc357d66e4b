"""What workers open is named by absolute paths resolved in the driver: a Ray worker's working directory is its
node's, not the driver's, so a relative --model folder or voice-prompt file would be looked up in the wrong place.
Keys and the manifest keep the names as the rows give them."""

from __future__ import annotations

import os
from pathlib import Path

from jobs.inputs import RowDefaults, Utterance
from jobs.narrate import prepare
from jobs.render import RenderConfig, _chunk_jobs, plan_key
from jobs.runner import RunOptions


def test_relative_model_folder_and_voice_file_reach_workers_as_absolute_paths(tmp_path, monkeypatch,
                                                                              checkpoint_factory):
    driver, worker = tmp_path / "driver", tmp_path / "worker"
    driver.mkdir()
    worker.mkdir()
    os.symlink(checkpoint_factory("base"), driver / "ckpt")
    (driver / "alice.prompt").write_bytes(b"a voice prompt")
    monkeypatch.chdir(driver)
    rows = [Utterance(id="r", text="Hello there.", voice="alice.prompt")]
    opts = RunOptions(backend="engine", runner="local")
    rows, cfg, opts, backend = prepare(rows, RowDefaults(model="ckpt"), RenderConfig(model="ckpt"), opts)
    key = plan_key(rows[0], cfg)
    monkeypatch.chdir(worker)  # where a worker runs: "ckpt" and "alice.prompt" are not here
    (job,) = _chunk_jobs(rows[0], cfg, ["Hello there."], 0)
    assert Path(job.model).is_absolute() and (Path(job.model) / "config.json").is_file()
    assert Path(job.voice).is_absolute() and Path(job.voice).read_bytes() == b"a voice prompt"
    assert rows[0].voice == "alice.prompt" and cfg.model == "ckpt"  # as given: the manifest and keys
    assert plan_key(rows[0], cfg) == key
