"""Cluster membership: which replicas are alive, under leases, and what they report.

`Directory` is a plain class so that its rules are tested without Ray; `directory_actor` wraps
it in a named Ray actor. Replicas register once and then renew their lease by heartbeat; a
heartbeat also carries the replica's cache statistics, so reading the cluster's statistics never
calls a replica. A replica whose lease lapses is dropped; its next heartbeat is refused and it
registers again, which is also how replicas repopulate a directory that restarted empty.

Membership is published as a `RingSnapshot`: the live members, a version that grows with every
change, and the `epoch` of the directory incarnation (a restarted directory starts a new epoch
at version 0, so a replica compares (epoch, version) pairs for equality, never versions alone).
Replicas build their `Ring` from the snapshot and compute owners locally.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NewType

from cluster.sharing.ring import DEFAULT_VNODES_PER_WEIGHT, Ring

ReplicaId = NewType("ReplicaId", str)


@dataclass(frozen=True)
class Member:
    """One model replica as the cluster knows it."""

    replica_id: ReplicaId
    node_id: str
    peer_address: str = ""
    """Where its `PeerServer` serves results (gRPC)."""
    weight: float = 1.0
    blocks_address: str = ""
    """Where its `PeerServer` serves prefix blocks (the block stream)."""


@dataclass(frozen=True)
class RingSnapshot:
    """Membership at one version of one directory incarnation."""

    epoch: str
    version: int
    members: tuple[Member, ...]

    def ring(self, vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT) -> Ring:
        """The consistent-hash ring of these members (ids and weights)."""
        return Ring({m.replica_id: m.weight for m in self.members}, vnodes_per_weight, self.version)

    def member(self, replica_id: str) -> Member | None:
        """The member with `replica_id`, if present."""
        return next((m for m in self.members if m.replica_id == replica_id), None)


@dataclass
class _Lease:
    member: Member
    expires_at: float
    stats: Mapping[str, Any] = field(default_factory=dict)


class Directory:
    """Members under leases of `lease_s` seconds, with a version that changes with membership."""

    def __init__(
        self,
        lease_s: float = 10.0,
        timer: Callable[[], float] = time.monotonic,
        epoch: str | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self.lease_s = lease_s
        self.epoch = epoch or uuid.uuid4().hex
        self._timer = timer
        self._leases: dict[ReplicaId, _Lease] = {}
        self._excluded: set[ReplicaId] = set()
        self.version = 0

    def register(self, member: Member) -> int:
        """Add or refresh `member` (idempotent); returns the membership version."""
        self._expire()
        previous = self._leases.get(member.replica_id)
        self._leases[member.replica_id] = _Lease(
            member, self._timer() + self.lease_s, previous.stats if previous else {}
        )
        if previous is None or previous.member != member:
            self.version += 1
        return self.version

    def heartbeat(self, replica_id: ReplicaId, stats: Mapping[str, Any] | None = None) -> bool:
        """Renew the lease of `replica_id` and record its stats.

        Returns False when the replica is not a member (never registered, lease lapsed, or the
        directory restarted): the caller must `register` again.
        """
        self._expire()
        lease = self._leases.get(replica_id)
        if lease is None:
            return False
        lease.expires_at = self._timer() + self.lease_s
        if stats is not None:
            lease.stats = dict(stats)
        return True

    def deregister(self, replica_id: ReplicaId) -> None:
        """Remove `replica_id` at once (a replica shutting down cleanly)."""
        if self._leases.pop(replica_id, None) is not None:
            self.version += 1

    def exclude(self, replica_ids: list[ReplicaId]) -> int:
        """Keep `replica_ids` out of the ring (they stay members) until `readmit`; returns the
        membership version. The version actor excludes replicas behind on a model version."""
        fresh = set(replica_ids) - self._excluded
        if fresh:
            self._excluded |= fresh
            self.version += 1
        return self.version

    def readmit(self, replica_ids: list[ReplicaId]) -> int:
        """Undo `exclude` for `replica_ids`; returns the membership version."""
        back = set(replica_ids) & self._excluded
        if back:
            self._excluded -= back
            self.version += 1
        return self.version

    def members(self) -> list[Member]:
        """Live members, ordered by replica id."""
        self._expire()
        return [self._leases[rid].member for rid in sorted(self._leases)]

    def snapshot(self) -> RingSnapshot:
        """The live members in the ring (not excluded) at the current version."""
        members = [m for m in self.members() if m.replica_id not in self._excluded]
        return RingSnapshot(self.epoch, self.version, tuple(members))

    def stats(self) -> dict[ReplicaId, Mapping[str, Any]]:
        """The last stats each live member reported."""
        self._expire()
        return {rid: self._leases[rid].stats for rid in sorted(self._leases)}

    def _expire(self) -> None:
        now = self._timer()
        lapsed = [rid for rid, lease in self._leases.items() if lease.expires_at <= now]
        for rid in lapsed:
            del self._leases[rid]
        if lapsed:
            self.version += 1
