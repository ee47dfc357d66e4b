"""Service configuration: frozen dataclasses built from the `args:` block of configs/serve.yaml.

    cfg = ServiceConfig.from_dict(yaml.safe_load(open("configs/serve.yaml"))["applications"][0]["args"])

Every field has a default, so `ServiceConfig.from_dict({})` is a working one-model CPU service on a tiny random
checkpoint. Unknown keys are rejected (ValueError naming the key and the allowed ones), so a typo in the YAML fails at
start instead of being silently ignored.
"""

from __future__ import annotations

import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

from qwen_tts_core.errors import shown

MODEL_TYPES = ("custom_voice", "voice_design", "base")
# The environment variables that hold API keys (comma-separated), by the config field their keys join.
ENV_KEY_VARS = {"api_keys": "QTTS_API_KEYS", "admin_api_keys": "QTTS_ADMIN_API_KEYS"}
# The fields that hold keys: an error about them never shows their value (it goes to stderr, logs, `serve status`).
_SECRET_FIELDS = {"api_keys", "admin_api_keys", "env_api_keys", "env_admin_api_keys"}
# what with_env_keys records, never a config file's: a key put there is dropped wherever QTTS_API_KEYS is set
NOT_IN_FILES = ("env_api_keys", "env_admin_api_keys")


def file_args_error(args: dict[str, Any]) -> str | None:
    """Why a config file's `args:` cannot be taken as they are (fields it must not set), or None."""
    internal = sorted(k for k in NOT_IN_FILES if k in args)
    if internal:
        return (f"{', '.join(internal)} are not for the config file; put keys in api_keys / admin_api_keys, or "
                "QTTS_API_KEYS / QTTS_ADMIN_API_KEYS in the environment")
    return None
# A served model's name: Serve deploys it as "tts-<name>" (a Serve replica id is app#deployment#id, so no "#"),
# jobs pass it as --model (a "/" means a checkpoint), clients send it as `model` and in /v1/models/{id} ("." and
# ".." are path steps there); no control characters (log lines, metrics) nor surrounding spaces.
MODEL_NAME = re.compile(r"(?!\.\.?$)[^/#\s\x00-\x1f\x7f-\x9f](?:[^/#\x00-\x1f\x7f-\x9f]{0,126}[^/#\s\x00-\x1f\x7f-\x9f])?")
SEED_LIMIT = 2 ** 63   # the tiny random checkpoint's seed (torch.manual_seed)
DAY_S = 86400.0


class Span(typing.NamedTuple):
    """The values a config number may take: low..high, both included unless `low_open` (then low itself is not)."""
    low: float
    high: float
    low_open: bool = False

    def takes(self, v: float) -> bool:
        return (self.low < v if self.low_open else self.low <= v) and v <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{_num(self.low)}, {_num(self.high)}]"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


# Every number of the config and the range it lies in (one table for the lower and the upper bound). The upper
# bounds lie far above any real deployment and low enough that a typo (an extra 000) or a hostile file is a clear
# error here, not a failure later: Serve takes any max_ongoing_requests (the queues' sum, 10**20 included), a
# threading wait of 1e300 s raises OverflowError, and session_deadline_s is also how long a replica drains. A field
# whose type allows None may be null. Rules between two fields (interactive_reserve, default_max_new_tokens) are in
# __post_init__.
RANGES = {
    # a model (ModelConfig)
    "seed": Span(0, SEED_LIMIT - 1), "num_gpus": Span(0, 64), "num_cpus": Span(0, 4096),
    "num_replicas": Span(1, 1000), "max_sessions": Span(1, 1024), "max_queue": Span(0, 100_000),
    "max_bulk_queue": Span(0, 100_000), "max_new_tokens": Span(1, 100_000), "max_input_chars": Span(1, 1_000_000),
    "first_chunk_frames": Span(1, 1000), "chunk_frames": Span(1, 1000), "max_len": Span(16, 1 << 20),
    # the service (ServiceConfig)
    "max_body_bytes": Span(1024, 1 << 30), "max_upload_bytes": Span(1024, 1 << 30),
    "body_timeout_s": Span(0, DAY_S, low_open=True), "ws_idle_timeout_s": Span(0, DAY_S, low_open=True),
    "ws_max_messages": Span(1, 10 ** 9), "ws_max_messages_per_s": Span(0, 10 ** 6, low_open=True),
    "ws_message_burst": Span(1, 10 ** 9), "session_deadline_s": Span(0, DAY_S, low_open=True),
    "session_lease_s": Span(0, DAY_S, low_open=True), "retry_after_s": Span(0, 3600),
    "max_streams_per_key": Span(1, 10 ** 6), "max_voices_per_key": Span(1, 10 ** 6),
    "max_uploads_per_key": Span(1, 10 ** 6), "ingress_num_cpus": Span(0, 4096), "ingress_replicas": Span(1, 1000),
    "ingress_max_queued_requests": Span(1, 10 ** 6), "failover_retries": Span(0, 3),
    "failover_wait_s": Span(0, 600, low_open=True), "stream_lead_s": Span(0, DAY_S),
}


def _check_ranges(cfg: Any, where: str) -> None:
    """Every field of `cfg` that RANGES names holds a number of its type in its span (or None where its type allows
    it); ValueError naming the field otherwise. Applied on construction, so a config built in code (not through
    from_dict's type check) is held to the same rule: a bool is not a number."""
    hints = typing.get_type_hints(type(cfg))
    for f in fields(cfg):
        span = RANGES.get(f.name)
        if span is None:
            continue
        v, hint = getattr(cfg, f.name), hints[f.name]
        if v is None and _fits(None, hint):
            continue
        integral = _fits(0, hint) and not _fits(0.5, hint)
        kind = "an integer" if integral else "a number"
        if not (_fits(v, hint) and v is not None and span.takes(v)):  # NaN and inf are in no span
            null = " or null" if _fits(None, hint) else ""
            raise ValueError(f"{where}{f.name} must be {kind} in {span}{null}, got {shown(v)}")


def _check_keys(d: Any, cls: type, where: str) -> None:
    """`d` is a mapping of `cls`'s fields, each value of its field's type (a YAML list for a tuple); ValueError naming
    the key otherwise (a quoted "8" or a list where a number goes fails here, not as a TypeError deep inside)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {shown(d)}")
    allowed = {f.name for f in fields(cls)}
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {shown(sorted(map(str, unknown)))}; allowed: {sorted(allowed)}")
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name not in d:
            continue
        v = d[f.name]
        if not _fits(v, hints[f.name]):
            if f.name in _SECRET_FIELDS:  # the value may hold keys: say what is wrong, never show it
                bad = type(v).__name__ if not isinstance(v, list | tuple) else \
                    f"a list with a {type(next(k for k in v if not isinstance(k, str))).__name__} entry"
                raise ValueError(f"{where}.{f.name} must be a list of key strings, got {bad} (value not shown)")
            raise ValueError(f"{where}.{f.name} must be {f.type}, got {shown(v)}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a config value (from YAML or a dict) has the type `hint` names: bool is not an int, an int is a float,
    a list or tuple of the items is a tuple."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in args)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        return isinstance(value, list | tuple) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint)


@dataclass(frozen=True)
class ModelConfig:
    """One served model: its own Serve deployment (replicas each own one Engine).

    `checkpoint` is a local folder or hub id; when None the service builds a tiny random checkpoint of `model_type`
    (seed `seed`) into `cache_dir` so it runs out of the box.
    """

    name: str = "tiny-custom-voice"
    checkpoint: str | None = None
    model_type: str = "custom_voice"         # used only to build the random checkpoint
    seed: int = 0
    device: str = "auto"                     # "auto": cuda when num_gpus > 0 (an error without CUDA), else cpu;
    #                                          "cpu" with num_gpus > 0 holds the GPU resource, computes on the CPU
    dtype: str = "float32"
    num_gpus: float = 0.0
    num_cpus: float = 0.5
    num_replicas: int = 1
    autoscaling: dict[str, Any] | None = None  # Serve autoscaling_config (replaces num_replicas when set)
    max_sessions: int = 8                    # engine cache slots: sessions decoded together in one step
    max_queue: int = 16                      # sessions waiting for a slot before the replica answers 503
    interactive_reserve: int = 2             # slots bulk work never takes (room for interactive arrivals)
    max_new_tokens: int = 2048               # hard cap; requests may ask for less
    default_max_new_tokens: int | None = None  # when a request does not say (None: the model's default)
    max_input_chars: int | None = None       # longest text of one request (None: the service's max_input_chars)
    first_chunk_frames: int = 1
    chunk_frames: int = 4
    warmup: bool = True                      # warm the engine up (every model type) before traffic
    max_bulk_queue: int = 256                # bulk (batch-job) requests parked per replica before Busy
    # Engine options (None: the engine's default; see qwen_tts_core Engine): static KV length per session, CUDA
    # graphs on/off, the batch sizes graphs are captured for, torch.compile (True: the whole step bodies on CPU,
    # compiled while the replica starts: minutes; the layers' elementwise pieces at capture on a GPU), the
    # streaming audio decoder's dtype (fp32 by default; "bfloat16" is faster, as the official package decodes a
    # bf16 model, at bf16 precision).
    max_len: int | None = None
    cuda_graphs: bool | None = None
    batch_buckets: tuple[int, ...] | None = None
    compile: bool | str | None = None        # True / False, or "ops" / "step" (see Engine)
    audio_dtype: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not MODEL_NAME.fullmatch(self.name):
            raise ValueError(f"models[].name must be 1-128 characters without '/', '#', control characters or "
                             f"surrounding spaces, and not '.' or '..' (Serve deploys it as tts-<name>, clients name "
                             f"it in URLs), got {shown(self.name)}")
        if self.checkpoint is not None and not self.checkpoint.strip():  # e.g. an unset ${MODEL_PATH}
            raise ValueError(f"models[{self.name}].checkpoint must name a folder or hub id, or be left out (a tiny "
                             "random model); got a blank string")
        if self.checkpoint is not None and (self.checkpoint.strip() in (".", "..")
                                            or self.checkpoint.startswith(("./", "../"))):
            raise ValueError(f"models[{self.name}].checkpoint: a relative folder is resolved in each Ray worker's own "
                             f"working folder; give it as an absolute path (or ~/...), got {self.checkpoint!r}")
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"models[{self.name}].model_type must be one of {list(MODEL_TYPES)}, "
                             f"got {self.model_type!r}")
        where = f"models[{self.name}]"
        _check_ranges(self, f"{where}.")
        if not 0 <= self.interactive_reserve < self.max_sessions:
            raise ValueError(f"models[{self.name}].interactive_reserve must be in [0, max_sessions), "
                             f"got {self.interactive_reserve}")
        if self.batch_buckets is not None:
            buckets = tuple(self.batch_buckets)
            span = RANGES["max_sessions"]  # a batch size
            if not buckets or any(isinstance(b, bool) or not isinstance(b, int) or not span.takes(b) for b in buckets):
                raise ValueError(f"models[{self.name}].batch_buckets must list integers in {span}, got "
                                 f"{shown(buckets)}")
            object.__setattr__(self, "batch_buckets", buckets)
        if self.audio_dtype is not None:  # the core's rule (the engine applies the same one)
            from qwen_tts_core.checkpoint.weights import resolve_dtype

            resolve_dtype(self.audio_dtype, f"models[{self.name}].audio_dtype")
        if self.default_max_new_tokens is not None and not 1 <= self.default_max_new_tokens <= self.max_new_tokens:
            # a request that does not say is capped by this one alone: above max_new_tokens it lifted the hard cap
            raise ValueError(f"{where}.default_max_new_tokens must be in [1, max_new_tokens={self.max_new_tokens}] "
                             f"or null, got {self.default_max_new_tokens}")
        if self.device != "auto":  # what the model loader takes (torch's device names)
            import torch

            try:
                torch.device(self.device)
            except (RuntimeError, TypeError, ValueError):
                raise ValueError(f"{where}.device must be auto, cpu, cuda or cuda:N, got {shown(self.device)}") \
                    from None
        if self.dtype != "auto":  # what the model loader takes ("auto": the checkpoint's own)
            from qwen_tts_core.checkpoint.weights import resolve_dtype

            resolve_dtype(self.dtype, f"{where}.dtype")
        if self.compile is not None:  # the core's rule (the engine applies the same one, in every replica)
            from qwen_tts_core.generate.compiled import check_compile

            try:
                check_compile(self.compile, "device", self.cuda_graphs)
            except ValueError as e:
                raise ValueError(f"{where}.{e}") from None
        if self.autoscaling is not None:
            _check_autoscaling(self.autoscaling, f"{where}.autoscaling")

    @property
    def max_ongoing_requests(self) -> int:
        """Serve's per-replica limit: every slot, queue and bulk place, plus room for control calls (text feeds,
        lease renewals, stats), so the replica's own admission (Busy / 503) decides, not Serve's back-pressure."""
        return self.max_sessions + self.max_queue + self.max_bulk_queue + 32

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "models[]") -> ModelConfig:
        _check_keys(d, cls, where)
        return cls(**d)


@dataclass(frozen=True)
class ServiceConfig:
    """The whole service: models, voice store, limits and protection."""

    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    cache_dir: str = "~/.cache/qwen-tts-fleet/serve"
    voices_uri: str = "~/.cache/qwen-tts-fleet/voices"   # local folder or s3://bucket/prefix
    # (keys: repr=False, so that no repr of a config, in a log line or a traceback, shows one)
    api_keys: tuple[str, ...] = field(default=(), repr=False)   # Bearer keys; also env QTTS_API_KEYS (k1,k2)
    admin_api_keys: tuple[str, ...] = field(default=(), repr=False)   # see every key's voices; QTTS_ADMIN_API_KEYS
    env_api_keys: tuple[str, ...] = field(default=(), repr=False)     # not for the YAML: which of api_keys /
    env_admin_api_keys: tuple[str, ...] = field(default=(), repr=False)   # admin_api_keys came from the environment
    metrics_without_key: bool = False                   # with keys set, /metrics needs one unless this is true
    docs_without_key: bool = False                      # likewise /docs and /openapi.json
    max_body_bytes: int = 1 << 20
    max_upload_bytes: int = 10 << 20
    body_timeout_s: float = 30.0                        # a request body (JSON, voice upload) must arrive in this time
    max_input_chars: int = 4096
    allowed_audio_url_prefixes: tuple[str, ...] = ()     # reference audio URLs: only with an allow-list
    ws_idle_timeout_s: float = 30.0                     # WebSocket: config wait; a session with no text fails
    ws_max_messages: int = 8192                         # WebSocket: messages per session
    ws_max_messages_per_s: float = 200.0                # WebSocket: sustained message rate (token bucket) ...
    ws_message_burst: int = 5000                        # ... and its burst
    session_deadline_s: float = 600.0                   # any session: wall time in the engine before it fails
    session_lease_s: float = 15.0                       # a stream whose consumer stops renewing (and died) is cancelled
    retry_after_s: int = 1
    max_streams_per_key: int | None = 16                # open HTTP speech streams + WebSocket sessions of one
    #                                                     non-admin key (429 beyond); None: no limit (serve/quotas.py)
    max_voices_per_key: int | None = 100                # stored voices of one non-admin key (429 beyond); None: no limit
    max_uploads_per_key: int | None = 2                 # voice uploads of one non-admin key in progress at once (429
    #                                                     beyond: each holds a body or a fetched audio_url); None: none
    ingress_num_cpus: float = 0.25
    ingress_replicas: int = 1
    ingress_max_queued_requests: int = 200              # requests waiting for one of an ingress replica's 1000
    #                                                     places (Serve's queue); beyond: Serve's 503 at once
    failover_retries: int = 1                           # a speech request whose replica died before any audio
    #                                                     was sent goes again to another replica, this many times
    failover_wait_s: float = 10.0                       # ... if one takes it within this time (else 502)
    stream_lead_s: float = 0.0                          # > 0: HTTP/SSE/WebSocket audio goes out at most this many
    #                                                     seconds ahead of real time (slow clients, serve/README.md);
    #                                                     0: as fast as it is made

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models must list at least one model")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: duplicate names in {names}")
        _check_ranges(self, "")
        _check_cache_dir(self.cache_dir)
        _check_voices_uri(self.voices_uri)
        for key in (*self.api_keys, *self.admin_api_keys, *self.env_api_keys, *self.env_admin_api_keys):
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise ValueError("api_keys / admin_api_keys must be non-empty strings without surrounding spaces")
        from .fetch import AllowList

        AllowList(self.allowed_audio_url_prefixes)  # ValueError naming a prefix that is not an http(s) folder
        # Each model's text limit defaults to the service's (the replica applies it through the core's policy).
        object.__setattr__(self, "models", tuple(
            m if m.max_input_chars is not None else replace(m, max_input_chars=self.max_input_chars)
            for m in self.models))

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ServiceConfig:
        d = dict(d or {}) if isinstance(d, dict | None) else d
        if isinstance(d, dict) and "models" in d and d["models"] is None:
            # `models:` with every entry commented out: not the tiny default model in place of the real ones
            raise ValueError("serve config.models is empty (null): list at least one model, or leave the key out "
                             "for the tiny random default")
        models = d.pop("models", None) if isinstance(d, dict) else None
        _check_keys(d, cls, "serve config")
        if models is not None:
            if not isinstance(models, list | tuple):
                raise ValueError(f"serve config.models must be a list of model configs, got {shown(models)}")
            d["models"] = tuple(m if isinstance(m, ModelConfig) else ModelConfig.from_dict(m, f"models[{i}]")
                                for i, m in enumerate(models))
        for key in ("api_keys", "admin_api_keys", "env_api_keys", "env_admin_api_keys", "allowed_audio_url_prefixes"):
            if key in d:
                d[key] = tuple(d[key] or ())
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "models":
                v = [{g.name: getattr(m, g.name) for g in fields(m)} for m in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def session_limits(self) -> dict[str, Any]:
        """The replicas' per-session rules (serve/sessions.py SessionLimits)."""
        return {"max_text_chars": self.max_input_chars, "idle_text_timeout_s": self.ws_idle_timeout_s,
                "deadline_s": self.session_deadline_s, "lease_s": self.session_lease_s}

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ValueError(f"model {name!r} is not served; choose one of {[m.name for m in self.models]}")

    def with_env_keys(self, environ: dict[str, str] | None = None) -> ServiceConfig:
        """This config with the keys of QTTS_API_KEYS / QTTS_ADMIN_API_KEYS (comma-separated) added, recorded in
        `env_api_keys` / `env_admin_api_keys` so that a later call can take them out again.

        The environment's keys REPLACE the ones an earlier call added: where the app is built (the driver of `qtts
        serve`, `serve run`'s builder) they travel to the ingress inside its config, and the ingress calls this again
        with its own environment. When that environment sets either variable (a pod's Secret), its keys are the only
        environment keys accepted, so a key removed from the Secret is refused once the pods restart; when it sets
        neither (a local cluster whose workers never saw the driver's environment), the keys the config carries
        stay. Keys of the config file itself (api_keys in the YAML) are kept either way. Idempotent."""
        base = self._without_env_keys()
        env = _env_keys(os.environ if environ is None else environ)
        if env is None:  # this environment says nothing: the keys resolved where the app was built
            env = {"api_keys": self.env_api_keys, "admin_api_keys": self.env_admin_api_keys}
        added = {f: tuple(k for k in dict.fromkeys(env[f]) if k not in getattr(base, f)) for f in ENV_KEY_VARS}
        keys = {f: getattr(base, f) + added[f] for f in ENV_KEY_VARS}
        if (self.api_keys or self.admin_api_keys) and not any(keys.values()):
            # fail closed: no keys at all means no key checks, and a Secret emptied to revoke every key (or by
            # mistake) must not open the service to everyone
            raise ValueError(f"{' / '.join(ENV_KEY_VARS.values())} are set but empty here, which would leave this "
                             "service (built with API keys) without any: refusing to serve with key checks off. "
                             "Give at least one key, or unset both variables and remove api_keys from the config "
                             "to run without keys")
        return replace(base, **keys, env_api_keys=added["api_keys"], env_admin_api_keys=added["admin_api_keys"])

    def _without_env_keys(self) -> ServiceConfig:
        """The config file's own keys: those an earlier `with_env_keys` added are taken out."""
        return replace(self, api_keys=tuple(k for k in self.api_keys if k not in self.env_api_keys),
                       admin_api_keys=tuple(k for k in self.admin_api_keys if k not in self.env_admin_api_keys),
                       env_api_keys=(), env_admin_api_keys=())

    def effective_api_keys(self) -> frozenset[str]:
        """Every key the service accepts once the environment's are added (what the ingress enforces)."""
        cfg = self.with_env_keys()
        return frozenset(cfg.api_keys) | frozenset(cfg.admin_api_keys)


def _check_cache_dir(path: str) -> None:
    """cache_dir: a local folder every replica resolves alike: absolute, or under "~" (each worker's home)."""
    if not (path.startswith(("/", "~")) and "://" not in path):
        raise ValueError(f"cache_dir must be an absolute local folder or start with ~ (a relative one is resolved in "
                         f"each Ray worker's own working folder), got {shown(path)}")


def _check_voices_uri(uri: str) -> None:
    """voices_uri: what serve/voices.py VoiceStore.from_uri takes, checked here so that a wrong one is refused at
    start, not in the ingress and every replica as they start."""
    if uri.startswith("s3://"):
        if not uri[len("s3://"):].split("/", 1)[0]:
            raise ValueError(f"voices_uri must name a bucket: s3://bucket/prefix, got {shown(uri)}")
        return
    path = uri.removeprefix("file://")
    if "://" in path or not path.startswith(("/", "~")):
        raise ValueError(f"voices_uri must be an absolute local folder (or ~/...), file:///folder or "
                         f"s3://bucket/prefix (a relative folder is each Ray worker's own), got {shown(uri)}")


def _check_autoscaling(d: dict[str, Any], where: str) -> None:
    """Serve's autoscaling_config rules (unknown keys too, which Serve ignores), as an error naming the model."""
    from ray.serve.config import AutoscalingConfig

    known = getattr(AutoscalingConfig, "model_fields", None) or AutoscalingConfig.__fields__
    unknown = sorted(map(str, set(d) - set(known)))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {shown(unknown)}; allowed: {sorted(known)}")
    try:
        AutoscalingConfig(**d)
    except (TypeError, ValueError) as e:
        errors = getattr(e, "errors", None)
        why = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'value'}: {x['msg']}" for x in errors()) \
            if callable(errors) else str(e)
        raise ValueError(f"{where}: {why}") from None


def _env_keys(environ: dict[str, str]) -> dict[str, tuple[str, ...]] | None:
    """The keys of ENV_KEY_VARS in `environ` by config field, or None when it sets neither variable (set but empty
    counts: a Secret emptied to revoke every key must not bring back the keys of the build; `with_env_keys` then
    refuses to leave a service built with keys without any)."""
    if not any(var in environ for var in ENV_KEY_VARS.values()):
        return None
    return {f: tuple(k.strip() for k in environ.get(var, "").split(",") if k.strip())
            for f, var in ENV_KEY_VARS.items()}
