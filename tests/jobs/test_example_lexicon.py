"""configs/jobs/narrate.yaml's commented `lexicon:` line names a lexicon that exists and loads: uncommenting it, as the
file invites, gives a job whose lexicon fires."""

from __future__ import annotations

from pathlib import Path

from jobs import narrate

ROOT = Path(__file__).resolve().parents[2]


def test_uncommented_lexicon_line_of_the_narrate_config_loads(tmp_path, monkeypatch):
    lines = (ROOT / "configs" / "jobs" / "narrate.yaml").read_text().splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.startswith("# lexicon:")]
    lines[i] = lines[i][2:]
    conf = tmp_path / "narrate.yaml"
    conf.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(ROOT)  # like `output: file://./output`, paths are relative to the working directory
    args = narrate.build_parser().parse_args(["examples/book", "--config", str(conf), "--model", "m"])
    _, render, _, _ = narrate.build_options(args, "audio")
    said, fired = render.lexicon.apply("Ask Dr. Nguyen: is nginx slow?")
    assert said == "Ask Doctor Win: is engine x slow?" and [e.word for e in fired] == ["Dr. Nguyen", "nginx"]
