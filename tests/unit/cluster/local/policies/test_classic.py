"""Behaviour of the classic policies: LRU, LFU, S3-FIFO, SIEVE and ARC."""

from __future__ import annotations

from cluster.local.policies import make_policy
from cluster.local.policies.arc import ARCPolicy
from cluster.local.policies.s3fifo import S3FIFOPolicy


def access(policy, key, charge=1):
    if key in policy:
        policy.hit(key)
        return []
    return policy.insert(key, charge)


def test_lru_evicts_the_least_recently_used() -> None:
    policy = make_policy("lru", 3)
    for key in "abc":
        access(policy, key)
    access(policy, "a")
    assert access(policy, "d") == ["b"]
    assert access(policy, "e") == ["c"]
    assert policy.evict_one() == "a"


def test_lru_evicts_several_for_a_heavy_newcomer() -> None:
    policy = make_policy("lru", 10)
    for key in "abcde":
        access(policy, key, 2)
    assert access(policy, "big", 5) == ["a", "b", "c"]
    assert policy.used == 9


def test_lfu_evicts_the_least_frequent_then_the_least_recent() -> None:
    policy = make_policy("lfu", 3)
    for key in "abc":
        access(policy, key)
    for _ in range(3):
        access(policy, "a")
    access(policy, "c")
    assert access(policy, "d") == ["b"]  # b: 1 access; c: 2; a: 4
    assert access(policy, "e") == ["d"]  # d and e tie at 1: d is older
    access(policy, "e")
    access(policy, "e")
    assert policy.evict_one() == "c"


def test_lfu_remove_then_evict_finds_the_next_bucket() -> None:
    policy = make_policy("lfu", 3)
    for key in "abc":
        access(policy, key)
    access(policy, "b")
    access(policy, "c")
    access(policy, "c")
    policy.remove("a")  # empties the count-1 bucket
    assert policy.evict_one() == "b"
    policy.check_integrity()


def test_s3fifo_demotes_one_hit_wonders_and_promotes_hit_keys() -> None:
    policy = S3FIFOPolicy(10)  # small queue: 1 unit
    for key in range(10):
        access(policy, key)
    access(policy, 0)  # hit while in small
    evicted = []
    for key in range(100, 105):
        evicted += access(policy, key)
    assert 0 in policy, "a key hit in the small queue moves to main"
    assert 1 in evicted and 2 in evicted, "unhit keys leave from the small queue"


def test_s3fifo_ghost_hit_enters_main() -> None:
    policy = S3FIFOPolicy(10)
    for key in range(11):
        access(policy, key)
    assert 0 not in policy  # evicted from small into the ghost
    access(policy, 0)
    assert 0 in policy._main  # remembered by the ghost: straight to main
    policy.check_integrity()


def test_sieve_keeps_visited_keys_and_moves_the_hand() -> None:
    policy = make_policy("sieve", 3)
    for key in "abc":
        access(policy, key)
    access(policy, "a")
    assert access(policy, "d") == ["b"]  # a is visited: spared, its bit cleared
    assert access(policy, "e") == ["c"]  # the hand continues past b's slot
    assert access(policy, "f") == ["d"]  # d was never visited
    assert "a" in policy
    policy.check_integrity()


def test_arc_promotes_to_t2_and_adapts_on_ghost_hits() -> None:
    policy = ARCPolicy(4)
    for key in "abcd":
        access(policy, key)
    access(policy, "a")  # seen twice: T2
    assert "a" in policy._t2
    access(policy, "e")  # evicts b from T1 into ghost B1
    assert "b" not in policy
    assert "b" in policy._b1
    before = policy.target
    access(policy, "b")  # a B1 hit: T1 should have been larger
    assert policy.target > before
    assert "b" in policy._t2
    policy.check_integrity()


def test_arc_resists_a_scan_better_than_lru() -> None:
    hot = [f"hot{i}" for i in range(50)]
    arc, lru = make_policy("arc", 100), make_policy("lru", 100)
    hits = {"arc": 0, "lru": 0}
    for policy, name in ((arc, "arc"), (lru, "lru")):
        for _ in range(3):
            for key in hot:
                access(policy, key)
        for key in range(200):
            access(policy, f"scan{key}")
        for key in hot:
            hits[name] += key in policy
    assert hits["arc"] == 50
    assert hits["lru"] == 0
