"""The version rules: generations, idempotence, no going back, adoption, restoring,
subscriptions, publish outcomes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.versions.records import (
    ModelVersion,
    PublishOutcome,
    Subscriptions,
    VersionFormatError,
    VersionRegistry,
    VersionRegression,
)


def test_each_new_version_is_the_next_generation_and_republishing_is_a_no_op():
    registry = VersionRegistry()
    first = registry.publish("m", "1", source="config", now=1.0, seed=0)
    second = registry.publish("m", "2", source="admin", now=2.0, seed=2)
    assert (first.generation, second.generation) == (1, 2)
    assert second.history == ("1",)
    assert registry.publish("m", "2", source="user_config", now=3.0, seed=2) is second
    assert registry.current("m") is second


def test_versions_do_not_go_backwards_unless_forced():
    registry = VersionRegistry()
    registry.publish("m", "1", source="config", now=1.0)
    registry.publish("m", "2", source="admin", now=2.0)
    with pytest.raises(VersionRegression, match="backwards"):
        registry.publish("m", "1", source="admin", now=3.0)
    assert registry.current("m").version == "2"
    back = registry.publish("m", "1", source="admin", now=3.0, force=True)
    assert (back.version, back.generation, back.history) == ("1", 3, ("2",))


def test_the_current_label_with_other_weights_needs_force():
    registry = VersionRegistry()
    registry.publish("m", "1", source="config", now=1.0, seed=0)
    with pytest.raises(VersionRegression, match="other weights"):
        registry.publish("m", "1", source="admin", now=2.0, seed=9)
    assert registry.publish("m", "1", source="admin", now=2.0, seed=9, force=True).generation == 2


def test_adopt_takes_only_newer_generations():
    registry = VersionRegistry([ModelVersion("m", "3", 3)])
    assert not registry.adopt(ModelVersion("m", "2", 2))
    assert registry.adopt(ModelVersion("m", "4", 4))
    assert registry.current("m").version == "4"


@given(
    st.builds(
        ModelVersion,
        model=st.text(min_size=1, max_size=20),
        version=st.text(min_size=1, max_size=20),
        generation=st.integers(1, 2**40),
        source=st.text(max_size=10),
        seed=st.none() | st.integers(0, 2**31),
        checkpoint=st.none() | st.text(max_size=30),
        published_at=st.floats(0, 2e9),
        history=st.lists(st.text(max_size=5), max_size=5).map(tuple),
    )
)
def test_records_round_trip_through_json(record):
    assert ModelVersion.from_json(record.to_json()) == record


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"model": "m"}',
        b'{"model":"m","version":"1","generation":0,"source":"","seed":null,'
        b'"checkpoint":null,"published_at":0,"history":[]}',
        b'{"model":"m","version":"1","generation":1,"source":"","seed":-1,'
        b'"checkpoint":null,"published_at":0,"history":[]}',
        b'{"model":"m","version":"1","generation":1,"source":"","seed":null,'
        b'"checkpoint":null,"published_at":0,"history":[1]}',
        b"\xff" * 10,
        b"{" * 100_000,
    ],
)
def test_malformed_records_are_refused(raw):
    with pytest.raises(VersionFormatError):
        ModelVersion.from_json(raw)


def test_subscriptions_track_leases_and_what_each_replica_applied():
    subscriptions = Subscriptions(lease_s=10)
    registry = VersionRegistry()
    record = registry.publish("m", "1", source="config", now=0.0)
    subscriptions.renew("a", now=0.0)
    subscriptions.acknowledge("b", {"m": 1}, rules_seq=3, failures={}, now=0.0)
    assert subscriptions.alive(now=5.0) == ["a", "b"]
    assert not subscriptions.has_applied("a", "m", record.generation)
    assert subscriptions.has_applied("b", "m", record.generation)
    assert subscriptions.has_rules("b", 3) and not subscriptions.has_rules("b", 4)
    assert subscriptions.lagging(registry, now=5.0) == ["a"]
    subscriptions.acknowledge("a", {}, 0, {"m": (1, "OSError: no such file")}, now=6.0)
    assert subscriptions.failure("a", "m", 1) == "OSError: no such file"
    assert subscriptions.failure("a", "m", 2) is None  # a later version may load
    assert subscriptions.alive(now=12.0) == ["a"]  # b's lease lapsed


def test_subscriptions_know_who_holds_no_weights():
    subscriptions = Subscriptions(lease_s=10)
    subscriptions.acknowledge("replica", {"m": 1}, 0, {}, now=0.0)
    subscriptions.acknowledge("ingress", {"m": 1}, 0, {}, now=0.0, holds_weights=False)
    assert subscriptions.holds_weights("replica") and not subscriptions.holds_weights("ingress")


def test_a_removed_subscriber_is_not_waited_for():
    subscriptions = Subscriptions(lease_s=10)
    subscriptions.renew("a", now=0.0)
    subscriptions.remove("a")
    subscriptions.remove("a")
    assert subscriptions.alive(now=1.0) == []


def test_restoring_brings_back_the_previous_weights_as_the_next_generation():
    registry = VersionRegistry()
    good = registry.publish("m", "1", source="config", now=1.0, seed=0)
    registry.publish("m", "broken", source="admin", now=2.0, checkpoint="/ckpt/broken")
    restored = registry.restore(good, now=3.0)
    assert (restored.version, restored.generation, restored.source) == ("1", 3, "rollback")
    assert restored.same_weights(good.seed, good.checkpoint)
    assert restored.history == ("broken",)  # the failed label is not reused silently
    assert registry.current("m") is restored
    with pytest.raises(VersionRegression):
        registry.publish("m", "broken", source="admin", now=4.0, checkpoint="/ckpt/fixed")


def test_an_outcome_says_whether_it_loaded_nowhere_and_was_rolled_back():
    failed = ModelVersion("m", "broken", 2)
    restored = ModelVersion("m", "1", 3, source="rollback")
    nowhere = PublishOutcome(failed, (), ("c",), {"a": "OSError: x", "b": "OSError: x"})
    assert nowhere.loaded_nowhere and not nowhere.rolled_back and not nowhere.complete
    assert not PublishOutcome(failed, ("a",), (), {"b": "OSError: x"}).loaded_nowhere
    assert not PublishOutcome(failed, (), ("a",)).loaded_nowhere  # nobody answered
    # An ingress applies every version (it drops answers, loads no weights): it proves nothing.
    weightless = PublishOutcome(
        failed, ("ingress-1",), (), {"a": "OSError: x"}, weightless=("ingress-1",)
    )
    assert weightless.loaded_nowhere
    rolled = replace(nowhere, restored=restored)
    assert rolled.rolled_back
    assert rolled.as_json() == {
        "model": "m",
        "version": "broken",
        "generation": 2,
        "acknowledged": [],
        "missing": ["c"],
        "failed": {"a": "OSError: x", "b": "OSError: x"},
        "rolled_back": True,
        "restored": {"version": "1", "generation": 3},
    }
    assert PublishOutcome(failed, ("a",), ()).as_json()["rolled_back"] is False
