"""W-TinyLFU: a small LRU admission window in front of a frequency-filtered segmented LRU.

The layout is Caffeine's (Einziger, Eytan, Friedman, Manes, "Adaptive Software Cache
Management", 2018):

    newcomer -> [ window LRU ] --overflow--> candidate --TinyLFU--> [ probation | protected ]
                                                                      main space: SLRU 20/80

- Every newcomer enters the **window**, so a burst of new keys gets a chance to prove itself.
- A key leaving the window is a **candidate** for the main space. When the main space is full it
  meets the **victim** (the least recent probation key, else the least recent protected key) and
  the `FrequencySketch` decides who stays: the candidate must be more popular by more than
  `admit_margin`. A scan of one-time keys therefore washes through the window and never
  displaces the popular main space. Admission and eviction stay separate decisions.
- A hit in probation promotes the key to **protected** (80% of the main space); protected
  overflow is demoted back to the most recent end of probation.
- `admit_margin=1` discounts the access that made the candidate a candidate: the candidate was
  just requested, while the victim is compared at the oldest point of its reuse cycle. Without
  that discount a loop larger than the cache churns forever (each newcomer leads the victim by
  exactly that one access); with it, the cache holds a stable part of the loop. Workloads whose
  popular keys arrive with only one access more than the victims prefer 0; the adaptive policy
  picks between them online. The plain `tinylfu` keeps Caffeine's rule (0) by default.
- Ties reject the candidate, which lets a hash-flooding attacker pin a victim by inflating its
  estimate; so a candidate that is warm (estimate >= 6) but not more popular is still admitted
  with probability 1/128, from a seeded generator (no global randomness).

Charges are arbitrary positive integers: the window and the segments are bounded in charge
units, a candidate may need several victims, and it must beat each of them in turn; a candidate
that cannot fit even in an empty main space is rejected. The window keeps at least one charge
unit, so on small caches a newcomer still has one step of recency before it must compete.

The sketch is sized by entry count, not by charge: a cache charged in bytes does not know its
entry count in advance, so the sketch starts at `min(capacity, 1024)` entries and grows with the
resident count (`expected_entries` skips the growth when the count is known).
"""

from __future__ import annotations

import random
from collections import OrderedDict

from cluster.policies.base import Key, register
from cluster.policies.sketch import FrequencySketch

_HASHDOS_THRESHOLD = 6
_INITIAL_SKETCH_ENTRIES = 1024


@register("tinylfu")
class WTinyLFUPolicy:
    """W-TinyLFU with a window of `window_fraction` of the capacity.

    `sketch` lets shadow copies (see `adaptive`) read the owner's sketch; a policy that is given
    a sketch never grows it, and only `hit`/`insert` record accesses, `_touch`/`_place` do not.
    """

    def __init__(
        self,
        capacity: int,
        *,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        admit_margin: int = 0,
        seed: int = 0,
        expected_entries: int | None = None,
        doorkeeper: bool = False,
        sample_factor: float = 10.0,
        width_factor: int = 4,
        sketch: FrequencySketch | None = None,
    ) -> None:
        if not 0.0 <= window_fraction <= 1.0:
            raise ValueError(f"window_fraction must be in [0, 1], got {window_fraction}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        if admit_margin < 0:
            raise ValueError(f"admit_margin must be >= 0, got {admit_margin}")
        self.capacity = capacity
        self.admit_margin = admit_margin
        self._protected_fraction = protected_fraction
        self._window: OrderedDict[Key, int] = OrderedDict()
        self._probation: OrderedDict[Key, int] = OrderedDict()
        self._protected: OrderedDict[Key, int] = OrderedDict()
        self._window_used = 0
        self._protected_used = 0
        self._used = 0
        self._window_max = 0
        self._protected_max = 0
        self._set_window_max(round(capacity * window_fraction))
        if expected_entries is None:
            expected_entries = min(capacity, _INITIAL_SKETCH_ENTRIES)
        self._sketch_entries = max(expected_entries, 1)
        self._owns_sketch = sketch is None
        if sketch is None:
            sketch = FrequencySketch(
                self._sketch_entries,
                seed=seed,
                sample_factor=sample_factor,
                doorkeeper=doorkeeper,
                width_factor=width_factor,
            )
        self.sketch = sketch
        self._random = random.Random(seed)

    def _set_window_max(self, window_max: int) -> None:
        """Bound the window at `window_max` (at least 1) units; the main space gets the rest."""
        window_max = max(1, min(window_max, self.capacity))
        self._window_max = window_max
        self._protected_max = int((self.capacity - window_max) * self._protected_fraction)

    @property
    def window_max(self) -> int:
        """The window's bound in charge units."""
        return self._window_max

    def __contains__(self, key: object) -> bool:
        return key in self._window or key in self._probation or key in self._protected

    def __len__(self) -> int:
        return len(self._window) + len(self._probation) + len(self._protected)

    @property
    def used(self) -> int:
        return self._used

    def charge_of(self, key: Key) -> int:
        """The charge of resident `key` (KeyError when it is not resident)."""
        charge = self._window.get(key)
        if charge is None:
            charge = self._probation.get(key)
            if charge is None:
                charge = self._protected[key]
        return charge

    def hit(self, key: Key) -> None:
        self.sketch.increment(key)
        self._touch(key)

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge > self.capacity:
            return [key]
        self.sketch.increment(key)
        return self._place(key, charge)

    def _touch(self, key: Key) -> None:
        """The structural part of a hit: recency and SLRU promotion."""
        window = self._window
        if key in window:
            window.move_to_end(key)
            return
        protected = self._protected
        if key in protected:
            protected.move_to_end(key)
            return
        charge = self._probation.pop(key)
        protected[key] = charge
        self._protected_used += charge
        if self._protected_used > self._protected_max:
            self._demote()

    def _place(self, key: Key, charge: int) -> list[Key]:
        """The structural part of an insert (`charge <= capacity`): window, then admission."""
        window = self._window
        window[key] = charge
        self._window_used += charge
        self._used += charge
        evicted: list[Key] = []
        while self._window_used > self._window_max:
            candidate, candidate_charge = window.popitem(last=False)
            self._window_used -= candidate_charge
            self._used -= candidate_charge
            self._admit(candidate, candidate_charge, evicted)
        # The window holds the newcomer whatever its size; when the candidates that left it
        # freed less than that (or the window has just grown), the main space gives way.
        while self._used > self.capacity:
            evicted.append(self._evict_main())
        entries = len(window) + len(self._probation) + len(self._protected)
        if entries > self._sketch_entries and self._owns_sketch:
            self._sketch_entries = min(self.capacity, 2 * entries)
            self.sketch.ensure_capacity(self._sketch_entries)
        return evicted

    def _demote(self) -> None:
        """Move the least recent protected keys to probation until protected fits its bound."""
        protected = self._protected
        probation = self._probation
        while self._protected_used > self._protected_max and protected:
            key, charge = protected.popitem(last=False)
            self._protected_used -= charge
            probation[key] = charge

    def _admit(self, candidate: Key, charge: int, evicted: list[Key]) -> None:
        """Place `candidate` (just out of the window) in probation, or reject it, per TinyLFU."""
        probation = self._probation
        while self._used + charge > self.capacity:
            if probation:
                victim = next(iter(probation))
            elif self._protected:
                victim = next(iter(self._protected))
            else:
                evicted.append(candidate)
                return
            if not self._admits(candidate, victim):
                evicted.append(candidate)
                return
            evicted.append(self._evict_main())
        probation[candidate] = charge
        self._used += charge

    def _admits(self, candidate: Key, victim: Key) -> bool:
        sketch = self.sketch
        candidate_freq = sketch.frequency(candidate)
        if candidate_freq > sketch.frequency(victim) + self.admit_margin:
            return True
        if candidate_freq >= _HASHDOS_THRESHOLD:
            return self._random.getrandbits(7) == 0
        return False

    def _evict_main(self) -> Key:
        """Evict the least recent probation key, else the least recent protected key."""
        if self._probation:
            key, charge = self._probation.popitem(last=False)
        else:
            key, charge = self._protected.popitem(last=False)
            self._protected_used -= charge
        self._used -= charge
        return key

    def remove(self, key: Key) -> None:
        charge = self._window.pop(key, None)
        if charge is not None:
            self._window_used -= charge
        else:
            charge = self._probation.pop(key, None)
            if charge is None:
                charge = self._protected.pop(key, None)
                if charge is None:
                    return
                self._protected_used -= charge
        self._used -= charge

    def evict_one(self) -> Key | None:
        if self._probation or self._protected:
            return self._evict_main()
        if self._window:
            key, charge = self._window.popitem(last=False)
            self._window_used -= charge
            self._used -= charge
            return key
        return None

    def resize_window(self, window_max: int) -> None:
        """Move the window/main boundary to `window_max` units, moving keys across at once.

        A larger window takes the least recent main keys (probation first) into its most recent
        end; a smaller one sends its least recent keys to the most recent end of probation.
        Nothing is evicted: the total charge does not change.
        """
        self._set_window_max(window_max)
        window = self._window
        probation = self._probation
        protected = self._protected
        while self._window_used > self._window_max:
            key, charge = window.popitem(last=False)
            self._window_used -= charge
            probation[key] = charge
        while probation or protected:
            source = probation if probation else protected
            key = next(iter(source))
            charge = source[key]
            if self._window_used + charge > self._window_max:
                break
            del source[key]
            if source is protected:
                self._protected_used -= charge
            window[key] = charge
            self._window_used += charge
        if self._protected_used > self._protected_max:
            self._demote()

    def check_integrity(self) -> None:
        window_used = sum(self._window.values())
        probation_used = sum(self._probation.values())
        protected_used = sum(self._protected.values())
        assert self._window_used == window_used, "window charge drifted"
        assert self._protected_used == protected_used, "protected charge drifted"
        assert self._used == window_used + probation_used + protected_used, "used drifted"
        assert self._used <= self.capacity, "over capacity"
        assert self._window_used <= self._window_max, "window over its bound"
        assert self._protected_used <= self._protected_max, "protected over its bound"
        keys = [*self._window, *self._probation, *self._protected]
        assert len(keys) == len(set(keys)), "a key sits in two segments"
