"""One lookup path for cached values: local -> owner peer -> Redis -> compute.

`TieredCache.get_or_compute` answers a key from the first tier that has a value that decodes,
computing it when none does. Concurrent identical misses on one replica wait for a single
computation (single-flight). What a remote tier returns is untrusted: it is decoded by the
caller's `decode_remote` (default: `decode`), which raises on anything malformed, and a value
that fails is a miss, counted as corrupt, and deleted from Redis so it is not served again. A
value that decodes but that an invalidation covers (`StaleValue`) is handled alike and counted
as stale.

Stores go to the local cache at once and to the owner peer and Redis in the background, through
a bounded queue: when the queue is full the store is dropped and counted, so a slow tier never
delays a response. Remote failures are misses (the tiers themselves never raise).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, Protocol, TypeVar

from cluster.keys import ResultKey
from cluster.result_cache import CacheStats, EntryTags, ResultCache

logger = logging.getLogger(__name__)

T = TypeVar("T")
TierName = Literal["local", "peer", "redis"]
DEFAULT_QUEUE_SIZE = 1024


class PeerTier(Protocol):
    """Results held by other replicas (see `cluster.peer.PeerClient`)."""

    async def get_results(
        self, address: str, keys: Sequence[str], timeout_s: float
    ) -> list[bytes | None]: ...

    async def put_results(
        self, address: str, items: Sequence[tuple[str, bytes]], timeout_s: float
    ) -> bool: ...


class RedisTier(Protocol):
    """Results in the shared Redis (see `cluster.redis_store.RedisStore`)."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None
    ) -> bool: ...

    async def delete_many(self, keys: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class Placement:
    """Where a key lives beyond this replica."""

    redis_key: str | None = None
    """Its Redis key; None when the Redis tier is not used."""
    owner_address: str | None = None
    """Peer address of its owner replica; None when this replica owns it (or no peer tier)."""


@dataclass
class TierCounters:
    """Hits, misses and bytes of one remote tier."""

    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    stale: int = 0
    bytes_read: int = 0
    fetch_seconds: float = 0.0
    fetches: int = 0

    def as_cache_stats(self) -> CacheStats:
        return CacheStats(
            hits=self.hits, misses=self.misses, evictions=0, entries=0, bytes=self.bytes_read
        )


@dataclass
class TieredStats:
    """Counters of the remote tiers, single-flight and the background store queue."""

    peer: TierCounters = field(default_factory=TierCounters)
    redis: TierCounters = field(default_factory=TierCounters)
    computed: int = 0
    single_flight_waits: int = 0
    stores_queued: int = 0
    stores_dropped: int = 0
    stores_failed: int = 0


class StaleValue(ValueError):
    """A fetched value is well-formed but no longer valid (an invalidation covers it)."""


class ForeignValue(ValueError):
    """A fetched value is signed under another cluster secret (a rotation, or another cluster
    sharing the Redis): a miss, but never deleted, since its writer may still read it."""


class TieredCache(Generic[T]):
    """Looks keys up tier by tier and computes misses once; see the module docstring."""

    def __init__(
        self,
        local: ResultCache,
        decode: Callable[[bytes], T],
        peer: PeerTier | None = None,
        redis: RedisTier | None = None,
        peer_timeout_s: float = 0.2,
        redis_ttl_s: float | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timer: Callable[[], float] = time.perf_counter,
        decode_remote: Callable[[bytes], T] | None = None,
    ) -> None:
        self.local = local
        self._decode = decode
        self._decode_remote = decode if decode_remote is None else decode_remote
        self._peer = peer
        self._redis = redis
        self._peer_timeout_s = peer_timeout_s
        self._redis_ttl_s = redis_ttl_s
        self._timer = timer
        self._inflight: dict[ResultKey, asyncio.Future[tuple[T, TierName | None]]] = {}
        self._queue: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue(queue_size)
        self._writer: asyncio.Task[None] | None = None
        self.stats = TieredStats()

    async def get_or_compute(
        self,
        key: ResultKey,
        placement: Placement,
        tags: EntryTags,
        compute: Callable[[], Awaitable[tuple[T, bytes]]],
    ) -> tuple[T, TierName | None]:
        """The value of `key` and the tier it came from (None: computed now).

        `compute` returns the value and its encoded bytes; it runs at most once at a time per
        key on this replica. Its exceptions propagate to every waiter, and nothing is stored.
        """
        pending = self._inflight.get(key)
        if pending is None:
            found = await self.lookup(key, placement, tags)
            if found is not None:
                return found
            pending = self._inflight.get(key)  # another task may have started meanwhile
        if pending is not None:
            self.stats.single_flight_waits += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[T, TierName | None]] = (
            asyncio.get_running_loop().create_future()
        )
        self._inflight[key] = future
        try:
            value, encoded = await compute()
            self.stats.computed += 1
            self.store(key, encoded, placement, tags)
            future.set_result((value, None))
            return value, None
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody else must log it
            raise
        finally:
            del self._inflight[key]

    async def lookup(
        self, key: ResultKey, placement: Placement, tags: EntryTags
    ) -> tuple[T, TierName] | None:
        """The value of `key` from the first tier that has a valid one, or None."""
        blob = self.local.get(key)
        if blob is not None:
            try:
                return self._decode(blob), "local"
            except ValueError:
                logger.warning("dropping an undecodable local entry %s", key)
                self.local.pop(key)
        if self._peer is not None and placement.owner_address is not None:
            found = await self._from_peer(key, placement.owner_address)
            if found is not None:
                self.local.put(key, found[1], tags)
                return found[0], "peer"
        if self._redis is not None and placement.redis_key is not None:
            found = await self._from_redis(placement.redis_key)
            if found is not None:
                self.local.put(key, found[1], tags)
                return found[0], "redis"
        return None

    def store(self, key: ResultKey, encoded: bytes, placement: Placement, tags: EntryTags) -> None:
        """Store locally now; to the owner and to Redis in the background (may be dropped)."""
        self.local.put(key, encoded, tags)
        if self._peer is not None and placement.owner_address is not None:
            peer, address = self._peer, placement.owner_address
            self.enqueue(lambda: peer.put_results(address, [(key, encoded)], self._peer_timeout_s))
        if self._redis is not None and placement.redis_key is not None:
            redis, redis_key = self._redis, placement.redis_key
            self.enqueue(lambda: redis.set_many([(redis_key, encoded)], self._redis_ttl_s))

    async def drain(self) -> None:
        """Wait until every queued store has run (tests and shutdown)."""
        await self._queue.join()

    async def close(self) -> None:
        """Stop the background writer (queued stores are abandoned)."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _from_peer(self, key: ResultKey, address: str) -> tuple[T, bytes] | None:
        assert self._peer is not None
        started = self._timer()
        (blob,) = await self._peer.get_results(address, [key], self._peer_timeout_s)
        return self._accept(self.stats.peer, blob, started)

    async def _from_redis(self, redis_key: str) -> tuple[T, bytes] | None:
        assert self._redis is not None
        started = self._timer()
        (blob,) = await self._redis.get_many([redis_key])
        found = self._accept(self.stats.redis, blob, started)
        if blob is not None and found is None:
            await self._redis.delete_many([redis_key])
        return found

    def _accept(
        self, counters: TierCounters, blob: bytes | None, started: float
    ) -> tuple[T, bytes] | None:
        counters.fetches += 1
        counters.fetch_seconds += self._timer() - started
        if blob is None:
            counters.misses += 1
            return None
        try:
            value = self._decode_remote(blob)
        except StaleValue:
            counters.stale += 1
            counters.misses += 1
            return None
        except ValueError:
            counters.corrupt += 1
            counters.misses += 1
            return None
        counters.hits += 1
        counters.bytes_read += len(blob)
        return value, blob

    def enqueue(self, store: Callable[[], Awaitable[object]]) -> None:
        """Run `store` in the background; dropped (and counted) when the queue is full."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())
        try:
            self._queue.put_nowait(store)
            self.stats.stores_queued += 1
        except asyncio.QueueFull:
            self.stats.stores_dropped += 1

    async def _write_forever(self) -> None:
        while True:
            store = await self._queue.get()
            try:
                # Each tier bounds its own calls (socket timeouts, gRPC deadlines).
                if await store() is False:
                    self.stats.stores_failed += 1
            except Exception:  # a store is best effort; the tiers count their own errors
                self.stats.stores_failed += 1
            finally:
                self._queue.task_done()
