"""S3-FIFO (Yang et al., SOSP 2023): three FIFO queues, lazy promotion, quick demotion.

- A newcomer enters the **small** queue (10% of the capacity), unless the **ghost** queue
  remembers it from a recent eviction out of small: then it goes straight to **main**.
- Leaving small, a key that was hit while there moves to main; the others are evicted (their
  keys go to the ghost). Most one-hit wonders thus leave after a short stay ("quick demotion").
- Main is a FIFO with reinsertion: a key with a positive hit count (capped at 3) goes back to the
  head with its count decremented; the first key with count 0 is evicted.
- Hits only bump a small counter: no list moves on the hit path.

Charges: the queues and the ghost are bounded in charge units (the ghost by main's share).
"""

from __future__ import annotations

from collections import OrderedDict

from cluster.local.policies.base import ChargedPolicy, Key, register

_MAX_FREQ = 3


@register("s3fifo")
class S3FIFOPolicy(ChargedPolicy):
    """Small FIFO + main FIFO with reinsertion + ghost FIFO of recently evicted keys."""

    def __init__(self, capacity: int, *, small_fraction: float = 0.1) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), got {small_fraction}")
        super().__init__(capacity)
        self._small_max = max(1, round(capacity * small_fraction))
        self._ghost_max = max(1, capacity - self._small_max)
        self._small: OrderedDict[Key, int] = OrderedDict()
        self._main: OrderedDict[Key, int] = OrderedDict()
        self._ghost: OrderedDict[Key, int] = OrderedDict()
        self._freq: dict[Key, int] = {}
        self._small_used = 0
        self._ghost_used = 0

    def hit(self, key: Key) -> None:
        freq = self._freq[key]
        if freq < _MAX_FREQ:
            self._freq[key] = freq + 1

    def _admit(self, key: Key, charge: int) -> None:
        ghost_charge = self._ghost.pop(key, None)
        if ghost_charge is not None:
            self._ghost_used -= ghost_charge
            self._main[key] = charge
        else:
            self._small[key] = charge
            self._small_used += charge
        self._freq[key] = 0

    def _evict(self) -> Key:
        if self._small and (self._small_used >= self._small_max or not self._main):
            key = self._evict_small()
            if key is not None:
                return key
        return self._evict_main()

    def _evict_small(self) -> Key | None:
        """Evict from small, moving hit keys to main on the way; None when small ran empty."""
        small = self._small
        freq = self._freq
        while small:
            key, charge = small.popitem(last=False)
            self._small_used -= charge
            if freq[key] > 0:
                freq[key] = 0
                self._main[key] = charge
                continue
            del freq[key]
            self._ghost[key] = charge
            self._ghost_used += charge
            while self._ghost_used > self._ghost_max:
                _, old_charge = self._ghost.popitem(last=False)
                self._ghost_used -= old_charge
            return key
        return None

    def _evict_main(self) -> Key:
        main = self._main
        freq = self._freq
        while True:
            key, charge = main.popitem(last=False)
            count = freq[key]
            if count:
                freq[key] = count - 1
                main[key] = charge
                continue
            del freq[key]
            return key

    def _forget(self, key: Key) -> None:
        del self._freq[key]
        charge = self._small.pop(key, None)
        if charge is not None:
            self._small_used -= charge
        else:
            del self._main[key]

    def check_integrity(self) -> None:
        super().check_integrity()
        small_used = sum(self._small.values())
        assert self._small_used == small_used, "small charge drifted"
        assert self._used == small_used + sum(self._main.values()), "used drifted"
        assert self._ghost_used == sum(self._ghost.values()), "ghost charge drifted"
        assert self._ghost_used <= self._ghost_max, "ghost over its bound"
        assert self._freq.keys() == self._small.keys() | self._main.keys(), "membership drifted"
        assert self._freq.keys() == self._charges.keys(), "charges drifted"
        assert not (self._small.keys() & self._main.keys()), "a key in both queues"
        assert not (self._ghost.keys() & self._freq.keys()), "a resident key in the ghost"
        assert all(0 <= f <= _MAX_FREQ for f in self._freq.values()), "frequency out of range"
