"""Cache-affinity request routing for the `ModelReplica` deployment.

A request that carries a `routing_key` goes to the owner of that key on the directory's ring
(`cluster.sharing.ring_watch`: the very ring the replicas compute owners from, so the request
lands where its answer and prefix blocks live), unless that replica already has more than
`max_owner_queue` requests in flight: then the least loaded of the others takes it, with the
ring's next members preferred, and the owner stays the last resort.

The directory's ring leaves out the replicas the version actor excluded (behind on a version): they
get keyed requests only when no ring member can take them. Until the directory's ring is known, when
none of its members is among the running replicas, or in a driver's handle (outside any actor), the
ring of the replicas Serve knows stands in for it. A request that names a `replica` goes there while
it runs. Requests without a key get Serve's usual two random choices. Nothing here blocks: the ring
is followed in a background thread, and placement is hashing.
"""

from __future__ import annotations

import random

import ray
from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.sharing.ring import Ring
from cluster.sharing.ring_watch import RingWatcher

DEFAULT_MAX_OWNER_QUEUE = 8
DEFAULT_NAMESPACE = "raycache"


def _argument(request: PendingRequest | None, name: str) -> str | None:
    """Attribute `name` of the request's first argument, when it is a string."""
    if request is None or not request.args:
        return None
    value = getattr(request.args[0], name, None)
    return value if isinstance(value, str) else None


class CacheAffinityRouter(FIFOMixin, RequestRouter):
    """Routes each keyed request to its key's owner replica, falling back on load."""

    _max_owner_queue = DEFAULT_MAX_OWNER_QUEUE
    _namespace = DEFAULT_NAMESPACE
    _serve_ring: Ring = Ring()
    _directory_ring: RingWatcher | None = None

    def initialize_state(
        self, max_owner_queue: int = DEFAULT_MAX_OWNER_QUEUE, namespace: str = DEFAULT_NAMESPACE
    ) -> None:
        """`max_owner_queue`: in-flight requests above which the owner is passed over;
        `namespace`: the application's `args.namespace`, whose directory holds the ring."""
        self._max_owner_queue = max_owner_queue
        self._namespace = namespace

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
        ranked = [by_id[m] for m in self._ring(by_id).owners(key, len(by_id)) if m in by_id]
        # Running replicas off the directory's ring (excluded, or not registered yet) come last.
        ranked += [r for r in candidate_replicas if r not in ranked]
        owner, others = ranked[0], ranked[1:]
        owner_queue = self.replica_queue_len_cache.get(owner.replica_id)
        if others and owner_queue is not None and owner_queue > self._max_owner_queue:
            return [others, [owner]]
        return [[owner], others] if others else [[owner]]

    def _ring(self, running: dict[str, RunningReplica]) -> Ring:
        """The directory's ring when it holds a running replica; else the running replicas'."""
        watcher = self._watch_directory()
        if watcher is not None:
            ring = watcher.ring()
            if any(member in running for member in ring.weights):
                return ring
        if set(self._serve_ring.weights) != running.keys():
            self._serve_ring = Ring(dict.fromkeys(running, 1.0))
        return self._serve_ring

    def _watch_directory(self) -> RingWatcher | None:
        """The watcher of the directory's ring, started on first use in a Ray actor (the
        ingress replica whose handle routes). A driver's handle (a script, a test) routes on
        the running replicas: a background thread blocked in Ray must not outlive its
        driver's `ray.shutdown()`."""
        if (
            self._directory_ring is None
            and ray.is_initialized()
            and ray.get_runtime_context().get_actor_id() is not None
        ):
            self._directory_ring = RingWatcher.of_namespace(self._namespace)
            self._directory_ring.start()
        return self._directory_ring
