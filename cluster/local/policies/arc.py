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

from cluster.local.policies.base import ChargedPolicy, Key, register


@register("arc")
class ARCPolicy(ChargedPolicy):
    """Adaptive balance between a recency list (T1) and a frequency list (T2)."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._t1: OrderedDict[Key, int] = OrderedDict()
        self._t2: OrderedDict[Key, int] = OrderedDict()
        self._b1: OrderedDict[Key, int] = OrderedDict()
        self._b2: OrderedDict[Key, int] = OrderedDict()
        self._t1_used = 0
        self._b1_used = 0
        self._b2_used = 0
        self._p = 0.0
        # Where the newcomer being inserted was remembered: None, or the ghost list B1 or B2.
        self._ghost_of_newcomer: OrderedDict[Key, int] | None = None

    @property
    def target(self) -> float:
        """The adaptive target size of T1, in charge units."""
        return self._p

    def restore(
        self,
        recent: list[tuple[Key, int]],
        frequent: list[tuple[Key, int]],
        target: float,
    ) -> None:
        """Fill an empty ARC with resident keys and their charges, each list oldest first:
        `recent` (seen once) becomes T1, `frequent` (seen more than once) T2, and the target
        size of T1 becomes `target` (clamped to the capacity). The charges must fit the
        capacity together. No ghosts are remembered.

        For an owner that switches its residents from another structure to ARC.
        """
        assert not self._charges, "restore fills an empty ARC"
        for keys, lst in ((recent, self._t1), (frequent, self._t2)):
            for key, charge in keys:
                lst[key] = charge
                self._charges[key] = charge
                self._used += charge
        self._t1_used = sum(self._t1.values())
        self._p = min(max(target, 0.0), float(self.capacity))

    def residents(self) -> tuple[list[tuple[Key, int]], list[tuple[Key, int]]]:
        """The keys and charges of T1 (seen once) and of T2 (seen more), each oldest first."""
        return list(self._t1.items()), list(self._t2.items())

    def hit(self, key: Key) -> None:
        charge = self._t1.pop(key, None)
        if charge is not None:
            self._t1_used -= charge
            self._t2[key] = charge
        else:
            self._t2.move_to_end(key)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        self._ghost_of_newcomer = None
        if charge <= self.capacity:
            self._adapt(key, charge)
        evicted = super().insert(key, charge)
        self._ghost_of_newcomer = None
        self._trim_ghosts()
        return evicted

    def _adapt(self, key: Key, charge: int) -> None:
        """A ghost hit moves the target `p` towards the list the ghost came from."""
        ghost = self._b1.pop(key, None)
        if ghost is not None:
            self._b1_used -= ghost
            ratio = self._b2_used / self._b1_used if self._b1_used else 1.0
            self._p = min(float(self.capacity), self._p + charge * max(ratio, 1.0))
            self._ghost_of_newcomer = self._b1
            return
        ghost = self._b2.pop(key, None)
        if ghost is not None:
            self._b2_used -= ghost
            ratio = self._b1_used / self._b2_used if self._b2_used else 1.0
            self._p = max(0.0, self._p - charge * max(ratio, 1.0))
            self._ghost_of_newcomer = self._b2

    def _admit(self, key: Key, charge: int) -> None:
        if self._ghost_of_newcomer is None:
            self._t1[key] = charge
            self._t1_used += charge
        else:
            self._t2[key] = charge

    def _evict(self) -> Key:
        """Evict the LRU key of T1 (to B1) or of T2 (to B2), as ARC's REPLACE does."""
        t1_used = self._t1_used
        in_b2 = self._ghost_of_newcomer is self._b2
        if self._t1 and (t1_used > self._p or (in_b2 and t1_used >= self._p) or not self._t2):
            key, charge = self._t1.popitem(last=False)
            self._t1_used -= charge
            self._b1[key] = charge
            self._b1_used += charge
        else:
            key, charge = self._t2.popitem(last=False)
            self._b2[key] = charge
            self._b2_used += charge
        return key

    def _trim_ghosts(self) -> None:
        capacity = self.capacity
        while self._b1 and self._t1_used + self._b1_used > capacity:
            _, charge = self._b1.popitem(last=False)
            self._b1_used -= charge
        total = self._used + self._b1_used
        while self._b2 and total + self._b2_used > 2 * capacity:
            _, charge = self._b2.popitem(last=False)
            self._b2_used -= charge

    def _forget(self, key: Key) -> None:
        charge = self._t1.pop(key, None)
        if charge is not None:
            self._t1_used -= charge
        else:
            del self._t2[key]

    def evict_one(self) -> Key | None:
        key = super().evict_one()
        self._trim_ghosts()
        return key

    def check_integrity(self) -> None:
        super().check_integrity()
        assert self._t1_used == sum(self._t1.values()), "T1 charge drifted"
        assert self._used == self._t1_used + sum(self._t2.values()), "T2 charge drifted"
        assert self._b1_used == sum(self._b1.values()), "B1 charge drifted"
        assert self._b2_used == sum(self._b2.values()), "B2 charge drifted"
        assert self._t1_used + self._b1_used <= self.capacity, "T1 + B1 over capacity"
        everything = self.used + self._b1_used + self._b2_used
        assert everything <= 2 * self.capacity, "directory over twice the capacity"
        lists = [self._t1, self._t2, self._b1, self._b2]
        keys = [key for lst in lists for key in lst]
        assert len(keys) == len(set(keys)), "a key in two lists"
        assert self._charges.keys() == self._t1.keys() | self._t2.keys(), "membership drifted"
        assert 0.0 <= self._p <= self.capacity, "target out of range"
