"""Model versions and invalidation rules in Redis, and their pub/sub announcements.

Layout (the ``#`` keeps these out of every cache-key pattern ``{namespace}:...``, so a purge
never deletes them):

- ``{namespace}#versions``: a hash, model id -> signed `ModelVersion`. Written only through a
  compare-and-set script that keeps the higher generation, so two publishers (two actors, two
  clusters sharing one Redis) never move a model backwards, and that announces the winner on
- the channel ``{namespace}#versions`` (same name, a channel is not a key);
- ``{namespace}#invalidations``: the current `InvalidationRule` list, signed.

A record names the weights every replica loads, so anyone who can write to Redis could choose
them: each record is signed (`RecordSigner`, keyed BLAKE2b under the cluster secret's records
key, over the namespace and the record's exact JSON) and one that is unsigned, signed under
another key, edited, or moved from another namespace is ignored, counted (`rejected_records`)
and logged. Stored form: ``{"mac": hex, "record": "<ModelVersion JSON>"}`` (``"rules"`` for the
rule list); the MAC is checked before the record's JSON is parsed. A signature proves that a
cluster holding the key wrote the record, not that it is the newest: a replayed older record
loses to the generation a reader already holds.

Pub/sub is at most once: a follower re-reads the hash whenever it (re)connects, so a message
lost while it was away only delays it until then.

The records have no TTL and every cache key has one, so a Redis whose `maxmemory-policy` evicts
only keys with a TTL (`volatile-*`, as k8s/redis.yaml sets) never evicts the records to make
room for cache entries; `allkeys-*` may. `eviction_risk` reads the setting, for a warning at
start-up.

Blocking redis-py with short timeouts: the actor calls it from a worker thread, the follower
from its own thread. Every Redis failure is a `None` / `False` result and a log line, never an
exception: versions keep working from the actor's memory while Redis is away.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
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

from cluster.versions.invalidation import (
    InvalidationRule,
    RuleFormatError,
    rules_from_json,
    rules_to_json,
)
from cluster.versions.records import MAX_RECORD_BYTES, ModelVersion, VersionFormatError

__all__ = ["RecordRejected", "RecordSigner", "VersionStore", "versions_channel"]

logger = logging.getLogger(__name__)

TIMEOUT_S = 0.5
RETRIES = 3
LISTEN_POLL_S = 1.0
RECONNECT_PAUSE_S = 1.0
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64  # the longest key BLAKE2b takes
MAX_RULES_BYTES = 4 * 1024 * 1024
_MAC_BYTES = 32

# KEYS[1] = hash; ARGV = model, generation, signed record, channel, replaceable. Keeps the
# higher generation; returns the record stored afterwards (ours, or the newer one already
# there). Redis cannot check a signature, so a stored record claiming a higher generation wins
# here; when the caller finds it unsigned it calls again with that exact value as
# `replaceable`, which is then overwritten (only if it is still the stored one).
_SAVE_SCRIPT = """
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored and stored ~= ARGV[5] then
  local ok, generation = pcall(function()
    return tonumber(cjson.decode(cjson.decode(stored)['record'])['generation'])
  end)
  if ok and generation ~= nil and generation >= tonumber(ARGV[2]) then
    return stored
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[3])
return ARGV[3]
"""


class RecordRejected(ValueError):
    """A record read from Redis is unsigned, signed under another key or namespace, edited,
    or malformed; the message says which."""


class RecordSigner:
    """Signs and checks the version and rule records of namespace `namespace` under `key`.

    Pure: no Redis. The MAC covers the record's kind, the namespace and the record's exact
    JSON, so a record cannot be replayed as another kind or in another namespace.
    """

    def __init__(self, key: bytes, namespace: str) -> None:
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(
                f"a records key has {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes, not {len(key)}"
            )
        self._key = key
        self.namespace = namespace

    def sign_version(self, record: ModelVersion) -> str:
        """`record` in its stored (and announced) form."""
        return self._sign("record", record.to_json())

    def open_version(self, raw: str | bytes) -> ModelVersion:
        """The version record that `raw` holds; raises `RecordRejected`."""
        body = self._open("record", raw, 2 * MAX_RECORD_BYTES)
        try:
            return ModelVersion.from_json(body)
        except VersionFormatError as exc:
            raise RecordRejected(f"signed but malformed: {exc}") from None

    def sign_rules(self, rules: list[InvalidationRule]) -> str:
        """`rules` in their stored form."""
        return self._sign("rules", rules_to_json(rules))

    def open_rules(self, raw: str | bytes) -> list[InvalidationRule]:
        """The rule list that `raw` holds; raises `RecordRejected`."""
        body = self._open("rules", raw, 2 * MAX_RULES_BYTES)
        try:
            return rules_from_json(body, max_bytes=MAX_RULES_BYTES)
        except RuleFormatError as exc:
            raise RecordRejected(f"signed but malformed: {exc}") from None

    def _sign(self, kind: str, body: str) -> str:
        mac = self._mac(kind, body.encode())
        return json.dumps({"mac": mac.hex(), kind: body}, separators=(",", ":"))

    def _open(self, kind: str, raw: str | bytes, max_bytes: int) -> str:
        """The signed JSON text of `kind` inside `raw`, once its MAC is checked."""
        if len(raw) > max_bytes:
            raise RecordRejected(f"larger than {max_bytes} bytes")
        try:
            envelope = json.loads(raw)
        except (ValueError, RecursionError):  # JSON or UTF-8 errors; nesting too deep
            raise RecordRejected("not JSON") from None
        if not isinstance(envelope, dict) or set(envelope) != {"mac", kind}:
            raise RecordRejected(f"unsigned (not a signed {kind})")
        mac, body = envelope["mac"], envelope[kind]
        if not isinstance(mac, str) or not isinstance(body, str):
            raise RecordRejected("unsigned (mac and body must be strings)")
        try:
            given = bytes.fromhex(mac)
            expected = self._mac(kind, body.encode())
        except ValueError:  # a MAC that is not hex, a body that is not valid text
            raise RecordRejected("badly signed") from None
        if not hmac.compare_digest(given, expected):
            raise RecordRejected("badly signed (another key or namespace, or edited)")
        return body

    def _mac(self, kind: str, body: bytes) -> bytes:
        namespace = self.namespace.encode()
        message = b"".join(
            (b"raycache-", kind.encode(), b"\0", len(namespace).to_bytes(4, "big"), namespace, body)
        )
        return hashlib.blake2b(message, key=self._key, digest_size=_MAC_BYTES).digest()


def versions_channel(namespace: str) -> str:
    """The pub/sub channel on which new versions of `namespace` are announced."""
    return f"{namespace}#versions"


class VersionStore:
    """Versions and rules of raycache namespace `namespace` in the Redis at `url`, signed and
    checked under `records_key` (the cluster secret's `records` key)."""

    def __init__(
        self, url: str, namespace: str, records_key: bytes, timeout_s: float = TIMEOUT_S
    ) -> None:
        self.namespace = namespace
        self._signer = RecordSigner(records_key, namespace)
        self._versions_key = f"{namespace}#versions"
        self._rules_key = f"{namespace}#invalidations"
        self._channel = versions_channel(namespace)
        self._rejected = 0
        self._rejected_lock = threading.Lock()
        # Versions are read rarely and matter much (a restarted actor reloads them once): a
        # busy Redis gets a few tries with backoff, unlike the per-request cache tier.
        self._client = _connect(url, timeout_s, Retry(ExponentialBackoff(0.5, 0.05), RETRIES))
        # The listener must see its connection drop (redis-py would silently reconnect and
        # resubscribe), because a drop is when the stored versions must be read again.
        self._listener = _connect(url, timeout_s, Retry(NoBackoff(), 0))
        self._save = self._client.register_script(_SAVE_SCRIPT)

    @property
    def rejected_records(self) -> int:
        """Records read from Redis (stored or announced) and ignored: unsigned, badly signed,
        from another namespace, or malformed."""
        return self._rejected

    def load(self) -> dict[str, ModelVersion] | None:
        """Every stored version with a valid signature (others ignored, counted, logged);
        None when Redis fails."""
        try:
            raw = self._client.hgetall(self._versions_key)
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not read versions from Redis: %s", exc)
            return None
        records = {}
        for field, value in raw.items():
            record = self._stored_version(field, value)
            if record is not None:
                records[record.model] = record
        return records

    def save(self, record: ModelVersion) -> ModelVersion | None:
        """Store and announce `record` unless Redis holds a newer generation (validly signed:
        an invalid record in its place is overwritten).

        Returns what Redis holds afterwards (`record`, or the newer one), or None on failure.
        """
        signed = self._signer.sign_version(record)
        field = record.model.encode()
        try:
            stored = self._save_if_newer(record, signed, replaceable=b"")
            current = self._stored_version(field, stored)
            if current is None:
                stored = self._save_if_newer(record, signed, replaceable=stored)
                current = self._stored_version(field, stored)
            return current
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not store %s %s: %s", record.model, record.version, exc)
            return None

    def load_rules(self) -> list[InvalidationRule] | None:
        """The stored invalidation rules (none when the stored list is not validly signed:
        ignored, counted, logged); None when Redis fails."""
        try:
            raw = self._client.get(self._rules_key)
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not read invalidation rules from Redis: %s", exc)
            return None
        if raw is None:
            return []
        try:
            return self._signer.open_rules(raw)
        except RecordRejected as exc:
            self._reject("the stored invalidation rules", exc)
            return []

    def save_rules(self, rules: list[InvalidationRule]) -> bool:
        """Replace the stored rules; whether it worked."""
        try:
            self._client.set(self._rules_key, self._signer.sign_rules(rules))
            return True
        except (RedisError, RedisClusterException, OSError) as exc:
            logger.warning("could not store invalidation rules: %s", exc)
            return False

    def follow(
        self,
        on_record: Callable[[ModelVersion], None],
        stopped: threading.Event,
    ) -> None:
        """Call `on_record` with every validly signed stored version on each (re)connect, then
        with every validly signed announced one, until `stopped` is set. Runs in the caller's
        thread; never raises."""
        while not stopped.is_set():
            pubsub = None
            try:
                pubsub = self._listener.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
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
                    announced = self._announced_version(message["data"])
                    if announced is not None:
                        on_record(announced)
            except (RedisError, RedisClusterException, OSError) as exc:
                logger.info("version announcements unavailable (%s); retrying", exc)
                stopped.wait(RECONNECT_PAUSE_S)
            except Exception:  # redis-py on a connection closed under it, or a client bug
                if not stopped.is_set():
                    logger.warning("version announcements failed; retrying", exc_info=True)
                    stopped.wait(RECONNECT_PAUSE_S)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()

    def _save_if_newer(self, record: ModelVersion, signed: str, replaceable: bytes) -> bytes:
        stored: bytes = self._save(
            keys=[self._versions_key],
            args=[record.model, record.generation, signed, self._channel, replaceable],
        )
        return stored

    def _stored_version(self, field: bytes | str, raw: bytes | str) -> ModelVersion | None:
        """The record stored in hash field `field`, or None (counted, logged) when invalid."""
        field = field.encode() if isinstance(field, str) else field
        name = field.decode(errors="replace")
        try:
            record = self._signer.open_version(raw)
        except RecordRejected as exc:
            self._reject(f"the stored version of {name!r}", exc)
            return None
        if record.model.encode() != field:
            self._reject(f"the stored version of {name!r}", f"it is a record of {record.model!r}")
            return None
        return record

    def _announced_version(self, raw: bytes | str) -> ModelVersion | None:
        try:
            return self._signer.open_version(raw)
        except RecordRejected as exc:
            self._reject("a version announcement", exc)
            return None

    def _reject(self, what: str, reason: object) -> None:
        with self._rejected_lock:
            self._rejected += 1
        logger.warning("ignoring %s in Redis namespace %s: %s", what, self.namespace, reason)

    def close(self) -> None:
        self._client.close()
        self._listener.close()


def eviction_risk(url: str, timeout_s: float = 0.5) -> str | None:
    """Why the Redis at `url` may evict the version and invalidation records under memory
    pressure (its `maxmemory-policy` evicts keys without a TTL), or None: it evicts only keys
    with a TTL, never evicts, or the setting cannot be read (a managed Redis may refuse
    CONFIG; Redis away): then there is nothing to say."""
    try:
        client = _connect(url, timeout_s, Retry(NoBackoff(), 0))
        try:
            reply: Any = client.config_get("maxmemory-policy")
        finally:
            client.close()
    except (RedisError, RedisClusterException, OSError):
        return None
    # A cluster client answers per node ({node: {...}}) or merged; a plain one, a flat dict.
    replies = [reply] if "maxmemory-policy" in reply else list(reply.values())
    policies = sorted({str(r.get("maxmemory-policy")) for r in replies if isinstance(r, dict)})
    risky = [policy for policy in policies if policy.startswith("allkeys-")]
    if not risky:
        return None
    return (
        f"Redis maxmemory-policy is {risky[0]}: under memory pressure it may evict the version "
        "and invalidation records, which have no TTL; use volatile-lru (every cache key has a "
        "TTL), as k8s/redis.yaml does"
    )


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
