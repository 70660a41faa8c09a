"""The contract of `cluster.local.policies.base.EvictionPolicy`, checked against every
registered policy.

Like cachetools' `CacheTestMixin`: one body of tests, parametrized by policy name, drives random
workloads (hypothesis) with random charges and compares the policy with a model of what must
be resident, calling `check_integrity()` after every operation.
"""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.local.policies import (
    DEFAULT_POLICY,
    EvictionPolicy,
    bounds_entries,
    make_policy,
    policy_names,
)

KEYS: list[Hashable] = [*range(12), "alpha", "beta", "gamma", b"delta", ("tuple", 1)]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("access"), st.sampled_from(KEYS), st.integers(1, 12)),
        st.tuples(st.just("remove"), st.sampled_from(KEYS), st.just(0)),
        st.tuples(st.just("evict_one"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


class Model:
    """What must be resident: the policy's own answers, checked for consistency."""

    def __init__(self, policy: EvictionPolicy) -> None:
        self.policy = policy
        self.charges: dict[Hashable, int] = {}

    def access(self, key: Hashable, charge: int) -> None:
        policy = self.policy
        if key in policy:
            assert key in self.charges
            policy.hit(key)
            assert key in policy, "a hit evicted the key"
            return
        assert key not in self.charges
        before = set(self.charges)
        evicted = policy.insert(key, charge)
        assert len(evicted) == len(set(evicted)), f"duplicates in {evicted}"
        for gone in evicted:
            assert gone not in policy, f"{gone!r} returned as evicted but still resident"
            assert gone in before or gone == key, f"{gone!r} evicted but was never resident"
            self.charges.pop(gone, None)
        if charge > policy.capacity:
            assert evicted == [key], "an oversized newcomer must be rejected alone"
        if key in evicted:
            assert key not in policy
        else:
            assert key in policy, "a newcomer neither admitted nor returned"
            self.charges[key] = charge
        for kept in before - set(evicted):
            assert kept in policy, f"{kept!r} vanished without being returned"

    def remove(self, key: Hashable) -> None:
        self.policy.remove(key)
        self.charges.pop(key, None)
        assert key not in self.policy

    def evict_one(self) -> None:
        victim = self.policy.evict_one()
        if not self.charges:
            assert victim is None
            return
        assert victim in self.charges, f"evict_one returned non-resident {victim!r}"
        assert victim not in self.policy
        del self.charges[victim]

    def check(self) -> None:
        policy = self.policy
        policy.check_integrity()
        assert len(policy) == len(self.charges)
        assert policy.used == sum(self.charges.values())
        assert policy.used <= policy.capacity
        assert all(key in policy for key in self.charges)


def run(model: Model, ops: list[tuple[str, Hashable, int]]) -> None:
    model.check()
    for op, key, charge in ops:
        if op == "access":
            model.access(key, charge)
        elif op == "remove":
            model.remove(key)
        else:
            model.evict_one()
        model.check()


every_policy = pytest.mark.parametrize("name", policy_names())


@every_policy
def test_every_policy_keeps_the_protocol(name: str) -> None:
    assert isinstance(make_policy(name, 10), EvictionPolicy)


def test_default_policy_is_registered() -> None:
    assert DEFAULT_POLICY in policy_names()
    assert DEFAULT_POLICY == "adaptive"


def test_expected_policies_are_registered() -> None:
    expected = {"lru", "lfu", "tinylfu", "s3fifo", "sieve", "arc", "adaptive"}
    assert expected <= set(policy_names())


def test_unknown_policy_and_negative_capacity_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope", 10)
    with pytest.raises(ValueError, match="capacity"):
        make_policy("lru", -1)
    with pytest.raises(ValueError, match="max_entries"):
        make_policy("tinylfu", 10, max_entries=-1)


@every_policy
def test_an_entry_bound_reaches_the_policies_that_keep_it(name: str) -> None:
    policy = make_policy(name, 1000, max_entries=3)
    evicted: list[object] = []
    for key in range(20):
        evicted += policy.insert(key)
        if not bounds_entries(name):
            while len(policy) > 3:  # the owner keeps the bound
                evicted.append(policy.evict_one())
        assert len(policy) <= 3
        policy.check_integrity()
    assert len(policy) + len(evicted) == 20
    assert bounds_entries(name) == (name in {"tinylfu", "adaptive"})


@every_policy
@settings(max_examples=120, deadline=None)
@given(capacity=st.integers(0, 30), ops=operations)
def test_random_workloads_keep_the_contract(
    name: str, capacity: int, ops: list[tuple[str, Hashable, int]]
) -> None:
    run(Model(make_policy(name, capacity)), ops)


@every_policy
@settings(max_examples=60, deadline=None)
@given(capacity=st.integers(1, 8), ops=operations)
def test_unit_charges_never_exceed_the_entry_count(
    name: str, capacity: int, ops: list[tuple[str, Hashable, int]]
) -> None:
    model = Model(make_policy(name, capacity))
    run(model, [(op, key, 1) for op, key, _ in ops])
    assert len(model.policy) <= capacity


@every_policy
def test_newcomer_larger_than_capacity_is_rejected(name: str) -> None:
    policy = make_policy(name, 10)
    for key in range(5):
        policy.insert(key, 2)
    assert policy.insert("huge", 11) == ["huge"]
    assert "huge" not in policy
    assert len(policy) == 5
    policy.check_integrity()


@every_policy
def test_empty_policy(name: str) -> None:
    policy = make_policy(name, 5)
    assert len(policy) == 0
    assert policy.used == 0
    assert policy.evict_one() is None
    policy.remove("absent")
    policy.check_integrity()


@every_policy
def test_long_workload_with_variable_charges(name: str) -> None:
    """Thousands of operations: long enough for sketch aging and window adaptation to run."""
    rng = random.Random(1)
    model = Model(make_policy(name, 40))
    for step in range(6000):
        roll = rng.random()
        key = int(rng.paretovariate(1.2)) % 120 if step % 7 else 1000 + step
        if roll < 0.9:
            model.access(key, rng.choice((1, 1, 1, 2, 3, 5)))
        elif roll < 0.97:
            model.remove(key)
        else:
            model.evict_one()
        model.policy.check_integrity()
        assert model.policy.used <= 40
    model.check()
