"""The tiered lookup's rules, with in-memory tiers (the real ones have integration tests)."""

import asyncio
import gc
import threading
import time

import pytest

from cluster.keys import ResultKey
from cluster.local.result_cache import EntryTags, ResultCache
from cluster.sharing.tiered import ForeignValue, Placement, StaleValue, TieredCache, TierLookup

TAGS = EntryTags("m", "1", "t")
PLACED = Placement(redis_key="ns:m:1:r:k", owner_address="peer:1")


def decode(blob: bytes, *_: object) -> str:
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
async def test_a_lookup_observer_hears_each_tier_asked_and_how_long_its_fetch_took():
    ticks = iter(range(100))  # each reading of the clock one second later
    peer, redis = MemoryPeer(), MemoryRedis()
    local = ResultCache(max_bytes=10_000, max_entries=100)
    cache = TieredCache(local, decode, peer=peer, redis=redis, timer=lambda: float(next(ticks)))
    redis.data[PLACED.redis_key] = b"ok:from-redis"
    heard: list[TierLookup] = []
    assert await cache.lookup(ResultKey("k"), PLACED, TAGS, heard.append) == ("from-redis", "redis")
    assert heard == [
        TierLookup("local", False),
        TierLookup("peer", False, 1.0),
        TierLookup("redis", True, 1.0),
    ]
    heard.clear()
    found = await cache.get_or_compute(
        ResultKey("k"), PLACED, TAGS, computing("x", []), heard.append
    )
    assert found == ("from-redis", "local") and heard == [TierLookup("local", True)]


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
async def test_a_local_hit_serves_the_value_as_computed_or_fetched_without_decoding_again():
    decoded: list[bytes] = []

    def counting_decode(blob: bytes, *args: object) -> str:
        decoded.append(blob)
        return decode(blob, *args)

    redis = MemoryRedis()
    local = ResultCache(max_bytes=10_000, max_entries=100)
    cache = TieredCache(local, counting_decode, redis=redis)
    computed, fetched, pushed = ResultKey("computed"), ResultKey("fetched"), ResultKey("pushed")
    await cache.get_or_compute(computed, PLACED, TAGS, computing("v", []))
    redis.data["ns:fetched"] = b"ok:from-redis"
    assert await cache.lookup(fetched, Placement(redis_key="ns:fetched"), TAGS) == (
        "from-redis",
        "redis",
    )
    assert decoded == [b"ok:from-redis"]  # the remote value, checked once on arrival
    decoded.clear()
    for _ in range(3):
        assert await cache.lookup(computed, PLACED, TAGS) == ("v", "local")
        assert await cache.lookup(fetched, PLACED, TAGS) == ("from-redis", "local")
    assert decoded == []
    # Bytes stored without their value (an owner's push from a peer) are decoded on a hit.
    local.put(pushed, b"ok:pushed", TAGS)
    assert await cache.lookup(pushed, PLACED, TAGS) == ("pushed", "local")
    assert decoded == [b"ok:pushed"]
    # The peers still get the bytes.
    assert local.peek(computed) == b"ok:v"
    await cache.close()


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


@pytest.mark.asyncio
async def test_cancelling_the_first_of_three_identical_requests_leaves_the_others_their_answer():
    cache = tiered(MemoryPeer(), MemoryRedis())
    calls: list[int] = []
    requests = [
        asyncio.ensure_future(
            cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("v", calls, 0.05))
        )
        for _ in range(3)
    ]
    await asyncio.sleep(0.01)  # all three wait on the first one's computation
    requests[0].cancel()
    outcomes = await asyncio.gather(*requests, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert outcomes[1:] == [("v", None), ("v", None)]
    assert calls == [1]
    await cache.close()


@pytest.mark.asyncio
async def test_a_computation_every_waiter_left_still_finishes_and_is_stored():
    redis = MemoryRedis()
    cache = tiered(redis=redis)
    calls: list[int] = []
    request = asyncio.ensure_future(
        cache.get_or_compute(ResultKey("k"), PLACED, TAGS, computing("v", calls, 0.03))
    )
    await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.sleep(0.05)
    await cache.drain()
    assert calls == [1]
    assert cache.local.get(ResultKey("k")) == b"ok:v"
    assert redis.data == {PLACED.redis_key: b"ok:v"}
    await cache.close()


@pytest.mark.asyncio
async def test_a_failure_nobody_waits_for_any_more_is_not_reported_as_unretrieved(caplog):
    cache = tiered()

    async def explode():
        await asyncio.sleep(0.02)
        raise RuntimeError("model crashed")

    request = asyncio.ensure_future(cache.get_or_compute(ResultKey("k"), PLACED, TAGS, explode))
    await asyncio.sleep(0.005)
    request.cancel()
    await asyncio.sleep(0.05)
    del request  # its traceback holds the computation's task
    gc.collect()  # an unretrieved exception would be reported now
    assert "never retrieved" not in caplog.text
    assert ResultKey("k") not in cache.local


class Failing:
    """A tier every call of which raises `error` (not an error a tier is expected to raise)."""

    def __init__(self, error: type[Exception]) -> None:
        self.error = error
        self.calls = 0

    def fail(self):
        self.calls += 1
        raise self.error("the tier is broken")

    async def get_results(self, address, keys, timeout_s):
        self.fail()

    async def put_results(self, address, items, timeout_s):
        self.fail()

    async def get_many(self, keys):
        self.fail()

    async def set_many(self, items, ttl_s=None):
        self.fail()

    async def delete_many(self, keys):
        self.fail()


@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError, AttributeError])
@pytest.mark.asyncio
async def test_tiers_raising_anything_on_every_call_never_fail_a_request(error, caplog):
    peer, redis = Failing(error), Failing(error)
    cache = tiered(peer, redis)
    for i in range(20):
        outcome = await cache.get_or_compute(
            ResultKey(f"k{i}"), PLACED, TAGS, computing(f"v{i}", [])
        )
        assert outcome == (f"v{i}", None)
    await cache.drain()
    stats = cache.stats
    assert (stats.peer.errors, stats.peer.misses) == (20, 20)
    assert (stats.redis.errors, stats.redis.misses) == (20, 20)
    assert stats.stores_failed == 40 and stats.computed == 20
    assert peer.calls == redis.calls == 40  # a fetch and a store each
    # Logged once per kind of call (peer fetch, Redis fetch, background store), not per call.
    warnings = [r for r in caplog.records if r.name == "cluster.sharing.tiered"]
    assert len(warnings) == 3
    await cache.close()


@pytest.mark.asyncio
async def test_a_decoder_raising_anything_is_a_miss_and_the_value_is_kept():
    redis = MemoryRedis()
    redis.data[PLACED.redis_key] = b"ok:fine"

    def broken(blob: bytes, *_: object) -> str:
        raise TypeError("a bug in the decoder")

    cache = TieredCache(ResultCache(10_000, 100), decode, redis=redis, decode_remote=broken)
    placement = Placement(redis_key=PLACED.redis_key)
    assert await cache.lookup(ResultKey("k"), placement, TAGS) is None
    assert (cache.stats.redis.errors, cache.stats.redis.misses) == (1, 1)
    assert redis.data == {PLACED.redis_key: b"ok:fine"}  # the decoder failed, not the value


@pytest.mark.asyncio
async def test_a_value_under_another_secret_is_a_miss_and_is_not_deleted():
    redis = MemoryRedis()
    redis.data[PLACED.redis_key] = b"ok:another cluster's"

    def foreign(blob: bytes, *_: object) -> str:
        raise ForeignValue("signed under another secret")

    cache = TieredCache(ResultCache(10_000, 100), decode, redis=redis, decode_remote=foreign)
    assert await cache.lookup(ResultKey("k"), Placement(redis_key=PLACED.redis_key), TAGS) is None
    assert (cache.stats.redis.foreign, cache.stats.redis.corrupt) == (1, 0)
    assert PLACED.redis_key in redis.data


@pytest.mark.asyncio
async def test_a_stale_value_is_a_miss_and_is_deleted():
    redis = MemoryRedis()
    redis.data[PLACED.redis_key] = b"ok:old"

    def stale(blob: bytes, *_: object) -> str:
        raise StaleValue("invalidated")

    cache = TieredCache(ResultCache(10_000, 100), decode, redis=redis, decode_remote=stale)
    assert await cache.lookup(ResultKey("k"), Placement(redis_key=PLACED.redis_key), TAGS) is None
    assert cache.stats.redis.stale == 1
    assert PLACED.redis_key not in redis.data


def selecting(key: ResultKey):
    return lambda candidate, tags: candidate == key


@pytest.mark.asyncio
async def test_an_invalidation_during_a_computation_keeps_its_answer_out_of_every_cache():
    peer, redis = MemoryPeer(), MemoryRedis()
    cache = tiered(peer, redis)
    key, calls = ResultKey("k"), []
    first = asyncio.ensure_future(
        cache.get_or_compute(key, PLACED, TAGS, computing("old", calls, 0.05))
    )
    joined = asyncio.ensure_future(
        cache.get_or_compute(key, PLACED, TAGS, computing("unused", calls))
    )
    await asyncio.sleep(0.01)
    cache.local.put(key, b"ok:older", TAGS)  # say, fetched from a tier meanwhile
    assert cache.invalidate(selecting(key)) == 1
    # A request after the invalidation does not join the old computation: it computes afresh.
    after = asyncio.ensure_future(cache.get_or_compute(key, PLACED, TAGS, computing("new", calls)))
    assert await first == ("old", None) and await joined == ("old", None)
    assert await after == ("new", None)
    await cache.drain()
    assert cache.stats.invalidated_in_flight == 1
    assert len(calls) == 2
    # Only what was computed after the invalidation was stored, anywhere.
    assert cache.local.get(key) == b"ok:new"
    assert peer.data == {key: b"ok:new"} and redis.data == {PLACED.redis_key: b"ok:new"}
    await cache.close()


@pytest.mark.asyncio
async def test_an_invalidation_selects_by_key_and_tags_and_spares_the_rest():
    cache = tiered(redis=MemoryRedis())
    other_tags = EntryTags("m", "2", "t")
    cache.local.put(ResultKey("a"), b"ok:a", TAGS)
    cache.local.put(ResultKey("b"), b"ok:b", other_tags)
    calls: list[int] = []
    flights = [
        asyncio.ensure_future(
            cache.get_or_compute(ResultKey(name), PLACED, tags, computing(name, calls, 0.03))
        )
        for name, tags in (("c", TAGS), ("d", other_tags))
    ]
    await asyncio.sleep(0.01)
    assert cache.invalidate(lambda key, tags: tags.version == "1") == 1
    await asyncio.gather(*flights)
    assert ResultKey("a") not in cache.local and ResultKey("c") not in cache.local
    assert ResultKey("b") in cache.local and ResultKey("d") in cache.local
    await cache.close()


@pytest.mark.asyncio
async def test_an_invalidation_from_another_thread_runs_on_the_event_loop():
    cache = tiered(redis=MemoryRedis())
    key, calls = ResultKey("k"), []
    flight = asyncio.ensure_future(
        cache.get_or_compute(key, PLACED, TAGS, computing("old", calls, 0.05))
    )
    await asyncio.sleep(0.01)
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def selects(candidate: ResultKey, tags: EntryTags) -> bool:
        seen.append(threading.get_ident())
        return candidate == key

    assert await asyncio.to_thread(cache.invalidate, selects) == 0
    assert seen and set(seen) == {loop_thread}
    assert await flight == ("old", None)
    assert key not in cache.local and cache.stats.invalidated_in_flight == 1
    await cache.close()


@pytest.mark.asyncio
async def test_an_invalidation_the_loop_cannot_run_in_time_times_out_and_does_nothing():
    cache = tiered()
    key = ResultKey("k")
    cache.local.put(key, b"ok:v", TAGS)
    await cache.get_or_compute(key, PLACED, TAGS, computing("unused", []))  # binds the loop
    outcome: list[BaseException | int] = []

    def invalidate() -> None:
        try:
            outcome.append(cache.invalidate(selecting(key), timeout_s=0.05))
        except TimeoutError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=invalidate)
    thread.start()
    time.sleep(0.2)  # the event loop is busy (blocked) meanwhile
    thread.join()
    await asyncio.sleep(0)  # the loop now runs the abandoned call, which does nothing
    assert isinstance(outcome[0], TimeoutError)
    assert key in cache.local


def test_an_invalidation_without_a_running_loop_acts_at_once():
    cache = tiered()
    cache.local.put(ResultKey("k"), b"ok:v", TAGS)
    assert cache.invalidate(selecting(ResultKey("k"))) == 1
    assert ResultKey("k") not in cache.local


@pytest.mark.asyncio
async def test_a_computation_its_last_waiter_abandons_stops_and_stores_nothing():
    cache = tiered()
    calls: list[int] = []
    leaver = asyncio.ensure_future(
        cache.compute_once(
            ResultKey("k"), Placement(), TAGS, computing("v", calls, 0.05), stop_when_abandoned=True
        )
    )
    await asyncio.sleep(0.01)
    leaver.cancel()
    await asyncio.sleep(0)  # the leaver leaves; the computation has not run since
    # Arriving before the cancelled computation ran again: it computes afresh, it does not
    # join (and share the cancellation of) the abandoned one.
    assert not cache.in_flight(ResultKey("k"))
    value, tier = await cache.get_or_compute(
        ResultKey("k"), Placement(), TAGS, computing("w", calls)
    )
    assert (value, tier) == ("w", None)
    with pytest.raises(asyncio.CancelledError):
        await leaver
    assert calls == [1, 1]
    assert cache.local.get(ResultKey("k")) == b"ok:w"
    await cache.close()


@pytest.mark.asyncio
async def test_a_computation_another_request_waits_for_survives_an_abandoning_stream():
    cache = tiered()
    calls: list[int] = []
    compute = computing("v", calls, 0.05)
    leaver = asyncio.ensure_future(
        cache.compute_once(ResultKey("k"), Placement(), TAGS, compute, stop_when_abandoned=True)
    )
    await asyncio.sleep(0.01)
    stayer = asyncio.ensure_future(cache.get_or_compute(ResultKey("k"), Placement(), TAGS, compute))
    await asyncio.sleep(0.01)
    leaver.cancel()
    assert await stayer == ("v", None)
    assert calls == [1]
    await cache.close()
