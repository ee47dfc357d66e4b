"""The consumer check a replica makes before it cancels a lapsed session (serve/liveness.py), without a cluster:
what a handle call may carry as a consumer, and which answers of a ping mean dead. The real-Ray contract (a named
actor alive, then killed) is `test_a_lapsed_session_is_cancelled_only_once_its_consumer_actor_is_dead`."""

from __future__ import annotations

import pytest

from serve import liveness


@pytest.mark.parametrize("value", [
    None, "an-actor", 7, [], {"id": "ab"}, {"handle": object()}, {"id": 5, "handle": object()},
    {"id": "ab", "handle": "not a handle"}, {"id": "", "handle": None}, {"id": "x" * 65, "handle": None},
])
def test_a_consumer_that_is_not_an_actor_identity_is_ignored(value):
    assert liveness.consumer_of(value) is None


class _Ping:
    def __init__(self):
        self.__ray_ready__ = self

    def remote(self):
        return "ref"


@pytest.mark.parametrize("raised,alive", [
    pytest.param(None, True, id="answered"),
    pytest.param("died", False, id="actor-died"),
    pytest.param("timeout", True, id="busy"),
    pytest.param("unavailable", True, id="unreachable"),
    pytest.param("other", True, id="other-error"),
])
def test_only_a_dead_actor_reads_as_gone(monkeypatch, raised, alive):
    import ray
    from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError

    errors = {"died": ActorDiedError(), "timeout": GetTimeoutError("slow"),
              "unavailable": ActorUnavailableError("network", b"\0" * 16), "other": RuntimeError("boom")}

    def fake_get(ref, timeout=None):
        assert ref == "ref" and timeout is not None      # never an unbounded wait
        if raised is not None:
            raise errors[raised]
        return None
    monkeypatch.setattr(ray, "get", fake_get)
    assert liveness.actor_alive({"id": "abc", "handle": _Ping()}) is alive
