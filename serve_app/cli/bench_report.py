"""What a `raycache bench` run measured: throughput, latency percentiles by outcome, and the hit
ratio over time, from its samples.

`summarize` gives one phase's figures; `timeline` its per-window series (for the plots);
`compare` the workload phase against the baseline phase (the same number of requests, all of
them new prompts: the cluster without hits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from serve_app.cli.sender import ERROR, HIT_TIERS, MISS, OUTCOMES, UNCACHED, Sample

PERCENTILES = (50, 90, 99)
HITS = "hits"
"""The outcome group of every hit tier together."""
OUTCOME_ORDER = (HITS, *HIT_TIERS, MISS, UNCACHED, ERROR)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile of `values` (nearest rank); 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def duration(samples: Sequence[Sample]) -> float:
    """Seconds from the first call's start to the last answer."""
    if not samples:
        return 0.0
    return max(s.started + s.latency_s for s in samples) - min(s.started for s in samples)


def _latency(samples: Sequence[Sample], seconds: float) -> dict[str, Any]:
    latencies = [s.latency_s * 1000 for s in samples]
    figures: dict[str, Any] = {
        "requests": len(samples),
        "requests_per_s": len(samples) / seconds if seconds else 0.0,
        "mean_ms": sum(latencies) / len(latencies) if latencies else 0.0,
    }
    for q in PERCENTILES:
        figures[f"p{q}_ms"] = percentile(latencies, q)
    return figures


def summarize(samples: Sequence[Sample]) -> dict[str, Any]:
    """`{"requests", "seconds", "requests_per_s", "hit_ratio", "failed", "overall",
    "outcomes": {outcome or "hits": {"requests", "requests_per_s", "mean_ms", "p50_ms", ...}}}`;
    the hit ratio counts answered requests only."""
    seconds = duration(samples)
    groups: dict[str, list[Sample]] = {outcome: [] for outcome in OUTCOMES}
    for sample in samples:
        groups[sample.outcome].append(sample)
    groups[HITS] = [s for s in samples if s.hit]
    answered = len(samples) - len(groups[ERROR])
    outcomes = {name: _latency(group, seconds) for name, group in groups.items() if group}
    return {
        "requests": len(samples),
        "seconds": seconds,
        "requests_per_s": len(samples) / seconds if seconds else 0.0,
        "hit_ratio": len(groups[HITS]) / answered if answered else 0.0,
        "failed": len(groups[ERROR]),
        "overall": _latency([s for s in samples if s.outcome != ERROR], seconds),
        "outcomes": outcomes,
    }


def timeline(samples: Sequence[Sample], window_s: float = 1.0) -> list[dict[str, Any]]:
    """Per window of `window_s` seconds (by when each answer came; the last one ends with the
    run): answers per second, hits, misses, failures, the window's hit ratio, the cumulative
    hit ratio and the window's p50 latency."""
    if not samples:
        return []
    finish = [(s.started + s.latency_s, s) for s in samples]
    last = max(t for t, _ in finish)
    windows = int(last // window_s) + 1
    buckets: list[list[Sample]] = [[] for _ in range(windows)]
    for t, sample in finish:
        buckets[int(t // window_s)].append(sample)
    rows = []
    hits_so_far = answered_so_far = 0
    for number, bucket in enumerate(buckets):
        hits = sum(1 for s in bucket if s.hit)
        failed = sum(1 for s in bucket if s.outcome == ERROR)
        answered = len(bucket) - failed
        hits_so_far += hits
        answered_so_far += answered
        rows.append(
            {
                "end_s": min((number + 1) * window_s, last),
                # The last window is cut short by the run's end: its rate is over what it had.
                "answers_per_s": len(bucket) / max(min(window_s, last - number * window_s), 1e-9),
                "hits": hits,
                "misses": sum(1 for s in bucket if s.outcome == MISS),
                "failed": failed,
                "hit_ratio": hits / answered if answered else None,
                "cumulative_hit_ratio": hits_so_far / answered_so_far if answered_so_far else None,
                "p50_ms": percentile([s.latency_s * 1000 for s in bucket], 50),
            }
        )
    return rows


def compare(workload: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """The workload's throughput and latency as multiples of the baseline's (no hits), and its
    hits' median latency as a multiple of its misses'; None where a side has no requests."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    outcomes = workload["outcomes"]
    return {
        "throughput_x": ratio(workload["requests_per_s"], baseline["requests_per_s"]),
        "p50_latency_x": ratio(workload["overall"]["p50_ms"], baseline["overall"]["p50_ms"]),
        "hit_vs_miss_p50_x": ratio(
            outcomes.get(HITS, {}).get("p50_ms"), outcomes.get(MISS, {}).get("p50_ms")
        ),
    }
