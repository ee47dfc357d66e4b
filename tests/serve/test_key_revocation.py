"""A key removed from the environment (the qtts-api-keys Secret) is refused by an ingress that restarts with the new
environment, although the config it restarts with is the one built while the key was still there (Serve reuses a
replica's init args). No cluster: `build_app` gives the ingress's init args, the ingress applies `with_env_keys`."""

from __future__ import annotations

from serve.app import build_app
from serve.config import ServiceConfig


def _ingress_keys(init_args: dict, environ: dict[str, str]) -> set[str]:
    """The keys an ingress started with `init_args` in `environ` accepts (what Ingress.__init__ resolves)."""
    cfg = ServiceConfig.from_dict(init_args).with_env_keys(environ)
    return set(cfg.api_keys) | set(cfg.admin_api_keys)


def _built_args(monkeypatch, config: dict, environ: dict[str, str]) -> dict:
    """The ingress's config as `build_app` binds it, built in `environ`."""
    for var in ("QTTS_API_KEYS", "QTTS_ADMIN_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    args = build_app(config)._bound_deployment.init_args[0]
    return args


def test_a_key_removed_from_the_secret_is_refused_after_a_restart(monkeypatch):
    args = _built_args(monkeypatch, {}, {"QTTS_API_KEYS": "old-leaked-key,k2", "QTTS_ADMIN_API_KEYS": "adm-old"})
    # the Secret rotated, the pods restarted: the ingress's own environment is the only source of env keys
    assert _ingress_keys(args, {"QTTS_API_KEYS": "k2", "QTTS_ADMIN_API_KEYS": "adm-new"}) == {"k2", "adm-new"}
    # an admin list emptied (or dropped from the Secret while the other key stays) revokes the old admin key too
    assert _ingress_keys(args, {"QTTS_API_KEYS": "k2", "QTTS_ADMIN_API_KEYS": ""}) == {"k2"}
    assert _ingress_keys(args, {"QTTS_API_KEYS": "k2"}) == {"k2"}


def test_config_file_keys_stay_and_build_keys_are_the_fallback(monkeypatch):
    args = _built_args(monkeypatch, {"api_keys": ["file-key"], "admin_api_keys": ["file-admin"]},
                       {"QTTS_API_KEYS": "env-key,file-key"})
    # a worker that never saw the driver's environment (a local cluster): the keys of the build
    assert _ingress_keys(args, {}) == {"file-key", "file-admin", "env-key"}
    # a pod whose Secret no longer lists env-key: the file's keys stay, env-key goes (file-key is the file's)
    assert _ingress_keys(args, {"QTTS_API_KEYS": "file-key"}) == {"file-key", "file-admin"}
    assert _ingress_keys(args, {"QTTS_API_KEYS": ""}) == {"file-key", "file-admin"}


def test_resolving_twice_or_after_a_round_trip_changes_nothing():
    cfg = ServiceConfig.from_dict({"api_keys": ["c1"]}).with_env_keys({"QTTS_API_KEYS": "e1,c1"})
    again = ServiceConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.with_env_keys({}) == cfg and cfg.env_api_keys == ("e1",)
    assert again.with_env_keys({"QTTS_API_KEYS": "e2"}).api_keys == ("c1", "e2")


def test_a_secret_emptied_of_every_key_fails_closed(monkeypatch):
    """No keys at all means no key checks: an ingress of a service built with keys whose environment now sets both
    variables empty (every key revoked, or a Secret emptied by mistake) must not start open to everyone."""
    import pytest

    args = _built_args(monkeypatch, {}, {"QTTS_API_KEYS": "k1", "QTTS_ADMIN_API_KEYS": "adm"})
    for environ in ({"QTTS_API_KEYS": "", "QTTS_ADMIN_API_KEYS": ""}, {"QTTS_API_KEYS": " , "}):
        with pytest.raises(ValueError, match="refusing to serve with key checks off"):
            ServiceConfig.from_dict(args).with_env_keys(environ)
    # a service built without keys stays open, and a file key keeps checks on whatever the environment says
    open_args = _built_args(monkeypatch, {}, {})
    assert _ingress_keys(open_args, {"QTTS_API_KEYS": ""}) == set()
    assert _ingress_keys(_built_args(monkeypatch, {"api_keys": ["f"]}, {"QTTS_API_KEYS": "e"}),
                         {"QTTS_API_KEYS": ""}) == {"f"}
