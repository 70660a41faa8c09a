"""RedisStore without a Redis: its options are checked at construction, which never connects."""

import logging

import pytest
import redis.asyncio as aioredis

from cluster.sharing.breaker import CircuitBreaker
from cluster.sharing.redis_store import RedisStore

URL = "redis://127.0.0.1:1/0"  # nothing listens there; building a store must not notice


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("socket_timeout_s", 0.0),
        ("connect_timeout_s", -1.0),
        ("socket_read_bytes", 0),
        ("retries", -1),
        ("default_ttl_s", 0.0),
        ("ttl_jitter", 1.0),
        ("max_value_bytes", -1),
        ("max_connections", 0),
    ],
)
def test_a_bad_option_is_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        RedisStore(URL, **{option: value})


@pytest.mark.asyncio
async def test_the_read_size_reaches_redis_py():
    store = RedisStore(URL, socket_read_bytes=1 << 20, client_options={"socket_read_size": 1})
    pool = store._client.connection_pool  # type: ignore[union-attr]
    assert pool.connection_kwargs["socket_read_size"] == 1 << 20  # the store's option wins
    await store.close()


@pytest.mark.asyncio
async def test_a_disabled_store_decodes_nothing():
    def decode(index: int, value: bytes) -> bytes:
        raise AssertionError("nothing was read, so nothing is decoded")

    store = RedisStore(None)
    assert await store.get_many_decoded(["a", "b"], decode) == [None, None]
    assert await store.get_many_decoded([], decode) == []
    stats = store.stats()
    assert (stats.gets, stats.misses, stats.fetches) == (2, 2, 0)


def raising_connection(error: type[Exception]) -> type[aioredis.Connection]:
    """A connection class whose every connect raises `error`, which redis-py never raises."""

    class Raising(aioredis.Connection):
        async def connect(self) -> None:
            raise error("raised by the test")

    return Raising


@pytest.mark.parametrize("error", [RuntimeError, TypeError, KeyError])
@pytest.mark.asyncio
async def test_an_unexpected_exception_from_the_client_is_a_miss_and_a_breaker_failure(
    error, caplog
):
    caplog.set_level(logging.WARNING, logger="cluster.sharing.redis_store")
    store = RedisStore(
        URL,
        breaker=CircuitBreaker(failure_threshold=3),
        client_options={"connection_class": raising_connection(error)},
    )
    assert await store.get_many(["a", "b"]) == [None, None]
    assert not await store.set_many([("a", b"v")])
    assert await store.delete_many(["a"]) == 0
    assert await store.status() == "down"
    stats = store.stats()
    assert (stats.errors, stats.misses, stats.breaker_state, stats.breaker_opened) == (
        3,
        2,
        "open",
        1,
    )
    assert await store.get_many(["a"]) == [None]  # the breaker answers now
    assert store.stats().short_circuited == 1
    unexpected = [r for r in caplog.records if r.getMessage().startswith("Redis client at")]
    assert len(unexpected) == 1 and unexpected[0].exc_info is not None  # once, with traceback
    await store.close()
