"""`make test`'s lanes (tests/run.sh loads this plugin and names one lane in QTTS_LANE); every test is in exactly one:
  ray:   marked `ray` (it uses the session's Ray head, which tests/conftest.py marks, or starts a cluster);
  core:  the rest of a folder named `core` (the engine's tests), and the files MOVED says are "core";
  other: everything else (and the files MOVED says are "other").
`core` and `other` run side by side: each is one process of single-threaded CPU work (one intra-op thread:
tests/conftest.py; test_run_lanes.py checks it stays one), and two of those do not slow each other on a 2-core
machine. `ray` runs after them, alone, as before: its replicas, proxies and driver use both cores and its tests
wait on leases and health checks. MOVED evens out the two side-by-side lanes: the slower of them sets when `ray`
starts. CI of 03b3328: core 11:40, other 13:16; with test_batched_audio.py moved to core (cirun54): core 13:01,
other 11:46; so test_cpu_alloc.py (about half that) moved to other."""

from __future__ import annotations

import os

import pytest

LANES = ("core", "other", "ray")
MOVED = {"core/test_gpu_check.py": "other", "core/test_cpu_alloc.py": "other",  # folder/file -> lane
         "codec/test_batched_audio.py": "core"}


def lane_of(item: pytest.Item) -> str:
    if item.get_closest_marker("ray") is not None:
        return "ray"
    return MOVED.get("/".join(item.path.parts[-2:])) or folder_lane(item.path)


def folder_lane(path) -> str:
    """The lane a CPU test file's folder gives it, before MOVED."""
    return "core" if path.parent.name == "core" else "other"


def pytest_collection_modifyitems(config, items):
    lane = os.environ.get("QTTS_LANE", "")
    if lane not in LANES:
        raise pytest.UsageError(f"QTTS_LANE must be one of {', '.join(LANES)}, got {lane!r}")
    keep = [item for item in items if lane_of(item) == lane]
    if len(keep) < len(items):
        kept = set(keep)
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = keep
