"""Batch-job rules pinned by a mutation review of jobs/serve_backend.py, jobs/captions.py, jobs/quality.py and
jobs/deliver.py: each test here failed on a one-line change (a "mutant") that the rest of the suite let pass, named
in its docstring. A reply from another checkpoint or with other settings is never accepted, back-pressure waits are
bounded and honour the replica's hint, what was retried is recorded on a failed row too, the Serve app's replica
counts, and caption times and quality flags at their exact boundaries. Fake deployment handles, no Ray cluster."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from ray.exceptions import ActorDiedError

import jobs.serve_backend as sb
from jobs import captions
from jobs.quality import QualityConfig, check_audio, check_chunks
from serve.scheduler import Busy
from tests.jobs.test_serve_backend import OLD, FakeDeployment, as_ray_raises, backend, job

KEYED = {"dtype": "float32", "device": "cuda:0", "default_max_new_tokens": 2048}


# ---- serve_backend: replies from another model or with other settings


def test_settings_are_checked_for_a_model_whose_digest_the_job_did_not_resolve():
    """A model keyed on settings but with no digest entry still has its replies' settings checked (mutant: a
    missing digest entry skipped every check, so bf16 audio was stored under a key naming fp32)."""
    dep = FakeDeployment({"b": [{"settings": {**KEYED, "dtype": "bfloat16"}}]}, digest=OLD)
    a, b = backend(dep, settings={"m": KEYED}).synthesize([job("a"), job("b")])
    assert a.error is None and b.pcm is None and sb.model_changed(b.error)
    assert "dtype 'float32' -> 'bfloat16'" in b.error


@pytest.mark.parametrize("moved", [{"device": "cuda:1"}, {"default_max_new_tokens": 4096}])
def test_every_keyed_setting_is_compared_not_only_the_dtype(moved):
    """(mutant: only `dtype` compared, so a reply from a replica with another device or another token budget was
    taken under the old key)"""
    dep = FakeDeployment({"b": [{"settings": {**KEYED, **moved}}]}, digest=OLD)
    (b,) = backend(dep, digests={"m": OLD}, settings={"m": KEYED}).synthesize([job("b")])
    assert b.pcm is None and sb.model_changed(b.error) and next(iter(moved)) in b.error


def test_the_error_names_every_setting_that_moved_in_name_order():
    """(mutant: only the first moved setting named)"""
    dep = FakeDeployment({"b": [{"settings": {"dtype": "bfloat16", "device": "cpu",
                                              "default_max_new_tokens": 2048}}]}, digest=OLD)
    (b,) = backend(dep, digests={"m": OLD}, settings={"m": KEYED}).synthesize([job("b")])
    assert b.error == ("model: the served model 'm' changed during the job (device 'cuda:0' -> 'cpu', dtype "
                       "'float32' -> 'bfloat16'); run again to render with the new settings")


def test_a_reply_whose_settings_are_null_is_taken():
    """A reply carrying `settings: null` says nothing about the settings: taken, like one without the field
    (mutant: `.get("settings", {})` crashed on None and the row failed)."""
    dep = FakeDeployment({"a": [{"settings": None}]}, digest=OLD)
    (a,) = backend(dep, digests={"m": OLD}, settings={"m": KEYED}).synthesize([job("a")])
    assert a.error is None and a.pcm.size == 240


def test_only_a_model_changed_error_counts_as_a_model_change():
    """(mutant: any row error counted, so every bad-input row was reported as `model_changed` in the summary)"""
    assert not sb.model_changed("voice: 'nobody' is not a stored voice") and not sb.model_changed(None)
    assert sb.model_changed(f"model: the served model 'm' {sb.MODEL_CHANGED} (...)")


# ---- serve_backend: replies, retries and errors per row


def test_the_reply_sample_rate_is_the_chunks():
    """(mutant: the reply's `sample_rate` ignored, 16 kHz audio taken as 24 kHz and played 1.5 times too fast)"""
    (a,) = backend(FakeDeployment({"a": [{"sample_rate": 16000}]})).synthesize([job("a")])
    assert a.error is None and a.sample_rate == 16000


@pytest.mark.parametrize("last", [ValueError("bad seed"), RuntimeError("engine exploded")])
def test_a_row_failing_after_a_lost_replica_still_reports_the_retry(last):
    """A call lost with its replica, sent again, then failing: the row's `retries` still say what was retried
    (mutants: dropped on a ValueError, or on any other error)."""
    dep = FakeDeployment({"a": [ActorDiedError(), as_ray_raises(last)]})
    (a,) = backend(dep).synthesize([job("a")])
    assert a.pcm is None and a.error.endswith(str(last)) and a.retries == ("replica lost (ActorDiedError)",)


def _sleeps(monkeypatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(sb, "time", SimpleNamespace(sleep=slept.append, monotonic=time.monotonic))
    return slept


def test_a_busy_replica_is_waited_out_for_at_least_its_retry_after(monkeypatch):
    """Busy carries the replica's `retry_after_s`: the wait honours it even past max_delay_s (mutants: the hint
    ignored, or capped at max_delay_s, so the replica was asked again at once)."""
    slept = _sleeps(monkeypatch)
    dep = FakeDeployment({"a": [as_ray_raises(Busy("full", retry_after_s=2.0))]})
    (a,) = backend(dep).synthesize([job("a")])
    assert a.error is None and len(slept) == 1 and 2.0 * 0.8 <= slept[0] <= 2.0 * 1.2


def test_back_pressure_waits_grow_but_never_past_max_delay(monkeypatch):
    """(mutant: no cap, the 20th wait was base * 2**20: days)"""
    slept = _sleeps(monkeypatch)
    dep = FakeDeployment({"a": [as_ray_raises(Busy("full", retry_after_s=0))] * 20})
    (a,) = backend(dep).synthesize([job("a")])   # base 0.001 s, max 0.01 s
    assert a.error is None and len(slept) == 20 and max(slept) <= 0.01 * 1.2 and slept[-1] > slept[0]


# ---- serve_backend: the window and the replica counts


def test_the_window_rounds_a_workers_share_up_and_never_exceeds_the_rows():
    """4 calls per replica shared by 3 workers is 2 each (ceil; mutant: floor, 1), and a batch of one row opens
    one call (mutant: not capped by the rows). With two models the busier one's replicas count (mutant: min)."""
    be = backend(FakeDeployment(), replicas=1, max_inflight_per_replica=4, workers=3)
    assert be.window([job("x")] * 5) == 2 and be.window([job("x")]) == 1
    be = backend(FakeDeployment(), replicas=4, max_inflight_per_replica=2)
    be._replicas = (time.monotonic() + 1e9, {"m": 4, "n": 1})
    assert be.window([job("x"), job("y", model="n")] * 8) == 8


def test_zero_workers_count_as_one():
    """(mutant: workers=0 kept, and every batch died dividing by zero)"""
    be = backend(FakeDeployment(), replicas=2, max_inflight_per_replica=3, workers=0)
    assert be.window([job("x")] * 10) == 6


def test_replica_counts_are_asked_again_once_five_seconds_old(monkeypatch):
    """The window follows the app as it scales: a count older than 5 s is asked again, a fresh one is reused
    (mutants: never asked again once known; never stored, the controller asked on every batch)."""
    asked = []
    monkeypatch.setattr(sb, "served_models", lambda app: asked.append(app) or {"m": 3})
    be = sb.ServeBackend("qtts")
    be._replicas = (time.monotonic() - 10.0, {"m": 1})
    assert be.replicas("m") == 3 and be.replicas("m") == 3 and asked == ["qtts"]


def _app(status="ApplicationStatus.RUNNING"):
    deps = {"tts-m": SimpleNamespace(replica_states={"ReplicaState.RUNNING": 2, "ReplicaState.STARTING": 1}),
            "Ingress": SimpleNamespace(replica_states={"ReplicaState.RUNNING": 5})}
    return SimpleNamespace(status=status, deployments=deps)


def test_served_models_counts_running_replicas_of_model_deployments_only(monkeypatch):
    """(mutants: every deployment listed as a model, the ingress included; starting replicas counted as running;
    an app that is not RUNNING taken)"""
    from ray import serve

    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"qtts": _app()}))
    assert sb.served_models("qtts") == {"m": 2}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"qtts": _app("DEPLOYING")}))
    with pytest.raises(ValueError, match="'qtts' is DEPLOYING"):
        sb.served_models("qtts")


def test_serve_app_running_only_when_the_app_is_running(monkeypatch):
    """(mutant: a deploying or unhealthy app counted as running, and `--backend auto` sent the job to it)"""
    import ray
    from ray import serve

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    unhealthy = SimpleNamespace(applications={"qtts": _app("ApplicationStatus.UNHEALTHY")})
    monkeypatch.setattr(serve, "status", lambda: unhealthy)
    assert not sb.serve_app_running("qtts")
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={"qtts": _app()}))
    assert sb.serve_app_running("qtts") and not sb.serve_app_running("other")


# ---- captions


def test_cues_never_start_before_the_file_without_a_duration():
    """(mutant: without `duration_s`, a negative offset gave a cue a negative start)"""
    (c,) = captions.cues(["Hi."], [(0, 100)], 100, offset_s=-0.5)
    assert (c.start_s, c.end_s) == (0.0, 0.5)


def test_cue_text_is_the_words_joined_by_single_spaces():
    """(mutant: only the ends trimmed, line breaks and runs of spaces inside a sentence kept in the cue)"""
    (c,) = captions.cues(["  two   words\nand  a\tthird \n"], [(0, 100)], 100)
    assert c.text == "two words and a third"


def test_stamps_round_to_the_nearest_millisecond():
    """Cue times are rounded to the nearest millisecond, not cut: 71 samples at 24 kHz is 2.958 ms, stamped 003
    (mutant: truncated, 002, every cue up to 1 ms early)."""
    srt = captions.to_srt(captions.cues(["a", "b"], [(71, 24000), (61 * 24000 + 12000, 62 * 24000)], 24000))
    assert srt == "1\n00:00:00,003 --> 00:00:01,000\na\n\n2\n00:01:01,500 --> 00:01:02,000\nb\n"


def test_a_long_word_is_never_cut_across_caption_lines():
    """A word longer than a caption line (a URL) stays whole on its own line (mutant: cut mid-word)."""
    url = "https://example.com/" + "x" * 50
    srt = captions.to_srt([captions.Cue(0.0, 1.0, f"See {url} now")])
    assert url in srt.splitlines()


def test_a_paragraph_without_closing_punctuation_is_its_own_caption():
    """A heading (no full stop) and the paragraph after it are two cues (mutant: paragraphs not split first, the
    heading ran into the next sentence)."""
    assert captions.sentence_chunks("Chapter One\n\nIt was dark.", 200) == ["Chapter One", "It was dark."]


# ---- quality


def test_frames_exactly_at_the_silence_level_are_not_silent():
    """A frame RMS equal to silence_rms is not below it (mutant: `<=`, a steady signal at the level flagged
    mostly_silent)."""
    assert check_audio(np.full(24000, 0.25, np.float32), 24000, "", QualityConfig(silence_rms=0.25)) == []


def test_audio_of_one_frame_is_checked_for_silence():
    """30 ms of audio (one 20 ms frame) whose frame is silent and whose tail is loud: mostly_silent (mutant: audio
    of one frame never checked)."""
    x = np.zeros(720, np.float32)
    x[480:] = 0.5
    assert check_audio(x, 24000, "") == ["mostly_silent"]


def test_a_cjk_chunk_is_rated_with_the_cjk_weight():
    """10 Han characters in 0.5 s are 60 units/s: chunk_too_short (mutant: the chunk check counted them 1 each,
    20/s, and let a cut Chinese chunk pass)."""
    tone = (0.3 * np.sin(np.arange(48000) / 10)).astype(np.float32)
    assert check_chunks([tone, tone[:12000]], 24000, ["a" * 20, "今天天气很好我们去吧"]) == ["chunk_too_short"]


def test_samples_just_under_the_clip_level_are_not_clipping():
    """0.9989 is under 0.999: not clipping however many samples sit there (mutant: the audio analysed in float16,
    where 0.9989 rounds up to 0.99902 and a loud, clean file was flagged)."""
    x = (0.3 * np.sin(np.arange(24000) / 10)).astype(np.float32)
    x[::100] = 0.9989
    assert check_audio(x, 24000, "a" * 10) == []


# ---- deliver


def test_a_cue_never_ends_after_the_mastered_file():
    """ACX trims a chunk's long trailing silence: the cue ends where the delivered file ends (3.78 s), not where the
    untrimmed chunk did (9.75 s; mutant: cues not clipped to the mastered duration)."""
    from jobs import deliver, mastering
    from jobs.render import RenderConfig

    tone = (0.3 * np.sin(2 * np.pi * 300 * np.arange(24000) / 24000)).astype(np.float32)
    pcm = np.concatenate([tone, np.zeros(24000 * 8, np.float32)])
    rec = SimpleNamespace(key="a/r.mp3", flags=[])
    cfg = RenderConfig(model="fake", captions=True, master=mastering.MasterConfig("acx"))
    row = SimpleNamespace(text="One.", sample_rate=24000, format="wav")
    objects = deliver.finish_audio(row, rec, [pcm], 24000, cfg, ["One."])
    assert rec.duration_s == pytest.approx(3.78, abs=0.01)
    end = objects[1][1].decode().splitlines()[1].split(" --> ")[1]
    assert end == captions.to_srt([captions.Cue(0, rec.duration_s, "x")]).splitlines()[1].split(" --> ")[1]
