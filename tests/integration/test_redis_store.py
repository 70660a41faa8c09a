"""The Redis tier against real redis-servers: plain, stopped, hung, ACL, TLS, Cluster."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis.asyncio as aioredis
from redis.cluster import RedisCluster as SyncRedisCluster

from cluster.sharing.breaker import CircuitBreaker
from cluster.sharing.redis_store import RedisStore, redis_key, redis_key_pattern
from tests.support.processes import RedisServer, free_port
from tests.support.redis_topologies import (
    ACL_PASSWORD,
    ACL_USER,
    RedisClusterNodes,
    RedisNode,
    TlsRedisNode,
    acl_server,
    make_tls_files,
    tls_supported,
)

pytestmark = pytest.mark.integration

MiB = 1024 * 1024
# Generous where a test does not measure failure: the test machine's CPUs are shared.
RELAXED = {"socket_timeout_s": 2.0, "connect_timeout_s": 2.0}


def key(model: str, index: int, version: str = "v1", kind: Any = "r", ns: str = "raycache") -> str:
    return redis_key(ns, model, version, kind, f"{index:08x}")


@contextlib.asynccontextmanager
async def opened(url: str | None, **options: Any) -> AsyncIterator[RedisStore]:
    store = RedisStore(url, **options)
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def server(tmp_path: Path):
    node = RedisNode(tmp_path)
    node.start()
    yield node
    node.stop()


def counting_connection() -> type[aioredis.Connection]:
    """A connection class counting its writes to the socket: one per round trip."""

    class Counting(aioredis.Connection):
        sends = 0

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            type(self).sends += 1
            await super().send_packed_command(command, check_health)

    return Counting


@pytest.mark.asyncio
async def test_many_values_round_trip_in_one_pipeline_each_with_a_jittered_ttl(server):
    connection = counting_connection()
    rng = random.Random(7)
    items = [(key("m", i), rng.randbytes(rng.randrange(0, 4096))) for i in range(200)]
    keys = [k for k, _ in items]
    missing = [key("m", i) for i in range(1000, 1010)]
    admin = server.client()
    async with opened(
        server.url,
        **RELAXED,
        ttl_jitter=0.2,
        default_ttl_s=60,
        max_value_bytes=MiB,
        rng=random.Random(1),
        client_options={"connection_class": connection},
    ) as store:
        assert await store.status() == "up"  # connects: the handshake's writes are not counted
        connection.sends = 0
        assert await store.set_many(items, ttl_s=30.0)
        assert connection.sends == 1
        connection.sends = 0
        got = await store.get_many(missing[:5] + keys + missing[5:])
        assert connection.sends == 1
        assert got == [None] * 5 + [v for _, v in items] + [None] * 5

        ttls = [admin.pttl(k) for k in keys]
        assert all(30_000 * 0.8 - 1_000 <= ttl <= 30_000 * 1.2 for ttl in ttls), ttls
        assert max(ttls) - min(ttls) > 5_000  # jittered, not one shared expiry
        assert await store.set_many([(key("d", 1), b"default ttl")])
        assert 60_000 * 0.8 - 1_000 <= admin.pttl(key("d", 1)) <= 60_000 * 1.2

        too_large, small = (key("big", 1), b"x" * (MiB + 1)), (key("big", 2), b"ok")
        assert not await store.set_many([too_large, small])
        assert admin.exists(too_large[0]) == 0 and admin.get(small[0]) == b"ok"
        assert admin.pttl(small[0]) > 0
        with pytest.raises(ValueError, match="ttl_s"):
            await store.set_many(items[:1], ttl_s=0)

        assert await store.delete_many([*keys[:10], missing[0]]) == 10
        assert await store.get_many(keys[:11]) == [None] * 10 + [items[10][1]]

        stats = store.stats()
        assert (stats.gets, stats.hits, stats.misses) == (221, 201, 20)
        assert (stats.sets, stats.skipped_too_large, stats.errors) == (202, 1, 0)
        assert stats.bytes_read == sum(len(v) for _, v in items) + len(items[10][1])
        assert stats.bytes_written == sum(len(v) for _, v in items) + len(b"default ttl") + 2
        assert stats.deletes == 10
        assert stats.fetches == 2 and 0 < stats.fetch_max_seconds <= stats.fetch_seconds
        assert (stats.breaker_state, stats.breaker_opened) == ("closed", 0)
    admin.close()


def flaky_connection() -> type[aioredis.Connection]:
    """A connection class whose `fail_at`-th reply read after `arm(fail_at)` fails, once, as a
    dropped link; it also records how many GETs each write to the socket carries."""

    class Flaky(aioredis.Connection):
        sent: ClassVar[list[int]] = []
        reads = 0
        fail_at = 0

        @classmethod
        def arm(cls, fail_at: int) -> None:
            cls.sent.clear()
            cls.reads, cls.fail_at = 0, fail_at

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            type(self).sent.append(sum(chunk.count(b"\r\nGET\r\n") for chunk in command))
            await super().send_packed_command(command, check_health)

        async def read_response(self, *args: Any, **kwargs: Any) -> Any:
            type(self).reads += 1
            if type(self).reads == type(self).fail_at:
                await self.disconnect()
                raise aioredis.ConnectionError("dropped by the test")
            return await super().read_response(*args, **kwargs)

    return Flaky


@pytest.mark.asyncio
async def test_values_are_decoded_in_key_order_as_their_replies_arrive(server):
    connection = counting_connection()
    items = [(key("m", i), bytes([i]) * (i * 100_000)) for i in range(1, 9)]
    keys = [k for k, _ in items]
    async with opened(
        server.url, **RELAXED, client_options={"connection_class": connection}
    ) as store:
        assert await store.set_many(items)
        server.client().rpush(key("m", 100), b"a list")  # GET of it is an error reply
        asked = [keys[0], key("m", 99), keys[1], key("m", 100), *keys[2:]]
        calls: list[tuple[int, int]] = []

        def decode(index: int, value: bytes) -> int:
            calls.append((index, len(value)))
            return value[0]

        connection.sends = 0
        got = await store.get_many_decoded(asked, decode)
        assert connection.sends == 1  # one round trip
        assert got == [1, None, 2, None, 3, 4, 5, 6, 7, 8]
        sizes = [len(v) for _, v in items]
        assert calls == list(zip([0, 2, 4, 5, 6, 7, 8, 9], sizes, strict=True))
        stats = store.stats()
        assert (stats.gets, stats.hits, stats.misses, stats.errors) == (10, 8, 2, 1)
        assert stats.bytes_read == sum(len(v) for _, v in items)
        # The error reply was read whole: the connection is still in step.
        assert await store.get_many(keys[:2]) == [v for _, v in items[:2]]
        assert await store.get_many_decoded([], decode) == []


@pytest.mark.asyncio
async def test_what_a_decoder_raises_propagates_without_charging_redis_or_desyncing_the_pool(
    server,
):
    items = [(key("m", i), f"value {i}".encode() * 10_000) for i in range(6)]
    keys = [k for k, _ in items]
    breaker = CircuitBreaker(failure_threshold=1)
    async with opened(server.url, **RELAXED, breaker=breaker, max_connections=1) as store:
        assert await store.set_many(items)

        def refuse_the_second(index: int, value: bytes) -> bytes:
            if index == 1:
                raise ValueError("not for me")
            return value

        with pytest.raises(ValueError, match="not for me"):
            await store.get_many_decoded(keys, refuse_the_second)
        assert store.stats().errors == 0 and store.stats().breaker_state == "closed"
        # The only pooled connection had four replies unread; it was dropped, not reused.
        assert await store.get_many(keys[::-1]) == [v for _, v in items[::-1]]


@pytest.mark.asyncio
async def test_a_cancelled_fetch_leaves_no_unread_replies_in_the_pool(server):
    items = [(key("m", i), bytes([i]) * 1000) for i in range(4)]
    keys = [k for k, _ in items]
    async with opened(server.url, socket_timeout_s=5.0, max_connections=1) as store:
        assert await store.set_many(items)
        with server.paused():
            fetch = asyncio.ensure_future(store.get_many(keys))
            await asyncio.sleep(0.2)
            fetch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await fetch
        assert await store.get_many(keys[1:]) == [v for _, v in items[1:]]


@pytest.mark.asyncio
async def test_a_retry_after_a_dropped_link_asks_only_for_the_replies_not_yet_read(server):
    connection = flaky_connection()
    items = [(key("m", i), bytes([i]) * 50_000) for i in range(8)]
    keys = [k for k, _ in items]
    async with opened(
        server.url, **RELAXED, client_options={"connection_class": connection}
    ) as store:
        assert await store.set_many(items)
        connection.arm(fail_at=4)
        decoded: list[int] = []

        def decode(index: int, value: bytes) -> int:
            decoded.append(index)
            return value[0]

        assert await store.get_many_decoded(keys, decode) == list(range(8))
        assert decoded == list(range(8))  # each value once, in order
        # The retry (after the reconnection's handshake) asks for the 5 replies not read.
        assert [gets for gets in connection.sent if gets] == [8, 5]
        stats = store.stats()
        assert (stats.hits, stats.misses, stats.errors, stats.breaker_state) == (
            8,
            0,
            0,
            "closed",
        )


@pytest.mark.asyncio
async def test_a_failure_midway_keeps_what_arrived_before_it(server):
    connection = flaky_connection()
    items = [(key("m", i), bytes([i]) * 10) for i in range(6)]
    keys = [k for k, _ in items]
    async with opened(
        server.url, **RELAXED, retries=0, client_options={"connection_class": connection}
    ) as store:
        assert await store.set_many(items)
        connection.arm(fail_at=3)
        assert await store.get_many(keys) == [items[0][1], items[1][1], None, None, None, None]
        stats = store.stats()
        assert (stats.hits, stats.misses, stats.errors) == (2, 4, 1)
        assert await store.get_many(keys) == [v for _, v in items]


@pytest.mark.asyncio
async def test_a_stopped_redis_costs_nothing_once_the_breaker_opens_then_is_found_again(
    tmp_path, caplog
):
    server = RedisNode(tmp_path)
    server.start()
    keys = [key("m", i) for i in range(8)]
    breaker = CircuitBreaker(failure_threshold=3, reset_timeout_s=0.5)
    try:
        async with opened(server.url, **RELAXED, breaker=breaker) as store:
            assert await store.set_many([(k, b"v") for k in keys])
            server.stop()
            caplog.set_level(logging.WARNING, logger="cluster.sharing.redis_store")
            for _ in range(3):
                started = time.perf_counter()
                assert await store.get_many(keys) == [None] * 8  # connection refused: fast
                assert time.perf_counter() - started < 1.0
            assert store.stats().breaker_state == "open"

            started = time.perf_counter()
            for _ in range(1000):
                await store.get_many(keys)
            assert await store.status() == "down"
            assert not await store.set_many([(keys[0], b"v")])
            assert time.perf_counter() - started < 0.05
            assert store.stats().short_circuited >= 1001
            unavailable = [r for r in caplog.records if "unavailable" in r.getMessage()]
            assert len(unavailable) == 1  # logged once per opening, not per request
            assert "Redis tier at redis://127.0.0.1" in unavailable[0].getMessage()

            server.start()  # same port, empty
            restarted = time.perf_counter()
            while not await store.set_many([(keys[0], b"back")]):
                assert time.perf_counter() - restarted < 5.0, "the store did not reconnect"
                await asyncio.sleep(0.02)
            assert time.perf_counter() - restarted < breaker.reset_timeout_s + 1.0
            assert await store.get_many(keys[:2]) == [b"back", None]
            assert await store.status() == "up"
            assert store.stats().breaker_state == "closed"
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_redis_absent_at_start_up_then_appearing(tmp_path):
    port = free_port()
    started = time.perf_counter()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=0.3)
    store = RedisStore(f"redis://127.0.0.1:{port}/0", **RELAXED, breaker=breaker)
    try:
        assert time.perf_counter() - started < 0.05  # building connects to nothing
        assert await store.get_many(["raycache:m:v1:r:00"]) == [None]
        assert not await store.set_many([("raycache:m:v1:r:00", b"v")])
        assert await store.status() == "down"
        assert store.stats().breaker_state == "open"
        assert time.perf_counter() - started < 2.0

        server = RedisServer(tmp_path, port=port)
        server.start()
        try:
            appeared = time.perf_counter()
            while await store.status() != "up":
                assert time.perf_counter() - appeared < 5.0, "the store did not connect"
                await asyncio.sleep(0.02)
            assert await store.set_many([("raycache:m:v1:r:00", b"v")])
            assert await store.get_many(["raycache:m:v1:r:00"]) == [b"v"]
        finally:
            server.stop()
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_a_hung_redis_fails_within_the_timeout_then_costs_nothing(tmp_path):
    server = RedisNode(tmp_path)
    server.start()
    keys = [key("m", i) for i in range(4)]
    try:
        async with opened(
            server.url,
            socket_timeout_s=0.05,
            connect_timeout_s=0.1,
            breaker=CircuitBreaker(failure_threshold=3, reset_timeout_s=30.0),
        ) as store:
            assert await store.set_many([(k, b"v") for k in keys])
            assert await store.get_many(keys) == [b"v"] * 4  # a pooled, open connection
            with server.paused():
                for _ in range(3):
                    started = time.perf_counter()
                    assert await store.get_many(keys) == [None] * 4
                    # Two attempts of one timeout each and a backoff, not redis-py's defaults.
                    assert time.perf_counter() - started < 1.0
                stats = store.stats()
                assert stats.breaker_state == "open" and stats.errors == 3
                assert stats.fetch_max_seconds >= 0.05

                started = time.perf_counter()
                for _ in range(1000):
                    assert await store.get_many(keys) == [None] * 4
                assert not await store.set_many([(keys[0], b"w")])
                assert await store.delete_many(keys) == 0
                assert await store.status() == "down"
                assert time.perf_counter() - started < 0.05
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_acl_user_and_password_come_from_the_url(tmp_path):
    server = acl_server(tmp_path)
    base = f"127.0.0.1:{server.port}/0"
    try:
        async with opened(f"redis://{ACL_USER}:{ACL_PASSWORD}@{base}", **RELAXED) as store:
            assert await store.status() == "up"
            assert await store.set_many([(key("m", 1), b"v")])
            assert await store.get_many([key("m", 1)]) == [b"v"]
            # The ACL allows raycache:* only: another key is refused, as a miss, not an error.
            outside = key("m", 1, ns="other")
            assert await store.get_many([outside]) == [None]
            assert not await store.set_many([(outside, b"v")])
            assert store.stats().errors == 2
            assert store.stats().breaker_state == "closed"

        for url in (f"redis://{ACL_USER}:wrong@{base}", f"redis://{base}"):
            async with opened(url, **RELAXED) as store:
                assert await store.status() == "down"
                assert await store.get_many([key("m", 1)]) == [None]
                assert not await store.set_many([(key("m", 1), b"v")])
    finally:
        server.stop()


@pytest.mark.asyncio
@pytest.mark.skipif(not tls_supported(), reason="this redis-server was built without TLS")
async def test_tls_with_a_private_ca(tmp_path):
    files = make_tls_files(tmp_path / "tls")
    server = TlsRedisNode(tmp_path / "redis", files)
    server.start()
    plain = f"127.0.0.1:{server.port}/0"
    try:
        async with opened(server.url, **RELAXED) as store:  # rediss://...?ssl_ca_certs=...
            assert await store.status() == "up"
            assert await store.set_many([(key("m", 1), b"over tls")])
            assert await store.get_many([key("m", 1), key("m", 2)]) == [b"over tls", None]

        options = {"ssl_ca_certs": str(files.ca_cert), "ssl_cert_reqs": "required"}
        async with opened(f"rediss://{plain}", **RELAXED, client_options=options) as store:
            assert await store.get_many([key("m", 1)]) == [b"over tls"]

        # Without the CA the server's certificate is not trusted; without TLS nothing answers.
        for url in (f"rediss://{plain}", f"redis://{plain}"):
            async with opened(url, **RELAXED) as store:
                assert await store.status() == "down"
                assert await store.get_many([key("m", 1)]) == [None]
    finally:
        server.stop()


@pytest.mark.asyncio
async def test_redis_cluster_across_slots_and_purge_on_every_primary(tmp_path):
    nodes = RedisClusterNodes(tmp_path)
    nodes.start()
    admin = SyncRedisCluster(host="127.0.0.1", port=nodes.nodes[0].port, socket_timeout=2)
    items = [(key(model, i), f"{model}-{i}".encode()) for model in ("a", "b") for i in range(150)]
    try:
        async with opened(nodes.url, **RELAXED, ttl_jitter=0.0) as store:
            assert store.is_cluster
            assert await store.status() == "up"
            assert await store.set_many(items, ttl_s=100.0)
            assert all(count > 0 for count in nodes.keys_per_node())
            keys = [k for k, _ in items]
            got = await store.get_many([*keys, key("a", 999)])
            assert got == [v for _, v in items] + [None]
            decoded = await store.get_many_decoded(
                [key("a", 999), *keys[:3]], lambda index, value: (index, value.decode())
            )
            assert decoded == [None, (1, "a-0"), (2, "a-1"), (3, "a-2")]
            assert all(97_000 <= admin.pttl(k) <= 100_000 for k in keys[::15])

            assert await store.purge(redis_key_pattern("raycache", "a"), batch=20, pause_s=0) == 150
            remaining = {k.decode() for k in admin.scan_iter(match="*", count=100)}
            assert remaining == {k for k in keys if k.startswith("raycache:b:")}
            assert await store.delete_many(keys[150:160]) == 10

        # cluster=True selects the cluster client for a plain redis:// URL too.
        seed = f"redis://127.0.0.1:{nodes.nodes[1].port}/0"
        async with opened(seed, cluster=True, **RELAXED) as store:
            assert store.is_cluster
            assert await store.get_many([keys[160], keys[0]]) == [items[160][1], None]
    finally:
        admin.close()
        nodes.stop()


@pytest.mark.asyncio
async def test_purge_removes_exactly_the_matching_keys(server):
    admin = server.client()
    purged = [key("a", i, "v1", kind) for i in range(40) for kind in ("r", "kv")]
    kept = [
        *(key("a", i, "v2") for i in range(30)),
        *(key("b", i, "v1") for i in range(30)),
        *(key("a", i, "v10") for i in range(30)),  # "v1" is not a prefix match
        *(key("a", i, "v1", ns="other") for i in range(30)),
        "raycache:a:v1",  # not a full key: the pattern needs the ':' after the version
    ]
    async with opened(server.url, **RELAXED) as store:
        assert await store.set_many([(k, b"x") for k in purged + kept])
        pattern = redis_key_pattern("raycache", "a", "v1")
        started = time.perf_counter()
        assert await store.purge(pattern, batch=7, pause_s=0.002) == len(purged)
        assert time.perf_counter() - started >= 0.002 * 4  # paused between batches
        assert {k.decode() for k in admin.scan_iter(count=1000)} == set(kept)
        assert await store.purge(pattern, batch=500) == 0
        assert store.stats().deletes == len(purged)
        with pytest.raises(ValueError):
            await store.purge(pattern, batch=0)
    admin.close()


@pytest.mark.asyncio
async def test_a_store_without_url_is_disabled_and_a_closed_one_answers_misses(server):
    async with opened(None) as store:
        assert await store.status() == "disabled"
        assert await store.get_many(["a", "b"]) == [None, None]
        assert not await store.set_many([("a", b"v")])
        assert await store.delete_many(["a"]) == 0
        assert await store.purge("*") == 0
        assert store.stats().misses == 2
    store = RedisStore(server.url, **RELAXED)
    assert await store.set_many([(key("m", 1), b"v")])
    await store.close()
    assert await store.get_many([key("m", 1)]) == [None]
    await store.close()  # twice is fine


@pytest.mark.parametrize(
    ("url", "cluster"),
    [("redis+cluster://127.0.0.1:1/0", False), ("http://127.0.0.1/", None)],
)
def test_conflicting_or_unknown_urls_are_refused_at_construction(url, cluster):
    with pytest.raises(ValueError):
        RedisStore(url, cluster=cluster)


@pytest.mark.asyncio
async def test_the_password_never_reaches_the_logs(caplog):
    caplog.set_level(logging.WARNING, logger="cluster.sharing.redis_store")
    url = f"redis://raycache:hunter2@127.0.0.1:{free_port()}/0"
    async with opened(url, breaker=CircuitBreaker(failure_threshold=1)) as store:
        assert await store.get_many([key("m", 1)]) == [None]
    assert "redis://raycache:***@127.0.0.1" in caplog.text
    assert "hunter2" not in caplog.text
