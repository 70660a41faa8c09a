"""The `/v1/cache/stats` document."""

from cluster.local.result_cache import CacheStats
from serve_app.stats import cluster_stats, replica_stats

COUNTERS = {"hits", "misses", "hit_ratio", "entries", "bytes", "evictions"}


def test_replica_entry_has_every_contract_name():
    entry = replica_stats(local=CacheStats(hits=3, misses=1, evictions=0, entries=2, bytes=40))
    assert entry.keys() >= COUNTERS
    assert set(entry["tiers"]) == {"local", "peer", "redis"}
    for tier in entry["tiers"].values():
        assert tier.keys() >= COUNTERS
    assert entry["prefix"] == {"queried_tokens": 0, "cached_tokens": 0}
    assert entry["hit_ratio"] == 0.75


def test_total_sums_replicas_and_recomputes_ratios():
    a = replica_stats(local=CacheStats(hits=3, misses=1, evictions=1, entries=2, bytes=40))
    b = replica_stats(local=CacheStats(hits=0, misses=4, evictions=0, entries=4, bytes=60))
    document = cluster_stats({"a": a, "b": b})
    total = document["total"]
    assert (total["hits"], total["misses"], total["entries"], total["bytes"]) == (3, 5, 6, 100)
    assert total["hit_ratio"] == 3 / 8
    assert total["tiers"]["local"]["hits"] == 3
    assert set(document["replicas"]) == {"a", "b"}


def test_empty_cluster():
    assert cluster_stats({})["total"]["hit_ratio"] == 0.0
