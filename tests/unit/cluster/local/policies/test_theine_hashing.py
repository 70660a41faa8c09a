"""The theine harness of `benchmarks.theine_hashing` replays a trace as the simulator does."""

from __future__ import annotations

import numpy as np

from benchmarks.theine_hashing import HASHES, theine_hit_ratio


def test_a_working_set_that_fits_misses_only_once_per_key() -> None:
    keys = np.array(list(range(50)) * 10, dtype=np.int64)
    for hash_of in HASHES.values():
        assert theine_hit_ratio(keys, 100, hash_of) == 90.0


def test_a_loop_larger_than_the_cache_keeps_the_resident_set_consistent() -> None:
    """Evicted keys leave the harness's resident set: no hit is counted on an absent key."""
    keys = np.array(list(range(300)) * 5, dtype=np.int64)
    for hash_of in HASHES.values():
        assert 0.0 <= theine_hit_ratio(keys, 100, hash_of) <= 100 * 100 * 4 / len(keys)
