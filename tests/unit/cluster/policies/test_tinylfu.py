"""W-TinyLFU: admission by frequency, scan resistance, the window and its resizing."""

from __future__ import annotations

import pytest

from cluster.policies import make_policy
from cluster.policies.tinylfu import WTinyLFUPolicy


def access(policy, key, charge=1):
    if key in policy:
        policy.hit(key)
        return []
    return policy.insert(key, charge)


def warmed(capacity=100, rounds=3):
    policy = WTinyLFUPolicy(capacity)
    for _ in range(rounds):
        for key in range(capacity):
            access(policy, key)
    return policy


def test_one_hit_wonder_is_rejected_against_a_frequent_victim() -> None:
    policy = warmed()
    access(policy, 1000)  # enters the window
    evicted = access(policy, 1001)  # pushes 1000 out of the window: it meets a victim
    assert evicted == [1000]
    assert 1000 not in policy
    assert sum(key in policy for key in range(100)) >= 98


def test_a_popular_newcomer_is_admitted() -> None:
    policy = warmed()
    for _ in range(6):
        access(policy, 2000)  # one miss, then hits in the window
    evicted = access(policy, 2001)
    assert 2000 in policy
    assert 2000 not in evicted
    assert len(evicted) == 1 and evicted[0] in range(100)


def test_a_scan_does_not_flush_the_hot_set() -> None:
    hot = range(80)
    tinylfu, lru = make_policy("tinylfu", 100), make_policy("lru", 100)
    for policy in (tinylfu, lru):
        for _ in range(10):
            for key in hot:
                access(policy, key)
        for key in range(10_000, 11_000):
            access(policy, key)
    assert sum(key in tinylfu for key in hot) >= 76
    assert sum(key in lru for key in hot) == 0


def test_admit_margin_keeps_a_loop_stable() -> None:
    """A loop of 1000 keys through 100 slots: the discount keeps part of it resident."""
    hits = {}
    for margin in (0, 1):
        policy = WTinyLFUPolicy(100, admit_margin=margin)
        hits[margin] = 0
        for _ in range(20):
            for key in range(1000):
                if key in policy:
                    policy.hit(key)
                    hits[margin] += 1
                else:
                    policy.insert(key)
    assert hits[1] > 0.07 * 20_000  # OPT would be 9.9%
    assert hits[1] > 2 * hits[0]


def test_window_holds_at_least_one_unit_and_rejects_oversized() -> None:
    policy = WTinyLFUPolicy(50, window_fraction=0.0)
    assert policy.window_max == 1
    assert policy.insert("big", 51) == ["big"]
    policy.check_integrity()


def test_resize_window_moves_keys_without_evicting() -> None:
    policy = warmed(capacity=100, rounds=2)
    assert len(policy) == 100
    policy.resize_window(60)
    assert policy.window_max == 60
    assert len(policy) == 100
    policy.check_integrity()
    policy.resize_window(1)
    assert len(policy) == 100
    policy.check_integrity()


def test_charges_bound_the_segments() -> None:
    policy = WTinyLFUPolicy(1000, window_fraction=0.1)
    for key in range(300):
        access(policy, key, charge=1 + key % 17)
        assert policy.used <= 1000
    policy.check_integrity()


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="window_fraction"):
        WTinyLFUPolicy(10, window_fraction=1.5)
    with pytest.raises(ValueError, match="protected_fraction"):
        WTinyLFUPolicy(10, protected_fraction=-0.1)
    with pytest.raises(ValueError, match="admit_margin"):
        WTinyLFUPolicy(10, admit_margin=-1)
