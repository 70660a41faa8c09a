"""Cache-affinity request routing for the `ModelReplica` deployment.

A request that carries a `routing_key` goes to the owner of that key on the consistent-hash
ring of the running replicas (`cluster.ring`, the same placement the replicas compute from the
directory, so the request lands where its answer and prefix blocks live), unless that replica
already has more than `max_owner_queue` requests in flight: then the least loaded of the others
takes it, with the ring's next members preferred, and the owner stays the last resort. A request
that names a `replica` goes there while it runs. Requests without a key get Serve's usual two
random choices. Nothing here blocks or calls an actor:
placement is pure hashing over the replicas Serve already knows.
"""

from __future__ import annotations

import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.ring import Ring

DEFAULT_MAX_OWNER_QUEUE = 8


def _argument(request: PendingRequest | None, name: str) -> str | None:
    """Attribute `name` of the request's first argument, when it is a string."""
    if request is None or not request.args:
        return None
    value = getattr(request.args[0], name, None)
    return value if isinstance(value, str) else None


class CacheAffinityRouter(FIFOMixin, RequestRouter):
    """Routes each keyed request to its key's owner replica, falling back on load."""

    _max_owner_queue = DEFAULT_MAX_OWNER_QUEUE
    _ring: Ring = Ring()

    def initialize_state(self, max_owner_queue: int = DEFAULT_MAX_OWNER_QUEUE) -> None:
        """`max_owner_queue`: in-flight requests above which the owner is passed over."""
        self._max_owner_queue = max_owner_queue

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        chosen = _argument(pending_request, "replica")
        if chosen in by_id:
            return [[by_id[chosen]]]
        key = _argument(pending_request, "routing_key")
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        if set(self._ring.weights) != by_id.keys():
            self._ring = Ring(dict.fromkeys(by_id, 1.0))
        ranked = [by_id[m] for m in self._ring.owners(key, len(by_id))]
        owner, others = ranked[0], ranked[1:]
        owner_queue = self.replica_queue_len_cache.get(owner.replica_id)
        if others and owner_queue is not None and owner_queue > self._max_owner_queue:
            return [others, [owner]]
        return [[owner], others] if others else [[owner]]
