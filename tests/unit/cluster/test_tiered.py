"""The tiered lookup's rules, with in-memory tiers (the real ones have integration tests)."""

import asyncio

import pytest

from cluster.keys import ResultKey
from cluster.result_cache import EntryTags, ResultCache
from cluster.tiered import Placement, TieredCache

TAGS = EntryTags("m", "1", "t")
PLACED = Placement(redis_key="ns:m:1:r:k", owner_address="peer:1")


def decode(blob: bytes) -> str:
    if not blob.startswith(b"ok:"):
        raise ValueError("not ours")
    return blob[3:].decode()


class MemoryPeer:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.calls = 0

    async def get_results(self, address, keys, timeout_s):
        self.calls += 1
        return [self.data.get(k) for k in keys]

    async def put_results(self, address, items, timeout_s):
        self.data.update(items)
        return True


class MemoryRedis:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get_many(self, keys):
        return [self.data.get(k) for k in keys]

    async def set_many(self, items, ttl_s=None):
        self.data.update(items)
        return True

    async def delete_many(self, keys):
        return sum(self.data.pop(k, None) is not None for k in keys)


def tiered(peer=None, redis=None, queue_size=64) -> TieredCache[str]:
    local = ResultCache(max_bytes=10_000, max_entries=100)
    return TieredCache(local, decode, peer=peer, redis=redis, queue_size=queue_size)


def computing(value: str, calls: list[int], delay: float = 0.0):
    async def compute():
        calls.append(1)
        await asyncio.sleep(delay)
        return value, f"ok:{value}".encode()

    return compute


@pytest.mark.asyncio
async def test_tiers_are_asked_in_order_and_hits_are_kept_locally():
    peer, redis = MemoryPeer(), MemoryRedis()
    cache = tiered(peer, redis)
    key = ResultKey("k")
    redis.data[PLACED.redis_key] = b"ok:from-redis"
    assert await cache.lookup(key, PLACED, TAGS) == ("from-redis", "redis")
    assert await cache.lookup(key, PLACED, TAGS) == ("from-redis", "local")
    other = ResultKey("other")
    peer.data[other] = b"ok:from-peer"
    assert await cache.lookup(other, PLACED, TAGS) == ("from-peer", "peer")
    assert cache.stats.peer.hits == 1 and cache.stats.redis.hits == 1


@pytest.mark.asyncio
async def test_concurrent_misses_compute_once():
    cache = tiered(MemoryPeer(), MemoryRedis())
    calls: list[int] = []
    results = await asyncio.gather(
        *(
            cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("v", calls, 0.05))
            for _ in range(10)
        )
    )
    assert calls == [1]
    assert results == [("v", None)] * 10
    assert cache.stats.single_flight_waits == 9
    assert await cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("x", calls)) == (
        "v",
        "local",
    )
    await cache.close()


@pytest.mark.asyncio
async def test_computed_values_reach_the_owner_and_redis_in_the_background():
    peer, redis = MemoryPeer(), MemoryRedis()
    cache = tiered(peer, redis)
    await cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("v", []))
    await cache.drain()
    assert peer.data == {"k": b"ok:v"}
    assert redis.data == {PLACED.redis_key: b"ok:v"}
    await cache.close()


@pytest.mark.asyncio
async def test_a_full_store_queue_drops_instead_of_waiting():
    class StuckRedis(MemoryRedis):
        async def set_many(self, items, ttl_s=None):
            await asyncio.sleep(10)

    cache = tiered(redis=StuckRedis(), queue_size=2)
    for i in range(6):
        cache.store(ResultKey(f"k{i}"), b"ok:v", Placement(redis_key=f"r{i}"), TAGS)
    assert cache.stats.stores_dropped >= 3
    await cache.close()


@pytest.mark.asyncio
async def test_a_corrupt_redis_value_is_a_miss_and_is_deleted():
    redis = MemoryRedis()
    redis.data[PLACED.redis_key] = b"garbage"
    cache = tiered(redis=redis)
    assert await cache.lookup(ResultKey("k"), Placement(redis_key=PLACED.redis_key), TAGS) is None
    assert PLACED.redis_key not in redis.data
    assert cache.stats.redis.corrupt == 1


@pytest.mark.asyncio
async def test_a_failed_computation_reaches_every_waiter_and_stores_nothing():
    cache = tiered(redis=MemoryRedis())

    async def explode():
        await asyncio.sleep(0.02)
        raise RuntimeError("model crashed")

    outcomes = await asyncio.gather(
        *(cache.get_or_compute(ResultKey("k"), PLACED, TAGS, explode) for _ in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert ResultKey("k") not in cache.local
    calls: list[int] = []
    assert await cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("v", calls)) == (
        "v",
        None,
    )
    await cache.close()
