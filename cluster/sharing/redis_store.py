"""The shared Redis tier: pipelined multi-get and multi-set of opaque values, behind a breaker.

Values are codec envelopes (`cluster.codec`): bytes here, decoded as untrusted by the caller.
Keys are readable (`redis_key`): ``{namespace}:{model}:{version}:{kind}:{hex}``, so an operator
can find and purge everything of a model or a version with ``SCAN MATCH`` (`purge`).

A multi-get is one round trip whose replies are read one at a time: `get_many_decoded` hands
each value to the caller's decoder as soon as it has arrived, then drops it. For values of
megabytes (chunks of KV blocks) this halves what a fetch holds at its peak (the raw values and
their decoded copies are never all alive together), spreads the decoding over the fetch rather
than blocking the event loop for all of it after the last reply, and lets a retry ask only for
the replies not read yet; it costs within a few per cent of the CPU of decoding after the last
reply (`benchmarks.redis_bandwidth`).

Failure is a miss, never an exception: every Redis error makes a read a miss, a write `False`
and a delete 0, and is counted in `stats()`. So does any other exception the client raises
(a bug or an unexpected state in redis-py, say): it is logged (at most once a minute) and
counts as a failure for the breaker. Only cancellations, and what the caller's own decoder
raises, propagate. Three things keep a dead or hung Redis cheap:

- explicit short timeouts on connect, on every reply read and on every send (redis-py's
  defaults wait for a long time when Redis hangs);
- one retry, on connection and timeout errors only, as a `redis.asyncio.retry.Retry` with a
  backoff object (it also hides a stale pooled connection after a Redis restart);
- a `CircuitBreaker`: after a few consecutive failed calls every call returns at once, without
  touching the network, until a single probe call finds Redis back. There is no background
  task: the first call (or `status()`) after the reset timeout is the probe, so a store built
  while Redis is absent connects as soon as Redis appears.

Connection URLs are redis-py's: ``redis://[user:password@]host:port/db`` (ACL user and
password), ``rediss://...`` for TLS with redis-py's query options (``ssl_cert_reqs``,
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ...). Redis Cluster: the schemes
``redis+cluster://`` and ``rediss+cluster://`` (any one node as the seed), or ``cluster=True``;
reads and writes then go through redis-py's cluster pipeline (one round trip per node involved;
MGET could not span slots; its replies come back together), and `purge` scans every primary.

One store, one connection pool (one per node for a cluster), used from one asyncio event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.exceptions import (
    MaxConnectionsError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

from cluster.sharing.breaker import BreakerState, CircuitBreaker

__all__ = [
    "CLUSTER_SCHEMES",
    "KINDS",
    "RedisStatus",
    "RedisStore",
    "RedisStoreStats",
    "redis_key",
    "redis_key_pattern",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
_Client: TypeAlias = "aioredis.Redis | RedisCluster"

RedisStatus = Literal["up", "down", "disabled"]
KeyKind = Literal["r", "kv"]
KINDS: Final[frozenset[str]] = frozenset({"r", "kv"})
"""Key kinds: `r` for results, `kv` for chunks of prefix (KV) blocks."""
CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""URL schemes that select Redis Cluster, and the redis-py scheme each stands for."""

MiB: Final = 1024 * 1024
# ':' separates components; whitespace and control characters make keys unreadable; glob
# characters would make `redis_key_pattern` match more than asked; braces would form a Redis
# Cluster hash tag and pin every key of a model to one slot.
_FORBIDDEN: Final = re.compile(r"[:\s*?\[\]\\{}]")
_HEX: Final = re.compile(r"[0-9a-f]+")


def redis_key(namespace: str, model: str, version: str, kind: KeyKind, digest_hex: str) -> str:
    """``{namespace}:{model}:{version}:{kind}:{digest_hex}``; ValueError naming a bad component.

    `kind` is one of `KINDS`; `digest_hex` is lowercase hex. The other components must be
    non-empty printable text without ``:``, whitespace, glob characters (``*?[]\\``) or braces.
    """
    _check_component("namespace", namespace)
    _check_component("model", model)
    _check_component("version", version)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if not isinstance(digest_hex, str) or not _HEX.fullmatch(digest_hex):
        raise ValueError(f"digest_hex must be lowercase hex, got {digest_hex!r:.80}")
    return f"{namespace}:{model}:{version}:{kind}:{digest_hex}"


def redis_key_pattern(
    namespace: str,
    model: str | None = None,
    version: str | None = None,
    kind: KeyKind | None = None,
) -> str:
    """The ``SCAN MATCH`` pattern of every `redis_key` with the given components (None: any).

    E.g. ``redis_key_pattern("raycache", "tiny-gpt", "v1")`` is ``raycache:tiny-gpt:v1:*``.
    """
    _check_component("namespace", namespace)
    parts = [namespace]
    for name, value in (("model", model), ("version", version)):
        if value is not None:
            _check_component(name, value)
        parts.append("*" if value is None else value)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    parts.append("*" if kind is None else kind)
    while len(parts) > 1 and parts[-1] == "*":  # "ns:*:*:*" is "ns:*"
        parts.pop()
    return ":".join([*parts, "*"])


def _check_component(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty str, got {value!r:.80}")
    if _FORBIDDEN.search(value) or not value.isprintable():
        raise ValueError(
            f"{name} {value!r:.80} may not contain ':', whitespace, control characters, "
            "glob characters (*?[]\\) or braces"
        )


@dataclass(frozen=True)
class RedisStoreStats:
    """A snapshot of a store's counters (keys, calls, bytes and seconds since it was built)."""

    gets: int
    """Keys looked up."""
    hits: int
    misses: int
    """Keys not found, including those of failed or short-circuited calls."""
    errors: int
    """Failed calls, plus single keys that Redis answered with an error."""
    short_circuited: int
    """Calls answered at once because the breaker was open."""
    sets: int
    """Keys written."""
    deletes: int
    """Keys deleted (by `delete_many` and `purge`)."""
    bytes_read: int
    bytes_written: int
    skipped_too_large: int
    """Values not written because they were over `max_value_bytes`."""
    breaker_state: BreakerState
    breaker_opened: int
    fetches: int
    """`get_many` calls that went to Redis (failed ones included)."""
    fetch_seconds: float
    """Their total time."""
    fetch_max_seconds: float

    @property
    def hit_ratio(self) -> float:
        """Hits over keys looked up; 0.0 before the first lookup."""
        return self.hits / self.gets if self.gets else 0.0


class _Outcome(enum.Enum):
    FAILED = "failed"


_FAILED: Final = _Outcome.FAILED
# What redis-py raises: its own tree, RedisClusterException (outside it), and OSError/TimeoutError
# from below it in some paths (TLS handshakes, DNS). Anything else is unexpected, and logged.
_REDIS_FAILURES: Final = (RedisError, RedisClusterException, OSError)
_UNEXPECTED_LOG_INTERVAL_S: Final = 60.0


class _DecoderFailed(Exception):
    """Carries what the caller's decoder raised through `_run`, which must not count it."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class RedisStore:
    """The Redis tier of one replica; see the module docstring.

    `url` None disables the store: calls are misses and `status()` is "disabled". Building a
    store never connects and never blocks (a malformed URL raises ValueError).

    Options:

    - `socket_timeout_s`: bounds each reply read and each send; size it for the largest value
      (`max_value_bytes` over the link's bandwidth). `connect_timeout_s`: each connect.
    - `socket_read_bytes`: the most one read from the socket takes (redis-py's
      ``socket_read_size``, 32 KiB by default). Larger reads cut the per-read work of multi-MiB
      values (prefix chunks) by about a sixth and cost nothing for small ones: nothing of that
      size is allocated ahead.
    - `retries` of a call on connection and timeout errors, waiting as `backoff` says (default
      `ExponentialBackoff(cap=0.05, base=0.01)`: 20 ms before the first).
    - `breaker`: default opens after 5 consecutive failed calls and probes after 2 s, on `timer`.
    - `default_ttl_s`: lifetime of a key written without one; each key's lifetime is drawn from
      ``ttl * (1 ± ttl_jitter)`` with `rng`.
    - `max_value_bytes`: the largest value written. `max_connections`: the pool's size (per node
      for a cluster). `status_ttl_s`: how long `status()` trusts the last outcome.
    - `client_options`: further keyword arguments of redis-py's `from_url` (``ssl_ca_certs``,
      ``client_name``, ...); they cannot override the options above, and the URL's query string
      wins over both.
    """

    def __init__(
        self,
        url: str | None,
        *,
        cluster: bool | None = None,
        socket_timeout_s: float = 0.1,
        connect_timeout_s: float = 0.2,
        socket_read_bytes: int = 256 * 1024,
        retries: int = 1,
        backoff: AbstractBackoff | None = None,
        breaker: CircuitBreaker | None = None,
        default_ttl_s: float = 3600.0,
        ttl_jitter: float = 0.1,
        max_value_bytes: int = 64 * MiB,
        max_connections: int = 128,
        status_ttl_s: float = 1.0,
        client_options: Mapping[str, Any] | None = None,
        rng: random.Random | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        if not socket_timeout_s > 0 or not connect_timeout_s > 0:
            raise ValueError("socket_timeout_s and connect_timeout_s must be > 0")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not default_ttl_s > 0:
            raise ValueError(f"default_ttl_s must be > 0, got {default_ttl_s}")
        if not 0 <= ttl_jitter < 1:
            raise ValueError(f"ttl_jitter must be in [0, 1), got {ttl_jitter}")
        if max_value_bytes < 0 or max_connections < 1:
            raise ValueError("max_value_bytes must be >= 0 and max_connections >= 1")
        if socket_read_bytes < 1:
            raise ValueError(f"socket_read_bytes must be >= 1, got {socket_read_bytes}")
        self.default_ttl_s = default_ttl_s
        self.ttl_jitter = ttl_jitter
        self.max_value_bytes = max_value_bytes
        self.status_ttl_s = status_ttl_s
        self._timer = timer
        self._rng = rng or random.Random()
        self._breaker = breaker or CircuitBreaker(timer=timer)
        self._url_for_logs = _redact(url) if url is not None else "(none)"
        self._client: _Client | None = None
        if url is not None:
            self._client = _make_client(
                url,
                cluster,
                {
                    **(client_options or {}),
                    "socket_timeout": socket_timeout_s,
                    "socket_connect_timeout": connect_timeout_s,
                    "socket_read_size": socket_read_bytes,
                    "retry": Retry(backoff or ExponentialBackoff(cap=0.05, base=0.01), retries),
                    "max_connections": max_connections,
                    "decode_responses": False,  # values are bytes
                },
            )
        self.is_cluster = isinstance(self._client, RedisCluster)
        self._last_ok: bool | None = None  # outcome of the last call that reached Redis
        self._last_at = 0.0
        self._gets = self._hits = self._misses = self._errors = self._short_circuited = 0
        self._sets = self._deletes = self._bytes_read = self._bytes_written = 0
        self._skipped_too_large = self._fetches = 0
        self._fetch_seconds = self._fetch_max_seconds = 0.0
        self._unexpected_logged_at: float | None = None

    # -- data -----------------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, None where absent or on any failure; one round trip."""
        return await self.get_many_decoded(keys, _as_is)

    async def get_many_decoded(
        self, keys: Sequence[str], decode: Callable[[int, bytes], _T]
    ) -> list[_T | None]:
        """`decode(i, value)` of the value of each `keys[i]`, None where absent; one round trip.

        Each value is decoded as soon as its reply has arrived, in key order, then dropped (see
        the module docstring); on Redis Cluster, after every reply has arrived. A failure is a
        miss for the keys whose replies had not arrived; those before it keep their result.
        `decode` is the caller's and runs on the event loop: it should turn bad bytes into
        None rather than raise. What it raises propagates, is not counted against Redis, and
        drops the connection (replies may still be on their way).
        """
        self._gets += len(keys)
        results: list[_T | None] = [None] * len(keys)
        arrived = 0

        def deliver(reply: object) -> None:
            nonlocal arrived
            index, arrived = arrived, arrived + 1
            if isinstance(reply, bytes):
                self._hits += 1
                self._bytes_read += len(reply)
                try:
                    results[index] = decode(index, reply)
                except Exception as exc:
                    raise _DecoderFailed(exc) from exc
            else:
                self._misses += 1
                self._errors += reply is not None  # an error reply, such as an ACL refusal

        try:
            if keys:
                await self._run(functools.partial(_streamed_gets, keys, deliver), timed=True)
        except _DecoderFailed as failed:
            raise failed.error from None
        finally:
            self._misses += len(keys) - arrived
        return results

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None
    ) -> bool:
        """Write every item with a jittered TTL (`default_ttl_s` when None); one round trip.

        True when every item was written; values over `max_value_bytes` are skipped (and
        counted), which makes the result False.
        """
        lifetime = self.default_ttl_s if ttl_s is None else ttl_s
        if not lifetime > 0:
            raise ValueError(f"ttl_s must be > 0 (every key expires), got {ttl_s}")
        writable = [(key, value) for key, value in items if len(value) <= self.max_value_bytes]
        self._skipped_too_large += len(items) - len(writable)
        if not writable:
            return not items
        commands = [(key, value, self._ttl_ms(lifetime)) for key, value in writable]
        replies = await self._run(functools.partial(_pipelined_sets, commands))
        if replies is _FAILED:
            return False
        written = 0
        for (_, value), reply in zip(writable, replies, strict=True):
            if reply is True:
                written += 1
                self._bytes_written += len(value)
            else:
                self._errors += 1
        self._sets += written
        return written == len(items)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete (UNLINK) the keys; how many existed, 0 on failure."""
        if not keys:
            return 0
        replies = await self._run(functools.partial(_pipelined, "unlink", keys))
        if replies is _FAILED:
            return 0
        deleted = sum(reply for reply in replies if isinstance(reply, int))
        self._errors += sum(isinstance(reply, Exception) for reply in replies)
        self._deletes += deleted
        return deleted

    async def purge(self, pattern: str, batch: int = 500, pause_s: float = 0.01) -> int:
        """Delete every key matching the glob `pattern` (see `redis_key_pattern`); how many.

        SCAN MATCH COUNT `batch`, then UNLINK what it found, pausing `pause_s` between batches
        so that a large purge does not crowd out traffic; on Redis Cluster, every primary in
        turn. Keys written while it runs may survive. On a failure it stops and returns the
        count so far: purging again is safe.
        """
        if batch < 1 or pause_s < 0:
            raise ValueError("batch must be >= 1 and pause_s >= 0")
        if self._client is None:
            return 0
        nodes: list[ClusterNode | None] = [None]
        if self.is_cluster:
            primaries = await self._run(_primaries)
            if primaries is _FAILED:
                return 0
            nodes = list(primaries)
        removed = 0
        for node in nodes:
            cursor = 0
            while True:
                step = await self._run(
                    functools.partial(
                        _scan_and_unlink, node=node, cursor=cursor, pattern=pattern, count=batch
                    )
                )
                if step is _FAILED:
                    return removed
                cursor, unlinked = step
                removed += unlinked
                self._deletes += unlinked
                if cursor == 0:
                    break
                await asyncio.sleep(pause_s)
        return removed

    # -- health ---------------------------------------------------------------------------------

    async def status(self) -> RedisStatus:
        """`up`, `down` or `disabled`; never raises.

        Answers at once from the breaker (open: down) or from the last call's outcome when it
        is under `status_ttl_s` old; otherwise, or when the breaker waits for a probe, one PING
        (bounded by the timeouts), which may be that probe.
        """
        if self._client is None:
            return "disabled"
        state = self._breaker.state
        if state == "open":
            return "down"
        if (
            state == "half_open"
            or self._last_ok is None
            or self._timer() - self._last_at >= self.status_ttl_s
        ):
            await self._run(_ping)
        return "up" if self._last_ok else "down"

    def stats(self) -> RedisStoreStats:
        """A snapshot of the counters."""
        return RedisStoreStats(
            gets=self._gets,
            hits=self._hits,
            misses=self._misses,
            errors=self._errors,
            short_circuited=self._short_circuited,
            sets=self._sets,
            deletes=self._deletes,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            skipped_too_large=self._skipped_too_large,
            breaker_state=self._breaker.state,
            breaker_opened=self._breaker.opened,
            fetches=self._fetches,
            fetch_seconds=self._fetch_seconds,
            fetch_max_seconds=self._fetch_max_seconds,
        )

    async def close(self) -> None:
        """Close the connection pool; the store is disabled afterwards."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    # -- internals ------------------------------------------------------------------------------

    def _ttl_ms(self, lifetime_s: float) -> int:
        jitter = self._rng.uniform(-self.ttl_jitter, self.ttl_jitter)
        return max(1, round(lifetime_s * 1000 * (1 + jitter)))

    async def _run(
        self, operation: Callable[[_Client], Awaitable[_T]], timed: bool = False
    ) -> _T | _Outcome:
        """`operation` on the client through the breaker; _FAILED when skipped or failed.

        `timed`: count it as a fetch, with its duration, when it reaches Redis.
        """
        client = self._client
        if client is None:
            return _FAILED
        if not self._breaker.allow():
            self._short_circuited += 1
            return _FAILED
        started = self._timer()
        try:
            result = await operation(client)
        except MaxConnectionsError:
            # The pool is exhausted by this replica's own load: Redis is not at fault.
            self._errors += 1
            return _FAILED
        except _DecoderFailed:
            raise  # the caller's, not Redis's
        except _REDIS_FAILURES as exc:
            self._errors += 1
            self._failed(exc)
            return _FAILED
        except Exception as exc:
            self._errors += 1
            self._log_unexpected(exc)
            self._failed(exc)
            await _drop_idle_connections(client)
            return _FAILED
        finally:
            if timed:
                elapsed = self._timer() - started
                self._fetches += 1
                self._fetch_seconds += elapsed
                self._fetch_max_seconds = max(self._fetch_max_seconds, elapsed)
        self._succeeded()
        return result

    def _failed(self, exc: BaseException) -> None:
        before = self._breaker.state
        self._breaker.record_failure()
        self._last_ok, self._last_at = False, self._timer()
        if before == "closed" and self._breaker.state == "open":
            _log.warning(
                "Redis tier at %s is unavailable (%s: %.200s); serving without it and probing "
                "it every %.1f s",
                self._url_for_logs,
                type(exc).__name__,
                exc,
                self._breaker.reset_timeout_s,
            )

    def _log_unexpected(self, exc: Exception) -> None:
        """Log, with its traceback, an exception outside redis-py's own; once a minute at most."""
        now = self._timer()
        last = self._unexpected_logged_at
        if last is not None and now - last < _UNEXPECTED_LOG_INTERVAL_S:
            return
        self._unexpected_logged_at = now
        _log.warning(
            "Redis client at %s raised %s (%.200s); treated as a failed call",
            self._url_for_logs,
            type(exc).__name__,
            exc,
            exc_info=exc,
        )

    def _succeeded(self) -> None:
        if self._breaker.state != "closed":
            _log.info("Redis tier at %s is back", self._url_for_logs)
        self._breaker.record_success()
        self._last_ok, self._last_at = True, self._timer()


async def _drop_idle_connections(client: _Client) -> None:
    """Disconnect the pool's idle connections after an unexpected exception: redis-py may have
    put back a connection with replies still unread, whose next reader would take them for its
    own. Not done for Redis Cluster, whose client exposes no pool of idle connections per node
    (its nodes can only drop every connection, busy ones included)."""
    if isinstance(client, RedisCluster):
        return
    with contextlib.suppress(Exception):
        await client.connection_pool.disconnect(inuse_connections=False)


def _make_client(url: str, cluster: bool | None, options: dict[str, Any]) -> _Client:
    scheme, separator, rest = url.partition("://")
    if scheme in CLUSTER_SCHEMES:
        if cluster is False:
            raise ValueError(f"{scheme}:// selects Redis Cluster, but cluster=False")
        url, cluster = f"{CLUSTER_SCHEMES[scheme]}{separator}{rest}", True
    if cluster:
        return RedisCluster.from_url(url, **options)
    return aioredis.Redis.from_url(url, **options)


def _redact(url: str) -> str:
    """`url` without its password, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + netloc))


def _as_is(index: int, value: bytes) -> bytes:
    return value


async def _streamed_gets(
    keys: Sequence[str], deliver: Callable[[object], None], client: _Client
) -> None:
    """GET every key in one round trip; `deliver` each reply (bytes, None or the error) in order.

    On one node the replies are read from the connection one at a time, each delivered before
    the next is read. A retry (the client's `Retry`: connection and timeout errors) reconnects
    and asks only for the keys whose replies have not arrived.
    """
    if isinstance(client, RedisCluster):
        replies = await _pipelined("get", keys, client)
        replies.reverse()
        while replies:  # popped, so that each value can be freed once delivered
            deliver(replies.pop())
        return
    pool = client.connection_pool
    connection = await pool.get_connection()  # type: ignore[no-untyped-call]
    arrived = 0

    async def read_the_rest() -> None:
        nonlocal arrived
        rest = [("GET", key) for key in keys[arrived:]]
        await connection.send_packed_command(connection.pack_commands(rest))
        while arrived < len(keys):
            try:
                reply = await connection.read_response()
            except ResponseError as exc:  # a reply, read whole: the connection stays in step
                reply = exc
            arrived += 1
            deliver(reply)

    async def disconnect(error: Exception) -> None:
        await connection.disconnect()

    try:
        await connection.retry.call_with_retry(read_the_rest, disconnect)
    except BaseException:
        # Unread replies may follow (a failed or cancelled read, or `deliver` raised): a
        # connection out of step with its replies must not go back to the pool as it is.
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


async def _pipelined(command: str, keys: Sequence[str], client: _Client) -> list[Any]:
    """One `command key` per key in one pipeline; per-key errors come back as exceptions."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command(command.upper(), key)
    return await pipe.execute(raise_on_error=False)


async def _pipelined_sets(commands: Sequence[tuple[str, bytes, int]], client: _Client) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for key, value, ttl_ms in commands:
        pipe.set(key, value, px=ttl_ms)
    return await pipe.execute(raise_on_error=False)


async def _ping(client: _Client) -> bool:
    return bool(await client.ping())


async def _primaries(client: _Client) -> list[ClusterNode]:
    assert isinstance(client, RedisCluster)
    await client.initialize()
    return client.get_primaries()


async def _scan_and_unlink(
    client: _Client, *, node: ClusterNode | None, cursor: int, pattern: str, count: int
) -> tuple[int, int]:
    """One SCAN step (on `node` of a cluster) and the UNLINK of what it found."""
    if node is None:
        assert isinstance(client, aioredis.Redis)
        cursor, keys = await client.scan(cursor, match=pattern, count=count)
    else:
        assert isinstance(client, RedisCluster)
        # The cluster client answers a SCAN with every node's cursor: {node name: cursor}.
        reply: Any = await client.scan(cursor, match=pattern, count=count, target_nodes=node)
        cursors, keys = reply
        cursor = cursors[node.name]
    unlinked = int(await client.unlink(*keys)) if keys else 0
    return int(cursor), unlinked
