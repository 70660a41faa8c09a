"""Membership under leases (the plain class behind the directory actor)."""

from cluster.sharing.directory import Directory, Member, ReplicaId


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def member(name: str) -> Member:
    return Member(replica_id=ReplicaId(name), node_id="node", peer_address=f"{name}:1")


def test_register_is_idempotent_and_versions_membership():
    directory = Directory(lease_s=5, timer=Clock())
    v1 = directory.register(member("a"))
    assert directory.register(member("a")) == v1
    v2 = directory.register(member("b"))
    assert v2 > v1
    assert [m.replica_id for m in directory.members()] == ["a", "b"]


def test_heartbeat_renews_the_lease_and_records_stats():
    clock = Clock()
    directory = Directory(lease_s=5, timer=clock)
    directory.register(member("a"))
    clock.now = 4
    assert directory.heartbeat(ReplicaId("a"), {"hits": 3})
    clock.now = 8  # 4s after the renewal: still inside the lease
    assert directory.stats() == {"a": {"hits": 3}}


def test_lapsed_lease_removes_the_member_and_refuses_its_heartbeat():
    clock = Clock()
    directory = Directory(lease_s=5, timer=clock)
    directory.register(member("a"))
    version = directory.version
    clock.now = 5
    assert directory.members() == []
    assert directory.version > version
    assert not directory.heartbeat(ReplicaId("a"))


def test_unknown_replica_must_register():
    directory = Directory(lease_s=5, timer=Clock())
    assert not directory.heartbeat(ReplicaId("ghost"), {"hits": 1})
    assert directory.stats() == {}


def test_deregister_removes_at_once():
    directory = Directory(lease_s=5, timer=Clock())
    directory.register(member("a"))
    directory.deregister(ReplicaId("a"))
    directory.deregister(ReplicaId("a"))
    assert directory.members() == []
