"""A row reused from an earlier run reports this run's retries (none), not those of the run that rendered it."""

from __future__ import annotations

import json

from jobs import narrate
from jobs.manifest import from_parquet
from jobs.synth import ChunkJob, ChunkResult
from tests.jobs.fakes import FakeBackend


class LostOnceFake(FakeBackend):
    """Every chunk says its call was sent again after a lost replica (as ServeBackend reports it)."""

    def synthesize(self, jobs: list[ChunkJob]) -> list[ChunkResult]:
        out = super().synthesize(jobs)
        for r in out:
            r.retries = ("replica lost (RayActorError)",)
        return out


def _run(rows, out, backend: str, capsys) -> dict:
    code = narrate.main([str(rows), "--model", "fake", "--voice", "vivian", "--out", f"file://{out}",
                         "--backend", backend, "--runner", "local", "--no-progress", "--quiet"])
    assert code == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_reused_row_lists_no_retries_of_the_run_that_rendered_it(tmp_path, capsys):
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps({"id": "a", "text": "Hello there."}) + "\n")
    out = tmp_path / "out"
    first = _run(rows, out, f"{__name__}:LostOnceFake", capsys)
    assert first["retried"]["rows"] == 1
    second = _run(rows, out, "tests.jobs.fakes:FakeBackend", capsys)
    assert second["reused"] == 1 and "retried" not in second, second
    rec = from_parquet((out / "manifest.parquet").read_bytes())[0]
    assert rec.reused and rec.retries == []
    sidecar = json.loads((out / f"{rec.key}.json").read_text())
    assert sidecar["retries"] == ["replica lost (RayActorError)"]  # the original render's, kept with it


def test_a_row_this_job_committed_keeps_its_retries_when_listed_from_its_sidecar(tmp_path):
    """Review: rows whose record never came back (a stopped or aborted Ray job) are listed from their sidecars
    (runner._committed); clearing a reused row's retries wiped the retries this very job made for them."""
    import numpy as np

    from jobs import runner
    from jobs.inputs import Utterance
    from jobs.render import RenderConfig, render_rows
    from jobs.storage import LocalSink

    class LostOnce:
        def synthesize(self, jobs):
            return [ChunkResult(np.full(24000, 0.1, np.float32), "eos", retries=("replica lost, sent again",))
                    for _ in jobs]

    sink, cfg = LocalSink(str(tmp_path)), RenderConfig(model="fake")
    rows = [Utterance(id="a", text="Hello there.", voice="ryan")]
    made = render_rows(rows, LostOnce(), sink, cfg, skip_existing=False)[0]
    listed = runner._committed(rows, [0], sink, cfg)[0]
    assert made.retries == ["replica lost, sent again"]
    assert listed.retries == made.retries and listed.reused is False and listed.status == made.status
