"""The running app's Prometheus metrics, scraped from the test Ray cluster's export after known
traffic: exact counts of hits and misses, latency by cache outcome, and bounded labels."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import wait_until
from tests.unit.test_grafana_dashboard import dashboard_metrics

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"
# What Ray adds to every series, and what raycache's own labels may be.
RAY_LABELS = {
    "Component",
    "NodeAddress",
    "SessionName",
    "Version",
    "WorkerId",
    "JobId",
    "application",
    "deployment",
    "replica",
    "route",
    "le",
    "otel_scope_name",
    "otel_scope_schema_url",
    "otel_scope_version",
}
OUR_LABELS = {"model", "tier", "cause", "reason", "endpoint", "cache"}
Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("ray_raycache_")
    ]


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, tags, value in samples
        if sample == name and all(tags.get(k) == v for k, v in labels.items())
    )


def counts(samples: Samples) -> dict[str, float]:
    return {
        "misses": total(samples, "ray_raycache_result_cache_misses_total", model=MODEL),
        "local_hits": total(
            samples, "ray_raycache_result_cache_hits_total", model=MODEL, tier="local"
        ),
        "local_lookups": total(
            samples, "ray_raycache_result_cache_lookups_total", model=MODEL, tier="local"
        ),
        "hit_latencies": total(
            samples,
            "ray_raycache_request_duration_seconds_count",
            model=MODEL,
            endpoint="completions",
            cache="local",
        ),
        "miss_latencies": total(
            samples,
            "ray_raycache_request_duration_seconds_count",
            model=MODEL,
            endpoint="completions",
            cache="miss",
        ),
        "first_tokens": total(
            samples, "ray_raycache_time_to_first_token_seconds_count", model=MODEL
        ),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before[name] for name in after}


def settled(url: str) -> dict[str, float]:
    """The counts once earlier tests' traffic has all been reported (Ray reports each
    second): two scrapes 1.5 s apart agree."""
    last = counts(scrape(url))
    for _ in range(20):
        time.sleep(1.5)
        now = counts(scrape(url))
        if now == last:
            return now
        last = now
    raise AssertionError("the metrics kept changing with no traffic")


def test_known_traffic_is_counted_exactly(running_app, metrics_url):
    before = settled(metrics_url)
    prompts = [f"Counted {i} {uuid.uuid4().hex[:8]}" for i in range(4)]
    with running_app.http() as http:
        for _ in range(2):
            for prompt in prompts:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
                assert http.post("/v1/completions", json=body).status_code == 200
        stream = {"model": MODEL, "prompt": prompts[0], "max_tokens": 4, "stream": True}
        with http.stream("POST", "/v1/completions", json=stream) as response:
            list(response.iter_lines())  # sampled: computed, not looked up
    expected = {
        "misses": 4,
        "local_hits": 4,
        "local_lookups": 8,
        "hit_latencies": 4,
        "miss_latencies": 5,  # the stream's too: computed
        "first_tokens": 1,
    }
    seen: list[dict[str, float]] = []

    def counted() -> bool:
        seen.append(delta(counts(scrape(metrics_url)), before))
        return seen[-1] == expected

    try:
        wait_until(counted, 30, f"the metrics to count {expected}", step_s=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last counted {seen[-1]}") from None
    time.sleep(2)  # and nothing more arrives
    assert delta(counts(scrape(metrics_url)), before) == expected


def test_every_series_has_bounded_labels_and_the_board_has_its_metrics(metrics_url):
    samples = scrape(metrics_url)
    names = {name for name, _, _ in samples}
    for expected in (
        "ray_raycache_prefix_cache_queries_total",
        "ray_raycache_prefix_cache_hits_total",
        "ray_raycache_result_cache_entries",
        "ray_raycache_redis_breaker_state",
        "ray_raycache_ring_size",
    ):
        assert expected in names
    for name, labels, _ in samples:
        assert set(labels) <= RAY_LABELS | OUR_LABELS, (name, labels)
        assert not any(_looks_like_data(v) for k, v in labels.items() if k in OUR_LABELS)


def _looks_like_data(value: str) -> bool:
    """A key (hex), or free text: what a label must never hold."""
    return bool(re.fullmatch(r"[0-9a-f]{32,}", value)) or " " in value or len(value) > 64


# Counters Ray exports only once they counted something: evictions, refused values and fetched
# prefix bytes need a full cache, a forged value or another tier's blocks.
AFTER_AN_EVENT = {
    "ray_raycache_result_cache_evictions_total",
    "ray_raycache_rejected_values_total",
    "ray_raycache_prefix_fetch_bytes_total",
}


def test_the_grafana_board_queries_metrics_the_cluster_exports(metrics_url):
    seen = {name for name, _, _ in scrape(metrics_url)}
    assert dashboard_metrics() - AFTER_AN_EVENT <= seen
    assert dashboard_metrics() >= AFTER_AN_EVENT
