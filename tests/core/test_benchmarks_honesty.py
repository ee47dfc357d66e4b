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


def _cfg(tmp_path):
    import json

    layer = dict(hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4, num_key_value_heads=2)
    cfg = {"talker_config": {**layer, "num_hidden_layers": 3, "vocab_size": 100,
                             "code_predictor_config": {**layer, "num_hidden_layers": 2, "num_code_groups": 16,
                                                       "vocab_size": 50}}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_the_memory_bound_reads_each_part_at_its_own_working_sets_bandwidth(tmp_path, monkeypatch):
    """This stop: one 268 MB matrix read again and again stays in a 300 MB L3 (52 GB/s) while the talker streams from
    DRAM (~26 GB/s): the bound was 3/4 of what a frame can take. The talker and heads must be read at the bandwidth
    of the whole frame's working set, the code predictor's layers at theirs; a stand-in bandwidth that halves past
    a cache size shows a bound from one cached matrix would be too small."""
    import engine_vs_reference as evr

    parts = evr.weight_bytes_per_frame(_cfg(tmp_path), 4)
    assert parts["total"] == parts["once"] + parts["cp_steps"] * parts["cp_pass"]
    assert parts["cp_reuse"] < parts["once"] and parts["cp_steps"] == 15
    cache = parts["cp_reuse"] + 1                      # the code predictor fits "the cache", the frame does not
    asked = []

    def bandwidth(dtype, working_set):
        asked.append(working_set)
        return 2e-6 if working_set <= cache else 1e-6   # GB/s: slow enough that the rounded bound is seconds

    monkeypatch.setattr(evr, "stream_bandwidth_gbs", bandwidth)
    mem = evr.memory_bound(parts, "float32")
    want = parts["once"] / 1e3 + parts["cp_steps"] * parts["cp_pass"] / 2e3
    assert want > 100 and abs(mem["bound_s_per_frame"] - want) < 1e-3
    assert sorted(asked) == sorted([parts["cp_reuse"], parts["once"] + parts["cp_reuse"]])
    assert mem["bound_s_by_part"]["talker_and_heads"] == round(parts["once"] / 1e3, 4)
    assert (parts["once"] + parts["cp_steps"] * parts["cp_pass"]) / 2e3 < want   # the old, cached yardstick: less


def test_stream_bandwidth_cycles_distinct_matrices_and_is_finite():
    import math

    from _measure import stream_bandwidth_gbs

    bw = stream_bandwidth_gbs("float32", 64 * 64 * 4 * 3, rows=64, cols=64, min_seconds=0.01)
    assert 0 < bw < math.inf


def test_the_lexicon_benchmark_times_the_same_matches_on_both_patterns(capsys):
    """benchmarks/lexicon.py compares the module's pattern with the per-entry-boundary one it replaced; it must
    check that both find the same matches before it times them, and report what it timed."""
    import json

    import lexicon as bench

    assert bench.main(["--sizes", "40", "--chunks", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["sizes"][0]
    assert row["entries"] == 40 and row["pattern_chars"] < row["baseline_pattern_chars"]
    from jobs.lexicon import Entry

    entries = (Entry("ab", "x"), Entry("a", "y"))
    assert [m.span() for m in bench.baseline_pattern(entries).finditer("a ab b")] == [(0, 1), (2, 4)]
