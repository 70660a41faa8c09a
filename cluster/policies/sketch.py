"""Popularity estimates for admission: a count-min sketch with periodic aging and a doorkeeper.

TinyLFU (Einziger, Friedman, Manes 2017) asks one question, "is the newcomer more popular than
the victim?", and answers it from a compact, approximate and aging frequency histogram:

- **Count-min sketch**: four rows of saturating counters in 0..15 (the paper's and Caffeine's
  4-bit counters, held one per byte here because CPython indexes a `bytearray` far faster than it
  extracts nibbles). An increment is *conservative*: only the counters equal to the row minimum
  grow, which keeps over-estimation by colliding keys low. The estimate is the row minimum.
  Rows hold `width_factor` (4) x `next_power_of_two(expected_entries)` counters: 16 counters per
  entry in all, Caffeine's density. Fewer counters cost hit ratio on traces with many distinct
  keys per cache slot (3 points on LIRS multi3 at 1x).
- **Aging**: after `sample_size` (10 x the expected entry count) recorded sightings every counter
  is halved (and the doorkeeper cleared), so the histogram follows a changing workload.
- **Doorkeeper** (optional, off by default): a Bloom filter in front of the sketch. A key's first
  sighting in a sample period only sets its doorkeeper bits; an estimate adds 1 when the
  doorkeeper holds the key. The paper uses it to save counter memory on one-hit wonders. Here
  counters are bytes anyway, and measured on the shared traces the reset of the doorkeeper at
  each aging (which forgets one sighting of every key) costs more than it saves: 4 points on
  LIRS multi3, 1 on cloudPhysics. So it exists, is tested, and is off unless asked for.

Hashing must be reproducible across processes (decisions are compared between runs and
replicas), so Python's per-process-seeded `hash()` of `str`/`bytes` is never used:
`stable_key_hash` hashes text and bytes with xxh64, and any other non-int key by the xxh64 of its
`repr`; an `int` key is its own stable hash. The sketch then spreads the stable hash and its seed
with CPython's tuple hash, `hash((stable_hash, seed))`: for a pair of ints that is a
deterministic xxHash-style integer mix (ints hash to themselves modulo 2**61 - 1, no
per-process secret is involved), and at about 70 ns it is five times cheaper than a 64-bit
mixer written in Python. Row k indexes with bits 14k.. of that one 64-bit value; rows are at
most 2**22 wide so that the last row stays inside the 64 bits (past about a million entries
the sketch stops growing and merely gets noisier).

A cache whose charges are bytes learns its entry count only as it fills, so `ensure_capacity`
grows the sketch later; growth repeats each row, which keeps every estimate (an index under the
wider mask is the old index or the old index plus the old width).
"""

from __future__ import annotations

from collections.abc import Hashable

import xxhash

_MASK64 = (1 << 64) - 1
_MAX_COUNT = 15
_HALVE = bytes(value >> 1 for value in range(256))
_MIN_ENTRIES = 16
_DOOR_SLOTS = 8
_MAX_WIDTH = 1 << 22


def stable_key_hash(key: Hashable) -> int:
    """A 64-bit hash of `key` that is the same in every process (unlike `hash` of a str)."""
    if type(key) is int:
        return key & _MASK64
    if isinstance(key, str):
        return xxhash.xxh64_intdigest(key.encode("utf-8", "surrogatepass"))
    if isinstance(key, (bytes, bytearray, memoryview)):
        return xxhash.xxh64_intdigest(bytes(key))
    if isinstance(key, int):  # bool and int subclasses
        return int(key) & _MASK64
    return xxhash.xxh64_intdigest(repr(key).encode("utf-8", "surrogatepass"))


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


class FrequencySketch:
    """Approximate, aging access counts of keys: estimates in 0..15 (0..16 with the doorkeeper).

    `increment(key)` records one sighting; `frequency(key)` estimates the sightings since the
    last aging plus half of the earlier ones (halved once per aging). Collisions only ever add.
    """

    def __init__(
        self,
        expected_entries: int,
        seed: int = 0,
        *,
        sample_factor: float = 10.0,
        width_factor: int = 4,
        doorkeeper: bool = False,
    ) -> None:
        if width_factor < 1 or width_factor & (width_factor - 1):
            raise ValueError(f"width_factor must be a power of two, got {width_factor}")
        if sample_factor <= 0:
            raise ValueError(f"sample_factor must be > 0, got {sample_factor}")
        self._seed = seed & _MASK64
        self._sample_factor = sample_factor
        self._width_factor = width_factor
        self.doorkeeper = doorkeeper
        self._rows: list[bytearray] = []
        self._door = bytearray()
        self._door_mask = 0
        self._mask = 0
        self._additions = 0
        # Estimates asked again before the next increment (a shadow policy replaying the same
        # admission contest) are answered from here; any increment clears it.
        self._memo: dict[Hashable, int] = {}
        self.sample_size = 0
        self.ensure_capacity(expected_entries)

    @property
    def width(self) -> int:
        """Counters per row."""
        return len(self._rows[0])

    def ensure_capacity(self, expected_entries: int) -> None:
        """Suit `expected_entries` distinct resident keys; never shrinks, keeps every estimate."""
        entries = _power_of_two_at_least(max(expected_entries, _MIN_ENTRIES))
        width = min(self._width_factor * entries, _MAX_WIDTH)
        if self._rows and width <= len(self._rows[0]):
            return
        if self._rows:
            factor = width // len(self._rows[0])
            self._rows = [row * factor for row in self._rows]
            self._door = self._door * factor
        else:
            self._rows = [bytearray(width) for _ in range(4)]
            self._door = bytearray(_DOOR_SLOTS * width // self._width_factor)
        self._mask = width - 1
        self._door_mask = len(self._door) - 1
        self.sample_size = max(1, int(self._sample_factor * max(expected_entries, _MIN_ENTRIES)))

    def increment(self, key: Hashable) -> None:
        """Record one sighting of `key`; ages the sketch after every `sample_size` sightings."""
        if self._memo:
            self._memo = {}
        h = hash((key if type(key) is int else stable_key_hash(key), self._seed)) & _MASK64
        if self.doorkeeper and self._door_admits(h):
            return
        mask = self._mask
        r0, r1, r2, r3 = self._rows
        i0 = h & mask
        i1 = (h >> 14) & mask
        i2 = (h >> 28) & mask
        i3 = (h >> 42) & mask
        c0 = r0[i0]
        c1 = r1[i1]
        c2 = r2[i2]
        c3 = r3[i3]
        low = min(c0, c1, c2, c3)
        if low == _MAX_COUNT:
            return
        low += 1
        if c0 < low:
            r0[i0] = low
        if c1 < low:
            r1[i1] = low
        if c2 < low:
            r2[i2] = low
        if c3 < low:
            r3[i3] = low
        self._additions += 1
        if self._additions >= self.sample_size:
            self.age()

    def _door_admits(self, h: int) -> bool:
        """Set `h`'s doorkeeper bits; True when they were not all set (a first sighting)."""
        door = self._door
        mask = self._door_mask
        first = h & mask
        second = (h >> 32) & mask
        if door[first] and door[second]:
            return False
        door[first] = door[second] = 1
        self._additions += 1
        if self._additions >= self.sample_size:
            self.age()
        return True

    def frequency(self, key: Hashable) -> int:
        """Estimated sightings of `key`, halved at each aging."""
        count = self._memo.get(key)
        if count is not None:
            return count
        h = hash((key if type(key) is int else stable_key_hash(key), self._seed)) & _MASK64
        mask = self._mask
        r0, r1, r2, r3 = self._rows
        count = min(r0[h & mask], r1[(h >> 14) & mask], r2[(h >> 28) & mask], r3[(h >> 42) & mask])
        if self.doorkeeper:
            door = self._door
            door_mask = self._door_mask
            if door[h & door_mask] and door[(h >> 32) & door_mask]:
                count += 1
        self._memo[key] = count
        return count

    def age(self) -> None:
        """Halve every counter and clear the doorkeeper: the start of a new sample period."""
        self._memo = {}
        self._rows = [row.translate(_HALVE) for row in self._rows]
        if self.doorkeeper:
            self._door = bytearray(len(self._door))
        self._additions //= 2
