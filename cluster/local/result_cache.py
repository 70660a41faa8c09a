"""The replica-local result cache: request key -> encoded answer (and, optionally, the answer
decoded).

Bounded by bytes and by entries; which entry leaves is the eviction policy's decision
(`cluster.local.policies`, chosen by name). Each entry carries a TTL with random jitter, so entries
written together do not expire together, and tags (model, version, tenant) by which it can be
invalidated. An expired entry is never returned.

An entry may keep its value decoded beside the bytes (`put(..., decoded=)`, read back with
`get_decoded`): the bytes are what other replicas fetch, the decoded value is what a local hit
serves without decoding and verifying bytes this replica checked or produced itself. Such an
entry counts its bytes twice against the budget, as the decoded value holds the same content
again.

Concurrency: safe to share between asyncio tasks and threads. A hit does not take the lock: it
reads the entry dict (atomic under the GIL), checks the deadline (an entry without a lifetime
skips the clock), and appends the key to an access buffer. The buffer is applied to the policy
under the lock later (when it fills, and on every write), as Caffeine does; so the hot path
stays a dictionary lookup and a deque append, and the policy's bookkeeping runs in batches
(one `hit_many` call per drain where the policy has it, as W-TinyLFU does). Accesses to a key
that left before the buffer is drained are simply skipped. A write does only the work there is:
it drains the buffer when it holds accesses, and sweeps expired entries when the earliest
deadline (the head of a heap) has passed.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from cluster.keys import ResultKey
from cluster.local.policies import DEFAULT_POLICY, Key, make_policy

ACCESS_BUFFER_SIZE = 128


@dataclass(frozen=True, slots=True)
class EntryTags:
    """What an entry belongs to, for invalidation."""

    model: str = ""
    version: str = ""
    tenant: str = ""


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a cache's counters."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    expirations: int = 0
    invalidations: int = 0

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


# An entry is a tuple (cheapest to create in CPython; a class costs ~200 ns more per put):
VALUE: Final = 0
CHARGE: Final = 1
EXPIRES_AT: Final = 2  # NEVER (this very object) when the entry has no lifetime
TAGS: Final = 3
DECODED: Final = 4  # None when the entry keeps no decoded value
_Entry = tuple[bytes, int, float, EntryTags, Any]

NEVER = float("inf")
_NO_TAGS = EntryTags()


class ResultCache:
    """A map from `ResultKey` to bytes within `max_bytes` and `max_entries`.

    `ttl_s` is the default lifetime of an entry (None: no expiry); each entry's lifetime is
    drawn uniformly from `ttl_s * (1 ± ttl_jitter)`. `timer` and `rng` are injectable so tests
    control time and jitter.
    """

    def __init__(
        self,
        max_bytes: int,
        max_entries: int,
        policy: str = DEFAULT_POLICY,
        ttl_s: float | None = None,
        ttl_jitter: float = 0.1,
        timer: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("max_bytes and max_entries must be >= 0")
        if ttl_s is not None and ttl_s <= 0:
            raise ValueError("ttl_s must be > 0 (or None for no expiry)")
        if not 0 <= ttl_jitter < 1:
            raise ValueError("ttl_jitter must be in [0, 1)")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.ttl_jitter = ttl_jitter
        self.policy_name = policy
        # A policy that admits (W-TinyLFU) keeps the entry bound itself, so that bound goes
        # through its admission decision too; for the others `put` keeps it with `evict_one`.
        # A cache of no entries gets a policy of no capacity, which declines every key.
        self._policy = make_policy(
            policy, max_bytes if max_entries else 0, max_entries=max(max_entries, 1)
        )
        # A policy may take a batch of accesses in one call (W-TinyLFU does): one call per
        # drain instead of one per access.
        self._hit_many: Callable[[list[ResultKey]], None] = getattr(
            self._policy, "hit_many", self._hit_each
        )
        self._timer = timer
        self._rng = rng or random.Random()
        # Keyed by ResultKey; typed Any so the policy's keys index it without a `cast` call
        # per eviction on the write path.
        self._entries: dict[Any, _Entry] = {}
        self._deadlines: list[tuple[float, ResultKey]] = []  # heap; stale items are skipped
        self._accesses: deque[ResultKey] = deque()
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._expirations = 0
        self._invalidations = 0

    @staticmethod
    def entry_size(key: ResultKey, value: bytes, decoded: object = None) -> int:
        """Bytes an entry counts against the budget: its key and its value, the value twice
        when the entry keeps it decoded too."""
        return len(key) + (2 * len(value) if decoded is not None else len(value))

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: ResultKey) -> bytes | None:
        """The live value of `key`, or None; counts a hit or a miss."""
        entry = self._live(key)
        return entry[VALUE] if entry is not None else None

    def get_decoded(self, key: ResultKey) -> tuple[bytes, Any] | None:
        """The live value of `key` and its decoded value (None when it was stored without
        one), or None; counts a hit or a miss as `get` does."""
        entry = self._live(key)
        return (entry[VALUE], entry[DECODED]) if entry is not None else None

    def _live(self, key: ResultKey) -> _Entry | None:
        """The live entry of `key`, or None; counts a hit or a miss."""
        entry = self._entries.get(key)
        if entry is not None:
            expires_at = entry[EXPIRES_AT]
            if expires_at is NEVER or expires_at > self._timer():
                accesses = self._accesses
                accesses.append(key)
                if len(accesses) >= ACCESS_BUFFER_SIZE and self._lock.acquire(blocking=False):
                    try:
                        self._drain_accesses()
                    finally:
                        self._lock.release()
                return entry
        with self._lock:
            self._misses += 1
            if entry is not None and self._entries.get(key) is entry:
                self._expirations += 1
                self._discard(key)
        return None

    def peek(self, key: ResultKey) -> bytes | None:
        """The live value of `key` for another replica: recorded as an access for the policy,
        but not counted as this replica's hit or miss."""
        entry = self._entries.get(key)
        if entry is None or entry[EXPIRES_AT] <= self._timer():
            return None
        with self._lock:
            if key in self._entries:
                self._policy.hit(key)
        return entry[VALUE]

    def __contains__(self, key: object) -> bool:
        """Whether a live entry exists; touches neither recency nor counters."""
        entry = self._entries.get(key)
        return entry is not None and entry[EXPIRES_AT] > self._timer()

    def __len__(self) -> int:
        return len(self._entries)

    # -- writes ---------------------------------------------------------------------------------

    def put(
        self,
        key: ResultKey,
        value: bytes,
        tags: EntryTags = _NO_TAGS,
        ttl_s: float | None = None,
        decoded: object = None,
    ) -> bool:
        """Store `value` under `key`, with `decoded` (its decoded value, for `get_decoded`)
        when given; True when it was admitted.

        Not admitted (False) when the entry alone exceeds the budget, the cache holds no entries,
        or the policy declines it. A previous value of `key` is dropped in every case, so a
        lookup never returns a value older than the last put.
        """
        # Every write runs through here, so each step that has nothing to do is skipped with one
        # test (no pending accesses, deadlines or lifetime; no previous value; nothing evicted).
        charge = len(key) + (2 * len(value) if decoded is not None else len(value))  # entry_size
        lifetime = self.ttl_s if ttl_s is None else ttl_s
        entries = self._entries
        with self._lock:
            expires_at = NEVER
            if self._accesses or self._deadlines or lifetime is not None:
                expires_at = self._prepare_write(lifetime)
            previous = entries.pop(key, None)
            if previous is not None:
                self._bytes -= previous[CHARGE]
                self._policy.remove(key)
            evicted = self._policy.insert(key, charge)
            if evicted:
                self._evictions += len(evicted)
                for victim in evicted:
                    dropped = entries.pop(victim, None)  # None for `key` itself
                    if dropped is not None:
                        self._bytes -= dropped[CHARGE]
                if key in evicted:  # declined, which is no eviction
                    self._evictions -= 1
                    return False
            entries[key] = (value, charge, expires_at, tags, decoded)
            self._bytes += charge
            if expires_at is not NEVER:
                self._schedule(key, expires_at)
            if len(entries) > self.max_entries:
                # The entry count binds: usually one victim, written out (a call costs here).
                victim = self._policy.evict_one()
                if victim is not None:
                    self._evictions += 1
                    dropped = entries.pop(victim, None)
                    if dropped is not None:
                        self._bytes -= dropped[CHARGE]
                    if len(entries) > self.max_entries:
                        self._evict_to_entry_bound()
                return key in entries
            return True

    def pop(self, key: ResultKey) -> bool:
        """Remove `key`; True when it was present."""
        with self._lock:
            return self._discard(key)

    def invalidate(self, predicate: Callable[[EntryTags], bool]) -> int:
        """Remove every entry whose tags satisfy `predicate`; returns how many."""
        return self.invalidate_entries(lambda _, tags: predicate(tags))

    def invalidate_entries(self, selects: Callable[[ResultKey, EntryTags], bool]) -> int:
        """Remove every entry for which `selects(key, tags)` is true; returns how many.

        `selects` runs under the lock, once per entry: it must be quick and must not call
        back into this cache.
        """
        with self._lock:
            doomed = [key for key, entry in self._entries.items() if selects(key, entry[TAGS])]
            for key in doomed:
                self._discard(key)
            self._invalidations += len(doomed)
            return len(doomed)

    def clear(self) -> None:
        """Remove every entry; counters are kept."""
        self.invalidate(lambda _: True)

    def stats(self) -> CacheStats:
        """A snapshot of the counters (pending accesses included)."""
        with self._lock:
            self._drain_accesses()
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
                expirations=self._expirations,
                invalidations=self._invalidations,
            )

    def check_integrity(self) -> None:
        """Raise AssertionError when the entries, the byte count and the policy disagree."""
        with self._lock:
            self._drain_accesses()
            assert self._bytes == sum(e[CHARGE] for e in self._entries.values())
            assert self._bytes <= self.max_bytes and len(self._entries) <= self.max_entries
            assert len(self._policy) == len(self._entries)
            assert all(key in self._policy for key in self._entries)
            self._policy.check_integrity()

    # -- internals (lock held) --------------------------------------------------------------------

    def _drain_accesses(self) -> None:
        # Only the accesses present now: `get` appends without the lock, and later ones wait
        # for the next drain.
        accesses = self._accesses
        popleft = accesses.popleft
        pending = len(accesses)
        self._hit_many([popleft() for _ in range(pending)])
        self._hits += pending

    def _hit_each(self, keys: list[ResultKey]) -> None:
        """`hit_many` for a policy without it: each access to a key still resident."""
        hit = self._policy.hit
        entries = self._entries
        for key in keys:
            if key in entries:
                hit(key)

    def _prepare_write(self, lifetime: float | None) -> float:
        """Apply pending accesses and expire what is due; the deadline of an entry written now
        with `lifetime` (NEVER for None)."""
        if self._accesses:
            self._drain_accesses()
        deadlines = self._deadlines
        if not deadlines and lifetime is None:
            return NEVER
        now = self._timer()
        if deadlines and deadlines[0][0] <= now:  # the heap's head is the next deadline
            self._expire(now)
        if lifetime is None:
            return NEVER
        return now + lifetime * (1 + self._rng.uniform(-self.ttl_jitter, self.ttl_jitter))

    def _schedule(self, key: ResultKey, expires_at: float) -> None:
        """Remember the deadline of the entry just written under `key`."""
        heapq.heappush(self._deadlines, (expires_at, key))
        if len(self._deadlines) > 2 * len(self._entries) + 64:
            self._compact_deadlines()

    def _evict_to_entry_bound(self) -> None:
        evict_one = self._policy.evict_one
        while len(self._entries) > self.max_entries:
            victim = evict_one()
            if victim is None:
                break
            self._evictions += 1
            self._drop(victim)

    def _expire(self, now: float) -> None:
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            expires_at, key = heapq.heappop(deadlines)
            entry = self._entries.get(key)
            if entry is not None and entry[EXPIRES_AT] == expires_at:
                self._expirations += 1
                self._discard(key)

    def _compact_deadlines(self) -> None:
        """Drop heap items of entries that were replaced or removed since they were pushed."""
        self._deadlines = [
            (expires_at, key)
            for expires_at, key in self._deadlines
            if (entry := self._entries.get(key)) is not None and entry[EXPIRES_AT] == expires_at
        ]
        heapq.heapify(self._deadlines)

    def _discard(self, key: ResultKey) -> bool:
        """Remove `key` from the entries and from the policy; False when it was absent."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self._bytes -= entry[CHARGE]
        self._policy.remove(key)
        return True

    def _drop(self, key: Key) -> None:
        """Remove the entry of `key`, which the policy has already let go."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[CHARGE]
