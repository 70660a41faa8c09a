"""The local result cache: bounds, policy plumbing, TTL, invalidation, counters, threads."""

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.keys import ResultKey
from cluster.local.policies import policy_names
from cluster.local.result_cache import EXPIRES_AT, EntryTags, ResultCache


def k(name: str) -> ResultKey:
    return ResultKey(name)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_get_returns_what_was_put_and_counts():
    cache = ResultCache(max_bytes=1000, max_entries=10)
    assert cache.get(k("a")) is None
    assert cache.put(k("a"), b"value")
    assert cache.get(k("a")) == b"value"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes == len("a") + len(b"value")
    assert stats.hit_ratio == 0.5


def test_an_entry_keeps_its_decoded_value_beside_its_bytes_and_counts_the_bytes_twice():
    cache = ResultCache(max_bytes=1000, max_entries=10)
    value = ("the", "answer")
    assert cache.put(k("a"), b"value", decoded=value)
    found = cache.get_decoded(k("a"))
    assert found is not None and found[0] == b"value" and found[1] is value
    assert cache.get(k("a")) == b"value"
    assert (
        cache.stats().bytes
        == len("a") + 2 * len(b"value")
        == ResultCache.entry_size(k("a"), b"value", value)
    )
    assert cache.stats().hits == 2
    # A later put without a decoded value replaces both.
    assert cache.put(k("a"), b"other")
    assert cache.get_decoded(k("a")) == (b"other", None)
    assert cache.get_decoded(k("missing")) is None
    assert cache.stats().bytes == len("a") + len(b"other")


def test_lru_policy_evicts_the_least_recently_used():
    cache = ResultCache(max_bytes=10_000, max_entries=3, policy="lru")
    for name in "abc":
        cache.put(k(name), b"x")
    cache.get(k("a"))  # a is now the most recent; b the least
    cache.put(k("d"), b"x")
    assert k("b") not in cache
    assert all(k(name) in cache for name in "acd")
    assert cache.stats().evictions == 1


def test_byte_budget_evicts_as_many_as_needed():
    cache = ResultCache(max_bytes=30, max_entries=100, policy="lru")
    for name in "abc":
        cache.put(k(name), b"123456789")  # 10 bytes each with the key
    cache.put(k("d"), b"1234567890123456789")  # 20 bytes: a and b must go
    assert [name for name in "abcd" if k(name) in cache] == ["c", "d"]
    assert cache.stats().bytes == 30
    assert cache.stats().evictions == 2


@pytest.mark.parametrize("policy", policy_names())
def test_entry_larger_than_budget_is_refused_and_drops_the_old_value(policy):
    cache = ResultCache(max_bytes=10, max_entries=10, policy=policy)
    cache.put(k("a"), b"old")
    assert not cache.put(k("a"), b"x" * 100)
    assert cache.get(k("a")) is None
    assert cache.stats().bytes == 0
    cache.check_integrity()


def test_replacing_a_value_accounts_bytes_once():
    cache = ResultCache(max_bytes=100, max_entries=10)
    cache.put(k("a"), b"12345")
    cache.put(k("a"), b"12")
    assert cache.stats().bytes == 3
    assert len(cache) == 1
    cache.check_integrity()


def test_zero_entries_caches_nothing():
    cache = ResultCache(max_bytes=100, max_entries=0)
    assert not cache.put(k("a"), b"x")
    assert len(cache) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": -1}, {"ttl_s": 0}, {"ttl_jitter": 1.0}, {"policy": "no-such-policy"}],
)
def test_bad_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        ResultCache(**{"max_bytes": 10, "max_entries": 10, **kwargs})


def test_expired_entries_are_never_returned():
    clock = Clock()
    cache = ResultCache(max_bytes=1000, max_entries=10, ttl_s=10, ttl_jitter=0, timer=clock)
    cache.put(k("a"), b"v")
    cache.put(k("b"), b"v", ttl_s=100)
    clock.now = 9.99
    assert cache.get(k("a")) == b"v"
    clock.now = 10.0
    assert k("a") not in cache
    assert cache.get(k("a")) is None
    assert cache.get(k("b")) == b"v"
    stats = cache.stats()
    assert (stats.expirations, stats.entries, stats.bytes) == (1, 1, 2)
    cache.check_integrity()


def test_expired_entries_free_their_budget_on_the_next_write():
    clock = Clock()
    cache = ResultCache(max_bytes=1000, max_entries=100, ttl_s=1, ttl_jitter=0, timer=clock)
    for i in range(50):
        cache.put(k(f"old{i}"), b"v")
    clock.now = 2
    cache.put(k("new"), b"v")
    assert len(cache) == 1
    assert cache.stats().expirations == 50
    cache.check_integrity()


class CountingClock(Clock):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.now


def test_entries_without_lifetime_skip_the_clock():
    clock = CountingClock()
    cache = ResultCache(max_bytes=1000, max_entries=10, timer=clock)
    for name in "abc":
        cache.put(k(name), b"v")
        assert cache.get(k(name)) == b"v"
    assert clock.calls == 0
    cache.put(k("d"), b"v", ttl_s=5)  # the first deadline: from now on writes read the clock
    clock.now = 6  # past 5 s plus its jitter
    assert cache.get(k("d")) is None
    assert cache.get(k("a")) == b"v"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.expirations, stats.entries) == (4, 1, 1, 3)
    cache.check_integrity()


def test_a_due_deadline_among_lifetimeless_entries_frees_its_budget_on_the_next_write():
    clock = Clock()
    cache = ResultCache(max_bytes=1000, max_entries=100, timer=clock)
    cache.put(k("short"), b"v" * 100, ttl_s=1)
    cache.put(k("long"), b"v" * 100)
    clock.now = 0.5
    cache.put(k("x"), b"v")
    assert k("short") in cache
    clock.now = 2
    cache.put(k("y"), b"v")
    stats = cache.stats()
    assert (stats.expirations, stats.entries) == (1, 3)
    assert stats.bytes == sum(
        len(n) + len(v) for n, v in [("long", "v" * 100), ("x", "v"), ("y", "v")]
    )
    cache.check_integrity()


@pytest.mark.parametrize("policy", policy_names())
def test_every_buffered_hit_is_counted_and_replacing_a_value_recharges(policy):
    cache = ResultCache(max_bytes=100_000, max_entries=1000, policy=policy)
    cache.put(k("a"), b"v")
    for _ in range(300):  # more than the buffer holds: drained by gets, then by the put
        assert cache.get(k("a")) == b"v"
    cache.put(k("a"), b"vvvv")
    assert cache.get(k("a")) == b"vvvv"
    stats = cache.stats()
    assert (stats.hits, stats.entries, stats.bytes) == (301, 1, 5)
    cache.check_integrity()


def test_jitter_spreads_deadlines_within_bounds():
    clock = Clock()
    cache = ResultCache(
        max_bytes=10**6, max_entries=1000, ttl_s=100, ttl_jitter=0.2, timer=clock,
        rng=random.Random(3),
    )  # fmt: skip
    for i in range(500):
        cache.put(k(f"{i}"), b"v")
    deadlines = sorted(entry[EXPIRES_AT] for entry in cache._entries.values())
    assert deadlines[0] >= 80 and deadlines[-1] <= 120
    assert deadlines[-1] - deadlines[0] > 30  # really spread, not synchronized
    clock.now = 100
    alive = sum(k(f"{i}") in cache for i in range(500))
    assert 150 < alive < 350


def test_invalidation_by_tags_and_predicate():
    cache = ResultCache(max_bytes=10_000, max_entries=100)
    cache.put(k("m1v1a"), b"x", EntryTags("m1", "1", "alice"))
    cache.put(k("m1v2a"), b"x", EntryTags("m1", "2", "alice"))
    cache.put(k("m1v2b"), b"x", EntryTags("m1", "2", "bob"))
    cache.put(k("m2v1b"), b"x", EntryTags("m2", "1", "bob"))
    assert cache.invalidate(lambda tags: tags.model == "m1" and tags.version == "1") == 1
    assert cache.invalidate(lambda tags: tags.tenant == "bob") == 2
    assert [name for name in ("m1v1a", "m1v2a", "m1v2b", "m2v1b") if k(name) in cache] == ["m1v2a"]
    assert cache.invalidate(lambda tags: tags.model == "m1") == 1
    assert cache.stats().invalidations == 4
    assert cache.stats().bytes == 0
    cache.check_integrity()


def test_invalidation_by_key_and_tags():
    cache = ResultCache(max_bytes=10_000, max_entries=100)
    for name in ("a1", "a2", "b1"):
        cache.put(k(name), b"x", EntryTags("m", name[1], "t"))
    seen: list[tuple[ResultKey, EntryTags]] = []

    def selects(key: ResultKey, tags: EntryTags) -> bool:
        seen.append((key, tags))
        return key.startswith("a") and tags.version == "1"

    assert cache.invalidate_entries(selects) == 1
    assert sorted(seen) == sorted((k(n), EntryTags("m", n[1], "t")) for n in ("a1", "a2", "b1"))
    assert [name for name in ("a1", "a2", "b1") if k(name) in cache] == ["a2", "b1"]
    assert cache.stats().invalidations == 1
    cache.check_integrity()


operations = st.lists(
    st.tuples(
        st.sampled_from(["get", "put", "put_decoded", "pop", "tick", "invalidate"]),
        st.sampled_from("abcdefgh"),
        st.binary(max_size=40),
    ),
    max_size=120,
)


@settings(max_examples=60, deadline=None)
@given(
    operations,
    st.sampled_from(policy_names()),
    st.integers(min_value=0, max_value=150),
    st.integers(min_value=0, max_value=6),
)
def test_bounds_and_accounting_hold_under_any_operations(ops, policy, max_bytes, max_entries):
    clock = Clock()
    cache = ResultCache(max_bytes, max_entries, policy=policy, ttl_s=5, timer=clock)
    for op, name, value in ops:
        if op == "put":
            cache.put(k(name), value, EntryTags(tenant=name))
        elif op == "put_decoded":
            cache.put(k(name), value, EntryTags(tenant=name), decoded=value.hex())
        elif op == "get":
            got = cache.get(k(name))
            assert got is None or isinstance(got, bytes)
        elif op == "pop":
            cache.pop(k(name))
        elif op == "tick":
            clock.now += len(value) / 10
        else:
            cache.invalidate(lambda tags, name=name: tags.tenant == name)
        cache.check_integrity()


@pytest.mark.parametrize("policy", ["tinylfu", "adaptive"])
def test_a_cache_bound_by_entries_keeps_its_hot_set_through_a_scan(policy):
    """The entry bound binds (the byte budget has room): admission still filters the scan."""
    cache = ResultCache(max_bytes=1_000_000, max_entries=100, policy=policy)
    hot = [k(f"hot{i}") for i in range(80)]
    for _ in range(10):
        for key in hot:
            if cache.get(key) is None:
                cache.put(key, b"answer")
    for i in range(1000):
        cache.put(k(f"scan{i}"), b"answer")  # stored in the window, then (mostly) turned away
        assert len(cache) <= 100
    assert sum(cache.get(key) is not None for key in hot) >= 76
    cache.check_integrity()


def test_a_get_never_returns_a_value_older_than_the_last_put():
    cache = ResultCache(max_bytes=10_000, max_entries=100)
    for i in range(200):
        cache.put(k("a"), f"{i}".encode())
        assert cache.get(k("a")) in (None, f"{i}".encode())


def test_concurrent_threads_keep_accounting_exact():
    cache = ResultCache(max_bytes=2_000, max_entries=50)
    lookups_per_thread = sum(1 for i in range(2_000) if i % 3)

    def worker(seed: int) -> None:
        for i in range(2_000):
            key = k(f"{(seed * 7919 + i) % 97}")
            if i % 3:
                cache.get(key)
            else:
                cache.put(key, b"v" * (i % 40))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cache.check_integrity()
    stats = cache.stats()
    assert stats.hits + stats.misses == 4 * lookups_per_thread
