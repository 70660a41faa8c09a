"""Is the shared Redis tier reachable? A cheap answer for health checks.

One PING with a short timeout, remembered for `ttl_s` so that a health check polled every
second does not turn into Redis traffic, and a hung Redis costs one timeout per `ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cluster.sharing.redis_store import RedisStatus


class RedisProbe:
    """Tells whether the Redis at `url` answers; `disabled` when no URL is configured."""

    def __init__(
        self,
        url: str | None,
        timeout_s: float = 0.25,
        ttl_s: float = 1.0,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._timer = timer
        self._client: aioredis.Redis | None = None
        self._last: tuple[float, RedisStatus] | None = None

    async def status(self) -> RedisStatus:
        """`up`, `down` or `disabled`; never raises."""
        if self._url is None:
            return "disabled"
        now = self._timer()
        if self._last is not None and now - self._last[0] < self._ttl_s:
            return self._last[1]
        result: RedisStatus = "up" if await self._ping() else "down"
        self._last = (now, result)
        return result

    async def _ping(self) -> bool:
        assert self._url is not None
        try:
            if self._client is None:
                self._client = aioredis.Redis.from_url(
                    self._url,
                    socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s,
                    # One attempt: redis-py's default retries would multiply the timeout.
                    retry=Retry(NoBackoff(), 0),
                )
            return bool(await self._client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        """Release the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
