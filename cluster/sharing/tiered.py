"""One lookup path for cached values: local -> owner peer -> Redis -> compute.

`TieredCache.get_or_compute` answers a key from the first tier that has a value that decodes,
computing it when none does. What a remote tier returns is untrusted: it is decoded by the
caller's `decode_remote` (default: `decode`), called with the key and tags it was looked up
for, which raises on anything malformed or recorded for another key (a valid value moved under
this one). A value that fails is a miss, counted as corrupt, and deleted from Redis so it is not
served again. A value that decodes but that an invalidation covers (`StaleValue`) is handled
alike and counted as stale; one signed under another cluster secret (`ForeignValue`) is a miss,
counted as foreign, and left in Redis, since its writer may still read it.

A failing tier is a miss, never an error: whatever a tier call raises (an `Exception`, not a
cancellation), or a decoder raises other than the `ValueError`s above, is counted in the
tier's `errors` and logged at most once a minute per kind of call.

Single-flight: concurrent identical misses on one replica wait for one computation, which runs
as a task of its own, so that it belongs to none of its callers. Cancelling a waiter (the first
one included: Serve cancels the request of a client that disconnects) ends that wait only; the
others get the answer. The computation runs to its end even when every waiter has left, and its
answer is stored (the client's retry is then a hit), except when the last waiter to leave asked
for it to stop (`compute_once(stop_when_abandoned=True)`: a stream, whose client is gone): then
it is cancelled, and stores nothing.

A caller that passes `on_lookup` to `lookup` or `get_or_compute` hears of every tier that call
asked, as a `TierLookup`: whether it answered and, for the peer and Redis, the seconds of the
fetch (the replica's metrics). Per call, so that the caller labels each with what it knows of
the request.

`invalidate` drops matching local entries and marks matching computations in flight: their
answers still reach their waiters but are stored nowhere, and later requests for those keys
compute afresh. It runs on the cache's event loop (from another thread it hops there and waits),
so that it is atomic against a lookup, which decodes a remote value and stores it locally in one
step: an entry is either stored before the invalidation (and dropped by it) or decoded after the
caller's rules changed.

The local tier keeps each value decoded beside its bytes (`ResultCache.get_decoded`): a local
hit serves it without decoding again what this replica computed, or decoded and checked when it
fetched it; the bytes are what other replicas fetch. Only bytes stored without their value (an
owner's push from a peer) are decoded on a local hit.

Stores go to the local cache at once and to the owner peer and Redis in the background, through
a bounded queue: when the queue is full the store is dropped and counted, so a slow tier never
delays a response.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Generic, Literal, Protocol, TypeVar

from cluster.keys import ResultKey
from cluster.local.result_cache import CacheStats, EntryTags, ResultCache
from cluster.sharing.redis_store import redis_key
from cluster.sharing.write_budget import TenantWriteBudget

logger = logging.getLogger(__name__)

T = TypeVar("T")
Decoder = Callable[[bytes, ResultKey, EntryTags], T]
"""`decode(blob, key, tags)`: the value in `blob`, which must be the answer stored for `key`
with `tags`; raises `ValueError` (or `StaleValue`, `ForeignValue`) otherwise."""
TierName = Literal["local", "peer", "redis"]
DEFAULT_QUEUE_SIZE = 1024
ERROR_LOG_INTERVAL_S = 60.0
INVALIDATE_TIMEOUT_S = 10.0


class PeerTier(Protocol):
    """Results held by other replicas (see `cluster.sharing.peer.PeerClient`)."""

    async def get_results(
        self, address: str, keys: Sequence[str], timeout_s: float
    ) -> list[bytes | None]: ...

    async def put_results(
        self, address: str, items: Sequence[tuple[str, bytes]], timeout_s: float
    ) -> bool: ...


class RedisTier(Protocol):
    """Results in the shared Redis (see `cluster.sharing.redis_store.RedisStore`)."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None
    ) -> bool: ...

    async def delete_many(self, keys: Sequence[str]) -> int: ...


@dataclass(frozen=True)
class TierLookup:
    """One tier asked for one key."""

    tier: TierName
    hit: bool
    """Whether it answered with a value that decoded (and that no rule covers)."""
    seconds: float | None = None
    """How long the fetch took, failures included, before decoding; None for the local tier."""


LookupObserver = Callable[[TierLookup], None]


@dataclass(frozen=True)
class Placement:
    """Where a key lives beyond this replica."""

    redis_key: str | None = None
    """Its Redis key; None when the Redis tier is not used."""
    owner_address: str | None = None
    """Peer address of its owner replica; None when this replica owns it (or no peer tier)."""


def result_placement(
    key: ResultKey, tags: EntryTags, owner_address: str | None, namespace: str | None
) -> Placement:
    """Where the result `key` (of `tags`' model and version) lives beyond this replica: with
    its owner replica at `owner_address`, and in Redis under `{namespace}:{model}:{version}:r:
    {key}` unless `namespace` is None (no Redis tier)."""
    redis = None
    if namespace is not None:
        redis = redis_key(namespace, tags.model, tags.version, "r", key)
    return Placement(redis_key=redis, owner_address=owner_address)


@dataclass
class TierCounters:
    """Hits, misses and bytes of one remote tier."""

    hits: int = 0
    misses: int = 0
    """Lookups without a usable value, all causes included (absent, rejected, failed)."""
    corrupt: int = 0
    stale: int = 0
    foreign: int = 0
    """Values signed under another cluster secret."""
    errors: int = 0
    """Calls that raised, and values whose decoder raised something other than a rejection."""
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
    invalidated_in_flight: int = 0
    """Computations whose answer an invalidation kept out of every cache."""
    stores_queued: int = 0
    stores_dropped: int = 0
    stores_failed: int = 0


class _Rejection(enum.Enum):
    """Why a fetched value was not used."""

    ABSENT = "absent"
    STALE = "stale"
    CORRUPT = "corrupt"
    FOREIGN = "foreign"
    FAILED = "failed"


# Rejections that make a value in Redis worth deleting: no replica can use it.
_DELETABLE: Final = frozenset({_Rejection.STALE, _Rejection.CORRUPT})


class StaleValue(ValueError):
    """A fetched value is well-formed but no longer valid (an invalidation covers it)."""


class ForeignValue(ValueError):
    """A fetched value is signed under another cluster secret (a rotation, or another cluster
    sharing the Redis): a miss, but never deleted, since its writer may still read it."""


class _Flight(Generic[T]):
    """One computation in flight and what it was started for."""

    __slots__ = ("invalidated", "key", "tags", "task", "waiters")

    def __init__(self, key: ResultKey, tags: EntryTags) -> None:
        self.key = key
        self.tags = tags
        self.task: asyncio.Task[tuple[T, TierName | None]] | None = None
        self.invalidated = False  # an invalidation selected it: its answer is stored nowhere
        self.waiters = 0


class _ErrorLog:
    """Logs failures at most once per `interval_s` per kind of call, with how many it left out:
    a tier that fails on every call must not flood the log."""

    def __init__(self, timer: Callable[[], float], interval_s: float) -> None:
        self._timer = timer
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def report(self, call: str, exc: BaseException) -> None:
        now = self._timer()
        last = self._last.get(call)
        if last is not None and now - last < self._interval_s:
            self._left_out[call] = self._left_out.get(call, 0) + 1
            return
        self._last[call] = now
        left_out = self._left_out.pop(call, 0)
        logger.warning(
            "%s failed (%s: %.200s); treated as a miss%s",
            call,
            type(exc).__name__,
            exc,
            f" ({left_out} more such failures since the last report)" if left_out else "",
            exc_info=exc,
        )


class TieredCache(Generic[T]):
    """Looks keys up tier by tier and computes misses once; see the module docstring.

    Used from one asyncio event loop (the one it is built on, or else the first that uses it);
    only `invalidate` may be called from other threads.
    """

    def __init__(
        self,
        local: ResultCache,
        decode: Decoder[T],
        peer: PeerTier | None = None,
        redis: RedisTier | None = None,
        peer_timeout_s: float = 0.2,
        redis_ttl_s: float | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        timer: Callable[[], float] = time.perf_counter,
        decode_remote: Decoder[T] | None = None,
        error_log_interval_s: float = ERROR_LOG_INTERVAL_S,
        write_budget: TenantWriteBudget | None = None,
    ) -> None:
        self.local = local
        self._write_budget = write_budget
        self._decode = decode
        self._decode_remote = decode if decode_remote is None else decode_remote
        self._peer = peer
        self._redis = redis
        self._peer_timeout_s = peer_timeout_s
        self._redis_ttl_s = redis_ttl_s
        self._timer = timer
        self._errors = _ErrorLog(timer, error_log_interval_s)
        self._inflight: dict[ResultKey, _Flight[T]] = {}
        # Every flight's task until it ends, invalidated ones included: the event loop keeps
        # only weak references to tasks.
        self._flights: set[asyncio.Task[tuple[T, TierName | None]]] = set()
        self._queue: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue(queue_size)
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = _running_loop()
        self.stats = TieredStats()

    async def get_or_compute(
        self,
        key: ResultKey,
        placement: Placement,
        tags: EntryTags,
        compute: Callable[[], Awaitable[tuple[T, bytes]]],
        on_lookup: LookupObserver | None = None,
    ) -> tuple[T, TierName | None]:
        """The value of `key` and the tier it came from (None: computed now).

        `compute` returns the value and its encoded bytes; it runs at most once at a time per
        key on this replica, in a task of its own (see the module docstring). Its exceptions
        propagate to every waiter, and nothing is stored. Cancelling this call cancels only
        this wait. `on_lookup` hears of each tier asked (none when joining a computation).
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if key not in self._inflight:
            found = await self.lookup(key, placement, tags, on_lookup)
            if found is not None:
                return found
        return await self.compute_once(key, placement, tags, compute)

    async def compute_once(
        self,
        key: ResultKey,
        placement: Placement,
        tags: EntryTags,
        compute: Callable[[], Awaitable[tuple[T, bytes]]],
        stop_when_abandoned: bool = False,
    ) -> tuple[T, None]:
        """The value `compute` returns for `key`, without looking it up: the computation in
        flight for `key` on this replica, or a new one (see `get_or_compute`).

        With `stop_when_abandoned`, cancelling this call when no other call waits for the
        computation cancels the computation too (a stream whose client left: nobody needs the
        answer); otherwise cancelling cancels only this wait.
        """
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        flight = self._inflight.get(key)
        if flight is None:
            flight = self._start(key, placement, tags, compute)
        else:
            self.stats.single_flight_waits += 1
        task = flight.task
        assert task is not None
        flight.waiters += 1
        try:
            value, _ = await asyncio.shield(task)
            return value, None
        except asyncio.CancelledError:
            if stop_when_abandoned and flight.waiters == 1:
                task.cancel()
                # Until the task runs again it is still "in flight": a request arriving now
                # must start afresh, not join a computation that is being cancelled.
                if self._inflight.get(key) is flight:
                    del self._inflight[key]
            raise
        finally:
            flight.waiters -= 1

    def in_flight(self, key: ResultKey) -> bool:
        """Whether a computation of `key` is in flight on this replica (one a new call of
        `compute_once` would join)."""
        return key in self._inflight

    async def lookup(
        self,
        key: ResultKey,
        placement: Placement,
        tags: EntryTags,
        on_lookup: LookupObserver | None = None,
    ) -> tuple[T, TierName] | None:
        """The value of `key` from the first tier that has a valid one, or None; `on_lookup`
        hears of each tier asked."""
        heard = on_lookup or _ignore
        cached = self.local.get_decoded(key)
        if cached is not None:
            blob, value = cached
            if value is not None:  # decoded when it was stored: checked or produced here
                heard(TierLookup("local", True))
                return value, "local"
            try:
                value = self._decode(blob, key, tags)
            except Exception as exc:  # our own bytes: a decoder that refuses them is a bug
                self._errors.report("decoding a local entry", exc)
                self.local.pop(key)
            else:
                heard(TierLookup("local", True))
                return value, "local"
        heard(TierLookup("local", False))
        if self._peer is not None and placement.owner_address is not None:
            found, seconds = await self._from_peer(key, tags, placement.owner_address)
            heard(TierLookup("peer", found is not None, seconds))
            if found is not None:
                self.local.put(key, found[1], tags, decoded=found[0])
                return found[0], "peer"
        if self._redis is not None and placement.redis_key is not None:
            found, seconds = await self._from_redis(key, tags, placement.redis_key)
            heard(TierLookup("redis", found is not None, seconds))
            if found is not None:
                self.local.put(key, found[1], tags, decoded=found[0])
                return found[0], "redis"
        return None

    def store(
        self,
        key: ResultKey,
        encoded: bytes,
        placement: Placement,
        tags: EntryTags,
        value: T | None = None,
    ) -> None:
        """Store locally now (with `value`, the decoded `encoded`, when given: local hits then
        serve it as it is); to the owner and to Redis in the background (may be dropped, and
        is not made when the tenant's write budget is spent)."""
        self.local.put(key, encoded, tags, decoded=value)
        to_peer = self._peer is not None and placement.owner_address is not None
        to_redis = self._redis is not None and placement.redis_key is not None
        budget = self._write_budget
        writes = (to_peer + to_redis) * len(encoded)
        if writes and budget is not None and not budget.take(tags.tenant, writes):
            return
        if self._peer is not None and placement.owner_address is not None:
            peer, address = self._peer, placement.owner_address
            self.enqueue(lambda: peer.put_results(address, [(key, encoded)], self._peer_timeout_s))
        if self._redis is not None and placement.redis_key is not None:
            redis, redis_key = self._redis, placement.redis_key
            self.enqueue(lambda: redis.set_many([(redis_key, encoded)], self._redis_ttl_s))

    def invalidate(
        self,
        selects: Callable[[ResultKey, EntryTags], bool],
        timeout_s: float = INVALIDATE_TIMEOUT_S,
    ) -> int:
        """Drop every local entry for which `selects(key, tags)` is true, and mark every
        computation in flight it selects: its answer reaches its waiters but is stored nowhere
        (not locally, not on the owner peer, not in Redis), and later requests for its key
        compute afresh. Returns how many local entries were dropped.

        Safe from any thread. On the cache's event loop (or when none runs) it acts at once;
        from another thread it runs on the loop (`call_soon_threadsafe`) while the caller
        waits, at most `timeout_s`: then TimeoutError, and nothing was done. `selects` then runs
        on the loop, and should be quick: it is called for every local entry.
        """
        loop = self._loop
        if loop is None or not loop.is_running() or _running_loop() is loop:
            return self._invalidate_here(selects)
        done: concurrent.futures.Future[int] = concurrent.futures.Future()

        def run() -> None:
            if not done.set_running_or_notify_cancel():
                return  # the caller gave up waiting
            try:
                done.set_result(self._invalidate_here(selects))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return done.result(timeout_s)
        except TimeoutError:
            if done.cancel():
                raise TimeoutError(
                    f"the cache's event loop did not run the invalidation within {timeout_s} s"
                ) from None
            return done.result()  # it started meanwhile: wait for its end

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

    def _start(
        self,
        key: ResultKey,
        placement: Placement,
        tags: EntryTags,
        compute: Callable[[], Awaitable[tuple[T, bytes]]],
    ) -> _Flight[T]:
        flight: _Flight[T] = _Flight(key, tags)
        task = asyncio.get_running_loop().create_task(self._fly(flight, placement, compute))
        flight.task = task
        self._inflight[key] = flight
        self._flights.add(task)
        task.add_done_callback(self._landed)
        return flight

    async def _fly(
        self,
        flight: _Flight[T],
        placement: Placement,
        compute: Callable[[], Awaitable[tuple[T, bytes]]],
    ) -> tuple[T, TierName | None]:
        try:
            value, encoded = await compute()
            self.stats.computed += 1
            if flight.invalidated:
                self.stats.invalidated_in_flight += 1
            else:
                self.store(flight.key, encoded, placement, flight.tags, value)
            return value, None
        finally:
            if self._inflight.get(flight.key) is flight:
                del self._inflight[flight.key]

    def _landed(self, task: asyncio.Task[tuple[T, TierName | None]]) -> None:
        self._flights.discard(task)
        if not task.cancelled():
            # Retrieved, so that a failure every waiter left before is not logged as unseen:
            # the waiters that stayed re-raise it.
            task.exception()

    def _invalidate_here(self, selects: Callable[[ResultKey, EntryTags], bool]) -> int:
        for key, flight in list(self._inflight.items()):
            if selects(key, flight.tags):
                flight.invalidated = True
                del self._inflight[key]
        return self.local.invalidate_entries(selects)

    async def _from_peer(
        self, key: ResultKey, tags: EntryTags, address: str
    ) -> tuple[tuple[T, bytes] | None, float]:
        """The owner's value of `key` (None: none usable), and the seconds of the fetch."""
        assert self._peer is not None
        started = self._timer()
        try:
            (blob,) = await self._peer.get_results(address, [key], self._peer_timeout_s)
        except Exception as exc:
            seconds = self._timer() - started
            self._failed(self.stats.peer, "peer fetch", exc, seconds)
            return None, seconds
        seconds = self._timer() - started
        found = self._accept(self.stats.peer, blob, key, tags, seconds)
        return (found if isinstance(found, tuple) else None), seconds

    async def _from_redis(
        self, key: ResultKey, tags: EntryTags, redis_key: str
    ) -> tuple[tuple[T, bytes] | None, float]:
        """Redis's value of `key` (None: none usable), and the seconds of the fetch."""
        assert self._redis is not None
        started = self._timer()
        try:
            (blob,) = await self._redis.get_many([redis_key])
        except Exception as exc:
            seconds = self._timer() - started
            self._failed(self.stats.redis, "Redis fetch", exc, seconds)
            return None, seconds
        seconds = self._timer() - started
        found = self._accept(self.stats.redis, blob, key, tags, seconds)
        if isinstance(found, tuple):
            return found, seconds
        if found in _DELETABLE:
            try:
                await self._redis.delete_many([redis_key])
            except Exception as exc:
                self.stats.redis.errors += 1
                self._errors.report("Redis delete", exc)
        return None, seconds

    def _failed(self, counters: TierCounters, call: str, exc: Exception, seconds: float) -> None:
        counters.fetches += 1
        counters.fetch_seconds += seconds
        counters.errors += 1
        counters.misses += 1
        self._errors.report(call, exc)

    def _accept(
        self,
        counters: TierCounters,
        blob: bytes | None,
        key: ResultKey,
        tags: EntryTags,
        seconds: float,
    ) -> tuple[T, bytes] | _Rejection:
        counters.fetches += 1
        counters.fetch_seconds += seconds
        if blob is None:
            counters.misses += 1
            return _Rejection.ABSENT
        rejection = _Rejection.FAILED
        try:
            value = self._decode_remote(blob, key, tags)
        except StaleValue:
            counters.stale += 1
            rejection = _Rejection.STALE
        except ForeignValue:
            counters.foreign += 1
            rejection = _Rejection.FOREIGN
        except ValueError:
            counters.corrupt += 1
            rejection = _Rejection.CORRUPT
        except Exception as exc:
            counters.errors += 1
            self._errors.report("decoding a fetched value", exc)
        else:
            counters.hits += 1
            counters.bytes_read += len(blob)
            return value, blob
        counters.misses += 1
        return rejection

    def enqueue(self, store: Callable[[], Awaitable[object]]) -> bool:
        """Run `store` in the background; False when it was dropped (and counted) because the
        queue is full."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_forever())
        try:
            self._queue.put_nowait(store)
        except asyncio.QueueFull:
            self.stats.stores_dropped += 1
            return False
        self.stats.stores_queued += 1
        return True

    async def _write_forever(self) -> None:
        while True:
            store = await self._queue.get()
            try:
                # Each tier bounds its own calls (socket timeouts, gRPC deadlines).
                if await store() is False:
                    self.stats.stores_failed += 1
            except Exception as exc:  # a store is best effort
                self.stats.stores_failed += 1
                self._errors.report("a background store", exc)
            finally:
                self._queue.task_done()


def _ignore(lookup: TierLookup) -> None:
    pass


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
