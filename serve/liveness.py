"""Who consumes a replica stream, and whether that consumer still lives: the replica's check before it cancels a
session whose lease lapsed.

    consumer = this_actor()          # in the ingress: {"id": actor id hex, "handle": its ActorHandle}, None outside
    RAY_ACTORS.identity(value)       # in the replica: a consumer as it arrived in a call -> checked identity or None
    RAY_ACTORS.alive(consumer)       # ... False only when Ray reports that actor dead (blocking: call in a thread)

Leases (streaming.py, sessions.py) are the fast signal: a renewal proves the consumer alive. A lapse alone is no
proof of death (a loaded host can delay renewals past a lease), so the replica pings the consumer's actor: Ray
raises `ActorDiedError` only for an actor its GCS has marked dead. A ping left unanswered (a busy actor) or failing
otherwise counts as alive; the session deadline bounds that.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


def this_actor() -> dict[str, Any] | None:
    """The calling actor as a consumer identity; None in a driver or outside Ray."""
    import ray

    if not ray.is_initialized():
        return None
    ctx = ray.get_runtime_context()
    actor_id = ctx.get_actor_id()
    if not actor_id:
        return None
    return {"id": actor_id, "handle": ctx.current_actor}


def consumer_of(value: Any) -> dict[str, Any] | None:
    """A consumer identity as the replica accepts it (from a handle call: anything may arrive), else None."""
    from ray.actor import ActorHandle

    if not isinstance(value, dict):
        return None
    actor_id, handle = value.get("id"), value.get("handle")
    if not isinstance(actor_id, str) or not 0 < len(actor_id) <= 64 or not isinstance(handle, ActorHandle):
        return None
    return {"id": actor_id, "handle": handle}


def actor_alive(consumer: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """Whether the consumer's actor lives; blocking (one ping): call it in a thread."""
    import ray
    from ray.exceptions import ActorDiedError, GetTimeoutError

    try:
        ray.get(consumer["handle"].__ray_ready__.remote(), timeout=timeout_s)
    except ActorDiedError:
        return False
    except GetTimeoutError:
        pass                         # busy, not dead
    except Exception as e:  # noqa: BLE001 - unreachable for now (a network blip, a GCS restart): not proof of death
        log.warning("could not ping consumer %s: %s: %s", consumer["id"], type(e).__name__, e)
    return True


class ActorLiveness:
    """What the replica needs (ReplicaCore's `liveness`; tests pass a stand-in with the same two methods)."""

    identity = staticmethod(consumer_of)
    alive = staticmethod(actor_alive)


RAY_ACTORS = ActorLiveness()
