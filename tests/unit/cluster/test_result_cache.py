"""The local result cache: byte and entry bounds, LRU order, counters, thread safety."""

import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.keys import ResultKey
from cluster.result_cache import ResultCache


def k(name: str) -> ResultKey:
    return ResultKey(name)


def test_get_returns_what_was_put_and_counts():
    cache = ResultCache(max_bytes=1000, max_entries=10)
    assert cache.get(k("a")) is None
    assert cache.put(k("a"), b"value")
    assert cache.get(k("a")) == b"value"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.bytes == len("a") + len(b"value")
    assert stats.hit_ratio == 0.5


def test_least_recently_used_leaves_first():
    cache = ResultCache(max_bytes=10_000, max_entries=3)
    for name in "abc":
        cache.put(k(name), b"x")
    cache.get(k("a"))  # a is now the most recent; b the least
    cache.put(k("d"), b"x")
    assert k("b") not in cache
    assert all(k(name) in cache for name in "acd")
    assert cache.stats().evictions == 1


def test_byte_budget_evicts_as_many_as_needed():
    cache = ResultCache(max_bytes=30, max_entries=100)
    for name in "abc":
        cache.put(k(name), b"123456789")  # 10 bytes each with the key
    cache.put(k("d"), b"1234567890123456789")  # 20 bytes: a and b must go
    assert [name for name in "abcd" if k(name) in cache] == ["c", "d"]
    assert cache.stats().bytes == 30
    assert cache.stats().evictions == 2


def test_entry_larger_than_budget_is_refused_and_drops_the_old_value():
    cache = ResultCache(max_bytes=10, max_entries=10)
    cache.put(k("a"), b"old")
    assert not cache.put(k("a"), b"x" * 100)
    assert cache.get(k("a")) is None
    assert cache.stats().bytes == 0


def test_replacing_a_value_accounts_bytes_once():
    cache = ResultCache(max_bytes=100, max_entries=10)
    cache.put(k("a"), b"12345")
    cache.put(k("a"), b"12")
    assert cache.stats().bytes == 3
    assert len(cache) == 1


def test_zero_entries_caches_nothing():
    cache = ResultCache(max_bytes=100, max_entries=0)
    assert not cache.put(k("a"), b"x")
    assert len(cache) == 0


def test_negative_bounds_are_rejected():
    with pytest.raises(ValueError):
        ResultCache(max_bytes=-1, max_entries=1)


@given(
    st.lists(
        st.tuples(st.sampled_from("abcdefgh"), st.binary(max_size=40), st.booleans()),
        max_size=200,
    ),
    st.integers(min_value=0, max_value=120),
    st.integers(min_value=0, max_value=5),
)
def test_bounds_are_never_exceeded(operations, max_bytes, max_entries):
    cache = ResultCache(max_bytes=max_bytes, max_entries=max_entries)
    for name, value, is_put in operations:
        if is_put:
            cache.put(k(name), value)
        else:
            got = cache.get(k(name))
            assert got is None or isinstance(got, bytes)
        stats = cache.stats()
        assert stats.bytes <= max_bytes
        assert stats.entries <= max_entries
        assert stats.bytes == sum(
            ResultCache.entry_size(key, value) for key, value in cache._entries.items()
        )


def test_concurrent_threads_keep_accounting_exact():
    cache = ResultCache(max_bytes=2_000, max_entries=50)

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
    stats = cache.stats()
    assert stats.bytes == sum(ResultCache.entry_size(a, b) for a, b in cache._entries.items())
    assert stats.bytes <= 2_000 and stats.entries <= 50
    assert stats.hits + stats.misses == 4 * sum(1 for i in range(2_000) if i % 3)
