"""Ray Serve request router of the engine deployment (imports Ray: the `ray` extra).

Ray loads a custom router by import path, so it lives at module level here.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def rendezvous(key: str, replica: str) -> bytes:
    """Highest-random-weight order of replicas for a key: the smallest digest wins."""
    return hashlib.sha256(f"{key}/{replica}".encode()).digest()


class DemonstrationAffinityRouter(RequestRouter):
    """Ranks the running replicas by rendezvous hash of the request's `affinity_key` (the
    demonstrations' hash): the first is tried first, the rest if it is full. Requests without
    demonstrations may go to any replica. No FIFOMixin: it hands a found replica to the oldest
    pending request, which would send a request to another request's replica."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        key = pending_request.kwargs.get("affinity_key", "") if pending_request else ""
        if not key or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: rendezvous(key, r.replica_id.unique_id))
        return [[ranked[0]], ranked[1:]]
