"""On the real local Ray head, with a tiny fake backend: a row that kills its worker fails after a few lost workers
instead of hanging the job, and a relative file:// output is the driver's folder, not the workers'."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
from pathlib import Path

import pytest

from jobs import narrate
from jobs.manifest import from_parquet

MAX_WORKER_LOSSES = 3  # jobs.runner.MAX_WORKER_LOSSES (a literal: the test also runs against older runners)

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = ["--runner", "ray", "--actors", "1", "--num-cpus", "0.25", "--no-progress", "--quiet", "--model", "fake",
       "--voice", "vivian"]


def _narrate(args: list[str], limit_s: float = 150) -> int:
    """narrate.main in a thread: a job that hangs fails the test instead of the session."""
    result: list[int] = []
    th = threading.Thread(target=lambda: result.append(narrate.main(args)), daemon=True)
    th.start()
    th.join(limit_s)
    assert result, f"the job did not end within {limit_s} s"
    return result[0]


def _rows(path: Path, texts: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in texts.items()))
    return path


def _cwd() -> str:
    return os.getcwd()


def _worker_cwd() -> Path:
    import ray

    return Path(ray.get(ray.remote(_cwd).options(num_cpus=0).remote()))


def test_a_row_that_kills_its_worker_fails_and_the_rest_render(ray_driver, tmp_path, capsys):
    rows = _rows(tmp_path / "crash.jsonl", {f"r{i}": "CRASH here." if i == 2 else f"Row {i} text." for i in range(6)})
    out = tmp_path / "out"
    code = _narrate([str(rows), "--out", f"file://{out}", "--backend", "tests.jobs.crash_fakes:CrashFake",
                     "--batch-size", "2", *RAY])
    s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    man = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
    assert code == 1 and s["failed_ids"] == ["r2"] and s["ok"] == 5, s
    assert man["r2"].error.startswith(f"worker lost {MAX_WORKER_LOSSES} times on this row"), man["r2"].error
    assert man["r2"].key is not None and not (out / man["r2"].key).exists()
    for rid, rec in man.items():
        if rid != "r2":
            assert rec.status == "ok" and (out / rec.key).is_file(), (rid, rec.error)
    # r3 shared r2's batch: it was run again after the lost workers, and says so
    assert any("was lost" in why for why in man["r3"].retries)


def test_a_relative_output_is_the_drivers_folder(ray_driver, tmp_path, monkeypatch, capsys):
    driver = tmp_path / "driver"
    driver.mkdir()
    name = f"qtts-relout-{uuid.uuid4().hex[:8]}"
    worker_out = _worker_cwd() / name
    assert _worker_cwd() != driver
    rows = _rows(tmp_path / "in.jsonl", {f"r{i}": f"Row {i} text." for i in range(3)})
    monkeypatch.chdir(driver)
    try:
        code = _narrate([str(rows), "--out", f"file://./{name}", "--backend", "tests.jobs.fakes:FakeBackend",
                         "--batch-size", "2", *RAY])
        s = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert code == 0 and s["ok"] == 3 and s["output"] == f"file://{driver / name}", s
        man = from_parquet((driver / name / "manifest.parquet").read_bytes())
        assert all((driver / name / r.key).is_file() for r in man)
        assert not worker_out.exists()
    finally:
        shutil.rmtree(worker_out, ignore_errors=True)


def test_workers_that_die_loading_the_backend_end_the_job(ray_driver, tmp_path, capsys):
    """A backend whose load kills the process (a model out of memory) never opens a row, so the poison-row rule never
    fired and Ray restarted the workers up to its bound (max_losses x rows: for a big job, a hang of reloads). The
    tracker counts loads that never finished; the constructor gives up after `max_losses` of them: the job fails
    within a few restarts, every row unrendered, nothing written."""
    from tests.jobs.crash_fakes import LOAD_LOG

    rows = _rows(tmp_path / "rows.jsonl", {f"r{i}": f"Row {i} text." for i in range(40)})
    out = tmp_path / "out"
    LOAD_LOG.unlink(missing_ok=True)
    try:
        code = _narrate([str(rows), "--out", f"file://{out}", "--backend", "tests.jobs.crash_fakes:LoadCrashFake",
                         "--batch-size", "2", *RAY], limit_s=120)
    except Exception as e:  # noqa: BLE001 - the dataset's failure may surface as an exception: the job ended
        code = e
    capsys.readouterr()
    loads = len(LOAD_LOG.read_text().splitlines())
    LOAD_LOG.unlink(missing_ok=True)
    assert code != 0, code
    assert loads <= MAX_WORKER_LOSSES + 1, f"{loads} loads (one actor: it gives up on load {MAX_WORKER_LOSSES + 1})"
    assert not any(p.suffix == ".wav" for p in out.rglob("*")) if out.exists() else True
