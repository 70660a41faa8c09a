"""The tiered lookup over a real redis-server: a Redis client that raises anything never fails a
request, and an invalidation during a computation keeps its answer out of Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis

from cluster.keys import ResultKey
from cluster.local.result_cache import EntryTags, ResultCache
from cluster.sharing.breaker import CircuitBreaker
from cluster.sharing.redis_store import RedisStore, redis_key
from cluster.sharing.tiered import Placement, TieredCache
from tests.support.redis_topologies import RedisNode

pytestmark = pytest.mark.integration

TAGS = EntryTags("m", "v1", "t")
RELAXED = {"socket_timeout_s": 2.0, "connect_timeout_s": 2.0}


@pytest.fixture
def server(tmp_path: Path):
    node = RedisNode(tmp_path)
    node.start()
    yield node
    node.stop()


def decode(blob: bytes, *_: object) -> str:
    if not blob.startswith(b"ok:"):
        raise ValueError("not an answer")
    return blob[3:].decode()


def placed(index: int) -> tuple[ResultKey, Placement]:
    key = ResultKey(f"{index:064x}")
    return key, Placement(redis_key=in_redis(index))


def in_redis(index: int) -> str:
    return redis_key("ns", "m", "v1", "r", f"{index:064x}")


def faulty_connection() -> type[aioredis.Connection]:
    """A connection to the real server whose reply reads raise `error` while it is set: the
    command has gone out, its reply stays unread (as after a bug in a client or parser)."""

    class Faulty(aioredis.Connection):
        error: ClassVar[type[Exception] | None] = None

        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            error = type(self).error
            if error is not None:
                raise error("raised by the test")
            return await super().read_response(*args, **kwargs)

    return Faulty


def computing(value: str, delay: float = 0.0):
    async def compute() -> tuple[str, bytes]:
        await asyncio.sleep(delay)
        return value, f"ok:{value}".encode()

    return compute


@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError])
@pytest.mark.asyncio
async def test_a_redis_client_raising_anything_on_every_call_never_fails_a_request(server, error):
    connection = faulty_connection()
    store = RedisStore(
        server.url,
        **RELAXED,
        breaker=CircuitBreaker(failure_threshold=3, reset_timeout_s=0.1),
        client_options={"connection_class": connection},
    )
    cache: TieredCache[str] = TieredCache(ResultCache(100_000, 1000), decode, redis=store)
    assert await store.set_many([(in_redis(0), b"ok:before")])

    connection.error = error
    for i in range(1, 21):
        key, placement = placed(i)
        assert await cache.get_or_compute(key, placement, TAGS, computing(f"v{i}")) == (
            f"v{i}",
            None,
        )
    await cache.drain()
    stats = store.stats()
    assert stats.errors >= 3 and stats.breaker_opened >= 1
    assert cache.stats.redis.misses == 20 and cache.stats.computed == 20
    assert server.client().keys("ns:*") == [in_redis(0).encode()]  # written before the fault

    # Once the client behaves again, the breaker's probe finds Redis back, and no connection is
    # left out of step with its replies: each key reads its own value.
    connection.error = None
    await asyncio.sleep(0.15)
    items = [(in_redis(i), f"ok:after {i}".encode()) for i in range(30, 36)]
    assert await store.set_many(items)
    assert await store.get_many([k for k, _ in items]) == [v for _, v in items]
    assert await store.get_many([in_redis(0)]) == [b"ok:before"]
    await cache.close()
    await store.close()


@pytest.mark.asyncio
async def test_an_invalidation_during_a_computation_keeps_its_answer_out_of_redis(server):
    store = RedisStore(server.url, **RELAXED)
    computing_here: TieredCache[str] = TieredCache(ResultCache(100_000, 1000), decode, redis=store)
    elsewhere: TieredCache[str] = TieredCache(ResultCache(100_000, 1000), decode, redis=store)
    key, placement = placed(1)
    first = asyncio.ensure_future(
        computing_here.get_or_compute(key, placement, TAGS, computing("old", 0.1))
    )
    await asyncio.sleep(0.02)
    computing_here.invalidate(lambda candidate, tags: tags.version == "v1")
    assert await first == ("old", None)  # its caller still gets its answer
    await computing_here.drain()
    assert server.client().get(in_redis(1)) is None
    assert await computing_here.lookup(key, placement, TAGS) is None
    assert await elsewhere.lookup(key, placement, TAGS) is None  # another replica neither
    # The next request computes afresh, and that answer is shared as usual.
    assert await computing_here.get_or_compute(key, placement, TAGS, computing("new")) == (
        "new",
        None,
    )
    await computing_here.drain()
    assert await elsewhere.lookup(key, placement, TAGS) == ("new", "redis")
    await computing_here.close()
    await store.close()
