"""Least frequently used, in O(1) per operation (Shah, Mitra, Matani 2010).

Keys sit in frequency buckets; each bucket is an LRU list, so ties between equally frequent keys
go to the least recent. Counts never age: classic LFU, a baseline that shows what pure frequency
buys and how it fails when popularity shifts (a formerly hot key stays forever).
"""

from __future__ import annotations

from collections import OrderedDict

from cluster.local.policies.base import ChargedPolicy, Key, register


@register("lfu")
class LFUPolicy(ChargedPolicy):
    """Evicts the least frequently accessed key; the least recent among equals."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._counts: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        # The smallest count with a bucket, or larger when `remove` emptied it (fixed lazily).
        self._min_count = 1

    def hit(self, key: Key) -> None:
        count = self._counts[key]
        buckets = self._buckets
        bucket = buckets[count]
        del bucket[key]
        if not bucket:
            del buckets[count]
            if self._min_count == count:
                self._min_count = count + 1
        count += 1
        self._counts[key] = count
        target = buckets.get(count)
        if target is None:
            target = buckets[count] = OrderedDict()
        target[key] = None

    def _admit(self, key: Key, charge: int) -> None:
        self._counts[key] = 1
        bucket = self._buckets.get(1)
        if bucket is None:
            bucket = self._buckets[1] = OrderedDict()
        bucket[key] = None
        self._min_count = 1

    def _evict(self) -> Key:
        buckets = self._buckets
        bucket = buckets.get(self._min_count)
        if bucket is None:
            self._min_count = min(buckets)
            bucket = buckets[self._min_count]
        key, _ = bucket.popitem(last=False)
        if not bucket:
            del buckets[self._min_count]
            if buckets:
                self._min_count = min(buckets)
        del self._counts[key]
        return key

    def _forget(self, key: Key) -> None:
        count = self._counts.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]

    def check_integrity(self) -> None:
        super().check_integrity()
        assert self._counts.keys() == self._charges.keys(), "counts and charges disagree"
        in_buckets = [key for bucket in self._buckets.values() for key in bucket]
        assert len(in_buckets) == len(self._charges), "bucket membership drifted"
        for count, bucket in self._buckets.items():
            assert bucket, "empty bucket kept"
            assert all(self._counts[key] == count for key in bucket), "key in the wrong bucket"
        if self._buckets:
            assert self._min_count <= min(self._buckets), "min count above the smallest bucket"
