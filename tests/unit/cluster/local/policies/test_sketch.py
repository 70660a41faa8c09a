"""The frequency sketch: estimates, saturation, aging, write-back, growth, stable hashing."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Hashable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.local.policies.sketch import MAX_COUNT, FrequencySketch, key_hash

ROOT = Path(__file__).resolve().parents[5]


def estimate_of(sketch: FrequencySketch, key: Hashable) -> int:
    """The sketch's estimate of `key`, as its owners read it: `estimate` of the key's hash."""
    return sketch.estimate(sketch.hash(key))


def test_estimates_count_sightings_and_never_undercount() -> None:
    sketch = FrequencySketch(1000)
    for key in range(200):
        for _ in range(key % 7):
            sketch.add_key(key)
    exact = sum(estimate_of(sketch, key) == key % 7 for key in range(200))
    assert all(estimate_of(sketch, key) >= key % 7 for key in range(200))
    assert exact >= 190, "with 16 counters per entry, collisions should be rare"


def test_counters_saturate_at_fifteen() -> None:
    sketch = FrequencySketch(100)
    for _ in range(40):
        sketch.add_key("hot")
    assert estimate_of(sketch, "hot") == 15


def test_aging_is_the_owners_call() -> None:
    """The sketch never ages by itself: an owner holding copies of estimates ages both."""
    sketch = FrequencySketch(1024, sample_factor=0.2)
    assert sketch.sample_size == 204
    for _ in range(12):
        sketch.add_key("a")
    for key in range(1000, 1400):  # well past the sample size
        sketch.add_key(key)
    assert estimate_of(sketch, "a") == 12
    sketch.age()
    assert estimate_of(sketch, "a") == 6


def test_explicit_age_halves_every_counter() -> None:
    sketch = FrequencySketch(64)
    for _ in range(9):
        sketch.add_key(7)
    sketch.age()
    assert estimate_of(sketch, 7) == 4
    assert sketch.add_key(7)[1] == 5  # counts into the halved rows, not the ones before


def test_add_key_counts_into_the_grown_rows() -> None:
    sketch = FrequencySketch(16)
    sketch.add_key("k")
    sketch.ensure_capacity(5000)
    assert sketch.add_key("k")[1] == 2
    assert estimate_of(sketch, "k") == 2


def test_add_key_returns_the_hash_and_the_new_estimate() -> None:
    sketch = FrequencySketch(64, seed=9)
    keys = ("text", "日本語", b"bytes", 42, -7, 2**70, True, ("tuple", 1), "lone \udc80 surrogate")
    for key in keys:
        h, estimate = sketch.add_key(key)
        assert h == key_hash(key, 9) == sketch.hash(key)
        assert estimate == 1 == sketch.estimate(h)
        assert sketch.add_key(key) == (h, 2)


def test_raise_to_records_a_batch_of_sightings() -> None:
    sketch = FrequencySketch(64)
    h = sketch.hash("written back")
    sketch.raise_to(h, 5)
    assert sketch.estimate(h) == 5
    sketch.raise_to(h, 3)  # never lowers
    assert sketch.estimate(h) == 5
    assert sketch.add_key("written back")[1] == 6


def test_hashes_differ_by_seed_and_spread_ints() -> None:
    assert key_hash(7, 0) != key_hash(7, 1)
    assert key_hash("k", 0) != key_hash("k", 1)
    assert len({key_hash(key, 0) >> 56 for key in range(4096)}) > 200


def test_growth_keeps_estimates() -> None:
    sketch = FrequencySketch(16)
    for key in range(40):
        for _ in range(key % 5):
            sketch.add_key(key)
    before = [estimate_of(sketch, key) for key in range(40)]
    width = sketch.width
    sketch.ensure_capacity(5000)
    assert sketch.width > width
    assert [estimate_of(sketch, key) for key in range(40)] == before
    sketch.ensure_capacity(10)  # never shrinks
    assert sketch.width > width


def test_sample_size_follows_the_expected_entries() -> None:
    sketch = FrequencySketch(16)
    sketch.ensure_capacity(1000)
    assert sketch.sample_size == 10_000


def test_invalid_options_are_refused() -> None:
    with pytest.raises(ValueError, match="width_factor"):
        FrequencySketch(10, width_factor=3)
    with pytest.raises(ValueError, match="sample_factor"):
        FrequencySketch(10, sample_factor=0)


def test_string_estimates_do_not_depend_on_the_process_hash_seed() -> None:
    """Python seeds `hash(str)` per process; the sketch must not follow it."""
    program = (
        "from cluster.local.policies.sketch import FrequencySketch\n"
        "s = FrequencySketch(16, seed=3)\n"
        "keys = [f'k{i}' for i in range(300)]\n"
        "for i, k in enumerate(keys):\n"
        "    for _ in range(i % 4):\n"
        "        s.add_key(k)\n"
        "print([s.estimate(s.hash(k)) for k in keys])\n"
    )
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        result = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout)
    assert len(outputs) == 1


# --- the compiled counter steps ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(h=st.integers(0, (1 << 64) - 1), seed=st.integers(0, 2**32))
def test_add_is_a_conservative_increment(h: int, seed: int) -> None:
    """`add` raises exactly the counters at the row minimum by one (saturating at 15), and
    returns the new minimum."""
    rng = random.Random(seed)
    sketch = FrequencySketch(16)
    sketch._rows = [bytearray(rng.randrange(MAX_COUNT + 1) for _ in range(64)) for _ in range(4)]
    sketch._mask = 63
    a, b = h & ((1 << 28) - 1), (h >> 36) | 1
    slots = [(row, (a + k * b) & 63) for k, row in enumerate(sketch._rows)]
    before = [row[index] for row, index in slots]
    low = min(before)
    assert sketch.estimate(h) == low
    expected = [value + 1 if value == low and low < MAX_COUNT else value for value in before]
    assert sketch.add(h) == min(low + 1, MAX_COUNT)
    assert [row[index] for row, index in slots] == expected
