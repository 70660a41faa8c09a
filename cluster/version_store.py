"""Model versions and invalidation rules in Redis, and their pub/sub announcements.

Layout (the ``#`` keeps these out of every cache-key pattern ``{namespace}:...``, so a purge
never deletes them):

- ``{namespace}#versions``: a hash, model id -> `ModelVersion` JSON. Written only through a
  compare-and-set script that keeps the higher generation, so two publishers (two actors, two
  clusters sharing one Redis) never move a model backwards, and that announces the winner on
- the channel ``{namespace}#versions`` (same name, a channel is not a key);
- ``{namespace}#invalidations``: the current `InvalidationRule` list as one JSON array.

Pub/sub is at most once: a follower re-reads the hash whenever it (re)connects, so a message
lost while it was away only delays it until then.

Blocking redis-py with short timeouts: the actor calls it from a worker thread, the follower
from its own thread. Every Redis failure is a `None` / `False` result and a log line, never an
exception: versions keep working from the actor's memory while Redis is away.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from cluster.invalidation import (
    InvalidationRule,
    RuleFormatError,
    rules_from_json,
    rules_to_json,
)
from cluster.versions import ModelVersion, VersionFormatError

__all__ = ["VersionStore", "versions_channel"]

logger = logging.getLogger(__name__)

TIMEOUT_S = 0.5
RETRIES = 3
LISTEN_POLL_S = 1.0
RECONNECT_PAUSE_S = 1.0
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# KEYS[1] = hash; ARGV = model, generation, record JSON, channel. Keeps the higher generation;
# returns the record stored afterwards (ours, or the newer one already there).
_SAVE_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored then
  local ok, decoded = pcall(cjson.decode, stored)
  if ok and type(decoded) == 'table' and tonumber(decoded['generation']) ~= nil
     and tonumber(decoded['generation']) >= tonumber(ARGV[2]) then
    return stored
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return ARGV[3]
"""


def versions_channel(namespace: str) -> str:
    """The pub/sub channel on which new versions of `namespace` are announced."""
    return f"{namespace}#versions"


class VersionStore:
    """Versions and rules of raycache namespace `namespace` in the Redis at `url`."""

    def __init__(self, url: str, namespace: str, timeout_s: float = TIMEOUT_S) -> None:
        self.namespace = namespace
        self._versions_key = f"{namespace}#versions"
        self._rules_key = f"{namespace}#invalidations"
        self._channel = versions_channel(namespace)
        # Versions are read rarely and matter much (a restarted actor reloads them once): a
        # busy Redis gets a few tries with backoff, unlike the per-request cache tier.
        self._client = _connect(url, timeout_s, Retry(ExponentialBackoff(0.5, 0.05), RETRIES))
        # The listener must see its connection drop (redis-py would silently reconnect and
        # resubscribe), because a drop is when the stored versions must be read again.
        self._listener = _connect(url, timeout_s, Retry(NoBackoff(), 0))
        self._save = self._client.register_script(_SAVE_SCRIPT)

    def load(self) -> dict[str, ModelVersion] | None:
        """Every stored version (malformed ones skipped, logged); None when Redis fails."""
        try:
            raw = self._client.hgetall(self._versions_key)
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not read versions from Redis: %s", exc)
            return None
        records = {}
        for field, value in raw.items():
            try:
                record = ModelVersion.from_json(value)
            except VersionFormatError as exc:
                logger.warning("ignoring a malformed stored version of %r: %s", field, exc)
                continue
            records[record.model] = record
        return records

    def save(self, record: ModelVersion) -> ModelVersion | None:
        """Store and announce `record` unless Redis holds a newer generation.

        Returns what Redis holds afterwards (`record`, or the newer one), or None on failure.
        """
        try:
            stored = self._save(
                keys=[self._versions_key],
                args=[record.model, record.generation, record.to_json(), self._channel],
            )
            return ModelVersion.from_json(stored)
        except (RedisError, RedisClusterException, OSError, VersionFormatError) as exc:
            logger.warning("could not store %s %s: %s", record.model, record.version, exc)
            return None

    def load_rules(self) -> list[InvalidationRule] | None:
        """The stored invalidation rules; None when Redis fails or holds a malformed list."""
        try:
            raw = self._client.get(self._rules_key)
            return [] if raw is None else rules_from_json(raw)
        except (RedisError, RedisClusterException, OSError, RuleFormatError) as exc:
            logger.warning("could not read invalidation rules from Redis: %s", exc)
            return None

    def save_rules(self, rules: list[InvalidationRule]) -> bool:
        """Replace the stored rules; whether it worked."""
        try:
            self._client.set(self._rules_key, rules_to_json(rules))
            return True
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not store invalidation rules: %s", exc)
            return False

    def follow(
        self,
        on_record: Callable[[ModelVersion], None],
        stopped: threading.Event,
    ) -> None:
        """Call `on_record` with every stored version on each (re)connect, then with every
        announced one, until `stopped` is set. Runs in the caller's thread; never raises."""
        while not stopped.is_set():
            pubsub = None
            try:
                pubsub = self._listener.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
                pubsub.subscribe(self._channel)
                # Subscribe first, then read: a version published in between is seen twice,
                # never missed.
                records = self.load()
                if records is None:
                    raise RedisError("could not read the stored versions")
                for record in records.values():
                    on_record(record)
                while not stopped.is_set():
                    message = pubsub.get_message(timeout=LISTEN_POLL_S)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        on_record(ModelVersion.from_json(message["data"]))
                    except VersionFormatError as exc:
                        logger.warning("ignoring a malformed version announcement: %s", exc)
            except (RedisError, RedisClusterException, OSError) as exc:
                logger.info("version announcements unavailable (%s); retrying", exc)
                stopped.wait(RECONNECT_PAUSE_S)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()

    def close(self) -> None:
        self._client.close()
        self._listener.close()


def _connect(url: str, timeout_s: float, retry: Retry) -> redis.Redis | RedisCluster:
    """A blocking client of `url` (``redis+cluster://`` / ``rediss+cluster://``: Cluster)."""
    scheme, _, rest = url.partition("://")
    options: dict[str, Any] = {
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": retry,
    }
    if scheme in _CLUSTER_SCHEMES:  # the cluster client retries connection errors itself
        return RedisCluster.from_url(f"{_CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return redis.Redis.from_url(
        url, retry_on_error=[RedisConnectionError, RedisTimeoutError], **options
    )
