"""The default policy adapts: window by hill climbing, admission rule by a race of three
miniatures; shadows run on a spatial sample of the keys of a large cache."""

from __future__ import annotations

import numpy as np
import pytest

from cluster.local.policies import adaptive as adaptive_module
from cluster.local.policies import make_policy
from cluster.local.policies import tinylfu as tinylfu_module
from cluster.local.policies.adaptive import (
    GRADED,
    STRICT,
    WORN,
    AdaptiveTinyLFUPolicy,
    HillClimber,
    sample_rate,
)
from cluster.local.policies.tinylfu import SAMPLED


def replay(policy, keys) -> int:
    hits = 0
    for key in keys:
        if key in policy:
            policy.hit(key)
            hits += 1
        else:
            policy.insert(key)
    return hits


def shifting_working_sets(capacity: int, phases: int) -> list[int]:
    """Recency-friendly: a working set of 3/4 of the capacity, replaced every 15 capacities."""
    rng = np.random.default_rng(3)
    size = 3 * capacity // 4
    keys: list[int] = []
    for phase in range(phases):
        keys += (phase * size + rng.integers(0, size, 15 * capacity)).tolist()
    return keys


def zipf(capacity: int, requests: int) -> list[int]:
    """Frequency-friendly: Zipf(0.9) over 25 capacities' worth of keys."""
    rng = np.random.default_rng(5)
    weights = np.arange(1, 25 * capacity + 1) ** -0.9
    return rng.choice(len(weights), size=requests, p=weights / weights.sum()).tolist()


def test_hill_climber_follows_caffeine_rule() -> None:
    climber = HillClimber(1000, decay=0.98)  # Caffeine's decay
    assert climber.step == -62.5  # Caffeine's first move shrinks
    assert climber.adjustment(0.50) == -62.5  # a 50-point change: restart at full step
    climber.orient(grow=True)
    assert climber.adjustment(0.52) == 62.5  # no drop: keep going, decay the step
    assert climber.step == pytest.approx(61.25)
    assert climber.adjustment(0.51) == pytest.approx(-61.25)  # a drop: reverse
    assert climber.adjustment(0.40) == pytest.approx(60.025)  # a big drop: reverse, restart
    assert climber.step == pytest.approx(62.5)
    assert climber.adjustment(0.40) == 0  # no change, no evidence: stay (Caffeine moves on)
    assert climber.step == pytest.approx(62.5)
    assert climber.adjustment(0.41) == 62.5


def test_window_grows_on_a_recency_friendly_workload() -> None:
    capacity = 200
    keys = shifting_working_sets(capacity, phases=12)
    policy = AdaptiveTinyLFUPolicy(capacity)
    hits = replay(policy, keys)
    lru_hits = replay(make_policy("lru", capacity), keys)
    fixed_hits = replay(make_policy("tinylfu", capacity), keys)
    assert policy.window_max >= capacity // 2
    # CLOCK, the lazy LRU of the full window, loses about a point to LRU at each phase change.
    assert hits >= 0.92 * lru_hits
    assert hits >= 1.15 * fixed_hits
    policy.check_integrity()


def test_a_large_cache_heeds_the_yardstick_within_its_first_sample() -> None:
    """A climber sample of a large cache is long (10x its entries): the guard reads the first
    one in parts, so a cache where LRU wins grows its window before that sample ends."""
    capacity = 64_000  # miniatures of 4,000 entries: the first sample is read in 4 parts
    rng = np.random.default_rng(3)
    size = 3 * capacity // 4
    keys: list[int] = []
    for phase in range(4):  # working sets replaced every 2 capacities: LRU's ground
        keys += (phase * size + rng.integers(0, size, 2 * capacity)).tolist()
    split, whole = AdaptiveTinyLFUPolicy(capacity), AdaptiveTinyLFUPolicy(capacity, guard_splits=1)
    split_hits, whole_hits = replay(split, keys), replay(whole, keys)
    assert whole.window_max == capacity // 100  # no climber sample has ended yet
    assert split.window_max >= capacity // 4  # the guard's step, taken within the sample
    assert split_hits > whole_hits
    split.check_integrity()


def test_window_shrinks_on_a_frequency_friendly_workload() -> None:
    capacity = 200
    keys = zipf(capacity, 60_000)
    policy = AdaptiveTinyLFUPolicy(capacity, window_fraction=0.5)
    replay(policy, keys)
    assert policy.window_max <= 0.4 * capacity
    policy.check_integrity()


def test_race_switches_to_the_loop_friendly_admission_once() -> None:
    """A loop larger than the cache: the strict rule keeps a stable part of it from the second
    lap on, the worn one (the start) wears it down and churns; the race adopts strict within a
    few laps, for good."""
    policy = AdaptiveTinyLFUPolicy(100)
    assert policy.rule == WORN
    rules = []
    hits = 0
    for key in list(range(1000)) * 30:
        if key in policy:
            policy.hit(key)
            hits += 1
        else:
            policy.insert(key)
        if not rules or rules[-1][1] != policy.rule:
            rules.append((hits, policy.rule))
    assert [rule for _, rule in rules] == [WORN, STRICT]
    assert rules[1][0] < 0.01 * 30_000  # switched before the loop paid off
    assert hits > 0.08 * 30_000  # OPT would be 9.9%
    policy.check_integrity()


def test_race_adopts_wear_where_an_earlier_phase_freezes_the_main_space() -> None:
    """Phases of 150 keys, each read six times, in a cache of 200: the next phase's keys meet
    victims whose estimates are as high as theirs will get, so the graded and strict rules keep
    the old phase until aging; the worn rule lets each phase in. Started graded, the race
    adopts worn, and beats both fixed rules."""

    def phases(policy: AdaptiveTinyLFUPolicy) -> tuple[int, list[str]]:
        hits = 0
        rules = [policy.rule]
        for phase in range(4):
            for _ in range(6):
                for key in range(1000 * phase, 1000 * phase + 150):
                    if key in policy:
                        policy.hit(key)
                        hits += 1
                    else:
                        policy.insert(key)
                    if policy.rule != rules[-1]:
                        rules.append(policy.rule)
        policy.check_integrity()
        return hits, rules

    raced, rules = phases(AdaptiveTinyLFUPolicy(200, rule=GRADED))
    assert rules == [GRADED, WORN]
    for fixed in (GRADED, STRICT):
        hits, _ = phases(AdaptiveTinyLFUPolicy(200, rule=fixed, adaptive_admission=False))
        assert raced > hits


def test_shadows_can_be_turned_off() -> None:
    policy = AdaptiveTinyLFUPolicy(50, adaptive_admission=False, lru_guard=None)
    replay(policy, list(range(200)) * 20)
    policy.check_integrity()


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="rule"):
        AdaptiveTinyLFUPolicy(10, rule="lenient")
    with pytest.raises(ValueError, match="wear"):
        AdaptiveTinyLFUPolicy(10, wear=0)


def test_sample_rate_leaves_enough_keys_per_miniature() -> None:
    assert sample_rate(1000, 512, 16) == 1
    assert sample_rate(1024, 512, 16) == 2
    assert sample_rate(10_000, 512, 16) == 16
    assert sample_rate(10_000_000, 512, 16) == 16


def test_a_large_cache_shadows_a_sample_of_its_keys() -> None:
    capacity = 16 * 600
    policy = AdaptiveTinyLFUPolicy(capacity)
    keys = zipf(capacity // 25, 40_000)
    replay(policy, [key * 7919 for key in keys] + list(range(10**6, 10**6 + 3 * capacity)))
    shadows = policy._shadows
    assert shadows.rate == 16
    assert shadows.yardstick is not None and shadows.yardstick.capacity == capacity // 16
    assert len(shadows.yardstick) <= capacity // 16
    sampled = sum(policy._index[key][SAMPLED] for key in list(policy._index))
    assert 0.03 < sampled / len(policy) < 0.1
    policy.check_integrity()


def test_shadows_follow_an_owner_that_bounds_entries() -> None:
    """An owner charging bytes and bounding entries with evict_one: shadows stay in scale."""
    policy = AdaptiveTinyLFUPolicy(100_000)  # bytes; 100 entries of 100 bytes fit in 10_000
    for key in range(20_000):
        if key in policy:
            policy.hit(key)
        else:
            policy.insert(key, 100)
        while len(policy) > 100:
            policy.evict_one()
    shadows = policy._shadows
    assert shadows.rate == 1  # settled at the first eviction, from the entry count
    # Occupancy is read mid-insert, before the owner's evict_one: one entry of slack.
    assert shadows.yardstick is not None and shadows.yardstick.capacity <= 10_100
    assert len(shadows.yardstick) <= 101
    policy.check_integrity()


@pytest.mark.parametrize("name", ["tinylfu", "adaptive"])
@pytest.mark.parametrize("loop", ["compiled", "python"])
def test_hit_many_is_hit_for_each_key_still_resident(monkeypatch, name: str, loop: str) -> None:
    """An owner that buffers accesses hands them over in batches, some for keys gone since; the
    compiled loop (`_tinylfu_core.hit_keys`) and its Python twin alike."""
    if loop == "python":
        monkeypatch.setattr(tinylfu_module, "hit_keys", tinylfu_module._hit_keys_python)
        monkeypatch.setattr(adaptive_module, "hit_keys", tinylfu_module._hit_keys_python)
    elif not tinylfu_module.COMPILED:
        pytest.skip("not compiled: test_the_compiled_place_is_built fails")
    one_by_one = make_policy(name, 200)
    batched = make_policy(name, 200)
    rng = np.random.default_rng(5)
    keys = (rng.zipf(1.2, 30_000) % 2_000).tolist()
    pending: list[int] = []
    for key in keys:
        if key in one_by_one:
            one_by_one.hit(key)
            pending.append(key)
            continue
        batched.hit_many(pending)  # as a cache drains its buffer before each write
        pending = [key + 10_000]  # a key never resident: skipped
        assert one_by_one.insert(key) == batched.insert(key)
    batched.hit_many(pending)
    assert one_by_one.requests_so_far() == batched.requests_so_far()
    assert sorted(one_by_one._index) == sorted(batched._index)
    one_by_one.check_integrity()
    batched.check_integrity()
