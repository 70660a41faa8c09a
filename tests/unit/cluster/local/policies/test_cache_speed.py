"""The speed benchmark measures what it says: every contender, both bounds, interleaved turns."""

from __future__ import annotations

import pytest

from benchmarks.cache_speed import measure


@pytest.mark.parametrize("chunk_size", [64, 1_000])  # turns, and each stream at once
def test_every_contender_gets_a_hit_and_a_put_time_under_each_bound(chunk_size: int) -> None:
    results = measure(50, 300, 2, ["lru", "adaptive"], chunk_size)
    assert set(results) == {
        "dict",
        "OrderedDict",
        "cachetools.LRUCache",
        "cachetools.LRUCache+lock",
        "ResultCache[lru]",
        "ResultCache[adaptive]",
    }
    for name, row in results.items():
        assert row["hit_ns"] > 0 and row["put_evict_ns"] > 0, name
    for policy in ("lru", "adaptive"):
        row = results[f"ResultCache[{policy}]"]
        bounds = [row["put_evict_ns[entries]"], row["put_evict_ns[bytes]"]]
        assert row["put_evict_ns"] == max(bounds)
