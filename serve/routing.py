"""Session ownership by routing: every call about a session reaches the replica that holds it.

A session id is `"<replica unique id>-<uuid4 hex>"`: globally unique (the UUID) and carrying its owner (the id Ray
Serve gives the replica that opened it). Callers pass it as the handle's routing key,

    handle.options(session_id=sid).feed.remote(sid, text, end)

and `SessionRouter` (this deployment's request router, set in app.py) sends the call to exactly that replica. Calls
without a key (opening a stream, `synthesize`) are balanced by the power of two choices over the replicas' queue
lengths, like Serve's default router (both of two may be full while a third has room: a replica that refuses an
open as full names itself, and the ingress asks the others by id before answering 503, Ingress._stream). When the
owner is gone (killed, restarted, scaled down), a keyed call goes to
any live replica, which does not hold the session and answers `UnknownSession`: a message can never reach, let alone
feed, another session, and nothing is retried on an error string.

Why not Ray 2.60's `ConsistentHashRouter`: it hashes the key onto a ring, so (1) the replica that OPENS a session
would be chosen by hash, not by load; (2) when the hashed replica is full it falls back to a ring successor, and the
session's later calls (hashed again to the primary) would miss it, unless fallback is off, in which case a full
replica stalls opens while others idle; (3) the ring moves keys when the replica set changes. Routing by the owner id
written into the session id has none of these: opens are load-balanced, and the owner is explicit.
"""

from __future__ import annotations

import contextvars
import random
import uuid
from typing import Any

from ray.serve.request_router import LocalityMixin, PendingRequest, RequestRouter, RunningReplica

SEP = "-"


def detached(call, *args, **kwargs):
    """Make a handle call (`call(*args)` returns its DeploymentResponse) outside the current Serve request context.

    Inside a request, every handle call inherits that request's internal id, and Serve's router matches a chosen
    replica to a pending call BY THAT ID: two calls in flight at once from one request (stats of every replica,
    lease renewals of several owners) would swap replicas and one would never be routed. A fresh context gives each
    call its own id."""
    return contextvars.Context().run(call, *args, **kwargs)


def new_session_id(owner: str) -> str:
    """A fresh globally unique session id owned by replica `owner` (its Serve unique id)."""
    return f"{owner}{SEP}{uuid.uuid4().hex}"


def owner_of(key: Any) -> str | None:
    """The replica id a session id (or `route_key(owner)`) names, or None for anything else."""
    if not isinstance(key, str) or SEP not in key:
        return None
    owner, _, rest = key.rpartition(SEP)
    return owner if owner and rest else None


def route_key(owner: str) -> str:
    """A routing key for calls about a replica rather than one session (stats of that replica)."""
    return f"{owner}{SEP}0"


class SessionRouter(LocalityMixin, RequestRouter):
    """Keyed calls go to the replica named in their key; unkeyed ones to the shorter queue of two random replicas,
    preferring replicas on the caller's node first when the handle asks for it (Serve's locality routing, as its
    default router does: a batch worker's calls stay on its node's replica).

    Not combined with Serve's FIFOMixin on purpose: that mixin hands a chosen replica to the OLDEST pending request,
    which may be another session's call. The base class matches the replica to the request it was chosen for.
    """

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # When the chosen replica is full, back off before retrying (without this the retry loop spins).
            pending_request.routing_context.should_backoff = True
            owner = owner_of(pending_request.metadata.session_id)
            if owner is not None:
                for r in candidate_replicas:
                    if r.replica_id.unique_id == owner:
                        return [[r]]
                # The owner is gone: any replica answers "unknown session" (it cannot hold this id).
        ids = self.apply_locality_routing(pending_request)  # local node first (once), then every replica
        local = [r for r in candidate_replicas if r.replica_id in ids] or list(candidate_replicas)
        if pending_request is not None:
            pending_request.routing_context.should_backoff = len(local) == len(candidate_replicas)
        if len(local) <= 2:
            return [local]
        return [random.sample(local, 2)]
