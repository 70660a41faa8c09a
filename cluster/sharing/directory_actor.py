"""The directory as a named, restartable Ray actor.

The actor keeps no state it cannot lose: after a restart it is empty under a new epoch,
replicas' heartbeats are refused, and they register again. Methods are idempotent, so Ray may
retry them. It is an async actor so that many replicas can long-poll `watch` at once; it
expires lapsed leases on its own timer too, so a dead replica leaves the ring even when nobody
calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from typing import Any

import ray
from ray.actor import ActorHandle

from cluster.sharing.directory import Directory, Member, ReplicaId, RingSnapshot

ACTOR_NAMESPACE = "raycache"
EXPIRY_CHECK_S = 0.5


# An async actor: Ray runs up to 1,000 of its calls concurrently, enough for every watcher.
@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class DirectoryActor:
    """A Ray shell over `Directory`; see there for the contract of each method."""

    def __init__(self, lease_s: float) -> None:
        self._directory = Directory(lease_s=lease_s)
        self._changed = asyncio.Event()
        self._seen_version = self._directory.version
        self._expiry_task: asyncio.Task[None] | None = None

    async def register(self, member: Member) -> int:
        self._start_expiry()
        return self._publish(self._directory.register(member))

    async def heartbeat(
        self, replica_id: ReplicaId, stats: Mapping[str, Any] | None = None
    ) -> bool:
        self._start_expiry()
        renewed = self._directory.heartbeat(replica_id, stats)
        self._publish(self._directory.version)
        return renewed

    async def deregister(self, replica_id: ReplicaId) -> None:
        self._directory.deregister(replica_id)
        self._publish(self._directory.version)

    async def exclude(self, replica_ids: list[ReplicaId]) -> int:
        return self._publish(self._directory.exclude(replica_ids))

    async def readmit(self, replica_ids: list[ReplicaId]) -> int:
        return self._publish(self._directory.readmit(replica_ids))

    async def members(self) -> list[Member]:
        return self._directory.members()

    async def stats(self) -> dict[ReplicaId, Mapping[str, Any]]:
        return self._directory.stats()

    async def snapshot(self) -> RingSnapshot:
        return self._directory.snapshot()

    async def watch(self, epoch: str, version: int, timeout_s: float) -> RingSnapshot:
        """The snapshot, as soon as it differs from (`epoch`, `version`) or after `timeout_s`."""
        self._start_expiry()
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            snapshot = self._directory.snapshot()
            remaining = deadline - asyncio.get_running_loop().time()
            if (snapshot.epoch, snapshot.version) != (epoch, version) or remaining <= 0:
                return snapshot
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)

    def _publish(self, version: int) -> int:
        if version != self._seen_version:
            self._seen_version = version
            # Wake every watcher; later watchers wait on a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()
        return version

    def _start_expiry(self) -> None:
        if self._expiry_task is None:
            self._expiry_task = asyncio.get_running_loop().create_task(self._expire_forever())

    async def _expire_forever(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK_S)
            self._directory.members()  # drops lapsed leases
            self._publish(self._directory.version)


def directory_name(namespace: str) -> str:
    """The actor name of the directory of raycache namespace `namespace`."""
    return f"directory-{namespace}"


def directory_actor(namespace: str, lease_s: float = 10.0) -> ActorHandle[Any]:
    """The directory actor of raycache namespace `namespace`, created on first use.

    Detached, so it outlives the deployment that happened to create it; every replica and
    ingress of the application shares it.
    """
    return DirectoryActor.options(  # type: ignore[attr-defined,no-any-return]
        name=directory_name(namespace),
        namespace=ACTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(lease_s)
