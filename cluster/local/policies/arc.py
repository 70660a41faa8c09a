"""ARC, the Adaptive Replacement Cache (Megiddo and Modha, FAST 2003), generalized to charges.

Two LRU lists share the capacity: T1 holds keys seen once recently, T2 keys seen at least twice.
Two ghost lists, B1 and B2, remember keys recently evicted from T1 and T2. A miss that hits a
ghost is evidence that its list was too short, so the target size `p` of T1 moves towards it:
up on a B1 hit, down on a B2 hit, by at least the newcomer's charge and more when the other
ghost is larger (the paper's ratio). Replacement evicts from T1 while T1 exceeds `p`, else from
T2. Ghosts are trimmed so that T1+B1 stays within the capacity and all four lists within twice
the capacity, all in charge units (with unit charges this is the paper's algorithm).
"""

from __future__ import annotations

from collections import OrderedDict

from cluster.local.policies.base import Key, register


@register("arc")
class ARCPolicy:
    """Adaptive balance between a recency list (T1) and a frequency list (T2)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._t1: OrderedDict[Key, int] = OrderedDict()
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._t1_used = 0
        self._t2_used = 0
        self._b1_used = 0
        self._b2_used = 0
        self._p = 0.0

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    @property
    def used(self) -> int:
        return self._t1_used + self._t2_used

    @property
    def target(self) -> float:
        """The adaptive target size of T1, in charge units."""
        return self._p

    def hit(self, key: Key) -> None:
        charge = self._t1.pop(key, None)
        if charge is not None:
            self._t1_used -= charge
            self._t2[key] = charge
            self._t2_used += charge
        else:
            self._t2.move_to_end(key)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge > self.capacity:
            return [key]
        evicted: list[Key] = []
        capacity = self.capacity
        ghost = self._b1.pop(key, None)
        if ghost is not None:
            self._b1_used -= ghost
            ratio = self._b2_used / self._b1_used if self._b1_used else 1.0
            self._p = min(float(capacity), self._p + charge * max(ratio, 1.0))
            self._make_room(charge, False, evicted)
            self._t2[key] = charge
            self._t2_used += charge
        else:
            ghost = self._b2.pop(key, None)
            if ghost is not None:
                self._b2_used -= ghost
                ratio = self._b1_used / self._b2_used if self._b2_used else 1.0
                self._p = max(0.0, self._p - charge * max(ratio, 1.0))
                self._make_room(charge, True, evicted)
                self._t2[key] = charge
                self._t2_used += charge
            else:
                self._make_room(charge, False, evicted)
                self._t1[key] = charge
                self._t1_used += charge
        self._trim_ghosts()
        return evicted

    def _make_room(self, charge: int, in_b2: bool, evicted: list[Key]) -> None:
        while self._t1_used + self._t2_used + charge > self.capacity:
            evicted.append(self._replace(in_b2))

    def _replace(self, in_b2: bool) -> Key:
        """Evict the LRU key of T1 (to B1) or of T2 (to B2), as ARC's REPLACE does."""
        t1_used = self._t1_used
        if self._t1 and (t1_used > self._p or (in_b2 and t1_used >= self._p) or not self._t2):
            key, charge = self._t1.popitem(last=False)
            self._t1_used -= charge
            self._b1[key] = charge
            self._b1_used += charge
        else:
            key, charge = self._t2.popitem(last=False)
            self._t2_used -= charge
            self._b2[key] = charge
            self._b2_used += charge
        return key

    def _trim_ghosts(self) -> None:
        capacity = self.capacity
        while self._b1 and self._t1_used + self._b1_used > capacity:
            _, charge = self._b1.popitem(last=False)
            self._b1_used -= charge
        total = self._t1_used + self._t2_used + self._b1_used
        while self._b2 and total + self._b2_used > 2 * capacity:
            _, charge = self._b2.popitem(last=False)
            self._b2_used -= charge

    def remove(self, key: Key) -> None:
        charge = self._t1.pop(key, None)
        if charge is not None:
            self._t1_used -= charge
            return
        charge = self._t2.pop(key, None)
        if charge is not None:
            self._t2_used -= charge

    def evict_one(self) -> Key | None:
        if not (self._t1 or self._t2):
            return None
        key = self._replace(False)
        self._trim_ghosts()
        return key

    def check_integrity(self) -> None:
        assert self._t1_used == sum(self._t1.values()), "T1 charge drifted"
        assert self._t2_used == sum(self._t2.values()), "T2 charge drifted"
        assert self._b1_used == sum(self._b1.values()), "B1 charge drifted"
        assert self._b2_used == sum(self._b2.values()), "B2 charge drifted"
        assert self.used <= self.capacity, "over capacity"
        assert self._t1_used + self._b1_used <= self.capacity, "T1 + B1 over capacity"
        everything = self.used + self._b1_used + self._b2_used
        assert everything <= 2 * self.capacity, "directory over twice the capacity"
        lists = [self._t1, self._t2, self._b1, self._b2]
        keys = [key for lst in lists for key in lst]
        assert len(keys) == len(set(keys)), "a key in two lists"
        assert 0.0 <= self._p <= self.capacity, "target out of range"
