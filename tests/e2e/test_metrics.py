"""The running app's Prometheus metrics, scraped from the test Ray cluster's export after known
traffic: exact counts of hits and misses per tenant, latency by cache outcome, bounded labels,
and the counters Ray exports only once something happened (an invalidation, a value in Redis
that fails its check, prefix blocks fetched from the owner) with the fetch and rollout timings
that come with them."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.keys import routing_key
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.ring import Ring
from serve_app.api.auth import OTHER_TENANTS
from serve_app.api.completions import CompletionJob
from serve_app.config import parse_args
from serve_app.models import ByteTokenizer, SamplingParams
from tests.conftest import API_KEYS, APP_NAME
from tests.support.answer_keys import answer_redis_key
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
OUR_LABELS = {"model", "tier", "cause", "reason", "endpoint", "cache", "tenant"}
OUR_LABELS |= {"operation", "outcome"}  # the version actor's
# The test cluster's tenants come from API keys: those are the only names a label may hold.
TENANT_LABELS = {*API_KEYS, OTHER_TENANTS}
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
    """What `test_known_traffic_is_counted_exactly` sends: requests of alice."""
    alice = {"model": MODEL, "tenant": "alice"}
    return {
        "misses": total(samples, "ray_raycache_result_cache_misses_total", **alice),
        "local_hits": total(samples, "ray_raycache_result_cache_hits_total", **alice, tier="local"),
        "local_lookups": total(
            samples, "ray_raycache_result_cache_lookups_total", **alice, tier="local"
        ),
        "ingress_hits": total(
            samples, "ray_raycache_result_cache_hits_total", **alice, tier="ingress"
        ),
        "ingress_lookups": total(
            samples, "ray_raycache_result_cache_lookups_total", **alice, tier="ingress"
        ),
        "local_hit_latencies": total(
            samples,
            "ray_raycache_request_duration_seconds_count",
            **alice,
            endpoint="completions",
            cache="local",
        ),
        "ingress_hit_latencies": total(
            samples,
            "ray_raycache_request_duration_seconds_count",
            **alice,
            endpoint="completions",
            cache="ingress",
        ),
        "miss_latencies": total(
            samples,
            "ray_raycache_request_duration_seconds_count",
            **alice,
            endpoint="completions",
            cache="miss",
        ),
        "first_tokens": total(samples, "ray_raycache_time_to_first_token_seconds_count", **alice),
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
    before = settled(metrics_url)  # running_app.http() asks as alice
    prompts = [f"Counted {i} {uuid.uuid4().hex[:8]}" for i in range(4)]
    with running_app.http() as http:
        for _ in range(2):
            for prompt in prompts:
                body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}
                assert http.post("/v1/completions", json=body).status_code == 200
        stream = {"model": MODEL, "prompt": prompts[0], "max_tokens": 4, "stream": True}
        with http.stream("POST", "/v1/completions", json=stream) as response:
            list(response.iter_lines())  # sampled: computed, not looked up
    # The second round is answered by the ingress: the replicas see the first round only.
    expected = {
        "misses": 4,
        "local_hits": 0,
        "local_lookups": 4,
        "ingress_hits": 4,
        "ingress_lookups": 8,
        "local_hit_latencies": 0,
        "ingress_hit_latencies": 4,
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


def test_every_series_has_bounded_labels(events, metrics_url):
    samples = scrape(metrics_url)  # after every kind of traffic of this module
    names = {name for name, _, _ in samples}
    for expected in (
        "ray_raycache_prefix_cache_queries_total",
        "ray_raycache_prefix_cache_hits_total",
        "ray_raycache_result_cache_entries",
        "ray_raycache_redis_breaker_state",
        "ray_raycache_ring_size",
        "ray_raycache_version_operations_total",  # every replica's start-up publishes
    ):
        assert expected in names
    for name, labels, _ in samples:
        assert set(labels) <= RAY_LABELS | OUR_LABELS, (name, labels)
        assert not any(_looks_like_data(v) for k, v in labels.items() if k in OUR_LABELS)
        assert labels.get("tenant", OTHER_TENANTS) in TENANT_LABELS, (name, labels)


def _looks_like_data(value: str) -> bool:
    """A key (hex), or free text: what a label must never hold."""
    return bool(re.fullmatch(r"[0-9a-f]{32,}", value)) or " " in value or len(value) > 64


def completion(prompt: str) -> dict[str, object]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, "temperature": 0}


def namespace_of(running_app) -> str:
    return running_app.app_args()["namespace"]


def job_for(namespace: str, prompt: str) -> CompletionJob:
    """Alice's job of `prompt`, as the ingress builds it, for a handle to the replicas."""
    tokens = tuple(ByteTokenizer().encode(prompt))
    return CompletionJob(
        model=MODEL,
        tenant="alice",
        prompt_tokens=tokens,
        params=SamplingParams(max_tokens=4, temperature=0.0),
        routing_key=routing_key(namespace, "alice", MODEL, tokens),
        tenant_label="alice",
    )


def owner_and_other(namespace: str, key: str) -> tuple[str, str]:
    """The replica owning routing key `key`, and another one."""
    members = ray.get(directory_actor(namespace).members.remote())
    owner = Ring({m.replica_id: m.weight for m in members}).owner(key)
    return owner, next(m.replica_id for m in members if m.replica_id != owner)


def event_counts(samples: Samples) -> dict[str, float]:
    """The totals that the traffic of the `events` fixture raises."""
    invalidations = {"operation": "invalidate"}
    return {
        "invalidation_evictions": total(
            samples, "ray_raycache_result_cache_evictions_total", cause="invalidation"
        ),
        "corrupt_values": total(samples, "ray_raycache_rejected_values_total", reason="corrupt"),
        "peer_prefix_bytes": total(samples, "ray_raycache_prefix_fetch_bytes_total", tier="peer"),
        "peer_prefix_tokens": total(
            samples, "ray_raycache_prefix_cache_hits_total", tier="peer", tenant="alice"
        ),
        "peer_prefix_fetches": total(
            samples, "ray_raycache_prefix_fetch_seconds_count", model=MODEL, tier="peer"
        ),
        "peer_result_fetches": total(
            samples, "ray_raycache_result_fetch_seconds_count", model=MODEL, tier="peer"
        ),
        "redis_result_fetches": total(
            samples, "ray_raycache_result_fetch_seconds_count", model=MODEL, tier="redis"
        ),
        "timed_invalidations": total(
            samples, "ray_raycache_version_rollout_seconds_count", **invalidations, model="*"
        ),
        "acknowledged_invalidations": total(
            samples,
            "ray_raycache_version_operations_total",
            **invalidations,
            outcome="acknowledged",
        ),
    }


@dataclasses.dataclass(frozen=True)
class Events:
    """What the `events` fixture did."""

    before: dict[str, float]
    """The `event_counts` from before it."""
    shared_tokens: int
    """The prompt tokens the two questions of one document share."""


@pytest.fixture(scope="module")
def events(running_app, metrics_url, redis_server) -> Events:
    """Traffic that makes each event-only counter count: an invalidation of a cached answer,
    a value in Redis that is no envelope, a prefix fetched from its owner."""
    before = event_counts(scrape(metrics_url))
    marker = uuid.uuid4().hex[:8]
    with running_app.http("alice") as http:
        # An invalidation by key drops the answer from the replica that cached it.
        body = completion(f"Invalidated for the metrics {marker}")
        key = http.post("/v1/completions", json=body).json()["cache"]["key"]
        assert http.post("/v1/completions", json=body).json()["cache"]["hit"]
        invalidated = http.post(
            "/v1/cache/invalidate", json={"key": key}, headers=running_app.admin_headers()
        )
        assert invalidated.status_code == 200, invalidated.text
        assert len(invalidated.json()["acknowledged"]) == running_app.subscriber_count()
        # A value in Redis under a live key that is no envelope: refused as corrupt.
        body = completion(f"Corrupted in Redis for the metrics {marker}")
        redis_server.client().set(answer_redis_key(running_app, "alice", body), b"not an envelope")
        assert http.post("/v1/completions", json=body).json()["cache"]["hit"] is False
    # One document, two questions: the second asked of the replica that does not own it,
    # which fetches the document's blocks from the owner (the prompts share their routing key).
    namespace = namespace_of(running_app)
    document = f"A document whose blocks travel between replicas {marker}. " * 6
    first, second = (job_for(namespace, document + q) for q in ("First?", "Second, elsewhere?"))
    assert first.routing_key == second.routing_key
    owner, other = owner_and_other(namespace, first.routing_key)
    replicas = serve.get_deployment_handle("ModelReplica", app_name=APP_NAME)
    for job, replica in ((first, owner), (second, other)):
        answer = replicas.complete.remote(dataclasses.replace(job, replica=replica))
        assert answer.result(timeout_s=60).cache_tier is None
    return Events(before, len(document.encode()))


def test_events_are_counted_with_the_fetch_and_rollout_times(running_app, events, metrics_url):
    block = parse_args(running_app.app_args()).prefix_cache.block_size
    shared_blocks = events.shared_tokens // block
    at_least = {
        "invalidation_evictions": 1,  # the replica that cached it (and its owner, if another)
        "corrupt_values": 1,
        "peer_prefix_bytes": 1,
        "peer_prefix_tokens": (shared_blocks - 1) * block,
        "peer_prefix_fetches": 1,
        "peer_result_fetches": 1,  # the second question's result, asked of the owner
        "redis_result_fetches": 4,  # every answer computed above was asked of Redis first
        "timed_invalidations": 1,
        "acknowledged_invalidations": 1,
    }
    seen: list[dict[str, float]] = []

    def counted() -> bool:
        seen.append(delta(event_counts(scrape(metrics_url)), events.before))
        return all(seen[-1][name] >= least for name, least in at_least.items())

    try:
        wait_until(counted, 30, f"the events to be counted at least {at_least}", step_s=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last counted {seen[-1]}") from None
    assert seen[-1]["corrupt_values"] == 1  # only the value planted here was corrupt


def test_the_grafana_board_queries_metrics_the_cluster_exports(events, metrics_url):
    missing: set[str] = set()

    def exported() -> bool:
        missing.clear()
        missing.update(dashboard_metrics() - {name for name, _, _ in scrape(metrics_url)})
        return not missing

    try:
        wait_until(exported, 30, "every metric of the board to be exported", step_s=0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; missing {sorted(missing)}") from None
