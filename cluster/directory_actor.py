"""The directory as a named, restartable Ray actor.

The actor keeps no state it cannot lose: after a restart it is empty, replicas' heartbeats are
refused, and they register again. Methods are idempotent, so Ray may retry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray
from ray.actor import ActorHandle

from cluster.directory import Directory, Member, ReplicaId

ACTOR_NAMESPACE = "raycache"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DirectoryActor:
    """A Ray shell over `Directory`; see there for the contract of each method."""

    def __init__(self, lease_s: float) -> None:
        self._directory = Directory(lease_s=lease_s)

    def register(self, member: Member) -> int:
        return self._directory.register(member)

    def heartbeat(self, replica_id: ReplicaId, stats: Mapping[str, Any] | None = None) -> bool:
        return self._directory.heartbeat(replica_id, stats)

    def deregister(self, replica_id: ReplicaId) -> None:
        self._directory.deregister(replica_id)

    def members(self) -> list[Member]:
        return self._directory.members()

    def stats(self) -> dict[ReplicaId, Mapping[str, Any]]:
        return self._directory.stats()


def directory_actor(namespace: str, lease_s: float = 10.0) -> ActorHandle[Any]:
    """The directory actor of raycache namespace `namespace`, created on first use.

    Detached, so it outlives the deployment that happened to create it; every replica and
    ingress of the application shares it.
    """
    return DirectoryActor.options(  # type: ignore[attr-defined,no-any-return]
        name=f"directory-{namespace}",
        namespace=ACTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(lease_s)
