"""Least recently used: the classic, and the baseline every other policy must beat."""

from __future__ import annotations

from collections import OrderedDict

from cluster.local.policies.base import Key, register


@register("lru")
class LRUPolicy:
    """Evicts the key accessed least recently."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._charges: OrderedDict[Key, int] = OrderedDict()
        self._used = 0

    def __contains__(self, key: object) -> bool:
        return key in self._charges

    def __len__(self) -> int:
        return len(self._charges)

    @property
    def used(self) -> int:
        return self._used

    def hit(self, key: Key) -> None:
        self._charges.move_to_end(key)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge > self.capacity:
            return [key]
        evicted = []
        while self._used + charge > self.capacity:
            victim, victim_charge = self._charges.popitem(last=False)
            self._used -= victim_charge
            evicted.append(victim)
        self._charges[key] = charge
        self._used += charge
        return evicted

    def remove(self, key: Key) -> None:
        charge = self._charges.pop(key, None)
        if charge is not None:
            self._used -= charge

    def evict_one(self) -> Key | None:
        if not self._charges:
            return None
        victim, charge = self._charges.popitem(last=False)
        self._used -= charge
        return victim

    def check_integrity(self) -> None:
        assert self._used == sum(self._charges.values()), "used != sum of charges"
        assert self._used <= self.capacity, "over capacity"
