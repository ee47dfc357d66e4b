"""The real engine (tiny checkpoint) behind the render pipeline, in one process (no Ray)."""

from __future__ import annotations

import json

import numpy as np

from jobs import narrate
from jobs.audio import decode
from jobs.manifest import from_parquet
from jobs.synth import ChunkJob, EngineBackend, EngineOptions

LOCAL = ["--backend", "engine", "--runner", "local", "--max-new-tokens", "16", "--no-progress", "--quiet"]


def test_engine_backend_same_seed_same_audio_and_bad_voice(tiny_ckpt):
    be = EngineBackend(EngineOptions(max_sessions=4))
    job = ChunkJob(text="Hello there.", voice="ryan", language="english", instruct=None, seed=7,
                   model=tiny_ckpt, sampling={"max_new_tokens": 12})
    bad = ChunkJob(**{**job.__dict__, "voice": "nobody"})
    a, b, c = be.synthesize([job, bad, job])
    assert a.error is None and a.pcm.size > 0 and a.finish_reason in ("eos", "max_new_tokens")
    assert np.array_equal(a.pcm, c.pcm)  # same seed, batched together -> same audio
    assert b.pcm is None and b.error.startswith("speaker: 'nobody' is not supported")


def test_runaway_guard_retried_with_new_seed_then_recorded(tiny_ckpt, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "loop", "text": "A long sentence that never ends.", "voice": "ryan"}))
    out = tmp_path / "out"
    code = narrate.main([str(rows), "--model", tiny_ckpt, "--out", str(out), *LOCAL,
                         "--guard-frames-per-token", "0.001", "--guard-base-frames", "1", "--attempts", "2"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    man = from_parquet((out / "manifest.parquet").read_bytes())
    if man[0].status == "failed":  # the usual case: random weights rarely stop within 1 frame
        assert code == 1 and summary["failed"] == 1
        assert "runaway guard tripped (guard) after 2 attempt(s)" in man[0].error and man[0].attempts == 2
    else:  # EOS on the first frame with both seeds: still a valid output
        assert man[0].finish_reasons == ["eos"]


def test_chapter_through_engine_is_written(tiny_ckpt, tmp_path, capsys):
    ch = tmp_path / "ch1.txt"
    ch.write_text("First sentence. Second sentence.\n\nA new paragraph.")
    out = tmp_path / "out"
    assert narrate.main([str(ch), "--model", tiny_ckpt, "--voice", "vivian", "--out", str(out), *LOCAL,
                         "--retry-on", "guard", "--format", "flac"]) == 0
    (rec,) = from_parquet((out / "manifest.parquet").read_bytes())
    assert rec.num_chunks == 2 and rec.key.endswith(".flac") and len(rec.finish_reasons) == 2
    pcm, sr = decode((out / rec.key).read_bytes())
    assert sr == 24000 and len(pcm) > int(0.4 * sr)  # two chunks and the pause between them
