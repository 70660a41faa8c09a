"""The replica side of versions, without Ray: offers, ordering, failures, lag and contact."""

from __future__ import annotations

from cluster.versions.follower import VersionFollower
from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion

START = ModelVersion("m", "1", 1)


def follower(applied: list, fail: set | None = None, clock=None) -> VersionFollower:
    def apply(record: ModelVersion) -> None:
        if record.version in (fail or set()):
            raise OSError(f"cannot load {record.version}")
        applied.append(record.version)

    return VersionFollower(
        "replica-a",
        actor=lambda: None,
        initial={"m": START},
        apply_version=apply,
        apply_rules=lambda rules: applied.extend(rule.seq for rule in rules),
        clock=clock or (lambda: 0.0),
    )


def test_newer_versions_are_applied_once_and_older_ones_ignored():
    applied: list = []
    f = follower(applied)
    f.offer(ModelVersion("m", "3", 3))
    f.offer(ModelVersion("m", "2", 2))  # older than what was heard: ignored
    f.offer(ModelVersion("m", "3", 3))  # at-least-once delivery
    assert applied == ["3"]
    assert f.applied("m").version == "3" and not f.lagging("m")


def test_a_version_that_fails_to_load_leaves_the_replica_lagging_until_a_later_one_loads():
    applied: list = []
    f = follower(applied, fail={"bad"})
    f.offer(ModelVersion("m", "bad", 2))
    assert f.lagging("m") and f.applied("m") == START
    assert f.failures() == {"m": (2, "OSError: cannot load bad")}
    f.offer(ModelVersion("m", "good", 3))  # applied before `offer` returns
    assert not f.lagging("m") and f.applied("m").version == "good"
    assert applied == ["good"] and f.failures() == {}


def test_rules_are_applied_once_in_order():
    applied: list = []
    f = follower(applied)
    f.offer_rules([InvalidationRule(2, 0.0, model="m"), InvalidationRule(1, 0.0, tenant="t")])
    f.offer_rules([InvalidationRule(2, 0.0, model="m")])
    assert applied == [1, 2] and f.rules_seq == 2


def test_contact_is_lost_when_the_actor_stays_silent():
    now = [0.0]
    f = follower([], clock=lambda: now[0])
    assert f.in_contact()
    now[0] = 100.0
    assert not f.in_contact()
