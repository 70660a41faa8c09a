"""Least recently used: the classic, and the baseline every other policy must beat."""

from __future__ import annotations

from collections import OrderedDict

from cluster.local.policies.base import ChargedPolicy, Key, register


@register("lru")
class LRUPolicy(ChargedPolicy):
    """Evicts the key accessed least recently."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[Key, None] = OrderedDict()

    def hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def _admit(self, key: Key, charge: int) -> None:
        self._order[key] = None

    def _evict(self) -> Key:
        return self._order.popitem(last=False)[0]

    def _forget(self, key: Key) -> None:
        del self._order[key]

    def check_integrity(self) -> None:
        super().check_integrity()
        assert self._order.keys() == self._charges.keys(), "order and charges disagree"
