"""A tenant's writes to the shared tiers draw on a bucket of its own: a burst, then the rate."""

import pytest

from cluster.sharing.write_budget import TenantWriteBudget


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_tenant_writes_its_burst_then_at_its_rate():
    clock = Clock()
    budget = TenantWriteBudget(bytes_per_s=100, burst_bytes=1000, timer=clock)
    assert budget.take("alice", 600) and budget.take("alice", 400)
    assert not budget.take("alice", 1)
    clock.now = 0.5  # 50 bytes flowed in
    assert budget.take("alice", 50) and not budget.take("alice", 1)
    clock.now = 1000.0  # refilled, never past the burst
    assert not budget.take("alice", 1001) and budget.take("alice", 1000)
    assert (budget.refused, budget.refused_bytes) == (3, 1003)


def test_one_tenant_spending_its_budget_leaves_the_others_theirs():
    budget = TenantWriteBudget(bytes_per_s=1, burst_bytes=100, timer=Clock())
    assert budget.take("mallory", 100) and not budget.take("mallory", 10)
    assert budget.take("alice", 100)


def test_buckets_are_kept_for_a_bounded_number_of_tenants():
    budget = TenantWriteBudget(bytes_per_s=1, burst_bytes=10, timer=Clock(), max_tenants=2)
    for tenant in ("a", "b", "c"):
        assert budget.take(tenant, 10)
    assert budget.take("a", 10)  # forgotten, so full again: the bound costs no refusal
    assert not budget.take("c", 1)


def test_a_budget_needs_a_rate_and_a_burst():
    with pytest.raises(ValueError):
        TenantWriteBudget(bytes_per_s=0, burst_bytes=1)
