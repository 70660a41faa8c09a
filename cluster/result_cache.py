"""The replica-local result cache: request key -> encoded answer.

Bounded by bytes and by entries, least recently used out first. Values are the encoded answers
(bytes), so an entry's size is exact: its key plus its value. Every operation holds one lock for
a few dictionary operations, so the cache is safe to share between asyncio tasks and threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from cluster.keys import ResultKey


@dataclass(frozen=True)
class CacheStats:
    """A consistent snapshot of a cache's counters."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int

    @property
    def hit_ratio(self) -> float:
        """Hits over lookups; 0.0 before the first lookup."""
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class ResultCache:
    """An LRU map from `ResultKey` to bytes within `max_bytes` and `max_entries`."""

    def __init__(self, max_bytes: int, max_entries: int) -> None:
        if max_bytes < 0 or max_entries < 0:
            raise ValueError("max_bytes and max_entries must be >= 0")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[ResultKey, bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @staticmethod
    def entry_size(key: ResultKey, value: bytes) -> int:
        """Bytes an entry counts against the budget: its key and its value."""
        return len(key) + len(value)

    def get(self, key: ResultKey) -> bytes | None:
        """The value of `key`, now most recently used, or None; counts a hit or a miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: ResultKey, value: bytes) -> bool:
        """Store `value` under `key`, evicting least recently used entries to make room.

        Returns False, storing nothing, when the entry alone exceeds `max_bytes` or the cache
        holds no entries at all; a previous value of `key` is dropped in that case too, so a
        lookup never returns a value older than the last put.
        """
        size = self.entry_size(key, value)
        with self._lock:
            self._discard(key)
            if size > self.max_bytes or self.max_entries == 0:
                return False
            while self._entries and (
                self._bytes + size > self.max_bytes or len(self._entries) >= self.max_entries
            ):
                evicted_key, evicted = self._entries.popitem(last=False)
                self._bytes -= self.entry_size(evicted_key, evicted)
                self._evictions += 1
            self._entries[key] = value
            self._bytes += size
            return True

    def pop(self, key: ResultKey) -> bool:
        """Remove `key`; True when it was present."""
        with self._lock:
            return self._discard(key)

    def clear(self) -> None:
        """Remove every entry; counters are kept."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                entries=len(self._entries),
                bytes=self._bytes,
            )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership without touching recency or counters."""
        return key in self._entries

    def _discard(self, key: ResultKey) -> bool:
        value = self._entries.pop(key, None)
        if value is None:
            return False
        self._bytes -= self.entry_size(key, value)
        return True
