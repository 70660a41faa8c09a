"""The default policy follows the best of its sampled simulations: it keeps within the bounds of
LRU where recency wins (chat sessions), keeps a loop's stable part where LRU has none, and its
hit ratio does not fall as the cache grows. Workloads are generated here, small enough for
seconds (`cluster.simulation.workloads`)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from cluster.local.policies import make_policy
from cluster.local.policies.adaptive import CONFIGS, AdaptiveTinyLFUPolicy, Config, sample_rate
from cluster.simulation import workloads
from cluster.simulation.simulate import replay


def hit_ratio(name: str, capacity: int, keys: np.ndarray) -> float:
    """Hit ratio (%) of policy `name` with `capacity` unit-charge keys over `keys`."""
    return 100.0 * replay(make_policy(name, capacity), keys) / len(keys)


CHAT = workloads.chat(40_000, window=600, turns=6, keys=4, seed=3)


def test_sample_rate_leaves_enough_entries_per_simulation() -> None:
    assert sample_rate(1_000, 512, 64) == 1
    assert sample_rate(2_048, 512, 64) == 4
    assert sample_rate(10**7, 512, 64) == 64
    assert sample_rate(10**7, 512, 1) == 1


@pytest.mark.parametrize("capacity", [100, 400, 1_600])
def test_chat_sessions_stay_within_two_points_of_lru(capacity: int) -> None:
    assert hit_ratio("adaptive", capacity, CHAT) >= hit_ratio("lru", capacity, CHAT) - 2.0


def test_a_loop_keeps_its_stable_part_where_lru_keeps_nothing() -> None:
    keys = workloads.loop(30_000, length=600, noise=0.0)
    assert hit_ratio("lru", 300, keys) == 0.0
    assert hit_ratio("adaptive", 300, keys) > 30.0


@pytest.mark.parametrize(
    "keys",
    [
        CHAT,
        workloads.chat(30_000, hot=0.3, turns=12, keys=6, window=1_500, seed=4),
        workloads.phase(30_000, keys=3_000, phase=8_000, sets=2),
        workloads.scan(30_000, hot=2_000, length=1_000, every=3_000),
        workloads.trend(30_000, keys=5_000, speed=0.1),
    ],
    ids=["chat", "chat-long", "phase", "scan", "trend"],
)
def test_hit_ratio_does_not_fall_as_the_cache_grows(keys: np.ndarray) -> None:
    ratios = [hit_ratio("adaptive", capacity, keys) for capacity in (100, 200, 400, 800, 1_600)]
    drops = [smaller - larger for smaller, larger in itertools.pairwise(ratios)]
    assert max(drops) <= 0.5, ratios


def test_a_sampled_cache_simulates_a_slice_of_the_keys() -> None:
    policy = AdaptiveTinyLFUPolicy(40_000, min_sample_entries=512, max_sample_rate=16)
    for key in range(20_000):
        policy.insert(key)
    simulated = len(policy._simulations[0])
    assert 20_000 / 16 * 0.8 < simulated < 20_000 / 16 * 1.2
    policy.check_integrity()


def test_the_configuration_in_use_changes_only_with_a_lead() -> None:
    policy = AdaptiveTinyLFUPolicy(200)
    start = policy.config
    for key in range(50):  # no simulation is full yet: nothing to compare
        policy.insert(key)
    assert policy.config == start
    replay(policy, workloads.loop(20_000, length=300, noise=0.0))
    assert CONFIGS[policy.config].window_fraction < 1.0  # CLOCK keeps nothing of a loop
    policy.check_integrity()


def test_a_switch_of_admission_rule_alone_leaves_the_margin() -> None:
    """Configurations with the same window differ only in admission: nothing moves, no backoff."""
    configs = (Config(0.01, 0, 0), Config(0.01, 3, 6))
    policy = AdaptiveTinyLFUPolicy(200, configs=configs, initial=1)
    replay(policy, workloads.loop(20_000, length=300, noise=0.0))
    assert policy.config == 0  # strict admission keeps a loop's stable part
    assert policy._margin == policy._switch_margin
    policy.check_integrity()


def test_a_switch_of_admission_rule_is_judged_by_the_requests_the_rules_disagree_on() -> None:
    """Two rules that agree on most requests (a hot set both keep) differ by chance far less
    than sqrt(requests): a steady lead on the rest (a long loop, of which strict admission
    keeps a part) switches soon after the warm-up."""
    configs = (Config(0.01, 0, 0), Config(0.01, 3, 6))
    for seed in range(4):
        policy = AdaptiveTinyLFUPolicy(200, configs=configs, initial=1)
        rng = np.random.default_rng(seed)
        hot = rng.integers(0, 60, 4_000)
        loop = 10_000 + np.arange(4_000) % 1_000
        for key in np.where(rng.random(4_000) < 0.5, loop, hot).tolist():
            if key in policy:
                policy.hit(key)
            else:
                policy.insert(key)
            if policy.config == 0:
                break
        assert policy.config == 0, f"seed {seed}: strict admission never taken"
        assert policy._disagreements[0, 1] < policy._requests / 10
        policy.check_integrity()


def test_a_configuration_behind_during_the_warm_up_starts_behind() -> None:
    """The warm-up's leads are the fill's (large windows flush its leftovers fastest), but a
    configuration that fell behind even so is behind for real."""
    policy = AdaptiveTinyLFUPolicy(200)
    loop = workloads.loop(20_000, length=300, noise=0.0).tolist()
    step = 0
    while policy._warming:
        key = loop[step]
        if key in policy:
            policy.hit(key)
        else:
            policy.insert(key)
        step += 1
    clock = next(i for i, config in enumerate(CONFIGS) if config.window_fraction == 1.0)
    assert policy._scores[clock] < -10  # CLOCK keeps nothing of a loop
    assert policy._scores[policy.config] == 0.0


def test_hit_many_is_hit_for_each_key_still_resident() -> None:
    """An owner that buffers accesses hands them over in batches, some for keys gone since."""
    one_by_one = make_policy("adaptive", 200)
    batched = make_policy("adaptive", 200)
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
    assert sorted(one_by_one._index) == sorted(batched._index)
    one_by_one.check_integrity()
    batched.check_integrity()


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="initial"):
        AdaptiveTinyLFUPolicy(10, initial=len(CONFIGS))
    with pytest.raises(ValueError, match="power of two"):
        AdaptiveTinyLFUPolicy(10, max_sample_rate=3)


ARC_INDEX = next(i for i, config in enumerate(CONFIGS) if config.arc)


def _drive(policy: AdaptiveTinyLFUPolicy, rng: random.Random, steps: int, resident: dict) -> None:
    """Random accesses (random charges), removals and `evict_one` calls, each checked against
    `resident`, the keys the policy has reported resident, and the protocol's promises."""
    for _ in range(steps):
        key = rng.randrange(400)
        roll = rng.random()
        if roll < 0.05:
            policy.remove(key)
            resident.pop(key, None)
        elif roll < 0.08:
            victim = policy.evict_one()
            assert (victim is None) == (not resident)
            resident.pop(victim, None)
        elif key in policy:
            policy.hit(key)
        else:
            before = set(resident)
            evicted = policy.insert(key, rng.choice((1, 1, 1, 2, 5)))
            assert set(evicted) <= before | {key}
            for gone in evicted:
                resident.pop(gone, None)
            if key not in evicted:
                resident[key] = True
        assert set(resident) == {k for k in resident if k in policy}
        assert len(policy) == len(resident)
        assert policy.used <= policy.capacity
        if policy.max_entries is not None:
            assert len(policy) <= policy.max_entries


@pytest.mark.parametrize("max_entries", [None, 90])
def test_switches_to_arc_and_back_keep_every_resident_and_the_bounds(
    max_entries: int | None,
) -> None:
    """A switch moves the residents between the W-TinyLFU and an ARC and evicts nothing; both
    keep the protocol, the capacity and the entry bound."""
    rng = random.Random(11)
    policy = AdaptiveTinyLFUPolicy(300, max_entries=max_entries)
    resident: dict = {}
    for target in (ARC_INDEX, 0, ARC_INDEX, 3, ARC_INDEX, 2, ARC_INDEX, 1):
        _drive(policy, rng, 3_000, resident)
        keys, used = set(resident), policy.used
        policy._adopt(target)
        assert {key for key in keys if key in policy} == keys and len(policy) == len(keys)
        assert policy.used == used
        assert (policy._arc is not None) == CONFIGS[target].arc
        policy.check_integrity()
    _drive(policy, rng, 3_000, resident)
    policy.check_integrity()


def test_hit_many_follows_a_switch_to_arc_midway() -> None:
    policy = AdaptiveTinyLFUPolicy(100)
    for key in range(100):
        policy.insert(key)
    policy._adopt(ARC_INDEX)
    policy.hit_many([*range(50), 500])  # 500 is not resident: skipped
    policy.check_integrity()
    _recent, frequent = policy._arc.residents()
    assert {key for key, _ in frequent} == set(range(50))


def test_where_arc_wins_by_far_the_default_runs_as_arc() -> None:
    keys = workloads.trend(60_000, keys=20_000)
    policy = AdaptiveTinyLFUPolicy(500)
    hits = replay(policy, keys)
    assert policy._arc is not None
    policy.check_integrity()
    arc = hit_ratio("arc", 500, keys)
    assert 100.0 * hits / len(keys) >= arc - 2.0
