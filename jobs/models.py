"""The models a job renders with, resolved ONCE before any row, and the checks that can fail a job up front.

A `ModelSpec` says what a model is (type, speakers, languages) and what exactly produces its audio: the resolved
checkpoint's content digest (a local folder's files, the hub revision actually resolved, or what the Serve replica
reports about the weights it loaded) plus the settings outside the request that change the audio (dtype, device,
the runaway guard, the replica's default frame cap). Output keys are built from the spec, so a different checkpoint
behind the same name never re-uses old audio.

Engine backend: a local folder, or a hub id found in the local cache (else looked up on the hub once: an id that is
not cached and cannot be reached fails the job here, not row by row). Serve backend: the model must be served by
the app (`tts-<name>` deployment); its replica's `info()` gives the rest.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .inputs import Utterance
from .synth import error_text

log = logging.getLogger(__name__)
KINDS = ("custom_voice", "voice_design", "base")


@dataclass(frozen=True)
class ModelSpec:
    name: str                       # as rows and --model name it
    kind: str                       # the checkpoint's tts_model_type: custom_voice | voice_design | base
    digest: str                     # content digest of the resolved checkpoint (or a --revision label)
    speakers: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    revision: str | None = None     # hub commit the engine workers load (hub ids only)
    audio: dict[str, Any] = field(default_factory=dict)  # dtype, device, guard, default frame cap
    path: str | None = None         # engine backend, a local folder: its absolute path, what workers load (their
                                    # working directory is the Ray node's, not the driver's)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config(path: Path) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    from qwen_tts_core.config import TTSConfig

    cfg = TTSConfig.from_json(path)
    return cfg.tts_model_type, tuple(sorted(cfg.talker.spk_id or ())), tuple(cfg.languages)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def resolve_checkpoint_ref(model: str, revision: str | None = None) -> tuple[Path, str, str | None]:
    """(config.json path, digest, hub commit or None) for a local folder or hub id, downloading no weights.

    Raises:
        ValueError: not a folder and not a hub id; or a hub id that is neither cached nor reachable.
    """
    from qwen_tts_core.checkpoint.digest import checkpoint_digest, digest_from_hashes
    from qwen_tts_core.checkpoint.weights import CHECKPOINT_FILES

    if not model.strip():  # Path("") is the current folder
        raise ValueError("model: empty; name a checkpoint folder or a hub id")
    p = Path(model).expanduser()
    if p.exists() or model.startswith(("/", ".", "~")) or model.count("/") != 1:
        if not (p / "config.json").is_file():
            raise ValueError(f"model: {model!r} is not a checkpoint folder (no config.json) and not a hub id like "
                             "'Qwen/Qwen3-TTS-12Hz-0.6B-CustomVoice'")
        return p / "config.json", checkpoint_digest(p), None
    from huggingface_hub import snapshot_download

    try:  # the local cache first: no network
        snap = Path(snapshot_download(model, revision=revision, local_files_only=True,
                                      allow_patterns=CHECKPOINT_FILES))
        return snap / "config.json", checkpoint_digest(snap), snap.name
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
        cached_err = e
    if _hub_offline():
        raise ValueError(f"model: {model!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                         f"({type(cached_err).__name__}); download it first or pass a local folder")
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi().model_info(model, revision=revision, files_metadata=True, timeout=20)
        cfg = Path(hf_hub_download(model, "config.json", revision=info.sha))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: one clear message
        raise ValueError(f"model: {model!r} is not in the local cache and the hub cannot be reached "
                         f"({error_text(e)[:200]})") from e
    entries = [(s.rfilename, s.lfs.sha256 if s.lfs else s.blob_id) for s in info.siblings or []]
    return cfg, digest_from_hashes(entries), info.sha


def engine_spec(model: str, engine: Any, revision: str | None = None) -> ModelSpec:
    """The engine backend's spec: checkpoint resolved here, audio settings from the engine options."""
    from qwen_tts_core.checkpoint.weights import resolve_dtype

    cfg_path, digest, commit = resolve_checkpoint_ref(model, revision)
    kind, speakers, langs = _config(cfg_path)
    guard = None if not engine.guard_frames_per_token else [engine.guard_frames_per_token,
                                                             engine.guard_base_frames]
    audio = {"dtype": str(resolve_dtype(engine.dtype)).removeprefix("torch."),
             "device": str(engine.device).split(":")[0], "guard": guard, "default_max_new_tokens": None}
    path = None if commit else str(cfg_path.parent.resolve())  # a local folder, named as the driver sees it
    return ModelSpec(model, kind, digest, speakers, langs, commit, audio, path)


def serve_spec(model: str, app: str, served: dict[str, int], label: str | None = None) -> ModelSpec:
    """The Serve backend's spec, from the replica that serves `model` (`label`: only for a service that does not
    report its checkpoint digest)."""
    from .serve_backend import model_info

    if model not in served:
        raise ValueError(f"model: {model!r} is not served by the Serve app {app!r}; served models: "
                         f"{sorted(served)} (served names, not checkpoints: they contain no '/')")
    info = model_info(app, model)
    digest = info.get("checkpoint_digest") or (f"label:{label}" if label else None)
    if not digest:
        raise ValueError(f"model: the service does not report which checkpoint {model!r} runs (no "
                         "checkpoint_digest in its info); upgrade the service or pass --revision LABEL")
    audio = {"dtype": info.get("dtype"), "device": info.get("device"), "guard": None,
             "default_max_new_tokens": info.get("default_max_new_tokens") or info.get("max_new_tokens")}
    return ModelSpec(model, info["type"], digest, tuple(info.get("speakers") or ()),
                     tuple(info.get("languages") or ()), None, audio)


def resolve_models(rows: list[Utterance], default_model: str | None, backend: str, *, engine: Any = None,
                   app: str = "qtts", revision: str | None = None,
                   ) -> tuple[list[Utterance], dict[str, ModelSpec], str | None]:
    """Resolve every model the rows name, each once. Returns (rows, specs, default model).

    Rows whose own model cannot be resolved get an error; a job-level problem raises ValueError (exit 2): no model
    at all, or the default model (--model) unusable.
    """
    served: dict[str, int] = {}
    if backend == "serve":
        from .serve_backend import served_models

        served = served_models(app)
        if default_model is None and len(served) == 1:
            default_model = next(iter(served))
            log.info("using the app's only model %r", default_model)
    missing = [r for r in rows if r.error is None and not (r.model or default_model)]
    if missing:
        hint = f"; served models: {sorted(served)}" if backend == "serve" else ""
        raise ValueError(f"model: {len(missing)} row(s) name no model (first: {missing[0].id!r}); pass --model"
                         f"{hint}")
    names = {r.model or default_model for r in rows if r.error is None}
    if default_model:
        names.add(default_model)
    specs: dict[str, ModelSpec] = {}
    failed: dict[str, str] = {}
    for name in sorted(n for n in names if n):
        try:
            if backend == "serve":
                spec = serve_spec(name, app, served, revision)
            elif backend == "engine":  # --revision: the hub revision to load; the digest is of what it resolves to
                spec = engine_spec(name, engine, revision if name == default_model else None)
            else:  # a test backend (module:Class): no checkpoint to look at, the name and label are all we know
                spec = ModelSpec(name, "unknown", f"unresolved:{name}@{revision or 'unknown'}")
            specs[name] = spec
        except ValueError as e:
            if name == default_model:
                raise
            failed[name] = str(e)
    out = [replace(r, error=failed[r.model]) if r.error is None and r.model in failed else r for r in rows]
    return out, specs, default_model


def check_voices(rows: list[Utterance], specs: dict[str, ModelSpec], default_model: str | None,
                 default_voice: str | None, default_instruct: str | None) -> list[Utterance]:
    """Voice checks that need no synthesis. Unknown speakers fail their row; a job whose rows lack what their model
    needs (a voice, or a voice description for VoiceDesign), or whose --voice is not valid, raises ValueError."""
    out, no_voice, no_desc = [], [], []
    for r in rows:
        spec = specs.get(r.model or default_model or "")
        if r.error is not None or spec is None or spec.kind not in KINDS:  # a test backend: nothing known
            out.append(r)
            continue
        if spec.kind == "custom_voice":
            if not r.voice:
                no_voice.append(r)
            elif spec.speakers and r.voice.lower() not in spec.speakers:
                if r.voice == default_voice and (r.model or default_model) == default_model:
                    raise ValueError(f"voice: --voice {default_voice!r} is not a speaker of {spec.name!r}; "
                                     f"choose one of {list(spec.speakers)}")
                r = replace(r, error=f"voice: {r.voice[:80]!r} is not a speaker of {spec.name!r}; "
                                     f"choose one of {list(spec.speakers)}")
        elif spec.kind == "base":
            if not r.voice:
                no_voice.append(r)
        elif spec.kind == "voice_design":
            if r.voice:
                r = replace(r, error="voice: a VoiceDesign model takes no voice name; describe the voice in "
                                     "'instruct'")
            elif not (r.instruct or "").strip():
                no_desc.append(r)
        out.append(r)
    if no_voice:
        spec = specs[no_voice[0].model or default_model or ""]
        what = f"speakers: {list(spec.speakers)}" if spec.kind == "custom_voice" else \
            "a Base model needs a stored voice id or a voice-prompt file"
        raise ValueError(f"voice: {len(no_voice)} row(s) have no voice (first: {no_voice[0].id!r}) and no --voice "
                         f"was given ({spec.name!r} {what})")
    if no_desc:
        raise ValueError(f"instruct: {len(no_desc)} row(s) for VoiceDesign model {no_desc[0].model or default_model!r} "
                         f"have no voice description (first: {no_desc[0].id!r}); pass --instruct")
    return out


def voice_file_paths(rows: list[Utterance], specs: dict[str, ModelSpec], default_model: str | None,
                     ) -> dict[str, Path]:
    """Base models with a voice-prompt FILE as voice: each such voice (as rows name it) -> the file's absolute path,
    resolved in the driver (a relative path means the driver's working directory, never a worker's)."""
    out: dict[str, Path] = {}
    for r in rows:
        spec = specs.get(r.model or default_model or "")
        if r.error is None and spec is not None and spec.kind == "base" and r.voice and r.voice not in out:
            p = Path(r.voice).expanduser()
            if p.is_file():
                out[r.voice] = p.resolve()
    return out


def voice_file_digests(paths: dict[str, Path]) -> dict[str, str]:
    """Each voice-prompt file's content hash (it shapes the audio: it is in the keys), by voice as rows name it."""
    import hashlib

    return {voice: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for voice, p in paths.items()}


def specs_json(specs: dict[str, ModelSpec]) -> str:
    return json.dumps({k: v.to_dict() for k, v in specs.items()}, sort_keys=True)
