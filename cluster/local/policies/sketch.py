"""Popularity estimates for admission: a count-min sketch of 4-bit counters that its owner ages.

TinyLFU (Einziger, Friedman, Manes 2017) asks one question, "is the newcomer more popular than
the victim?", and answers it from a compact, approximate and aging frequency histogram:

- **Count-min sketch**: four rows of saturating counters in 0..15 (the paper's and Caffeine's
  4-bit counters, held one per byte here because CPython indexes a `bytearray` far faster than it
  extracts nibbles). An addition is *conservative*: only the counters equal to the row minimum
  grow, which keeps over-estimation by colliding keys low. The estimate is the row minimum.
  Rows hold `width_factor` (4) x `next_power_of_two(expected_entries)` counters: 16 counters per
  entry in all, Caffeine's density; fewer counters let collisions decide admissions.
- **Aging**: `age()` halves every counter. The owner calls it once per `sample_size` (10 x the
  expected entry count) sightings, because the owner may hold copies of estimates (a policy
  keeps each resident key's estimate in its node) that must be halved at the same moment.
- **Write-back**: `raise_to(h, count)` lifts the counters of `h` that are below `count` to it, a
  batch of conservative additions: a policy that counts a resident key's hits itself records
  them here when the key leaves.

Hashing must be reproducible across processes (decisions are compared between runs and
replicas), so Python's per-process-seeded `hash()` of `str`/`bytes` is never used. `key_hash`
spreads an `int` key with CPython's tuple hash, `hash((key, seed))` (for a pair of ints a
deterministic xxHash-style mix: ints hash to themselves modulo 2**61 - 1, no per-process secret
is involved; about 50 ns), and text, bytes and any other key (by its `repr`) with the seeded
xxh3 of its bytes. Row k indexes at `a + k*b` (Kirsch and Mitzenmacher's double hashing) with
`a` the low 28 bits of the 64-bit hash and `b` its high 28 bits, made odd: CPython computes
fastest on integers below 2**30. Bits 28-35 are left for the adaptive policy to pick its sample
by. Rows are at most 2**22 wide (past about a million entries the sketch merely gets noisier).

A cache whose charges are bytes learns its entry count only as it fills, so `ensure_capacity`
grows the sketch later; growth repeats each row, which keeps every estimate (an index under the
wider mask is the old index or the old index plus the old width).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import xxhash

_MASK64 = (1 << 64) - 1
MAX_COUNT = 15
_HALVE = bytes(value >> 1 for value in range(256))
_MIN_ENTRIES = 16
_MAX_WIDTH = 1 << 22
_LOW28 = (1 << 28) - 1
_xxh3 = xxhash.xxh3_64_intdigest


def key_hash(key: Hashable, seed: int) -> int:
    """The sketch's 64-bit hash of `key` under `seed`: stable across processes, well mixed."""
    if type(key) is int:
        return hash((key, seed)) & _MASK64
    if type(key) is str:
        return _xxh3(_utf8(key), seed)
    if isinstance(key, (bytes, bytearray, memoryview)):
        return _xxh3(bytes(key), seed)
    if isinstance(key, int):  # bool and int subclasses
        return hash((int(key), seed)) & _MASK64
    return _xxh3(repr(key).encode("utf-8", "surrogatepass"), seed)


def _utf8(text: str) -> bytes:
    try:
        return text.encode()  # the fast path; lone surrogates need the handler below
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


Rows = Sequence[bytearray]


def _indexes(mask: int, h: int) -> list[int]:
    """The counter of `h` in each row: `a + k*b` under the mask (double hashing)."""
    a = h & _LOW28
    b = (h >> 36) | 1
    return [(a + k * b) & mask for k in range(4)]


def _estimate(rows: Rows, mask: int, h: int) -> int:
    """The row minimum of the counters of `h`."""
    return min(row[index] for row, index in zip(rows, _indexes(mask, h), strict=True))


def _raise_to(rows: Rows, mask: int, h: int, count: int) -> None:
    """Lift the counters of `h` that are below `count` to `count`."""
    for row, index in zip(rows, _indexes(mask, h), strict=True):
        if row[index] < count:
            row[index] = count


def _add(rows: Rows, mask: int, h: int) -> int:
    """One conservative increment of the counters of `h` (saturating); the new estimate.

    Once per miss, so `_indexes` and `_estimate` are written out here.
    """
    a = h & _LOW28
    b = (h >> 36) | 1
    i0 = a & mask
    i1 = (a + b) & mask
    i2 = (a + 2 * b) & mask
    i3 = (a + 3 * b) & mask
    r0, r1, r2, r3 = rows
    low = min(r0[i0], r1[i1], r2[i2], r3[i3])
    if low < MAX_COUNT:
        # Only the counters at the minimum grow.
        if r0[i0] == low:
            r0[i0] = low + 1
        if r1[i1] == low:
            r1[i1] = low + 1
        if r2[i2] == low:
            r2[i2] = low + 1
        if r3[i3] == low:
            r3[i3] = low + 1
        low += 1
    return low


class FrequencySketch:
    """Approximate access counts of hashed keys, in 0..15; halved when the owner calls `age`.

    Collisions only ever add: an estimate is never below the sightings recorded since the last
    aging plus the halved earlier ones.
    """

    def __init__(
        self,
        expected_entries: int,
        seed: int = 0,
        *,
        sample_factor: float = 10.0,
        width_factor: int = 4,
    ) -> None:
        if width_factor < 1 or width_factor & (width_factor - 1):
            raise ValueError(f"width_factor must be a power of two, got {width_factor}")
        if sample_factor <= 0:
            raise ValueError(f"sample_factor must be > 0, got {sample_factor}")
        self.seed = seed & _MASK64
        self._sample_factor = sample_factor
        self._width_factor = width_factor
        self._rows: list[bytearray] = []
        self._mask = 0
        # Sightings after which the owner should call `age`.
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
        else:
            self._rows = [bytearray(width) for _ in range(4)]
        self._mask = width - 1
        self.sample_size = max(1, int(self._sample_factor * max(expected_entries, _MIN_ENTRIES)))

    def hash(self, key: Hashable) -> int:
        """`key_hash(key, seed)`: what `estimate` and `raise_to` take."""
        return key_hash(key, self.seed)

    def add_key(self, key: Hashable) -> tuple[int, int]:
        """Record one sighting of `key`; returns its hash and its new estimate.

        This runs once per miss, so the common key types are hashed here, inline.
        """
        if type(key) is str:
            try:
                data = key.encode()
            except UnicodeEncodeError:
                data = key.encode("utf-8", "surrogatepass")
            h = _xxh3(data, self.seed)
        elif type(key) is int:
            h = hash((key, self.seed)) & _MASK64
        else:
            h = key_hash(key, self.seed)
        return h, _add(self._rows, self._mask, h)

    def add(self, h: int) -> int:
        """Record one sighting of hash `h`; returns its new estimate."""
        return _add(self._rows, self._mask, h)

    def estimate(self, h: int) -> int:
        """Estimated sightings of hash `h`, halved at each aging."""
        return _estimate(self._rows, self._mask, h)

    def raise_to(self, h: int, count: int) -> None:
        """Lift the counters of hash `h` that are below `count` (at most 15) to `count`."""
        _raise_to(self._rows, self._mask, h, count)

    def age(self) -> None:
        """Halve every counter: the start of a new sample period."""
        self._rows = [row.translate(_HALVE) for row in self._rows]
