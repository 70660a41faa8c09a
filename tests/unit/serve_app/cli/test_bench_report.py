"""A bench run's figures from its samples: percentiles, outcomes, the timeline, the ratios."""

from __future__ import annotations

import pytest

from serve_app.cli.bench_report import compare, percentile, summarize, timeline
from serve_app.cli.sender import Sample


def _sample(index, started, latency_s, outcome):
    return Sample(index, started, latency_s, outcome, 500 if outcome == "error" else 200)


def test_percentiles_are_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 90) == 7.0
    assert percentile([], 50) == 0.0


def test_a_summary_splits_latency_by_outcome_and_counts_answered_hits():
    samples = [
        _sample(0, 0.0, 0.100, "miss"),
        _sample(1, 0.1, 0.010, "local"),
        _sample(2, 0.2, 0.020, "peer"),
        _sample(3, 0.3, 0.200, "miss"),
        _sample(4, 0.4, 0.600, "error"),
    ]
    summary = summarize(samples)
    assert summary["requests"] == 5 and summary["failed"] == 1
    assert summary["seconds"] == pytest.approx(1.0)
    assert summary["requests_per_s"] == pytest.approx(5.0)
    assert summary["hit_ratio"] == pytest.approx(0.5)  # 2 hits of 4 answered
    assert summary["outcomes"]["hits"]["requests"] == 2
    assert summary["outcomes"]["hits"]["p50_ms"] == pytest.approx(10.0)
    assert summary["outcomes"]["miss"]["p99_ms"] == pytest.approx(200.0)
    assert summary["overall"]["requests"] == 4  # failures have no latency to report
    assert "redis" not in summary["outcomes"]


def test_the_timeline_counts_answers_per_window_and_the_cumulative_hit_ratio():
    samples = [
        _sample(0, 0.0, 0.5, "miss"),
        _sample(1, 0.6, 0.1, "local"),
        _sample(2, 1.2, 0.1, "local"),
        _sample(3, 1.5, 0.1, "miss"),
    ]
    rows = timeline(samples, window_s=1.0)
    assert [row["hits"] for row in rows] == [1, 1]
    assert [row["misses"] for row in rows] == [1, 1]
    assert rows[0]["hit_ratio"] == pytest.approx(0.5)
    assert rows[1]["cumulative_hit_ratio"] == pytest.approx(0.5)
    assert rows[0]["answers_per_s"] == pytest.approx(2.0)
    assert rows[1]["answers_per_s"] == pytest.approx(2 / 0.6)  # the run ended at 1.6 s


def test_the_comparison_is_workload_over_baseline_and_none_where_a_side_is_empty():
    baseline = summarize([_sample(0, 0.0, 0.2, "miss"), _sample(1, 0.2, 0.2, "miss")])
    workload = summarize([_sample(0, 0.0, 0.2, "miss"), _sample(1, 0.2, 0.02, "local")])
    ratios = compare(workload, baseline)
    assert ratios["throughput_x"] == pytest.approx(0.4 / 0.22)
    assert ratios["hit_vs_miss_p50_x"] == pytest.approx(0.1)
    assert compare(baseline, baseline)["hit_vs_miss_p50_x"] is None  # no hits at all
