"""The directory actor in a real Ray cluster: leases, ring snapshots, restarts."""

from __future__ import annotations

import uuid

import pytest
import ray

from cluster.sharing.directory import Member, ReplicaId
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.membership import Membership
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration


def members_of(namespace: str, names: list[str], interval_s: float = 0.1) -> list[Membership]:
    return [
        Membership(
            namespace,
            Member(ReplicaId(name), node_id="node", peer_address=f"127.0.0.1:{9000 + i}"),
            stats=lambda name=name: {"hits": len(name)},
            interval_s=interval_s,
            lease_s=1.0,
        )
        for i, name in enumerate(names)
    ]


def ring_members(membership: Membership) -> set[str]:
    snapshot = membership.snapshot
    return {m.replica_id for m in snapshot.members} if snapshot else set()


@pytest.fixture
def namespace(ray_cluster) -> str:
    name = f"test-{uuid.uuid4().hex[:8]}"
    yield name
    ray.kill(directory_actor(name), no_restart=True)


def test_replicas_converge_on_one_ring_and_compute_the_same_owners(namespace):
    replicas = members_of(namespace, ["a", "b", "c"])
    for replica in replicas:
        replica.start()
    try:
        wait_until(
            lambda: all(ring_members(r) == {"a", "b", "c"} for r in replicas), 10, "convergence"
        )
        owners = [[r.ring().owner(f"key-{i}") for i in range(200)] for r in replicas]
        assert owners[0] == owners[1] == owners[2]
        assert set(owners[0]) == {"a", "b", "c"}
        stats = ray.get(directory_actor(namespace).stats.remote())
        assert stats == {"a": {"hits": 1}, "b": {"hits": 1}, "c": {"hits": 1}}
    finally:
        for replica in replicas:
            replica.stop()


def test_a_silent_replica_leaves_the_ring_within_its_lease(namespace):
    survivor, silent = members_of(namespace, ["survivor", "silent"])
    survivor.start()
    silent.start()
    wait_until(lambda: ring_members(survivor) == {"survivor", "silent"}, 10, "both members")
    silent._stopped.set()  # stops beating without deregistering, as a crashed replica would
    wait_until(lambda: ring_members(survivor) == {"survivor"}, 5, "the lease to lapse")
    survivor.stop()


def test_a_restarted_directory_is_repopulated_by_the_replicas(namespace):
    replicas = members_of(namespace, ["a", "b"])
    for replica in replicas:
        replica.start()
    try:
        wait_until(lambda: all(ring_members(r) == {"a", "b"} for r in replicas), 10, "start")
        old_epoch = replicas[0].snapshot.epoch
        ray.kill(directory_actor(namespace), no_restart=False)  # state lost, actor restarts

        def converged_again() -> bool:
            return all(
                r.snapshot.epoch != old_epoch and ring_members(r) == {"a", "b"} for r in replicas
            )

        wait_until(converged_again, 20, "the replicas to re-register with the new directory")
    finally:
        for replica in replicas:
            replica.stop()


def test_watch_returns_at_once_on_change_and_on_timeout_otherwise(namespace):
    directory = directory_actor(namespace, lease_s=5.0)
    snapshot = ray.get(directory.snapshot.remote())
    idle = ray.get(directory.watch.remote(snapshot.epoch, snapshot.version, 0.2))
    assert (idle.epoch, idle.version) == (snapshot.epoch, snapshot.version)
    pending = directory.watch.remote(snapshot.epoch, snapshot.version, 30.0)
    ray.get(directory.register.remote(Member(ReplicaId("x"), "node")))
    changed = ray.get(pending, timeout=5)
    assert changed.version > snapshot.version
    assert [m.replica_id for m in changed.members] == ["x"]
