"""tests/run.sh, what `make test` runs: three pytest lanes (tests/lanes.py). A failure in any lane must fail the run
and be the last thing printed; Ctrl-C must stop the lanes running, let each tear down what it started, and start no
other. Here the lanes run a small suite this test writes (QTTS_TESTS), so each case takes seconds."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lanes import LANES

ROOT = Path(__file__).resolve().parents[1]

SUITE = {
    "conftest.py": '''
import os, pathlib, time
import pytest

@pytest.fixture(scope="session")
def started():
    """Stands for the Ray head or moto_server a lane starts: a file while it runs, removed at teardown."""
    mark = pathlib.Path(os.environ["LANE_MARKS"]) / f"running-{os.getpid()}"
    mark.write_text("")
    yield
    mark.unlink()
''',
    "core/test_core.py": '''
import os, time

def test_core(started):
    assert os.environ.get("FAIL") != "core"
    time.sleep(float(os.environ.get("SLEEP", "0")))
''',
    "test_lanes.py": '''
import os, time
import pytest

@pytest.mark.ray
def test_on_ray(started):
    assert os.environ.get("FAIL") != "ray"

@pytest.mark.parity
def test_parity():
    assert os.environ.get("FAIL") != "parity"

def test_other(started):
    assert os.environ.get("FAIL") != "other"
    time.sleep(float(os.environ.get("SLEEP", "0")))
''',
}


def run_lanes(tmp_path: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "tests/run.sh"), *args], cwd=ROOT, capture_output=True, text=True,
                          env=lanes_env(tmp_path, **env), timeout=300)


def lanes_env(tmp_path: Path, **env) -> dict:
    suite = tmp_path / "suite"
    suite.mkdir(exist_ok=True)
    for name, text in SUITE.items():
        (suite / name).parent.mkdir(exist_ok=True)
        (suite / name).write_text(text)
    (tmp_path / "marks").mkdir(exist_ok=True)
    return dict(os.environ, QTTS_TESTS=str(suite), PYTHON=sys.executable, LANE_MARKS=str(tmp_path / "marks"),
                TMPDIR=str(tmp_path), **env)


def summary(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("lane ")]


def test_every_test_runs_in_its_own_lane_and_the_run_passes(tmp_path):
    r = run_lanes(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    core, other, ray = summary(r.stdout)
    assert core.startswith("lane core (exit 0): 1 passed, 3 deselected"), core
    assert other.startswith("lane other (exit 0): 2 passed, 2 deselected"), other
    assert ray.startswith("lane ray (exit 0): 1 passed, 3 deselected"), ray
    assert not list(tmp_path.glob("qtts-test.*")), "the logs' folder is removed"


def test_a_failure_in_any_lane_fails_the_run_and_its_log_comes_last(tmp_path):
    for lane, fail, test in (("core", "core", "test_core"), ("other", "parity", "test_parity"),
                             ("other", "other", "test_other"), ("ray", "ray", "test_on_ray")):
        r = run_lanes(tmp_path, FAIL=fail)
        assert r.returncode == 1, (fail, r.stdout[-2000:])
        assert f"lane {lane} (exit 1): 1 failed" in r.stdout, r.stdout[-2000:]
        last_log = r.stdout.rsplit("==================== lane ", 1)[1]
        assert last_log.startswith(lane) and "FAILED " in last_log and test in last_log, r.stdout[-2000:]


def test_arguments_go_to_every_lane_and_a_lane_left_empty_passes(tmp_path):
    r = run_lanes(tmp_path, "-k", "test_other")
    assert r.returncode == 0, r.stdout + r.stderr
    core, other, ray = summary(r.stdout)
    assert "(exit 0): 4 deselected" in core and "(exit 0): 4 deselected" in ray, r.stdout
    assert "(exit 0): 1 passed, 3 deselected" in other, r.stdout
    r = run_lanes(tmp_path, "-k", "no_such_test")
    assert r.returncode == 0 and len(summary(r.stdout)) == 3, r.stdout


def test_a_lane_named_wrong_is_a_usage_error(tmp_path):
    env = lanes_env(tmp_path, QTTS_LANE="gpu")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.lanes", str(tmp_path / "suite")], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 4 and "QTTS_LANE must be one of core, other, ray, got 'gpu'" in r.stderr, r.stderr


@pytest.mark.parametrize("sig, background", [(signal.SIGINT, False), (signal.SIGTERM, True)], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_stops_the_running_lanes_tears_down_what_they_started_and_skips_the_rest(tmp_path, sig, background):
    """sigterm: run.sh started as a shell starts a background job without a terminal (CI, `make test &`), with
    SIGINT ignored, which its lanes inherit; SIGTERM to run.sh must still stop them through their SIGINT."""
    marks = tmp_path / "marks"
    ignore_int = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if background else None
    proc = subprocess.Popen(["bash", str(ROOT / "tests/run.sh")], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=lanes_env(tmp_path, SLEEP="120"),
                            preexec_fn=ignore_int)
    try:
        deadline = time.monotonic() + 60
        while len(list(marks.glob("running-*"))) < 2 and time.monotonic() < deadline:  # core, other inside a test
            time.sleep(0.2)
        assert len(list(marks.glob("running-*"))) == 2, "both side-by-side lanes started"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for mark in marks.glob("running-*"):  # a lane Ctrl-C did not stop: its pid is in the mark's name
            os.kill(int(mark.name.removeprefix("running-")), signal.SIGKILL)
    assert proc.returncode == 130 and "stopping" in err, (proc.returncode, out, err)
    assert not list(marks.glob("running-*")), "each lane tore down its session fixture"
    assert "lane ray" not in out, "the ray lane never started"


def test_the_suite_runs_torch_on_one_thread():
    """tests/conftest.py sets one intra-op thread; three test modules set two when imported, which every lane does
    while collecting. Two lanes of two OpenMP threads each on two cores spun against each other: the lanes took
    as long side by side as one after the other."""
    import torch

    assert torch.get_num_threads() == 1


def test_the_files_moved_between_lanes_exist_and_run_in_the_lane_named():
    """A file renamed or removed would leave MOVED naming nothing, and the lanes silently out of balance."""
    from types import SimpleNamespace

    from tests.lanes import MOVED, folder_lane, lane_of

    for name, lane in MOVED.items():
        path = ROOT / "tests" / name
        assert path.is_file(), name
        assert lane in ("core", "other") and lane != folder_lane(path), (name, lane)
        assert lane_of(SimpleNamespace(path=path, get_closest_marker=lambda _: None)) == lane, name


def test_run_sh_runs_and_reports_every_lane_of_lanes_py():
    """run.sh names the lanes twice (its schedule and ALL, the order of logs and summaries); tests/lanes.py LANES is
    the list pytest accepts. A lane added to one and not the other would never run, or never be reported."""
    script = (ROOT / "tests" / "run.sh").read_text()
    (listed,) = re.findall(r"^ALL=\(([^)]*)\)", script, re.M)
    started = re.findall(r"^start (\w+)$", script, re.M)
    assert tuple(listed.split()) == LANES
    assert sorted(started) == sorted(LANES)
