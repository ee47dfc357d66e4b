"""The README's main job, as a user runs it: `qtts demo` (what `make demo` calls) on the embedded default (its own
in-process Ray, the Serve app it deploys, a tiny random checkpoint, examples/book -> local files). It had no test: CI
ran `make test`, never the first of the README's two commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
QTTS = [sys.executable, "-m", "qwen_tts_core.cli"]


def _demo(out: Path, ray_tmp: str, *extra: str) -> tuple[int, dict, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}  # the embedded default
    # cluster/env.sh's settings (`make demo` sources it); Ray's files under a temp dir of this test's own
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               RAY_SERVE_ENABLE_HA_PROXY="0", RAY_TMPDIR=ray_tmp)
    r = subprocess.run([*QTTS, "demo", "--output-dir", str(out), "--http-port", str(free_port()), *extra],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    return r.returncode, json.loads(lines[-1]) if lines else {}, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.mark.ray
def test_the_main_job_narrates_the_sample_book_and_a_rerun_reuses_it(tmp_path):
    out = tmp_path / "output"
    ray_tmp = tempfile.mkdtemp(prefix="qd-")  # short: Ray's socket paths must fit in 107 bytes
    try:
        code, summary, log = _demo(out, ray_tmp)
        assert code == 0, log
        assert (Path(ray_tmp) / "ray").is_dir()  # its Ray ran under the test's own folder (checked below)
        chapters = sorted(p.stem for p in (ROOT / "examples/book").iterdir())
        assert summary["total"] == len(chapters) == 3 and summary["failed"] == 0, summary
        assert summary["synthesized"] == 3 and summary["output"] == f"file://{out}", summary
        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        assert sorted(r["id"] for r in rows) == chapters
        for r in rows:
            assert r["status"] in ("ok", "suspect"), r
            info = sf.info(str(out / r["key"]))
            assert info.samplerate == 24000 and info.channels == 1
            assert abs(info.duration - r["duration_s"]) < 0.01 and info.duration > 1.0, (r, info.duration)
        assert (out / ".checkpoints/tiny-custom-voice/config.json").is_file()
        first = {r["id"]: (r["key"], (out / r["key"]).read_bytes()) for r in rows}

        code, again, log = _demo(out, ray_tmp)
        assert code == 0, log
        assert (again["total"], again["reused"], again["synthesized"]) == (3, 3, 0), again
        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        assert {r["id"]: (r["key"], (out / r["key"]).read_bytes()) for r in rows} == first
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    # the in-process cluster ended with the command: nothing of it is left running
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert ray_tmp not in ps, [ln for ln in ps.splitlines() if ray_tmp in ln]


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_a_bad_http_port_is_refused_before_anything_starts(tmp_path, port):
    r = subprocess.run([*QTTS, "demo", "--output-dir", str(tmp_path / "o"), "--http-port", port], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--http-port" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.ray
def test_an_http_port_another_program_holds_is_a_one_line_error_naming_it(tmp_path):
    """`make demo` binds 127.0.0.1:8000; with that port taken the demo died ~20 s in with Ray's traceback
    (ProxyActor ... Failed to bind), exit 1 (found by the new-user review). Now one line naming --http-port, and
    its Ray ends with it. The check is serve.cli.start_http's, which `qtts serve` uses too."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    ray_tmp = tempfile.mkdtemp(prefix="qd-")
    try:
        code, _, log = _demo(tmp_path / "o", ray_tmp, "--http-port", str(port))
    finally:
        holder.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert code != 0 and f"qtts demo: 127.0.0.1:{port} is in use by another program" in log, log
    assert "--http-port" in log and "Traceback" not in log and "Failed to bind" not in log, log
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert ray_tmp not in ps
