"""End to end on the real local Ray head, the real engine (tiny checkpoint) and a real HTTP S3 endpoint."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import catalog, narrate
from jobs.audio import decode
from jobs.manifest import from_parquet
from qwen_tts_core.checkpoint.digest import checkpoint_digest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
BOOK = ROOT / "examples" / "book"
# Tiny random weights rarely say EOS: bound the frames, and accept hitting the bound as an ending.
ENGINE = ["--backend", "engine", "--runner", "ray", "--actors", "2", "--num-cpus", "0.25", "--batch-size", "1",
          "--max-new-tokens", "24", "--retry-on", "guard", "--max-chars", "120", "--no-progress", "--quiet"]


def _summary(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _s3_get(bucket: str, key: str) -> bytes:
    import boto3

    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


def _s3_keys(bucket: str, prefix: str) -> list[str]:
    import boto3

    resp = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_book_to_file_on_engine_actors(tiny_ckpt, ray_driver, tmp_path, capsys):
    out = tmp_path / "out"
    code = narrate.main([str(BOOK), "--model", tiny_ckpt, "--voice", "vivian", "--out", f"file://{out}",
                         *ENGINE])
    s = _summary(capsys)
    assert code == 0 and s["failed"] == 0 and s["synthesized"] == 3, s
    man = from_parquet((out / "manifest.parquet").read_bytes())
    assert [r.id for r in man] == ["01-the-lighthouse", "02-the-storm", "03-home"]
    for r in man:
        pcm, sr = decode((out / r.key).read_bytes())
        assert sr == 24000 and len(pcm) > 0 and abs(len(pcm) / sr - r.duration_s) < 1e-3
        assert r.num_chunks >= 2 and r.model == tiny_ckpt and r.revision == checkpoint_digest(tiny_ckpt)


def test_rows_to_s3_with_a_failing_row(tiny_ckpt, ray_driver, s3_bucket, capsys):
    import boto3

    boto3.client("s3").upload_file(str(ROOT / "examples" / "rows.jsonl"), s3_bucket, "in/rows.jsonl")
    uri = f"s3://{s3_bucket}/run1"
    code = narrate.main([f"s3://{s3_bucket}/in/rows.jsonl", "--model", tiny_ckpt, "--out", uri, *ENGINE])
    s = _summary(capsys)
    assert code == 1 and s["failed"] == 1 and s["failed_ids"] == ["unknown-voice"], s
    man = {r.id: r for r in from_parquet(_s3_get(s3_bucket, "run1/manifest.parquet"))}
    assert "'nobody' is not a speaker" in man["unknown-voice"].error  # found before any synthesis
    audio = [k for k in _s3_keys(s3_bucket, "run1/audio/") if not k.endswith(".json")]
    assert len(audio) == 3
    for rid in ("greeting", "chinese", "japanese"):
        pcm, sr = decode(_s3_get(s3_bucket, f"run1/{man[rid].key}"))
        assert sr == 24000 and len(pcm) > 0
    # the same job again: nothing synthesized, the failing row is tried (and recorded) again
    assert narrate.main([str(ROOT / "examples" / "rows.jsonl"), "--model", tiny_ckpt, "--out", uri,
                         *ENGINE]) == 1
    s2 = _summary(capsys)
    assert s2["reused"] == 3 and s2["synthesized"] == 0 and s2["failed"] == 1


def test_unreachable_or_missing_bucket_fails_before_work(tiny_ckpt, moto_s3, capsys, monkeypatch):
    voice = ["--voice", "ryan"]
    assert narrate.main([str(BOOK), "--model", tiny_ckpt, *voice, "--out", "s3://no-such-bucket/x", *ENGINE]) == 2
    assert "bucket does not exist" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert narrate.main([str(BOOK), "--model", tiny_ckpt, *voice, "--out", "s3://b/x", *ENGINE]) == 2
    assert "unreachable" in capsys.readouterr().err


def test_kill_and_resume_gives_exactly_one_output_per_input(tiny_ckpt, ray_driver, tmp_path):
    rows = tmp_path / "rows.jsonl"
    n = 8
    rows.write_text("\n".join(json.dumps({"id": f"u{i}", "text": f"Utterance number {i}. It has two sentences.",
                                          "voice": "ryan", "seed": i}) for i in range(n)))
    out = tmp_path / "out"
    args = [sys.executable, "-m", "jobs.narrate", str(rows), "--model", tiny_ckpt, "--out", f"file://{out}",
            "--backend", "engine", "--runner", "ray", "--actors", "1",
            "--num-cpus", "0.25", "--batch-size", "1", "--max-new-tokens", "24", "--retry-on", "guard", "--no-progress", "--quiet"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("audio/*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("audio/*.json")))
    assert 1 <= done_before < n
    assert not (out / "manifest.parquet").exists()
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    s = json.loads(res.stdout.strip().splitlines()[-1])
    assert s["total"] == n and s["failed"] == 0 and s["reused"] >= done_before
    man = from_parquet((out / "manifest.parquet").read_bytes())
    assert sorted(r.id for r in man) == sorted(f"u{i}" for i in range(n))
    wavs = sorted(p.relative_to(out).as_posix() for p in out.glob("audio/*.wav"))
    assert wavs == sorted(r.key for r in man)  # exactly one object per input, nothing extra
    assert not list(out.rglob(".*.tmp"))


def test_catalog_on_s3_touches_only_changed_prompts(tiny_ckpt, ray_driver, s3_bucket, tmp_path, capsys):
    import boto3
    import yaml

    cat = tmp_path / "cat.yaml"
    prompts = [{"id": "welcome", "text": "Welcome."}, {"id": "menu", "text": "Press one."},
               {"id": "bye", "text": "Goodbye."}]
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", "format": "wav-ulaw", "sample_rate": 8000},
                                   "prompts": prompts}))
    uri = f"s3://{s3_bucket}/ivr"
    assert catalog.main([str(cat), "--model", tiny_ckpt, "--out", uri, *ENGINE]) == 0
    assert _summary(capsys)["new"] == 3
    s3 = boto3.client("s3")
    before = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=s3_bucket,
                                                                       Prefix="ivr/prompts/")["Contents"]}
    time.sleep(1.1)  # S3 timestamps have one-second resolution
    prompts[1]["text"] = "Press two."
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan", "format": "wav-ulaw", "sample_rate": 8000},
                                   "prompts": prompts[:2]}))
    assert catalog.main([str(cat), "--model", tiny_ckpt, "--out", uri, "--retire", "delete", *ENGINE]) == 0
    s = _summary(capsys)
    assert (s["new"], s["changed"], s["unchanged"], s["retired"]) == (0, 1, 1, 1), s
    after = {o["Key"]: o["LastModified"] for o in s3.list_objects_v2(Bucket=s3_bucket,
                                                                      Prefix="ivr/prompts/")["Contents"]}
    man = {r.id: r for r in from_parquet(_s3_get(s3_bucket, "ivr/catalog-manifest.parquet"))}
    welcome = f"ivr/{man['welcome'].key}"
    assert after[welcome] == before[welcome]                       # untouched
    assert f"ivr/{man['menu'].key}" not in before                   # regenerated under a new key
    assert len([k for k in after if not k.endswith(".json")]) == 2  # old menu + retired bye deleted
    pcm, sr = decode(_s3_get(s3_bucket, f"ivr/{man['menu'].key}"))
    assert sr == 8000 and man["bye"].status == "retired"


def test_ray_job_submit_end_to_end(tiny_ckpt, ray_driver, tmp_path):
    out = tmp_path / "job-out"
    ray_bin = Path(sys.executable).with_name("ray")
    cmd = [str(ray_bin), "job", "submit", "--address", ray_driver["dashboard"], "--working-dir", str(ROOT),
           # the head's PATH may not hold the project's virtualenv: name its python explicitly
           "--", sys.executable, "-m", "jobs.narrate", "examples/book", "--model", tiny_ckpt, "--voice", "ryan",
           "--out", f"file://{out}", *ENGINE[:-1]]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert '"synthesized": 3' in res.stdout and "succeeded" in res.stdout
    man = from_parquet((out / "manifest.parquet").read_bytes())
    assert len(man) == 3 and all(r.status in ("ok", "suspect") for r in man)


def test_through_the_running_serve_app(tiny_ckpt, ray_driver, tmp_path, capsys):
    """Bulk rows through the project's Serve app (`synthesize_bulk` on the ingress, real engine replicas)."""
    from ray import serve

    from serve.app import build_app
    from serve.config import ServiceConfig
    from tests.conftest import free_port

    app = "qtts-jobs-test"
    cfg = ServiceConfig.from_dict({"models": [{"name": "tiny", "checkpoint": tiny_ckpt, "num_cpus": 0.25,
                                               "warmup": False, "max_new_tokens": 64}],
                                   "cache_dir": str(tmp_path / "cache"), "voices_uri": str(tmp_path / "voices")})
    # Serve may already run on this cluster (other test modules): then keep its settings
    with contextlib.suppress(Exception):
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    serve.run(build_app(cfg), name=app, route_prefix=f"/{app}")
    try:
        rows = tmp_path / "rows.jsonl"
        rows.write_text("\n".join([json.dumps({"id": "a", "text": "Hello there. How are you?", "voice": "ryan"}),
                                   json.dumps({"id": "b", "text": "Bad voice.", "voice": "nobody"})]))
        out = tmp_path / "out"
        code = narrate.main([str(rows), "--model", "tiny", "--out", f"file://{out}", "--serve-app", app,
                             "--backend", "auto", "--runner", "ray", "--num-cpus", "0.25", "--max-new-tokens",
                             "24", "--retry-on", "guard", "--no-progress", "--quiet"])
        s = _summary(capsys)
        assert code == 1 and s["synthesized"] == 1 and s["failed_ids"] == ["b"], s
        man = {r.id: r for r in from_parquet((out / "manifest.parquet").read_bytes())}
        assert "voice" in man["b"].error and man["a"].num_chunks == 1
        pcm, sr = decode(io.BytesIO((out / man["a"].key).read_bytes()).read())
        assert sr == 24000 and 0 < len(pcm) <= 24 * 1920
        # the replica says which weights it runs: keys and the manifest follow the checkpoint, not the name
        assert man["a"].revision == checkpoint_digest(tiny_ckpt) and man["a"].model == "tiny"
        # one frame per chunk still completes
        assert narrate.main([str(rows), "--model", "tiny", "--out", f"file://{tmp_path / 'one'}", "--serve-app",
                             app, "--backend", "serve", "--num-cpus", "0.25", "--max-new-tokens", "1",
                             "--no-progress", "--quiet"]) == 1
        s1 = _summary(capsys)
        assert s1["failed_ids"] == ["b"] and s1["ok"] + s1["suspect"] == 1, s1
        # a checkpoint id where the served name belongs: up front, naming what is served
        assert narrate.main([str(rows), "--model", tiny_ckpt, "--out", f"file://{out}", "--serve-app", app,
                             "--backend", "serve", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is not served by the Serve app" in err and "['tiny']" in err
    finally:
        serve.delete(app)


def _driver(args: list[str], **env: str) -> subprocess.Popen:
    """A job driver process joined to the session's Ray head."""
    full = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_one_bar_that_moves_and_no_ray_noise_unless_verbose(tiny_ckpt, ray_driver, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"id": f"r{i}", "text": f"Row number {i}.", "voice": "ryan"})
                              for i in range(4)))
    base = ["jobs.narrate", str(rows), "--model", tiny_ckpt, "--backend", "engine", "--runner", "ray", "--actors",
            "1", "--num-cpus", "0.25", "--batch-size", "1", "--max-new-tokens", "8", "--quiet"]
    quiet = _driver([*base, "--out", f"file://{tmp_path / 'q'}"], QTTS_PROGRESS="1")
    out, err = quiet.communicate(timeout=300)
    assert quiet.returncode == 0, err[-3000:]
    frames = [f for f in re.split(r"[\r\n]", err) if f.startswith("narrate:")]
    counts = [int(m.group(1)) for f in frames if (m := re.search(r"\| (\d)/4 rows", f))]
    assert counts and counts[-1] == 4 and len(set(counts)) >= 3, frames  # it moved row by row (1 batch = 1 row)
    assert "s audio" in frames[-1]
    for noise in ("core_worker.cc", "max_restarts", "Starting execution", "Progress bars disabled", "Traceback"):
        assert noise not in err, (noise, err[-2000:])
    log_lines = [x.rsplit("\r", 1)[-1].strip() for x in err.split("\n") if "INFO jobs." in x]
    assert log_lines and all(x.startswith("20") for x in log_lines), log_lines  # logs above the bar, not in it
    verbose = _driver([*base, "--out", f"file://{tmp_path / 'v'}", "--verbose"])
    out, err = verbose.communicate(timeout=300)
    assert verbose.returncode == 0 and "Starting execution" in err, err[-3000:]


def test_catalog_every_stops_cleanly_on_sigterm_mid_run_on_ray(tiny_ckpt, ray_driver, tmp_path):
    import yaml

    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"},
                                   "prompts": [{"id": f"p{i}", "text": f"Prompt number {i} is here."}
                                               for i in range(8)]}))
    out = tmp_path / "out"
    proc = _driver(["jobs.catalog", str(cat), "--model", tiny_ckpt, "--out", f"file://{out}", "--every", "1h",
                    "--backend", "engine", "--runner", "ray", "--actors", "1", "--num-cpus", "0.25",
                    "--batch-size", "1", "--max-new-tokens", "48", "--no-progress", "--quiet"])
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob("prompts/*.json")) and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGTERM)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and "SIGTERM" in err
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["stopped"] is True and s["rendered_before_stop"] < 8
    assert not (out / "catalog-manifest.parquet").exists()
