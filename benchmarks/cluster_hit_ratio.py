"""Cluster hit ratio with sharing vs without, against one cache of the cluster's total size.

    python -m benchmarks.cluster_hit_ratio [--replicas 4] [--capacity 2500] [--requests 400000]
        [--alpha 1.0] [--keys 100000] [--misrouted 0.1]
        [--json benchmarks/results/cluster_hit_ratio.json]

Replays one Zipf stream, side by side, through the real `ResultCache` (default policy) and the
real `Ring`:
- `one_big_cache`: a single cache with replicas x capacity entries (the bound);
- `sharing`: each request goes to its key's ring owner, as the affinity router sends it; a
  fraction `--misrouted` lands on a random other replica instead (load fall-back), which asks
  the owner (the peer tier) before computing, and keeps a local copy;
- `no_sharing`: requests spread at random, each replica alone (the baseline).
The issue's target: sharing reaches at least 95% of the big cache's hit ratio.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from cluster.keys import ResultKey
from cluster.local.policies import DEFAULT_POLICY
from cluster.local.result_cache import ResultCache
from cluster.sharing.ring import Ring

ROOT = Path(__file__).resolve().parents[1]
VALUE = b"x" * 32


def zipf_keys(alpha: float, keys: int, requests: int, seed: int = 7) -> list[ResultKey]:
    """Ranks drawn with P(r) ~ 1/r^alpha, scattered over the id space by a permutation."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** alpha
    ranks = rng.choice(keys, size=requests, p=weights / weights.sum())
    ids = rng.permutation(keys)[ranks]
    return [ResultKey(f"{i:016x}") for i in ids.tolist()]


def cache(capacity: int) -> ResultCache:
    return ResultCache(max_bytes=capacity * 64, max_entries=capacity)


def one_big_cache(stream: list[ResultKey], capacity: int) -> float:
    big, hits = cache(capacity), 0
    for key in stream:
        if big.get(key) is not None:
            hits += 1
        else:
            big.put(key, VALUE)
    return hits / len(stream)


def sharing(stream: list[ResultKey], replicas: int, capacity: int, misrouted: float) -> dict:
    names = [f"replica-{i}" for i in range(replicas)]
    ring = Ring(dict.fromkeys(names, 1.0))
    caches = {name: cache(capacity) for name in names}
    rng = random.Random(3)
    hits = peer_hits = 0
    for key in stream:
        owner = ring.owner(key)
        assert owner is not None
        here = owner if rng.random() >= misrouted else rng.choice(names)
        if caches[here].get(key) is not None:
            hits += 1
            continue
        if here != owner and caches[owner].peek(key) is not None:
            hits += 1
            peer_hits += 1
            caches[here].put(key, VALUE)
            continue
        caches[here].put(key, VALUE)
        if here != owner:
            caches[owner].put(key, VALUE)  # the background store to the owner
    return {"hit_ratio": hits / len(stream), "peer_hit_share": peer_hits / max(hits, 1)}


def no_sharing(stream: list[ResultKey], replicas: int, capacity: int) -> float:
    caches = [cache(capacity) for _ in range(replicas)]
    rng = random.Random(5)
    hits = 0
    for key in stream:
        local = caches[rng.randrange(replicas)]
        if local.get(key) is not None:
            hits += 1
        else:
            local.put(key, VALUE)
    return hits / len(stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--capacity", type=int, default=2500, help="entries per replica")
    parser.add_argument("--requests", type=int, default=400_000)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--misrouted", type=float, default=0.1)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "cluster_hit_ratio.json"
    )
    options = parser.parse_args()
    stream = zipf_keys(options.alpha, options.keys, options.requests)
    started = time.perf_counter()
    bound = one_big_cache(stream, options.replicas * options.capacity)
    shared = sharing(stream, options.replicas, options.capacity, options.misrouted)
    alone = no_sharing(stream, options.replicas, options.capacity)
    result = {
        "benchmark": "cluster_hit_ratio",
        "policy": DEFAULT_POLICY,
        **{k: v for k, v in vars(options).items() if k != "json"},
        "one_big_cache": bound,
        "sharing": shared["hit_ratio"],
        "sharing_peer_hit_share": shared["peer_hit_share"],
        "no_sharing": alone,
        "sharing_vs_big": shared["hit_ratio"] / bound,
        "no_sharing_vs_big": alone / bound,
        "seconds": time.perf_counter() - started,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"one cache x{options.replicas}: {bound:.2%} | sharing: {shared['hit_ratio']:.2%} "
        f"({result['sharing_vs_big']:.1%} of it; {shared['peer_hit_share']:.1%} of hits from "
        f"peers) | no sharing: {alone:.2%} ({result['no_sharing_vs_big']:.1%})"
    )


if __name__ == "__main__":
    main()
