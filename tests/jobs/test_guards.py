"""A job fails up front (exit 2, naming the culprit) for what would fail every row, bounds what it reads, and finishes
cleanly when storage refuses writes mid-job or SIGTERM arrives. Local runner; the Ray variants are in test_ray_e2e."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobs import catalog, narrate
from jobs.manifest import from_parquet

ROOT = Path(__file__).resolve().parents[2]
FAKE = ["--backend", "tests.jobs.fakes:FakeBackend", "--runner", "local", "--no-progress", "--quiet"]
LOCAL = ["--backend", "engine", "--runner", "local", "--no-progress", "--quiet"]


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def _rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


# --- inputs ---------------------------------------------------------------------------------------------------------
def test_binary_and_empty_inputs_fail_up_front_naming_the_file(tmp_path, capsys):
    out = ["--model", "m", "--out", str(tmp_path / "out"), *FAKE]
    cases = {"noise.txt": bytes(range(256)) * 4, "latin1.md": "caf\xe9 cr\xe8me".encode("latin-1"),
             "empty.txt": b"  \n\n ", "none.jsonl": b"\n\n"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert narrate.main([str(tmp_path / name), *out]) == 2, name
        err = capsys.readouterr().err
        assert str(tmp_path / name) in err, err
        assert ("binary" in err or "not UTF-8" in err) if name in ("noise.txt", "latin1.md") else \
            ("empty" in err or "no rows" in err), err
    folder = tmp_path / "book"
    folder.mkdir()
    (folder / "ch1.txt").write_text("")
    (folder / "ch2.md").write_text("```\ncode only\n```\n")
    assert narrate.main([str(folder), *out]) == 2
    assert "every chapter file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing was written


def test_row_and_input_size_limits(tmp_path, capsys):
    big = "word " * 1_000_000  # 5 MB of text in one row
    rows = _rows(tmp_path / "rows.jsonl", [{"id": "huge", "text": big, "voice": "ryan"},
                                           {"id": "fine", "text": "Short.", "voice": "ryan"}])
    t = time.monotonic()
    code = narrate.main([str(rows), "--model", "m", "--out", str(tmp_path / "out"), *FAKE])
    s = _last_json(capsys.readouterr().out)
    assert code == 1 and s["failed_ids"] == ["huge"] and s["ok"] == 1 and time.monotonic() - t < 30
    rec = {r.id: r for r in from_parquet((tmp_path / "out" / "manifest.parquet").read_bytes())}["huge"]
    assert "'huge'" in rec.error and "5000000 characters" in rec.error and "--max-row-chars" in rec.error
    assert narrate.main([str(rows), "--model", "m", "--out", str(tmp_path / "o2"), "--max-input-bytes", "1000",
                         *FAKE]) == 2
    err = capsys.readouterr().err
    assert str(rows) in err and "the limit is 1000" in err


# --- models and voices -----------------------------------------------------------------------------------------------
def test_missing_or_unreachable_model_fails_once_up_front(tmp_path, capsys, monkeypatch, tiny_ckpt):
    import jobs.models as models

    book = ROOT / "examples" / "book"
    assert narrate.main([str(book), "--voice", "ryan", "--out", str(tmp_path / "o"), *LOCAL]) == 2
    assert "pass --model" in capsys.readouterr().err
    calls = []
    real = models.resolve_checkpoint_ref
    monkeypatch.setattr(models, "resolve_checkpoint_ref", lambda m, r=None: calls.append(m) or real(m, r))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    assert narrate.main([str(book), "--model", "Qwen/Not-Cached-Anywhere", "--voice", "ryan",
                         "--out", str(tmp_path / "o"), *LOCAL]) == 2
    err = capsys.readouterr().err
    assert "'Qwen/Not-Cached-Anywhere' is not in the local Hugging Face cache" in err and calls == [
        "Qwen/Not-Cached-Anywhere"] and time.monotonic() - t < 20
    assert narrate.main([str(book), "--model", str(tmp_path / "nope"), "--voice", "ryan",
                         "--out", str(tmp_path / "o"), *LOCAL]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    # rows naming an unreachable model: those rows fail (looked up once), the others render
    calls.clear()
    rows = _rows(tmp_path / "rows.jsonl", [{"id": f"x{i}", "text": "Hi.", "voice": "ryan",
                                            "model": "Qwen/Not-Cached-Anywhere"} for i in range(5)]
                 + [{"id": "good", "text": "Hello.", "voice": "ryan"}])
    code = narrate.main([str(rows), "--model", tiny_ckpt, "--out", str(tmp_path / "o3"), "--max-new-tokens", "4",
                         *LOCAL])
    s = _last_json(capsys.readouterr().out)
    assert code == 1 and s["failed"] == 5 and s["ok"] + s["suspect"] == 1
    assert calls.count("Qwen/Not-Cached-Anywhere") == 1


def test_voice_problems(tmp_path, capsys, tiny_ckpt):
    book = ROOT / "examples" / "book"
    out = ["--out", str(tmp_path / "o"), "--max-new-tokens", "4", *LOCAL]
    assert narrate.main([str(book), "--model", tiny_ckpt, *out]) == 2  # a text file without --voice
    err = capsys.readouterr().err
    assert "3 row(s) have no voice (first: '01-the-lighthouse')" in err and "vivian" in err
    assert narrate.main([str(book), "--model", tiny_ckpt, "--voice", "nobody", *out]) == 2
    assert "--voice 'nobody' is not a speaker" in capsys.readouterr().err
    rows = _rows(tmp_path / "rows.jsonl", [{"id": "a", "text": "Hi there.", "voice": "RYAN"},
                                           {"id": "b", "text": "Hi.", "voice": "nobody"}])
    assert narrate.main([str(rows), "--model", tiny_ckpt, *out]) == 1
    s = _last_json(capsys.readouterr().out)
    assert s["failed_ids"] == ["b"] and s["ok"] + s["suspect"] == 1


def test_max_new_tokens_1_completes_on_the_engine(tmp_path, capsys, tiny_ckpt):
    code = narrate.main([str(ROOT / "examples" / "book"), "--model", tiny_ckpt, "--voice", "vivian",
                         "--out", str(tmp_path / "o"), "--max-new-tokens", "1", *LOCAL])
    s = _last_json(capsys.readouterr().out)
    assert code == 0 and s["failed"] == 0 and s["total"] == 3, s
    man = from_parquet((tmp_path / "o" / "manifest.parquet").read_bytes())
    assert all(set(r.finish_reasons) <= {"max_new_tokens", "eos"} and r.attempts == 1 for r in man)


def test_base_model_voice_from_a_file_or_a_store(tmp_path, capsys, checkpoint_factory, ref_wav_path):
    from qwen_tts_core import Qwen3TTSModel, save_voice_prompt
    from serve.voices import VoiceStore

    ckpt = str(checkpoint_factory("base"))
    model = Qwen3TTSModel.from_pretrained(ckpt, device_map="cpu", dtype="float32")
    (item,) = model.create_voice_clone_prompt(str(ref_wav_path), x_vector_only_mode=True)
    path = tmp_path / "alice.safetensors"
    save_voice_prompt(item, str(path), name="alice")
    vid = VoiceStore(tmp_path / "voices").put(path.read_bytes())
    rows = _rows(tmp_path / "rows.jsonl", [{"id": "file", "text": "Hello there.", "voice": str(path)},
                                           {"id": "store", "text": "Hello there.", "voice": vid},
                                           {"id": "missing", "text": "Hello.", "voice": "voice_0123456789abcdef"}])
    code = narrate.main([str(rows), "--model", ckpt, "--voices-uri", str(tmp_path / "voices"),
                         "--out", str(tmp_path / "o"), "--max-new-tokens", "4", *LOCAL])
    s = _last_json(capsys.readouterr().out)
    man = {r.id: r for r in from_parquet((tmp_path / "o" / "manifest.parquet").read_bytes())}
    assert code == 1 and s["failed_ids"] == ["missing"], s
    assert man["missing"].error.startswith("voice:") and "not a stored voice" in man["missing"].error
    assert json.loads(man["file"].params)["voice_file"]  # the file's content is in the key
    # a text file for a Base model without --voice fails up front
    assert narrate.main([str(ROOT / "examples" / "book"), "--model", ckpt, "--out", str(tmp_path / "o2"),
                         *LOCAL]) == 2
    assert "Base model needs a stored voice" in capsys.readouterr().err


# --- keys follow the checkpoint's content --------------------------------------------------------------------------
def test_a_changed_checkpoint_behind_the_same_path_is_not_reused(tmp_path, capsys, tiny_ckpt):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    args = [str(ROOT / "examples" / "book" / "03-home.txt"), "--model", str(ck), "--voice", "ryan",
            "--out", str(tmp_path / "o"), "--max-new-tokens", "4", *LOCAL]
    assert narrate.main(args) == 0
    first = _last_json(capsys.readouterr().out)
    assert narrate.main(args) == 0 and _last_json(capsys.readouterr().out)["reused"] == 1
    weights = ck / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # one weight changes; names, shapes and file size stay the same
    weights.write_bytes(bytes(data))
    assert narrate.main(args) == 0
    third = _last_json(capsys.readouterr().out)
    assert third["reused"] == 0 and third["synthesized"] == 1 and first["synthesized"] == 1
    man = from_parquet((tmp_path / "o" / "manifest.parquet").read_bytes())
    assert len(list((tmp_path / "o" / "audio").glob("*.wav"))) == 2 and man[0].revision.startswith("sha256:")


def test_hub_listing_and_cached_snapshot_give_the_same_digest(tmp_path, tiny_ckpt):
    """A job keys a hub id it has not downloaded from the hub's file list (LFS sha256 / git blob ids); once the
    snapshot is in the cache (files are links to blobs named by those hashes) the digest must be the same."""
    import hashlib

    from qwen_tts_core.checkpoint.digest import checkpoint_digest, digest_from_hashes

    snap = tmp_path / "snapshots" / "abc123"
    blobs = tmp_path / "blobs"
    blobs.mkdir(parents=True)
    entries = []
    for f in sorted(Path(tiny_ckpt).rglob("*")):
        if f.is_file():
            rel = f.relative_to(tiny_ckpt).as_posix()
            data = f.read_bytes()
            h = hashlib.sha256(data).hexdigest() if f.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
            (blobs / h).write_bytes(data)
            (snap / rel).parent.mkdir(parents=True, exist_ok=True)
            (snap / rel).symlink_to(blobs / h)
            entries.append((rel, h))
    entries.append(("README.md", "f" * 40))  # not a checkpoint file: ignored on both sides
    assert checkpoint_digest(snap) == digest_from_hashes(entries)
    assert checkpoint_digest(snap) != checkpoint_digest(tiny_ckpt)  # a plain folder hashes contents instead


# --- storage that refuses writes mid-job ----------------------------------------------------------------------------
def test_bucket_gone_mid_job_keeps_the_manifest_locally_and_prints_the_summary(tmp_path, capsys, moto_s3, s3_bucket,
                                                                               monkeypatch):
    import boto3

    import jobs.narrate as nar
    from jobs.storage import RetryPolicy

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("QTTS_FAKE_DELAY_S", "0.3")
    monkeypatch.setattr(nar, "MANIFEST_RETRY", RetryPolicy(attempts=2, base_delay=0.1, max_delay=0.2))
    rows = _rows(tmp_path / "rows.jsonl", [{"id": f"r{i}", "text": f"Row {i}.", "voice": "ryan"}
                                           for i in range(8)])
    s3 = boto3.client("s3")
    gone = threading.Event()

    def drop_bucket() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not gone.is_set():
            keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
            if any(k.endswith(".json") for k in keys):
                for k in keys:
                    s3.delete_object(Bucket=s3_bucket, Key=k)
                try:
                    s3.delete_bucket(Bucket=s3_bucket)
                    gone.set()
                except s3.exceptions.ClientError:  # a write landed in between: empty it again
                    continue
            time.sleep(0.05)

    th = threading.Thread(target=drop_bucket)
    th.start()
    code = narrate.main([str(rows), "--model", "m", "--out", f"s3://{s3_bucket}/run", "--batch-size", "1",
                         "--backend", "tests.jobs.fakes:SlowFake", "--runner", "local", "--no-progress", "--quiet"])
    th.join()
    out, err = capsys.readouterr()
    s = _last_json(out)
    assert gone.is_set() and code == 3, (code, err[-2000:])
    assert s["total"] == 8 and s["failed"] >= 1 and s["manifest"] is None
    local = Path(s["manifest_local"])
    assert local.parent == tmp_path and "kept it locally at" in err and str(local) in err
    man = from_parquet(local.read_bytes())
    assert sorted(r.id for r in man) == [f"r{i}" for i in range(8)]
    assert any(r.status == "failed" and r.error.startswith("storage:") for r in man)
    assert "Traceback" not in err


# --- SIGTERM ---------------------------------------------------------------------------------------------------------
def _catalog_proc(tmp_path: Path, *extra: str, delay: str = "0.01") -> subprocess.Popen:
    import yaml

    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"},
                                   "prompts": [{"id": f"p{i}", "text": f"Prompt {i}."} for i in range(6)]}))
    env = dict(os.environ, PYTHONPATH=str(ROOT), QTTS_FAKE_DELAY_S=delay)
    return subprocess.Popen([sys.executable, "-m", "jobs.catalog", str(cat), "--model", "m", "--out",
                             f"file://{tmp_path / 'out'}", "--backend", "tests.jobs.fakes:SlowFake", "--runner",
                             "local", "--batch-size", "1", "--no-progress", "--quiet", *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_exits_0_on_sigterm_between_runs(tmp_path):
    proc = _catalog_proc(tmp_path, "--every", "1h")
    first = proc.stdout.readline()  # the first run's summary
    assert json.loads(first)["new"] == 6
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "stopped by SIGTERM after 1 run(s)" in err


def test_every_abandons_the_current_run_cleanly_on_sigterm(tmp_path):
    proc = _catalog_proc(tmp_path, "--every", "1h", delay="1.0")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list((tmp_path / "out").glob("prompts/*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err[-2000:]
    s = _last_json(out)
    assert s["stopped"] is True and 1 <= s["rendered_before_stop"] < 6
    assert "Traceback" not in err and not (tmp_path / "out" / "catalog-manifest.parquet").exists()
    # the next run keeps what was committed and renders the rest
    assert catalog.main([str(tmp_path / "cat.yaml"), "--model", "m", "--out", f"file://{tmp_path / 'out'}",
                         *FAKE]) == 0


@pytest.mark.parametrize("every", [None, "1h"])
def test_a_one_off_catalog_pass_stopped_by_sigterm_exits_1(tmp_path, capsys, monkeypatch, every):
    """Review: a single pass (no --every) stopped by SIGTERM mid-render exited 0 with {"stopped": true} and no
    manifest, so a Job/CronJob killed mid-pass read as succeeded (narrate exits 1 for the same signal). It exits 1
    now; --every keeps exiting 0 (here with --max-runs 1, so the stopped pass is also the last)."""
    import yaml

    from jobs import runner

    monkeypatch.setattr(runner, "_stop", None)  # a fresh stop event for this run (it is process-wide)
    handler = signal.getsignal(signal.SIGTERM)
    cat = tmp_path / "cat.yaml"
    cat.write_text(yaml.safe_dump({"defaults": {"voice": "ryan"},
                                   "prompts": [{"id": f"p{i}", "text": f"Prompt {i}."} for i in range(6)]}))
    extra = ["--every", every, "--max-runs", "1"] if every else []
    try:
        code = catalog.main([str(cat), "--model", "m", "--out", f"file://{tmp_path / 'out'}", "--backend",
                             "tests.jobs.fakes:SigtermFake", "--runner", "local", "--no-progress", "--quiet",
                             "--batch-size", "2", *extra])
    finally:
        signal.signal(signal.SIGTERM, handler)
    s = _last_json(capsys.readouterr().out)
    assert s["stopped"] is True and s["rendered_before_stop"] < 6
    assert not (tmp_path / "out" / "catalog-manifest.parquet").exists()
    assert code == (0 if every else 1)


@pytest.mark.parametrize("every", [None, "1h"])
def test_narrate_and_catalog_sigterm_handler_is_ours(every):
    """Ray's driver installs a SIGTERM handler that exits 15 with a stack dump; ours is put back after connect."""
    from jobs.runner import _on_sigterm, _restore_sigterm, stop_on_sigterm

    stop = stop_on_sigterm()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # what ray.init would have done
    _restore_sigterm()
    assert signal.getsignal(signal.SIGTERM) is _on_sigterm and not stop.is_set()
