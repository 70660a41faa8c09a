"""The `/v1/cache/stats` document: per-replica counters and their cluster total, and the
counters of the ingress replica that answered (`ingress`: its own cache of answers).

Shape of one replica's entry (and of `total`):

    {"hits", "misses", "hit_ratio", "entries", "bytes", "evictions",
     "tiers": {"local" | "peer" | "redis": {same six counters}},
     "prefix": {"queried_tokens", "cached_tokens"}}

Tiers a replica does not have report zeros, so dashboards can rely on every name. A replica's
entry also has `cluster`: the Ray node and the process it runs in (`node_id`, `pid`), its ring
size and version, Redis breaker state, mean peer and Redis fetch latencies, corrupt values seen,
single-flight waits and dropped background stores, each model's version, and its model pool
(`models`: loaded, loads, evictions, load seconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cluster.local.result_cache import CacheStats

TIERS = ("local", "peer", "redis")
COUNTERS = ("hits", "misses", "entries", "bytes", "evictions")
EMPTY = CacheStats(hits=0, misses=0, evictions=0, entries=0, bytes=0)


def _counters(stats: CacheStats) -> dict[str, Any]:
    return {
        "hits": stats.hits,
        "misses": stats.misses,
        "hit_ratio": stats.hit_ratio,
        "entries": stats.entries,
        "bytes": stats.bytes,
        "evictions": stats.evictions,
    }


def replica_stats(
    local: CacheStats,
    peer: CacheStats = EMPTY,
    redis: CacheStats = EMPTY,
    prefix_queried_tokens: int = 0,
    prefix_cached_tokens: int = 0,
) -> dict[str, Any]:
    """One replica's entry.

    The top-level counters describe the result cache as a whole: a hit in any tier is a hit, a
    miss is a lookup that no tier answered (the local miss count less later tiers' hits).
    """
    overall = CacheStats(
        hits=local.hits + peer.hits + redis.hits,
        misses=max(local.misses - peer.hits - redis.hits, 0),
        evictions=local.evictions,
        entries=local.entries,
        bytes=local.bytes,
    )
    return {
        **_counters(overall),
        "tiers": {"local": _counters(local), "peer": _counters(peer), "redis": _counters(redis)},
        "prefix": {
            "queried_tokens": prefix_queried_tokens,
            "cached_tokens": prefix_cached_tokens,
        },
    }


def total_stats(replicas: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of replica entries, with hit ratios recomputed from the sums."""
    replicas = list(replicas)

    def summed(entries: list[Mapping[str, Any]]) -> dict[str, Any]:
        sums = {name: sum(int(e.get(name, 0)) for e in entries) for name in COUNTERS}
        lookups = sums["hits"] + sums["misses"]
        sums["hit_ratio"] = sums["hits"] / lookups if lookups else 0.0
        return sums

    total = summed(replicas)
    total["tiers"] = {
        tier: summed([r.get("tiers", {}).get(tier, {}) for r in replicas]) for tier in TIERS
    }
    total["prefix"] = {
        name: sum(int(r.get("prefix", {}).get(name, 0)) for r in replicas)
        for name in ("queried_tokens", "cached_tokens")
    }
    return total


def cluster_stats(
    replicas: Mapping[str, Mapping[str, Any]], ingress: CacheStats = EMPTY
) -> dict[str, Any]:
    """The whole document: `{"total": ..., "replicas": {replica_id: ...}, "ingress": ...}`,
    `ingress` with the six counters of a tier (zeros when the ingress keeps no answers). The
    total counts the replicas' lookups: a request the ingress answered asked no replica."""
    return {
        "total": total_stats(replicas.values()),
        "replicas": dict(replicas),
        "ingress": _counters(ingress),
    }
