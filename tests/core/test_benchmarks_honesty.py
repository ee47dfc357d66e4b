"""Cheap checks of the benchmarks' own measuring code (no model, no Ray): what a figure means must not change
silently. The benchmarks themselves run in their smallest modes by hand (benchmarks/*.py --help)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


def test_serve_load_leak_check_reads_a_missing_gauge_as_no_data_not_zero():
    import serve_load

    text = ("# HELP qtts_active_sessions sessions open in the replicas' engines\n"
            "# TYPE qtts_active_sessions gauge\n"
            'qtts_open_client_streams 0.0\n')
    assert serve_load._metric(text, "qtts_active_sessions") is None   # HELP/TYPE lines are not samples
    assert serve_load._metric(text, "qtts_open_client_streams") == 0.0
    two = 'qtts_active_sessions{model="a"} 2.0\nqtts_active_sessions{model="b"} 1.0\n'
    assert serve_load._metric(two, "qtts_active_sessions") == 3.0


def test_narrate_wire_bytes_is_measured_from_the_payload():
    import numpy as np
    from narrate_throughput import wire_bytes

    small, big = {"pcm": np.zeros(10, np.float32)}, {"pcm": np.zeros(10_000, np.float32)}
    assert wire_bytes(big) - wire_bytes(small) >= 9_990 * 4
    assert wire_bytes({"pcm": np.zeros(10_000, np.int16)}) < wire_bytes(big)


def test_peak_rss_is_this_process_not_its_parent(tmp_path):
    """Linux carries ru_maxrss across exec: a worker started by a big parent read the parent's peak as its own."""
    import json
    import subprocess

    import numpy as np

    big = np.ones(300 << 17)  # ~300 MiB held by this (parent) process
    code = "import sys; sys.path.insert(0, sys.argv[1]); import _measure, json; print(json.dumps(_measure.peak_rss_mb()))"
    child = json.loads(subprocess.run([sys.executable, "-c", code, str(ROOT / "benchmarks")], capture_output=True,
                                      text=True, check=True, timeout=60).stdout)
    assert child < big.nbytes / 2**20 / 2
