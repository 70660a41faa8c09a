"""W-TinyLFU: a small admission window in front of a frequency-filtered segmented main space.

The layout is Caffeine's (Einziger, Eytan, Friedman, Manes, "Adaptive Software Cache
Management", 2018):

    newcomer -> [ window ] --overflow--> candidate --TinyLFU--> [ probation | protected ]
                                                                  main space: SLRU 20/80

- Every newcomer enters the **window**, so a burst of new keys gets a chance to prove itself.
- A key leaving the window is a **candidate** for the main space. When the main space is full
  it meets the **victim** (the oldest probation key, else the oldest protected key) and the
  frequency estimates (`sketch`) decide who stays: the candidate must be more popular by more
  than `admit_margin`, so a scan of one-time keys washes through the window and never displaces
  the popular main space. A key used again in probation is promoted to **protected** (80% of the
  main space); protected overflow goes back to probation.
- The admission rule has three knobs, because no single rule suits every workload:
  `admit_margin=1` discounts the access that made the candidate a candidate (without it, a loop
  larger than the cache churns forever: each newcomer leads the victim by exactly that access);
  `margin_from` applies the margin only to candidates whose estimate is at least that much
  (`3` lets a key's first reuse in, which tells it from a one-hit wonder); `lower_every` takes
  one from the estimate of a victim at every `lower_every`-th candidate it rejects (never below
  1), so that a main space filled in an earlier phase thaws before aging halves the estimates.
  0 turns it off.
- Ties reject the candidate, which lets a hash-flooding attacker pin a victim by inflating its
  estimate; so a warm candidate (estimate >= 6) that is not more popular is still admitted with
  probability 1/128, from a seeded generator.

Bookkeeping waits until room is needed, so that a hit costs one counter update in the key's node:

- **CLOCK orders.** Each segment is a FIFO queue; a hit only counts the access, and a key that
  reaches the head of its queue with accesses counted gets a second chance instead of leaving
  (CLOCK's approximation of Caffeine's exact LRU orders).
- **Frequencies in the nodes.** A node carries its key's estimate (the sketch's at the miss that
  brought it in, plus the hits folded in when the hand passes, capped at 15); the sketch is
  written back only when a key leaves with a higher estimate than it came with. Aging halves the
  sketch and every node's estimate together.
- **Lazy removal.** `remove` marks the node dead; the hands skip dead nodes, and the queues are
  compacted when dead nodes outnumber the living ones.

Charges are arbitrary positive integers: the window and the segments are bounded in charge
units, and a candidate must beat every victim it needs. An owner's entry bound (`max_entries`)
is kept as a **minimum charge** of `ceil(capacity / max_entries)`, so the one admission decision
covers whichever bound binds (an owner that kept the bound with `evict_one` after the fact would
bypass admission). The sketch is sized by entry count, which a cache charged in bytes learns
only as it fills: it starts at `min(capacity, 1024)` entries and grows with the resident count.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Any

from cluster.local.policies.base import Key, register
from cluster.local.policies.sketch import MAX_COUNT, FrequencySketch

_HASHDOS_THRESHOLD = 6
_INITIAL_SKETCH_ENTRIES = 1024

# A node is a list (cheapest to create and index in CPython), one per resident key:
REFS = 0  # hits counted since the hand last passed the key
CHARGE = 1
FREQ = 2  # the frequency estimate, hits folded in up to the last pass, at most 15
HASH = 3  # the key's sketch hash
BASE = 4  # FREQ when the key came in (halved with it): higher at exit means write back
SEGMENT = 5  # which queue holds the node, or DEAD once removed
KEY = 6
SAMPLED = 7  # whether the adaptive policy simulates this key (see `adaptive`)

WINDOW, PROBATION, PROTECTED, DEAD = range(4)
Node = list[Any]


@register("tinylfu", bounds_entries=True)
class WTinyLFUPolicy:
    """W-TinyLFU with a window of `window_fraction` of the capacity."""

    # Slots, because attribute access is most of a miss's cost.
    __slots__ = (
        "_dead",
        "_index",
        "_probation",
        "_protected",
        "_protected_fraction",
        "_protected_max",
        "_protected_used",
        "_random",
        "_rejections",
        "_sightings",
        "_sketch_entries",
        "_used",
        "_window",
        "_window_max",
        "_window_used",
        "admit_margin",
        "capacity",
        "departures",
        "lower_every",
        "margin_from",
        "max_entries",
        "min_charge",
        "sketch",
    )

    def __init__(
        self,
        capacity: int,
        *,
        window_fraction: float = 0.01,
        protected_fraction: float = 0.8,
        admit_margin: int = 0,
        margin_from: int = 0,
        lower_every: int = 0,
        seed: int = 0,
        expected_entries: int | None = None,
        sample_factor: float = 10.0,
        width_factor: int = 4,
        max_entries: int | None = None,
    ) -> None:
        if not 0.0 <= window_fraction <= 1.0:
            raise ValueError(f"window_fraction must be in [0, 1], got {window_fraction}")
        if not 0.0 <= protected_fraction <= 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1], got {protected_fraction}")
        if admit_margin < 0:
            raise ValueError(f"admit_margin must be >= 0, got {admit_margin}")
        if margin_from < 0:
            raise ValueError(f"margin_from must be >= 0, got {margin_from}")
        if lower_every < 0:
            raise ValueError(f"lower_every must be >= 0, got {lower_every}")
        if max_entries is not None and max_entries < 1:
            raise ValueError(f"max_entries must be >= 1 (or None), got {max_entries}")
        self.max_entries = max_entries
        self.capacity = capacity
        self.min_charge = self._min_charge()
        self.admit_margin = admit_margin
        self.margin_from = margin_from
        self.lower_every = lower_every
        self._rejections = 0  # since the last lowering (see `_lower_victim`)
        self._protected_fraction = protected_fraction
        self._index: dict[Key, Node] = {}
        self._window: deque[Node] = deque()
        self._probation: deque[Node] = deque()
        self._protected: deque[Node] = deque()
        self._dead = 0
        self._window_used = 0
        self._protected_used = 0
        self._used = 0
        self._window_max = 0
        self._protected_max = 0
        self._set_window_max(round(capacity * window_fraction))
        if expected_entries is None:
            expected_entries = min(capacity, _INITIAL_SKETCH_ENTRIES)
        self._sketch_entries = max(expected_entries, 1)
        self.sketch = FrequencySketch(
            self._sketch_entries, seed=seed, sample_factor=sample_factor, width_factor=width_factor
        )
        self._sightings = 0  # since the last aging
        self.departures = 0  # keys that left: evicted, rejected or removed
        self._random = random.Random(seed)

    def _min_charge(self) -> int:
        """The charge that makes `max_entries` keys fill the capacity (1 without that bound)."""
        if self.max_entries is None:
            return 1
        return max(1, -(-self.capacity // self.max_entries))

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
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used(self) -> int:
        return self._used

    def hit(self, key: Key) -> None:
        self._index[key][REFS] += 1

    def hit_many(self, keys: Iterable[Key]) -> None:
        """`hit` each resident key of `keys`, in order, skipping the others: an owner that
        buffers accesses hands over a batch in one call (keys may have left since)."""
        index = self._index
        for key in keys:
            node = index.get(key)
            if node is not None:
                node[REFS] += 1

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        if charge < self.min_charge:
            charge = self.min_charge
        if charge > self.capacity:
            return [key]
        return self.insert_hashed(key, charge, self.sketch.hash(key))

    def insert_hashed(self, key: Key, charge: int, h: int, sampled: bool = False) -> list[Key]:
        """`insert` of a key whose sketch hash is `h` and whose `charge` fits the capacity."""
        evicted = self.place(key, charge, h, self.sketch.add(h), sampled)
        self._sightings += 1
        if self._sightings >= self.sketch.sample_size:
            self._age()
        if not evicted and len(self._index) > self._sketch_entries:  # see `_grow_sketch`
            self._grow_sketch()
        return evicted

    def _grow_sketch(self) -> None:
        """Size the sketch for twice the resident keys (at most the capacity).

        Only an insert that evicted nothing can take the key count past the sketch's size (one
        that evicts removes at least what it adds, and the sketch is never sized below the key
        count), so `insert` asks only then.
        """
        self._sketch_entries = min(self.capacity, 2 * len(self._index))
        self.sketch.ensure_capacity(self._sketch_entries)

    def place(self, key: Key, charge: int, h: int, freq: int, sampled: bool = False) -> list[Key]:
        """The structural part of an insert (`charge <= capacity`): window, then admission.

        `h` is the key's sketch hash and `freq` its estimate including this access. Window
        overflow goes to admission, then the main space gives way until everything fits. This
        runs on every miss: the common steps are written out here, with the running totals in
        locals, because CPython charges for every call and attribute access.
        """
        node = [0, charge, freq, h, freq, WINDOW, key, sampled]
        index = self._index
        index[key] = node
        window = self._window
        window.append(node)
        probation = self._probation
        used = self._used + charge
        window_used = self._window_used + charge
        window_max = self._window_max
        capacity = self.capacity
        admit_margin = self.admit_margin
        margin_from = self.margin_from
        evicted: list[Key] = []
        newcomer: Node | None = node
        while window_used > window_max:
            candidate = window.popleft()
            if candidate[SEGMENT] != WINDOW:
                self._dead -= 1
                continue
            refs = candidate[REFS]
            if refs:
                self._fold(candidate, refs)
                window.append(candidate)
                continue
            if candidate is newcomer and window:
                # As in an LRU window, the newcomer is the last to go: the others have just had
                # their second chance, so the next in line is the candidate.
                window.append(candidate)
                newcomer = None
                continue
            cost = candidate[CHARGE]
            window_used -= cost
            if used > capacity:
                # TinyLFU: the candidate must beat every victim it needs, else it leaves. The
                # common verdict is written out: the victim is the oldest probation key, unused
                # since it came in, and the candidate, below the flooding threshold (no coin is
                # tossed), does not beat it; `_contest` decides every other case.
                victim = probation[0] if probation else None
                candidate_freq = candidate[FREQ]
                if (
                    victim is not None
                    and candidate_freq < _HASHDOS_THRESHOLD
                    and candidate_freq
                    <= victim[FREQ] + (admit_margin if candidate_freq >= margin_from else 0)
                    and victim[SEGMENT] == PROBATION
                    and not victim[REFS]
                ):
                    used -= cost
                    if self.lower_every:
                        self._lower_victim(victim)
                    # `_forget(candidate)`, written out; it has no hits pending (see above).
                    loser = candidate[KEY]
                    del index[loser]
                    candidate[SEGMENT] = DEAD
                    self.departures += 1
                    if candidate_freq > candidate[BASE]:
                        self.sketch.raise_to(candidate[HASH], candidate_freq)
                    evicted.append(loser)
                    continue
                self._used = used - cost
                admitted = self._contest(candidate, evicted)
                used = self._used + cost if admitted else self._used
                if not admitted:
                    continue
            candidate[SEGMENT] = PROBATION
            probation.append(candidate)
        self._window_used = window_used
        self._used = used
        # The window holds the newcomer whatever its size; when the candidates that left it
        # freed less than that (or the window has just grown), the main space gives way.
        while self._used > capacity:
            victim = self._victim()
            if victim is None:
                break
            evicted.append(self._evict(victim))
        return evicted

    def _contest(self, candidate: Node, evicted: list[Key]) -> bool:
        """Evict the victims `candidate` beats until it fits; False when one beats it first.

        `candidate` is out of every queue and out of `used`; a loser is forgotten.
        """
        charge = candidate[CHARGE]
        probation = self._probation
        while self._used + charge > self.capacity:
            victim = probation[0] if probation else None
            if victim is None or victim[SEGMENT] != PROBATION or victim[REFS]:
                victim = self._victim()
            if victim is None or not self._admits(candidate, victim):
                if victim is not None and self.lower_every:
                    self._lower_victim(victim)
                evicted.append(self._forget(candidate))
                return False
            evicted.append(self._evict(victim))
        return True

    def _lower_victim(self, victim: Node) -> None:
        """Count a rejection by `victim`; every `lower_every`-th takes one from its estimate (not
        below 1).

        Only the node's estimate drops, not the sketch's: if the victim leaves and comes back,
        its past accesses count again (a lowered estimate is written back only where it is still
        above the one the victim came with).
        """
        self._rejections += 1
        if self._rejections >= self.lower_every:
            self._rejections = 0
            if victim[FREQ] > 1:
                victim[FREQ] -= 1

    def _fold(self, node: Node, refs: int) -> None:
        """Count `refs` hits into `node`'s estimate: the hand has passed it."""
        node[REFS] = 0
        freq = node[FREQ] + refs
        node[FREQ] = freq if freq < MAX_COUNT else MAX_COUNT
        self._sightings += refs

    def _admits(self, candidate: Node, victim: Node) -> bool:
        """TinyLFU's verdict: whether `candidate` should replace `victim`."""
        candidate_freq = candidate[FREQ]
        margin = self.admit_margin if candidate_freq >= self.margin_from else 0
        if candidate_freq > victim[FREQ] + margin:
            return True
        if candidate_freq >= _HASHDOS_THRESHOLD:
            return self._random.getrandbits(7) == 0
        return False

    def _victim(self) -> Node | None:
        """The node the main space gives up next, left at the head of its queue; None if empty.

        The oldest probation key not used since it came in; keys used meanwhile are promoted on
        the way. Without probation keys, the oldest protected key not used since the hand last
        passed it.
        """
        probation = self._probation
        while probation:
            node = probation[0]
            if node[SEGMENT] != PROBATION:
                probation.popleft()
                self._dead -= 1
                continue
            refs = node[REFS]
            if not refs:
                return node
            probation.popleft()
            self._fold(node, refs)
            node[SEGMENT] = PROTECTED
            self._protected.append(node)
            self._protected_used += node[CHARGE]
            if self._protected_used > self._protected_max:
                self._demote()
        protected = self._protected
        while protected:
            node = protected[0]
            if node[SEGMENT] != PROTECTED:
                protected.popleft()
                self._dead -= 1
                continue
            refs = node[REFS]
            if not refs:
                return node
            protected.popleft()
            self._fold(node, refs)
            protected.append(node)
        return None

    def _demote(self) -> None:
        """Move the oldest unused protected keys to probation until protected fits its bound."""
        protected = self._protected
        probation = self._probation
        while self._protected_used > self._protected_max and protected:
            node = protected.popleft()
            if node[SEGMENT] != PROTECTED:
                self._dead -= 1
                continue
            refs = node[REFS]
            if refs:
                self._fold(node, refs)
                protected.append(node)
                continue
            self._protected_used -= node[CHARGE]
            node[SEGMENT] = PROBATION
            probation.append(node)

    def _evict(self, victim: Node) -> Key:
        """Evict `victim`, which `_victim` left at the head of its queue."""
        charge = victim[CHARGE]
        if victim[SEGMENT] == PROBATION:
            self._probation.popleft()
        else:
            self._protected.popleft()
            self._protected_used -= charge
        self._used -= charge
        return self._forget(victim)

    def _forget(self, node: Node) -> Key:
        """Drop a node that no queue holds any more; its hits go to the sketch."""
        key: Key = node[KEY]
        del self._index[key]
        node[SEGMENT] = DEAD
        self.departures += 1
        refs = node[REFS]
        if refs:
            self._fold(node, refs)
        freq = node[FREQ]
        if freq > node[BASE]:
            self.sketch.raise_to(node[HASH], freq)
        return key

    def _age(self) -> None:
        """Halve the sketch and every estimate held in a node: a new sample period begins."""
        self.sketch.age()
        self._sightings //= 2
        for node in self._index.values():
            node[FREQ] >>= 1
            node[BASE] >>= 1

    def remove(self, key: Key) -> None:
        node = self._index.get(key)
        if node is None:
            return
        segment = node[SEGMENT]
        charge = node[CHARGE]
        if segment == WINDOW:
            self._window_used -= charge
        elif segment == PROTECTED:
            self._protected_used -= charge
        self._used -= charge
        self._forget(node)
        self._dead += 1
        if self._dead > max(64, len(self._index)):
            self._compact()

    def _compact(self) -> None:
        """Drop the dead nodes from every queue."""
        self._window = deque(node for node in self._window if node[SEGMENT] == WINDOW)
        self._probation = deque(node for node in self._probation if node[SEGMENT] == PROBATION)
        self._protected = deque(node for node in self._protected if node[SEGMENT] == PROTECTED)
        self._dead = 0

    def evict_one(self) -> Key | None:
        probation = self._probation
        if probation:
            # The common case, written out (see `place`): an unused key heads probation.
            victim = probation[0]
            if victim[SEGMENT] == PROBATION and not victim[REFS]:
                probation.popleft()
                self._used -= victim[CHARGE]
                key: Key = victim[KEY]
                del self._index[key]
                victim[SEGMENT] = DEAD
                self.departures += 1
                if victim[FREQ] > victim[BASE]:
                    self.sketch.raise_to(victim[HASH], victim[FREQ])
                return key
        found = self._victim()  # second chances, promotions, dead nodes
        if found is not None:
            return self._evict(found)
        window = self._window
        while window:
            node = window.popleft()
            if node[SEGMENT] != WINDOW:
                self._dead -= 1
                continue
            self._window_used -= node[CHARGE]
            self._used -= node[CHARGE]
            return self._forget(node)
        return None

    def resize_window(self, window_max: int) -> None:
        """Move the window/main boundary to `window_max` units, moving keys across at once.

        A larger window takes the oldest main keys (probation first) into its young end; a
        smaller one sends its oldest keys to the young end of probation. Nothing is evicted:
        the total charge does not change.
        """
        self._set_window_max(window_max)
        window = self._window
        probation = self._probation
        while self._window_used > self._window_max:
            node = window.popleft()
            if node[SEGMENT] != WINDOW:
                self._dead -= 1
                continue
            self._window_used -= node[CHARGE]
            node[SEGMENT] = PROBATION
            probation.append(node)
        for source, segment in ((probation, PROBATION), (self._protected, PROTECTED)):
            while source:
                node = source[0]
                if node[SEGMENT] != segment:
                    source.popleft()
                    self._dead -= 1
                    continue
                charge = node[CHARGE]
                if self._window_used + charge > self._window_max:
                    break
                source.popleft()
                if segment == PROTECTED:
                    self._protected_used -= charge
                node[SEGMENT] = WINDOW
                window.append(node)
                self._window_used += charge
            if source:  # its oldest key does not fit: protected waits until probation is empty
                break
        if self._protected_used > self._protected_max:
            self._demote()

    def take_residents(self) -> list[Node]:
        """Empty the policy and return its live nodes, coldest first: probation, protected, then
        the window, each oldest first. Hits are folded into the estimates and estimates above
        what a key came with are written to the sketch, which stays; no departure is counted.

        For an owner that moves the resident keys to another structure (see `adaptive`).
        """
        nodes = []
        for queue, segment in (
            (self._probation, PROBATION),
            (self._protected, PROTECTED),
            (self._window, WINDOW),
        ):
            for node in queue:
                if node[SEGMENT] != segment:
                    continue
                refs = node[REFS]
                if refs:
                    self._fold(node, refs)
                if node[FREQ] > node[BASE]:
                    self.sketch.raise_to(node[HASH], node[FREQ])
                node[SEGMENT] = DEAD
                nodes.append(node)
            queue.clear()
        self._index.clear()
        self._dead = 0
        self._window_used = self._protected_used = self._used = 0
        return nodes

    def restore(self, entries: list[tuple[Key, int, int, bool, bool]]) -> None:
        """Fill an empty policy with resident keys, coldest first, each as
        (key, charge, sketch hash, sampled, seen more than once); the charges must fit the
        capacity together.

        The youngest keys fill the window; of the others, the youngest seen more than once
        fill the protected segment and the rest wait in probation in their order. Estimates
        come from the sketch, at least 2 for a key seen more than once.
        """
        assert not self._index, "restore fills an empty policy"
        placed: list[Node] = []
        window_room = self._window_max
        protected_room = self._protected_max
        for key, charge, h, sampled, frequent in reversed(entries):
            freq = min(max(self.sketch.estimate(h), 2 if frequent else 1), MAX_COUNT)
            if window_room >= charge:
                segment = WINDOW
                window_room -= charge
            else:
                window_room = 0  # the window is the young end: it takes no older key
                if frequent and protected_room >= charge:
                    segment = PROTECTED
                    protected_room -= charge
                else:
                    segment = PROBATION
            placed.append([0, charge, freq, h, freq, segment, key, sampled])
        queues = {WINDOW: self._window, PROBATION: self._probation, PROTECTED: self._protected}
        for node in reversed(placed):
            queues[node[SEGMENT]].append(node)
            self._index[node[KEY]] = node
            self._used += node[CHARGE]
            if node[SEGMENT] == WINDOW:
                self._window_used += node[CHARGE]
            elif node[SEGMENT] == PROTECTED:
                self._protected_used += node[CHARGE]
        if len(self._index) > self._sketch_entries:
            self._grow_sketch()

    def check_integrity(self) -> None:
        used = {WINDOW: 0, PROBATION: 0, PROTECTED: 0}
        live = 0
        dead = 0
        for queue, segment in (
            (self._window, WINDOW),
            (self._probation, PROBATION),
            (self._protected, PROTECTED),
        ):
            for node in queue:
                if node[SEGMENT] == segment:
                    assert self._index.get(node[KEY]) is node, "a queued node is not indexed"
                    assert 0 <= node[FREQ] <= MAX_COUNT, "estimate out of range"
                    used[segment] += node[CHARGE]
                    live += 1
                else:
                    assert node[SEGMENT] == DEAD, "a node sits in the wrong queue"
                    dead += 1
        assert live == len(self._index), "an indexed node is in no queue (or in two)"
        assert dead == self._dead, "dead count drifted"
        assert self._window_used == used[WINDOW], "window charge drifted"
        assert self._protected_used == used[PROTECTED], "protected charge drifted"
        assert self._used == sum(used.values()), "used drifted"
        assert self._used <= self.capacity, "over capacity"
        if self.max_entries is not None:
            assert len(self._index) <= self.max_entries, "over the entry bound"
        assert self._window_used <= self._window_max, "window over its bound"
        assert self._protected_used <= self._protected_max, "protected over its bound"
