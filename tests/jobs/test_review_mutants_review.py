"""Batch-job rules pinned by a mutation review of jobs/models.py (the models a job renders with, resolved once),
jobs/review.py (`qtts review`, the local page over a job's manifest), jobs/levels.py (loudness figures) and
jobs/synth.py (the engine backend's synthesis call): each test here failed on a one-line change (a "mutant") that
the rest of the suite let pass, named in its docstring. The hub, the Serve app and the engine are stood in for by
monkeypatched functions and small fakes; the review server listens on loopback; no Ray."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from jobs import audio, codecs, levels, models, review, synth
from jobs.inputs import Utterance
from jobs.manifest import ManifestRecord, to_parquet
from jobs.models import ModelSpec, check_voices, resolve_models, voice_file_paths
from jobs.synth import ChunkJob, EngineBackend, EngineOptions, error_text

CV = ModelSpec("cv", "custom_voice", "sha256:cv", speakers=("ryan", "vivian"))


def _engine_opts(**kw):
    """What engine_spec reads of the engine options."""
    return SimpleNamespace(**{"dtype": "float32", "device": "cpu", "guard_frames_per_token": 8.0,
                              "guard_base_frames": 64, **kw})


# ---- models: where a checkpoint comes from -------------------------------------------------------------------------

@pytest.fixture()
def no_hub(monkeypatch):
    """The hub and its cache, stood in for: every call is recorded; by default nothing is cached or reachable."""
    import huggingface_hub

    calls = []

    def not_cached(*a, **k):
        calls.append(("snapshot_download", a, k))
        raise FileNotFoundError("not cached")

    def unreachable(self, *a, **k):
        calls.append(("model_info", a, k))
        raise ConnectionError("no network here")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    return calls


@pytest.mark.parametrize("value", ["true", "TRUE", "yes", "On"])
def test_every_spelling_of_hf_hub_offline_keeps_the_job_off_the_hub(no_hub, monkeypatch, value):
    """HF_HUB_OFFLINE=true / yes / on in any case means offline, as huggingface_hub reads it: an id not in the cache
    fails naming the setting, and the hub is never asked (mutants: only "1" counted; the value not lower-cased)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    with pytest.raises(ValueError, match="is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        models.resolve_checkpoint_ref("org/model")
    assert [c[0] for c in no_hub] == ["snapshot_download"]


def test_a_cached_snapshot_is_looked_up_offline_pinned_to_its_commit(no_hub, monkeypatch, tmp_path,
                                                                      checkpoint_factory):
    """A hub id found in the local cache: the look-up downloads nothing (local_files_only, checkpoint files only),
    the digest is of the snapshot's files, and the commit it resolved to is what workers load (mutants:
    local_files_only=False; allow_patterns dropped; the commit not returned, so workers load the newest)."""
    import shutil

    import huggingface_hub

    from qwen_tts_core.checkpoint.digest import checkpoint_digest
    from qwen_tts_core.checkpoint.weights import CHECKPOINT_FILES

    snap = tmp_path / "snapshots" / "0123abc"
    shutil.copytree(checkpoint_factory("custom_voice", "tiny"), snap)
    seen = {}

    def cached(repo, **kw):
        seen.update(kw, repo=repo)
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    cfg, digest, commit = models.resolve_checkpoint_ref("org/model", "main")
    assert (cfg, digest, commit) == (snap / "config.json", checkpoint_digest(snap), "0123abc")
    assert seen == {"repo": "org/model", "revision": "main", "local_files_only": True,
                    "allow_patterns": CHECKPOINT_FILES}
    spec = models.engine_spec("org/model", _engine_opts())
    assert spec.revision == "0123abc" and spec.path is None and spec.kind == "custom_voice"


def _hub(monkeypatch, siblings, sha="c0ffee"):
    import huggingface_hub

    downloads = []

    def model_info(self, repo, revision=None, files_metadata=False, timeout=None):
        return SimpleNamespace(sha=sha, siblings=siblings)

    def hf_hub_download(repo, filename, revision=None):
        downloads.append((repo, filename, revision))
        return "/nowhere/config.json"

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return downloads


def test_an_uncached_hub_id_is_keyed_on_the_hub_listing_of_one_commit(no_hub, monkeypatch):
    """Not cached: the hub's file list gives the digest (an LFS file by its sha256, any other by its blob id, as
    the cached snapshot's links are named), config.json comes from the commit the listing is of, and that commit is
    what workers load, whatever --revision said (mutants: blob ids for LFS files too; config.json of `revision`,
    which may have moved; the commit not returned)."""
    from qwen_tts_core.checkpoint.digest import digest_from_hashes

    siblings = [SimpleNamespace(rfilename="model.safetensors", lfs=SimpleNamespace(sha256="ab" * 32),
                                blob_id="1" * 40),
                SimpleNamespace(rfilename="config.json", lfs=None, blob_id="2" * 40)]
    downloads = _hub(monkeypatch, siblings)
    cfg, digest, commit = models.resolve_checkpoint_ref("org/model", "main")
    assert digest == digest_from_hashes([("model.safetensors", "ab" * 32), ("config.json", "2" * 40)])
    assert digest != digest_from_hashes([("model.safetensors", "1" * 40), ("config.json", "2" * 40)])
    assert commit == "c0ffee" and downloads == [("org/model", "config.json", "c0ffee")]
    assert cfg == Path("/nowhere/config.json")


def test_a_hub_listing_without_files_is_a_value_error(no_hub, monkeypatch):
    """A listing with no siblings at all (None) is the job's clear ValueError, not a TypeError that crashes it
    (mutant: `info.siblings` iterated without `or []`)."""
    _hub(monkeypatch, None)
    with pytest.raises(ValueError, match="no config or weight files"):
        models.resolve_checkpoint_ref("org/model")


@pytest.mark.parametrize("name", ["./org-model", "nested/a/b", "plain-name"])
def test_a_name_that_is_no_hub_id_is_a_missing_folder_never_a_hub_look_up(no_hub, tmp_path, monkeypatch, name):
    """A name starting with ./ or with no or several slashes can only be a folder: missing, it fails as one and the
    hub is not asked (mutants: the leading ./ not counted; `count("/") > 1` for `!= 1`)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is not a checkpoint folder"):
        models.resolve_checkpoint_ref(name)
    assert no_hub == []


def test_a_relative_folder_is_a_folder_and_workers_get_its_absolute_path(no_hub, tmp_path, monkeypatch,
                                                                           checkpoint_factory):
    """`ckpts/tiny` that exists is a folder even though it looks like `org/name`; the spec names no hub commit and
    gives workers (whose working directory is not the driver's) the folder's absolute path (mutants: `p.exists()`
    dropped, so the hub was asked; the folder's name returned as a commit; the path left relative; no path)."""
    import shutil

    from qwen_tts_core.checkpoint.digest import checkpoint_digest

    shutil.copytree(checkpoint_factory("custom_voice", "tiny"), tmp_path / "ckpts" / "tiny")
    monkeypatch.chdir(tmp_path)
    cfg, digest, commit = models.resolve_checkpoint_ref("ckpts/tiny")
    assert commit is None and digest == checkpoint_digest(tmp_path / "ckpts" / "tiny") and no_hub == []
    spec = models.engine_spec("ckpts/tiny", _engine_opts())
    assert spec.revision is None and spec.path == str((tmp_path / "ckpts" / "tiny").resolve())
    assert Path(spec.path).is_absolute()


def test_engine_audio_settings_in_the_keys(tmp_path, checkpoint_factory):
    """What the keys hold of the engine options: the dtype as the option names it ("float32"), the device kind
    without its index (cuda:1 renders what cuda:0 does), the guard as [frames per token, base frames], or None when
    the guard is off (mutants: "torch.float32"; "cuda:1"; the guard always a list; the base frames left out)."""
    ck = str(checkpoint_factory("custom_voice", "tiny"))
    spec = models.engine_spec(ck, _engine_opts(device="cuda:1", guard_frames_per_token=6.0, guard_base_frames=32))
    assert spec.audio == {"dtype": "float32", "device": "cuda", "guard": [6.0, 32], "default_max_new_tokens": None}
    for off in (0, None):
        assert models.engine_spec(ck, _engine_opts(guard_frames_per_token=off)).audio["guard"] is None
    assert models.engine_spec(ck, _engine_opts(guard_base_frames=1)).audio["guard"] == [8.0, 1]


# ---- models: the Serve backend's spec ------------------------------------------------------------------------------

@pytest.fixture()
def served(monkeypatch):
    """jobs.serve_backend's two cluster calls, stood in for: `apps` maps served name -> its info()."""
    from jobs import serve_backend

    state = SimpleNamespace(apps={}, info_calls=[])

    def model_info(app, model, timeout_s=120.0):
        state.info_calls.append(model)
        return dict(state.apps[model])

    monkeypatch.setattr(serve_backend, "served_models", lambda app: {k: 1 for k in state.apps})
    monkeypatch.setattr(serve_backend, "model_info", model_info)
    return state


INFO = {"type": "custom_voice", "checkpoint_digest": "sha256:abc", "speakers": ["ryan"], "languages": ["english"],
        "dtype": "bfloat16", "device": "cuda", "max_new_tokens": 2048}


def test_serve_spec_refuses_a_model_the_app_does_not_serve_without_asking_a_replica(served):
    """(mutant: the `not in served` check dropped: a replica handle of an unserved model was asked for its info)"""
    served.apps = {"cv": INFO}
    with pytest.raises(ValueError, match=r"'other' is not served by the Serve app 'qtts'; served models: \['cv'\]"):
        models.serve_spec("other", "qtts", {"cv": 1})
    assert served.info_calls == []


def test_serve_spec_keys_on_the_reported_digest_and_settings(served):
    """The replica's own digest wins over a --revision label (the label is only for a service that reports none);
    with neither, the job fails naming --revision; the frame cap falls back to `max_new_tokens`; the speakers come
    from info() (mutants: label first; the no-digest check dropped; the fallback dropped; no speakers)."""
    served.apps = {"cv": INFO, "old": {**INFO, "checkpoint_digest": None}}
    spec = models.serve_spec("cv", "qtts", {"cv": 1, "old": 1}, "v2")
    assert spec.digest == "sha256:abc" and spec.speakers == ("ryan",) and spec.languages == ("english",)
    assert spec.audio == {"dtype": "bfloat16", "device": "cuda", "guard": None, "default_max_new_tokens": 2048}
    assert models.serve_spec("old", "qtts", {"cv": 1, "old": 1}, "v2").digest == "label:v2"
    with pytest.raises(ValueError, match=r"no checkpoint_digest in its info.*--revision LABEL"):
        models.serve_spec("old", "qtts", {"cv": 1, "old": 1})


def test_the_apps_only_model_is_the_default_only_when_it_is_the_only_one_and_none_was_named(served):
    """Rows naming no model: with two served models and no --model the job fails listing them; an explicit --model
    the app does not serve fails as such, never silently replaced by the app's one model (mutants: `>= 1` served;
    the `default_model is None` test dropped)."""
    rows = [Utterance(id="a", text="Hi.", voice="ryan")]
    served.apps = {"cv": INFO, "cv2": INFO}
    with pytest.raises(ValueError, match=r"1 row\(s\) name no model \(first: 'a'\); pass --model; served models"):
        resolve_models(rows, None, "serve")
    served.apps = {"cv": INFO}
    assert resolve_models(rows, None, "serve")[2] == "cv"
    with pytest.raises(ValueError, match="'mine' is not served"):
        resolve_models(rows, "mine", "serve")


# ---- models: resolve_models ----------------------------------------------------------------------------------------

@pytest.fixture()
def specs_by_name(monkeypatch):
    """engine_spec stood in for: records (name, revision); names in `bad` raise ValueError."""
    state = SimpleNamespace(calls=[], bad=set())

    def fake(name, engine, revision=None):
        state.calls.append((name, revision))
        if name in state.bad:
            raise ValueError(f"model: {name!r} is broken")
        return ModelSpec(name, "custom_voice", f"sha256:{name}", ("ryan",))

    monkeypatch.setattr(models, "engine_spec", fake)
    return state


def test_rows_that_already_failed_need_no_model_and_cost_no_look_up(specs_by_name):
    """A row refused while reading (its error set) with no model does not fail the job for want of one, and the
    model it names is not looked up; a row's own error is kept, not replaced by its model's (mutants: errored rows
    counted as missing a model; their models resolved; the model's error written over the row's)."""
    specs_by_name.bad = {"broken"}
    rows = [Utterance(id="x", text="Hi.", error="text: too long"),
            Utterance(id="y", text="Hi.", model="elsewhere", error="seed: out of range"),
            Utterance(id="z", text="Hi.", model="broken", error="voice: bad"),
            Utterance(id="w", text="Hi.", model="broken")]
    out, specs, _ = resolve_models(rows, None, "engine", engine=_engine_opts())
    assert [r.error for r in out] == ["text: too long", "seed: out of range", "voice: bad",
                                      "model: 'broken' is broken"]
    assert specs_by_name.calls == [("broken", None)] and specs == {}


def test_an_unusable_default_model_fails_the_job_even_when_every_row_names_its_own(specs_by_name):
    """--model is part of the job: unusable, the job exits 2, though no row uses it (mutant: the default not added
    to the names resolved, so the broken --model went unnoticed)."""
    specs_by_name.bad = {"default"}
    rows = [Utterance(id="a", text="Hi.", voice="ryan", model="own")]
    with pytest.raises(ValueError, match="'default' is broken"):
        resolve_models(rows, "default", "engine", engine=_engine_opts())


def test_revision_applies_to_the_default_model_only(specs_by_name):
    """--revision is the hub revision of --model; models rows name load their own newest commit (mutant: every
    model resolved at --revision)."""
    rows = [Utterance(id="a", text="Hi.", voice="ryan"), Utterance(id="b", text="Hi.", voice="ryan", model="other")]
    resolve_models(rows, "main-model", "engine", engine=_engine_opts(), revision="v1.1")
    assert sorted(specs_by_name.calls) == [("main-model", "v1.1"), ("other", None)]


def test_a_test_backends_digest_carries_the_revision_label():
    """module:Class backends have no checkpoint to look at: the name and the --revision label are the digest, so a
    new label gives new keys (mutant: the label left out)."""
    rows = [Utterance(id="a", text="Hi.")]
    _, specs, _ = resolve_models(rows, "m", "tests.jobs.fakes:FakeBackend", revision="v2")
    assert specs["m"].digest == "unresolved:m@v2" and specs["m"].kind == "unknown"
    _, specs, _ = resolve_models(rows, "m", "tests.jobs.fakes:FakeBackend")
    assert specs["m"].digest == "unresolved:m@unknown"


# ---- models: voice checks ------------------------------------------------------------------------------------------

def test_voice_checks_leave_rows_that_already_failed_alone():
    """(mutant: errored rows voice-checked: one with no voice failed the whole job)"""
    rows = [Utterance(id="a", text="Hi.", error="text: bad"), Utterance(id="b", text="Hi.", voice="ryan")]
    out = check_voices(rows, {"cv": CV}, "cv", None, None)
    assert [r.error for r in out] == ["text: bad", None]


def test_a_model_that_lists_no_speakers_takes_any_voice():
    """A service that reports no speaker list: the voice is the service's to judge (mutant: `spec.speakers and`
    dropped, so every voice was refused)."""
    spec = ModelSpec("cv", "custom_voice", "d")
    out = check_voices([Utterance(id="a", text="Hi.", voice="anyone")], {"cv": spec}, "cv", None, None)
    assert out[0].error is None


def test_the_default_voice_on_another_model_fails_that_row_only():
    """--voice ryan is valid for --model; a row naming a model without ryan fails alone, the job goes on (mutant:
    any row with the default voice made the job exit 2)."""
    other = ModelSpec("other", "custom_voice", "d", speakers=("vivian",))
    rows = [Utterance(id="a", text="Hi.", voice="ryan"), Utterance(id="b", text="Hi.", voice="ryan", model="other")]
    out = check_voices(rows, {"cv": CV, "other": other}, "cv", "ryan", None)
    assert out[0].error is None
    assert out[1].error == "voice: 'ryan' is not a speaker of 'other'; choose one of ['vivian']"


def test_an_unknown_voice_is_quoted_at_most_80_characters():
    """(mutant: the whole voice, however long, copied into the row's error)"""
    out = check_voices([Utterance(id="a", text="Hi.", voice="x" * 5000)], {"cv": CV}, "cv", None, None)
    assert out[0].error == f"voice: {'x' * 80!r} is not a speaker of 'cv'; choose one of ['ryan', 'vivian']"


def test_voice_design_rows_take_a_description_not_a_voice():
    """A VoiceDesign row with a voice name fails (the name would be silently ignored); rows with a blank or
    whitespace-only description fail the job (mutants: the voice check dropped; `not r.instruct` let "   " pass;
    the no-description check dropped)."""
    vd = {"vd": ModelSpec("vd", "voice_design", "d")}
    out = check_voices([Utterance(id="a", text="Hi.", voice="ryan", instruct="warm")], vd, "vd", None, None)
    assert out[0].error == "voice: a VoiceDesign model takes no voice name; describe the voice in 'instruct'"
    calm = Utterance(id="a", text="Hi.", instruct="a calm voice")
    assert check_voices([calm], vd, "vd", None, None)[0].error is None
    for blank in (None, "", "   "):
        with pytest.raises(ValueError, match=r"instruct: 1 row\(s\) for VoiceDesign model 'vd' have no voice "
                                             r"description \(first: 'a'\)"):
            check_voices([Utterance(id="a", text="Hi.", instruct=blank)], vd, "vd", None, None)


def test_voice_prompt_files_of_base_models_resolved_in_the_driver(tmp_path, monkeypatch):
    """A Base row's voice naming a file: the file's absolute path (relative to the driver's working directory, `~`
    expanded); a CustomVoice speaker that happens to name a file, or a row that already failed, is no voice file
    (mutants: any model kind; the path left relative; `~` not expanded; failed rows included)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    for name in ("alice.bin", "ryan", "home/bob.bin", "carol.bin"):
        (tmp_path / name).write_bytes(b"voice")
    specs = {"base": ModelSpec("base", "base", "d"), "cv": CV}
    rows = [Utterance(id="a", text="Hi.", voice="alice.bin"), Utterance(id="b", text="Hi.", voice="~/bob.bin"),
            Utterance(id="c", text="Hi.", voice="ryan", model="cv"),
            Utterance(id="d", text="Hi.", voice="carol.bin", error="text: bad")]
    paths = voice_file_paths(rows, specs, "base")
    assert paths == {"alice.bin": (tmp_path / "alice.bin").resolve(),
                     "~/bob.bin": (tmp_path / "home" / "bob.bin").resolve()}
    assert all(p.is_absolute() for p in paths.values())


# ---- review: what the page serves ----------------------------------------------------------------------------------

def _tone(seconds: float, sr: int) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def _job(root: Path, records: list[ManifestRecord], objects: dict[str, bytes], name: str = "manifest.parquet"):
    root.mkdir(parents=True, exist_ok=True)
    for key, data in objects.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(to_parquet(records))


WAV = audio.encode(_tone(0.5, 24000), 24000, "wav")


def _rec(id_: str, key: str | None, status: str = "ok", fmt: str = "wav", **kw) -> ManifestRecord:
    return ManifestRecord(id=id_, key=key, status=status, format=fmt, **kw)


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _error(body: bytes) -> str:
    return json.loads(body)["error"]["message"]


def test_suspect_rows_are_flagged_and_playable_failed_rows_keys_are_not_served(tmp_path, review_server):
    """A suspect row (written, quality flags set) is flagged and its audio served; a failed row is flagged, and a
    key it carries is not an object the page serves; a row with a flag is flagged whatever its status says
    (mutants: suspect not flagged; suspect audio 404; every key served whatever the status; flags not counted)."""
    _job(tmp_path, [_rec("ok", "a/ok.wav"), _rec("sus", "a/sus.wav", "suspect"),
                    _rec("bad", "a/bad.wav", "failed", error="boom"), _rec("flag", "a/f.wav", flags=["clipping"])],
         {"a/ok.wav": WAV, "a/sus.wav": WAV, "a/bad.wav": WAV})
    base = review_server(tmp_path)
    rows = {r["id"]: r for r in json.loads(get(f"{base}/api/manifest")[2])["rows"]}
    assert [rows[i]["flagged"] for i in ("ok", "sus", "bad", "flag")] == [False, True, True, True]
    assert get(f"{base}/api/audio?key=a/sus.wav")[:3:2] == (200, WAV)
    status, _, body = get(f"{base}/api/audio?key=a/bad.wav")
    assert status == 404 and _error(body) == "'a/bad.wav' is not an object of this manifest"


def test_a_named_manifest_is_the_one_served_and_a_missing_one_is_a_404(tmp_path, review_server):
    """--manifest NAME: that object, not the default manifest.parquet beside it; a name that is not there is the
    review's 404 naming it (mutants: --manifest ignored; the missing manifest read as None and parsed)."""
    _job(tmp_path, [_rec("default", "a/x.wav")], {"a/x.wav": WAV})
    _job(tmp_path, [_rec("mine", "a/x.wav")], {}, name="runs/other.parquet")
    base = review_server(tmp_path, manifest="runs/other.parquet")
    data = json.loads(get(f"{base}/api/manifest")[2])
    assert data["manifest"] == "runs/other.parquet" and [r["id"] for r in data["rows"]] == ["mine"]
    with pytest.raises(review.ReviewError, match="nope.parquet is not in") as e:
        review.serve(str(tmp_path), port=0, manifest="nope.parquet")
    assert e.value.status == 404


def test_a_key_gone_from_the_manifest_is_no_longer_served_and_a_new_one_is_without_a_reload(tmp_path, review_server):
    """The server follows a running job: after the manifest is written again, a key it no longer lists is a 404;
    a server started while no object was listed serves one listed later on the first request for it (mutants: the
    allowed keys only ever added to; no manifest read when none was allowed)."""
    _job(tmp_path / "j1", [_rec("a", "a.wav"), _rec("b", "b.wav")], {"a.wav": WAV, "b.wav": WAV})
    base = review_server(tmp_path / "j1")
    assert get(f"{base}/api/audio?key=b.wav")[0] == 200
    _job(tmp_path / "j1", [_rec("a", "a.wav")], {})
    assert get(f"{base}/api/manifest")[0] == 200
    assert get(f"{base}/api/audio?key=b.wav")[0] == 404 and get(f"{base}/api/audio?key=a.wav")[0] == 200
    _job(tmp_path / "j2", [_rec("a", "a.wav", "failed")], {"a.wav": WAV})
    base2 = review_server(tmp_path / "j2")
    _job(tmp_path / "j2", [_rec("a", "a.wav")], {})
    assert get(f"{base2}/api/audio?key=a.wav")[:3:2] == (200, WAV)


def test_an_object_the_manifest_lists_but_storage_lacks_is_a_404_naming_it(tmp_path, review_server):
    """(mutant: a missing object served as an empty body with 200)"""
    _job(tmp_path, [_rec("a", "gone.wav")], {})
    status, _, body = get(f"{review_server(tmp_path)}/api/audio?key=gone.wav")
    assert status == 404
    assert _error(body) == f"'gone.wav' is listed in the manifest but missing from file://{tmp_path.resolve()}"


def test_audio_is_not_served_as_captions(tmp_path, review_server):
    """(mutant: /api/captions served any listed object, audio too)"""
    _job(tmp_path, [_rec("a", "a.wav", captions=["a.vtt"])], {"a.wav": WAV, "a.vtt": b"WEBVTT\n"})
    base = review_server(tmp_path)
    status, _, body = get(f"{base}/api/captions?key=a.wav")
    assert status == 404 and _error(body) == "'a.wav' is not a caption file"
    assert get(f"{base}/api/captions?key=a.vtt")[2] == b"WEBVTT\n"


def test_headerless_telephony_audio_is_played_and_drawn_as_a_wav(tmp_path, review_server):
    """A raw G.711 file (no header): decoded by its format's name, sent as a 16-bit WAV of the same length, its
    waveform drawn (mutants: decoded without the codec name, for the player and for the peaks)."""
    import io

    import soundfile as sf

    pcm = _tone(1.0, 8000)
    _job(tmp_path, [_rec("a", "a.ulaw", fmt="ulaw")], {"a.ulaw": codecs.encode(pcm, "ulaw")})
    base = review_server(tmp_path)
    status, headers, wav = get(f"{base}/api/audio?key=a.ulaw")
    info = sf.info(io.BytesIO(wav))
    assert status == 200 and headers["Content-Type"] == "audio/wav"
    assert (info.samplerate, info.frames, info.subtype) == (8000, 8000, "PCM_16")
    status, _, body = get(f"{base}/api/peaks?key=a.ulaw&n=20")
    p = json.loads(body)
    assert status == 200 and p["sample_rate"] == 8000 and p["duration_s"] == 1.0 and max(p["max"]) > 0.4


def test_peaks_count_is_kept_within_16_and_4000_and_each_count_is_its_own(tmp_path, review_server):
    """n is clamped to 16..4000 (a huge n would make the server build a huge reply); a waveform asked for at one
    width and then another gets each its own count, even for a file shorter than the count (mutants: no lower
    bound; no upper bound; the cache keyed on the object alone; an empty slice of a sample between two edges)."""
    _job(tmp_path, [_rec("a", "a.wav"), _rec("s", "s.wav")],
         {"a.wav": WAV, "s.wav": audio.encode(np.full(10, 0.25, np.float32), 24000, "wav")})
    base = review_server(tmp_path)

    def peaks(key, n):
        status, _, body = get(f"{base}/api/peaks?key={key}&n={n}")
        assert status == 200, body
        return json.loads(body)

    assert len(peaks("a.wav", 0)["min"]) == 16 and len(peaks("a.wav", -5)["max"]) == 16
    assert len(peaks("a.wav", 10**9)["max"]) == 4000
    assert len(peaks("a.wav", 100)["max"]) == 100 and len(peaks("a.wav", 50)["max"]) == 50
    short = peaks("s.wav", 100)
    assert len(short["max"]) == 100 and set(short["max"]) == {0.25}


def test_peaks_keep_at_most_256_waveforms(tmp_path, monkeypatch):
    """The waveform cache is bounded: the 257th drops the oldest, which is computed again when asked for (mutant:
    no eviction, memory grows with every width asked for)."""
    _job(tmp_path, [_rec("a", "a.wav")], {"a.wav": WAV})
    r = review.Review(str(tmp_path))
    decoded = []
    real = review.codecs.decode
    monkeypatch.setattr(review.codecs, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))
    for n in range(16, 16 + 257):
        r.peaks("a.wav", n)
    assert len(decoded) == 257
    r.peaks("a.wav", 16 + 256)
    assert len(decoded) == 257          # the newest is cached
    r.peaks("a.wav", 16)
    assert len(decoded) == 258          # the oldest was dropped


def test_the_object_cache_keeps_the_newest_within_its_budget(tmp_path, monkeypatch):
    """Players fetch a file in many Range requests: the object just read stays cached, older ones go once the
    budget is passed (mutants: no eviction; the newest evicted instead of the oldest)."""
    objs = {f"{c}.wav": WAV for c in "abc"}
    _job(tmp_path, [_rec(k, k) for k in objs], objs)
    monkeypatch.setattr(review, "OBJECT_CACHE_BYTES", 2 * len(WAV) + 10)
    r = review.Review(str(tmp_path))
    reads = []
    real = r.sink
    r.sink = SimpleNamespace(uri=real.uri, size=real.size, get=lambda key: reads.append(key) or real.get(key))
    for key in ("a.wav", "b.wav", "c.wav", "c.wav", "b.wav"):
        assert r.audio(key)[0] == WAV
    assert [k for k in reads if k.endswith(".wav")] == ["a.wav", "b.wav", "c.wav"]
    r.audio("a.wav")
    assert [k for k in reads if k.endswith(".wav")] == ["a.wav", "b.wav", "c.wav", "a.wav"]


@pytest.mark.parametrize("header,status,span", [
    ("bytes=-", 200, None),               # no numbers at all: the whole object
    ("bytes=0-1,5-6", 200, None),         # several ranges: not supported, the whole object
    ("bytes=-100", 206, (-100, None)),    # the last 100 bytes
    ("bytes=-999999", 206, (0, None)),    # a suffix longer than the object: all of it
    ("bytes=10-999999", 206, (10, None)),  # an end past the object: up to its last byte
    ("bytes=50-10", 416, None),           # reversed
])
def test_range_requests(tmp_path, review_server, header, status, span):
    """Ranges as RFC 9110 reads them (mutants: `bytes=-` taken as a suffix; the pattern not anchored at its end;
    the suffix start below 0 or one byte early; the end not cut to the object; a reversed range served)."""
    _job(tmp_path, [_rec("a", "a.wav")], {"a.wav": WAV})
    got, headers, body = get(f"{review_server(tmp_path)}/api/audio?key=a.wav", {"Range": header})
    size = len(WAV)
    assert got == status and headers["Accept-Ranges" if status != 416 else "Content-Range"]
    if status == 200:
        assert body == WAV and headers["Accept-Ranges"] == "bytes"
    elif status == 206:
        start = span[0] % size
        assert body == WAV[start:] and headers["Content-Range"] == f"bytes {start}-{size - 1}/{size}"
    else:
        assert body == b"" and headers["Content-Range"] == f"bytes */{size}"


def test_head_sends_headers_only_and_every_answer_says_no_store(tmp_path, review_server):
    """HEAD: the GET's status and Content-Length, no body (a body would be read as the next response on a kept-alive
    connection); every answer carries Cache-Control: no-store, so a page reload shows a running job's new rows;
    /index.html is the page and /favicon.ico an empty 204 (mutants: HEAD wrote the body; no Cache-Control; only /
    served the page; no favicon answer)."""
    _job(tmp_path, [_rec("a", "a.wav")], {"a.wav": WAV})
    base = review_server(tmp_path)
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"HEAD /api/audio?key=a.wav HTTP/1.0\r\nHost: x\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and f"Content-Length: {len(WAV)}".encode() in head and body == b""
    for path in ("/api/manifest", "/", "/api/audio?key=a.wav", "/api/audio?key=zz"):
        assert get(base + path)[1]["Cache-Control"] == "no-store"
    status, headers, page = get(base + "/index.html")
    assert status == 200 and page.startswith(b"<!doctype html>") and headers["Content-Type"].startswith("text/html")
    assert get(base + "/favicon.ico")[:3:2] == (204, b"")


def test_audio_that_cannot_be_decoded_is_a_502_naming_why(tmp_path, review_server):
    """A G.711 WAV whose bytes are no audio: the converting decode's ValueError is the reply's 502, the server goes
    on (mutant: ValueError not caught: the connection was dropped with no answer)."""
    _job(tmp_path, [_rec("a", "a.wav", fmt="wav-ulaw"), _rec("b", "b.wav")], {"a.wav": b"not audio" * 10,
                                                                            "b.wav": WAV})
    base = review_server(tmp_path)
    status, _, body = get(f"{base}/api/audio?key=a.wav")
    assert status == 502 and _error(body).startswith("ValueError: not decodable audio")
    assert get(f"{base}/api/audio?key=b.wav")[0] == 200


def test_review_listens_on_loopback_by_default_and_a_busy_port_exits_2(tmp_path, capsys):
    """The page serves a job's audio to whoever reaches it: by default only this machine; a port in use is the
    usual one-line error and exit 2 (mutants: 0.0.0.0 as the --host default, or as serve()'s; OSError not caught,
    a traceback)."""
    _job(tmp_path, [_rec("a", "a.wav")], {"a.wav": WAV})
    assert review.build_parser().parse_args([str(tmp_path)]).host == "127.0.0.1"
    srv = review.serve(str(tmp_path), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
        assert review.main([str(tmp_path), "--port", str(srv.server_address[1])]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    finally:
        srv.server_close()


def test_an_empty_manifest_object_is_passed_over(tmp_path, review_server):
    """manifest.parquet of zero bytes (a write not finished) is not a manifest: the catalog's is read (mutant:
    any object that exists taken, and its parse failed)."""
    _job(tmp_path, [_rec("a", "a.wav")], {"a.wav": WAV}, name="catalog-manifest.parquet")
    (tmp_path / "manifest.parquet").write_bytes(b"")
    assert json.loads(get(f"{review_server(tmp_path)}/api/manifest")[2])["manifest"] == "catalog-manifest.parquet"


# ---- synth: error texts --------------------------------------------------------------------------------------------

def test_error_text_is_one_bounded_line_from_the_original_error():
    """A wrapped error (Ray's, with `.cause`) is told by its cause; a RequestError-like error with a field but no
    message is told as any other; multi-line errors give their last line; every text is at most 500 characters
    (mutants: `.cause` ignored; `message` not checked; the first line; either text unbounded)."""
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  ...\nRayTaskError")
            self.cause = cause

    class Fielded(ValueError):
        def __init__(self, field, message):
            super().__init__(message)
            self.field, self.message = field, message

    assert error_text(Wrapped(Fielded("voice", "unknown speaker"))) == "voice: unknown speaker"
    assert error_text(Wrapped(KeyError("x"))) == "KeyError: 'x'"
    odd = ValueError("half a request error")
    odd.field = "text"
    assert error_text(odd) == "ValueError: half a request error"
    assert error_text(RuntimeError("first\n\nsecond\nlast line\n")) == "RuntimeError: last line"
    assert error_text(RuntimeError("x" * 2000)) == "RuntimeError: " + "x" * (500 - len("RuntimeError: "))
    assert error_text(Fielded("text", "y" * 2000)) == "text: " + "y" * 494


# ---- synth: the engine backend, on a fake engine -------------------------------------------------------------------

class FakeEngine:
    """Stands in for qwen_tts_core.Engine: `cap` sessions at a time (EngineBusy past it); each step ends every
    active session. A request's text says what its session does: "multi" gives two chunks, "error..." ends in error
    ("error-why" / "error-field" with the reason an engine gives: a message, and a field for a RequestError),
    "lost" ends with no last chunk, "sr16k" is at 16 kHz, "bad" is refused by add(); "foreign" also makes the engine
    emit a chunk of a session it did not get from this call."""

    made: list[FakeEngine] = []
    cap = 8

    def __init__(self, model, **kw):
        self.model, self.kw = model, kw
        self.active, self.added, self.next_id, self.busy_in_a_row = [], [], 1, 0
        FakeEngine.made.append(self)

    def add(self, req):
        from qwen_tts_core import EngineBusy

        if req["text"] == "bad":
            self.added.append(req)
            if len(self.added) > 50:
                raise RuntimeError("the same refused request added again and again")
            raise ValueError("text: refused")
        if len(self.active) >= self.cap:
            self.busy_in_a_row += 1
            if self.busy_in_a_row > 50:
                raise RuntimeError("add() called again and again on a full engine without a step")
            raise EngineBusy("full")
        self.busy_in_a_row = 0
        if len(self.added) > 50:
            raise RuntimeError("requests added again and again")
        self.added.append(req)
        s = SimpleNamespace(id=self.next_id, req=req)
        self.next_id += 1
        self.active.append(s)
        return s

    def has_work(self):
        return bool(self.active)

    def step(self):
        out = []
        for s in self.active:
            text, sr = s.req["text"], 16000 if s.req["text"] == "sr16k" else 24000
            if text == "lost":
                continue
            if text == "foreign":
                out.append(SimpleNamespace(session_id=999, pcm=np.ones(3), is_last=True, finish_reason="eos",
                                           sample_rate=24000))
            if text == "multi":
                out.append(SimpleNamespace(session_id=s.id, pcm=np.full(4, 0.1), is_last=False, finish_reason=None,
                                           sample_rate=sr))
            reason = "error" if text.startswith("error") else "eos"
            why = {"error-why": ("CUDA out of memory", None), "error-field": ("must be at most 4096", "max_new_tokens")}
            message, field_name = why.get(text, (None, None))
            out.append(SimpleNamespace(session_id=s.id, pcm=np.full(2, 0.5), is_last=True, finish_reason=reason,
                                       sample_rate=sr, error=message, error_field=field_name))
        self.active = []
        return out


@pytest.fixture()
def fake_engine(monkeypatch):
    """EngineBackend on FakeEngine: model loads and request fields recorded (the request is its fields)."""
    import torch

    import qwen_tts_core
    from qwen_tts_core.generate import requests

    threads = torch.get_num_threads()
    loads = []

    def from_pretrained(model_id, **kw):
        loads.append((model_id, kw))
        if model_id == "missing":
            raise OSError("no such checkpoint")
        return SimpleNamespace(name=model_id)

    monkeypatch.setattr(qwen_tts_core.Qwen3TTSModel, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(qwen_tts_core, "Engine", FakeEngine)
    monkeypatch.setattr(requests, "request_from_fields", lambda model, **kw: {"model": model.name, **kw})
    monkeypatch.setattr(FakeEngine, "made", [])
    monkeypatch.setattr(FakeEngine, "cap", 8)
    yield SimpleNamespace(loads=loads)
    torch.set_num_threads(threads)


def _chunk(text: str, model: str = "m", **kw) -> ChunkJob:
    return ChunkJob(text=text, voice="ryan", language="english", instruct=None, seed=3, model=model, **kw)


def test_each_model_is_loaded_once_with_the_jobs_revision_and_guard(fake_engine):
    """The commit the driver resolved is what each worker loads; the guard options reach the engine; preload loads
    every model named and synthesize re-uses them (mutants: revision None; the guard options replaced by the
    defaults; a model loaded on every call; only the first model preloaded)."""
    opts = EngineOptions(max_sessions=2, guard_frames_per_token=3.0, guard_base_frames=5, dtype="bfloat16")
    be = EngineBackend(opts, revisions={"org/m": "abc123"})
    be.preload(["org/m", "other"])
    assert fake_engine.loads == [("org/m", {"device_map": "cpu", "dtype": "bfloat16", "revision": "abc123"}),
                                 ("other", {"device_map": "cpu", "dtype": "bfloat16", "revision": None})]
    kw = FakeEngine.made[0].kw
    assert (kw["max_sessions"], kw["guard_frames_per_token"], kw["guard_base_frames"]) == (2, 3.0, 5)
    be.synthesize([_chunk("a", "org/m"), _chunk("b", "other")])
    be.synthesize([_chunk("c", "org/m")])
    assert len(fake_engine.loads) == 2 and len(FakeEngine.made) == 2


def test_a_batch_job_asks_for_bulk_non_streaming_audio_with_its_sampling(fake_engine):
    """Every field of the job reaches the request; batch work is `bulk` (interactive sessions go first) and
    non-streaming (mutants: priority interactive; the job's sampling dropped)."""
    be = EngineBackend()
    (res,) = be.synthesize([_chunk("Hello.", sampling={"max_new_tokens": 12, "temperature": 0.7})])
    (req,) = FakeEngine.made[0].added
    assert res.error is None
    assert {k: v for k, v in req.items() if k != "voices"} == {
        "model": "m", "text": "Hello.", "voice": "ryan", "instructions": None, "language": "english", "seed": 3,
        "non_streaming_mode": True, "priority": "bulk", "sampling": {"max_new_tokens": 12, "temperature": 0.7}}
    assert req["voices"] == be.load_voice


def test_a_model_that_cannot_be_loaded_fails_its_jobs_only(fake_engine):
    """An OSError loading one model (a checkpoint gone) is that model's jobs' error; the others render (mutant:
    only ValueError caught, the whole batch raised)."""
    a, b = EngineBackend().synthesize([_chunk("a", "missing"), _chunk("b", "m")])
    assert (a.pcm, a.finish_reason, a.error) == (None, "error", "OSError: no such checkpoint")
    assert b.error is None and b.pcm.size == 2


def test_each_models_jobs_go_to_its_own_engine(fake_engine):
    """(mutant: every job of the batch added to the first job's engine)"""
    EngineBackend().synthesize([_chunk("a", "m1"), _chunk("b", "m2"), _chunk("c", "m1")])
    assert {e.model.name: [r["text"] for r in e.added] for e in FakeEngine.made} == {"m1": ["a", "c"], "m2": ["b"]}
    assert all(r["model"] == e.model.name for e in FakeEngine.made for r in e.added)


def test_a_full_engine_is_stepped_until_every_job_is_in_and_out(fake_engine):
    """More jobs than the engine holds: each is added once, after a step made room, and each gets its audio (mutants:
    EngineBusy retried at once without a step; an admitted job left in the to-do list and added again)."""
    FakeEngine.cap = 1
    out = EngineBackend().synthesize([_chunk(t) for t in "abc"])
    assert [r["text"] for r in FakeEngine.made[0].added] == ["a", "b", "c"]
    assert all(r.error is None and r.pcm.size == 2 for r in out)


def test_a_request_the_engine_refuses_fails_alone(fake_engine):
    """(mutant: after a refusal the loop stopped adding and never dropped the refused job: it was added again and
    again)"""
    a, b = EngineBackend().synthesize([_chunk("bad"), _chunk("good")])
    assert (a.pcm, a.finish_reason, a.error) == (None, "error", "ValueError: text: refused")
    assert b.error is None and b.pcm.size == 2


def test_each_session_ends_as_the_engine_says(fake_engine):
    """Every chunk of a session is kept in order; a session ending in error is an error (never empty audio taken for
    success); its sample rate is the chunk's; a session with no last chunk is "no result from engine"; a chunk of a
    session this call did not add is passed over (mutants: only the last chunk kept; err None; the default rate;
    None returned for the missing result; the foreign chunk looked up and a KeyError)."""
    multi, err, sr, lost, foreign = EngineBackend().synthesize(
        [_chunk("multi"), _chunk("error"), _chunk("sr16k"), _chunk("lost"), _chunk("foreign")])
    np.testing.assert_array_equal(multi.pcm, np.array([0.1] * 4 + [0.5] * 2, np.float32))
    assert multi.pcm.dtype == np.float32 and (multi.error, multi.finish_reason) == (None, "eos")
    assert err.finish_reason == "error" and err.error
    assert (sr.sample_rate, sr.error) == (16000, None)
    assert (lost.pcm, lost.finish_reason, lost.error) == (None, "error", "no result from engine")
    assert foreign.error is None and foreign.pcm.size == 2


def test_zero_torch_threads_means_one(fake_engine):
    """(mutant: torch.set_num_threads(0), which torch refuses: a worker asked for 0 threads could not start)"""
    import torch

    EngineBackend(EngineOptions(torch_threads=0))
    assert torch.get_num_threads() == 1


def test_a_voice_prompt_file_under_home_is_loaded_and_an_unknown_voice_is_a_key_error(fake_engine, tmp_path,
                                                                                      monkeypatch):
    """`~/alice.safetensors` names a file in the home folder; a voice that is neither a file nor in a store is a
    KeyError (request_from_fields makes it the row's voice error) (mutants: `~` not expanded; None returned)."""
    import qwen_tts_core

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "alice.safetensors").write_bytes(b"prompt")
    monkeypatch.setattr(qwen_tts_core, "load_voice_prompt", lambda path: ("prompt of", path))
    be = EngineBackend()
    assert be.load_voice("~/alice.safetensors") == ("prompt of", str(tmp_path / "alice.safetensors"))
    with pytest.raises(KeyError):
        be.load_voice("nobody")


def test_make_backend_passes_each_backend_its_options(fake_engine):
    """The engine backend gets the resolved revisions, the Serve backend its options (digests, windows); anything
    else is a ValueError naming the choices (mutants: revisions dropped; serve options dropped; None returned)."""
    be = synth.make_backend("engine", EngineOptions(), revisions={"org/m": "abc"})
    assert isinstance(be, EngineBackend) and be.revisions == {"org/m": "abc"}
    sb = synth.make_backend("serve", app_name="app2", serve_opts={"digests": {"cv": "sha256:1"},
                                                                  "max_inflight_per_replica": 2})
    assert (sb.app_name, sb.digests, sb.per_replica) == ("app2", {"cv": "sha256:1"}, 2)
    with pytest.raises(ValueError, match="backend must be 'engine', 'serve' or 'module:Class', got 'nope'"):
        synth.make_backend("nope")


# ---- levels --------------------------------------------------------------------------------------------------------

def test_true_peak_is_never_below_the_sample_peak():
    """BS.1770: the true peak is at least the highest |sample|. A lone full-scale click is not band-limited, so the
    oversampled signal may peak lower (about -0.4 dB mid-file at 24 kHz); the figure is still at least 0 dBTP, and
    a negative click is a 0 dBFS sample peak (mutants: the running maximum started at 0, not at the sample peak;
    peak_db of max(x) instead of max |x|, which a symmetric sine cannot tell apart)."""
    for at in (0, 12000, -1):
        x = np.zeros(24000, np.float32)
        x[at] = -1.0
        assert levels.true_peak_dbtp(x, 24000) >= levels.peak_db(x) == 0.0   # |sample|: a negative peak counts


def test_an_engine_failure_names_what_the_engine_said(fake_engine):
    """DEFECT (fix.diff, jobs/synth.py): a session the engine ended in error carries why (`error`, and `error_field`
    for a RequestError found in the engine); the row said only "engine error", where the Serve backend's row names
    the reason. Now: 'field: message' as error_text words a RequestError, else "engine error: message"."""
    why, field, bare = EngineBackend().synthesize([_chunk("error-why"), _chunk("error-field"), _chunk("error")])
    assert why.error == "engine error: CUDA out of memory"
    assert field.error == "max_new_tokens: must be at most 4096"
    assert bare.error == "engine error"
