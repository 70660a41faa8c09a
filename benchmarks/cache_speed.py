"""Nanoseconds per hit and per put-with-eviction: `ResultCache` under each policy, side by side
with `dict`, `OrderedDict` (LRU by hand), `cachetools.LRUCache` and `cachetools.LRUCache` behind
a lock, all in one run on the same keys.

    python -m benchmarks.cache_speed [--entries 10000] [--ops 200000] [--repeat 5]
                                     [--json benchmarks/results/cache_speed.json]

The targets (issue 3): a `ResultCache` hit costs no more than a locked cachetools hit, and a put
that evicts no more than twice a locked cachetools put that evicts. Hits are measured on a warm
cache with a skewed (Zipf-like) key stream so that policies do real bookkeeping; the access
buffer is drained inside the timed loop (its cost is amortised into the hits, not hidden).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import cachetools

from cluster.keys import ResultKey
from cluster.policies import DEFAULT_POLICY, policy_names
from cluster.result_cache import ResultCache

ROOT = Path(__file__).resolve().parents[1]
VALUE = b"v" * 64


def _time_per_op(run: Callable[[], None], ops: int, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        run()
        samples.append((time.perf_counter_ns() - started) / ops)
    return statistics.median(samples)


class _LockedLRU:
    """cachetools.LRUCache behind a lock: the bar the issue sets."""

    def __init__(self, maxsize: int) -> None:
        self._cache: cachetools.LRUCache[str, bytes] = cachetools.LRUCache(maxsize)
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            return self._cache.get(key)

    def put(self, key: str, value: bytes) -> None:
        with self._lock:
            self._cache[key] = value


class _OrderedLRU:
    def __init__(self, maxsize: int) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._maxsize = maxsize

    def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        if len(self._data) > self._maxsize:
            self._data.popitem(last=False)


class _PlainDict:
    def __init__(self, maxsize: int) -> None:
        self._data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = value


class _Cachetools:
    def __init__(self, maxsize: int) -> None:
        self._cache: cachetools.LRUCache[str, bytes] = cachetools.LRUCache(maxsize)

    def get(self, key: str) -> bytes | None:
        return self._cache.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._cache[key] = value


def _result_cache(policy: str) -> Callable[[int], object]:
    def make(maxsize: int) -> ResultCache:
        # Budget in bytes sized so that the entry bound, not the byte bound, binds first.
        return ResultCache(max_bytes=maxsize * 200, max_entries=maxsize, policy=policy)

    return make


def measure(entries: int, ops: int, repeat: int) -> dict[str, dict[str, float]]:
    """ns per hit and per evicting put for every contender."""
    rng = random.Random(7)
    keys = [ResultKey(f"{i:064x}") for i in range(entries)]
    # Skewed hits over resident keys: rank r drawn with probability ~ 1/(r+1).
    weights = [1 / (rank + 1) for rank in range(entries)]
    hit_stream = rng.choices(keys, weights, k=ops)
    fresh = [ResultKey(f"fresh{i:059x}") for i in range(ops)]
    contenders: dict[str, Callable[[int], object]] = {
        "dict": _PlainDict,
        "OrderedDict": _OrderedLRU,
        "cachetools.LRUCache": _Cachetools,
        "cachetools.LRUCache+lock": _LockedLRU,
    }
    for policy in policy_names():
        contenders[f"ResultCache[{policy}]"] = _result_cache(policy)
    results = {}
    for name, make in contenders.items():
        cache = make(entries)
        for key in keys:
            cache.put(key, VALUE)  # type: ignore[attr-defined]
        get = cache.get  # type: ignore[attr-defined]
        put = cache.put  # type: ignore[attr-defined]
        for key in hit_stream[: entries * 2]:  # warm the policy's statistics
            get(key)

        def hits(get: Callable[[str], object] = get) -> None:
            for key in hit_stream:
                get(key)

        def puts(put: Callable[[str, bytes], None] = put) -> None:
            for key in fresh:
                put(key, VALUE)

        hit_ns = _time_per_op(hits, ops, repeat)
        # Every put below inserts a new key into a full cache, so each one evicts; it runs once
        # per contender, on fresh keys, because a repeat would find them resident.
        put_ns = _time_per_op(puts, ops, 1)
        results[name] = {"hit_ns": hit_ns, "put_evict_ns": put_ns}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=10_000)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "cache_speed.json"
    )
    options = parser.parse_args()
    results = measure(options.entries, options.ops, options.repeat)
    bar = results["cachetools.LRUCache+lock"]
    print(f"{'contender':34} {'hit ns':>8} {'put+evict ns':>13} {'hit/bar':>8} {'put/bar':>8}")
    for name, row in results.items():
        row["hit_vs_locked_cachetools"] = row["hit_ns"] / bar["hit_ns"]
        row["put_vs_locked_cachetools"] = row["put_evict_ns"] / bar["put_evict_ns"]
        print(
            f"{name:34} {row['hit_ns']:8.0f} {row['put_evict_ns']:13.0f} "
            f"{row['hit_vs_locked_cachetools']:8.2f} {row['put_vs_locked_cachetools']:8.2f}"
        )
    default = results[f"ResultCache[{DEFAULT_POLICY}]"]
    verdict = {
        "default_policy": DEFAULT_POLICY,
        "hit_within_bar": default["hit_vs_locked_cachetools"] <= 1.0,
        "put_within_twice_bar": default["put_vs_locked_cachetools"] <= 2.0,
    }
    print(verdict)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(
        json.dumps({"benchmark": "cache_speed", **vars(options), "json": str(options.json),
                    "results": results, "verdict": verdict}, indent=2) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
