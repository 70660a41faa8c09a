"""The replica's and the ingress's metrics, recorded by a fake of `ray.serve.metrics`."""

from __future__ import annotations

from collections import defaultdict

import pytest

from cluster.sharing.directory import ReplicaId
from serve_app.api.request_metrics import RequestMetrics, cache_outcome
from serve_app.models.loading import load_model, weight_bytes_estimate
from serve_app.replica.core import ReplicaCore
from serve_app.replica.metrics import PREFIX, ReplicaMetrics
from serve_app.replica.serving import config_version, weights_spec
from tests.unit.serve_app.replica.test_core import SECRET, TOKENIZER, app_args, job


class Recorded:
    """Stands for `ray.serve.metrics`: every metric's value per tag set."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self.tag_keys: dict[str, tuple[str, ...]] = {}
        outer = self

        class Metric:
            def __init__(self, name, description="", tag_keys=(), boundaries=None) -> None:
                assert name.startswith(PREFIX) and description
                self.name = name
                outer.tag_keys[name] = tuple(tag_keys)

            def _key(self, tags):
                assert set(tags or {}) == set(outer.tag_keys[self.name]), (self.name, tags)
                return tuple(sorted((tags or {}).items()))

        class Counter(Metric):
            def inc(self, value=1.0, tags=None) -> None:
                assert value > 0
                outer.values[self.name][self._key(tags)] += value

        class Gauge(Metric):
            def set(self, value, tags=None) -> None:
                outer.values[self.name][self._key(tags)] = value

        class Histogram(Metric):
            def observe(self, value, tags=None) -> None:
                outer.values[self.name][self._key(tags)] += 1

        self.Counter, self.Gauge, self.Histogram = Counter, Gauge, Histogram

    def value(self, name: str, **tags: str) -> float:
        return self.values[PREFIX + name][tuple(sorted(tags.items()))]


def stats(evictions: int, waits: int, breaker: str = "closed") -> dict:
    return {
        "tiers": {"local": {"evictions": evictions, "entries": 7, "bytes": 700}},
        "prefix": {"blocks": 3, "bytes": 300, "pinned_blocks": 1},
        "cluster": {
            "single_flight_waits": waits,
            "expirations": 2,
            "invalidations": 0,
            "version_drops": 0,
            "stores_dropped": 0,
            "generations_stopped": 0,
            "corrupt_values": 1,
            "foreign_values": 0,
            "stale_values": 0,
            "models": {"loads": 1, "evictions": 0, "loaded": ["m"], "loaded_bytes": 10},
            "redis_breaker": breaker,
            "ring_size": 2,
            "ring_version": 5,
            "versions": {"m": {"lagging": False}},
        },
    }


def test_lookups_hits_and_misses_are_counted_per_model_and_tier() -> None:
    backend = Recorded()
    metrics = ReplicaMetrics(backend)
    metrics.lookup("local", False, "m")
    metrics.lookup("redis", True, "m")
    metrics.lookup("local", True, "m")
    metrics.computed("m")
    assert backend.value("result_cache_lookups", model="m", tier="local") == 2
    assert backend.value("result_cache_hits", model="m", tier="local") == 1
    assert backend.value("result_cache_hits", model="m", tier="redis") == 1
    assert backend.value("result_cache_misses", model="m") == 1
    metrics.prefix("m", 100, {"local": 32, "peer": 16, "redis": 0}, {"peer": 4096, "redis": 0})
    assert backend.value("prefix_cache_queries", model="m") == 100
    assert backend.value("prefix_cache_hits", model="m", tier="peer") == 16
    assert backend.value("prefix_fetch_bytes", model="m", tier="peer") == 4096


def test_reports_become_counter_increments_and_gauges() -> None:
    backend = Recorded()
    metrics = ReplicaMetrics(backend)
    metrics.report(stats(evictions=3, waits=1))
    metrics.report(stats(evictions=5, waits=1, breaker="open"))
    assert backend.value("result_cache_evictions", cause="capacity") == 5
    assert backend.value("result_cache_evictions", cause="ttl") == 2
    assert backend.value("single_flight_waits") == 1
    assert backend.value("rejected_values", reason="corrupt") == 1
    assert backend.value("result_cache_entries") == 7
    assert backend.value("prefix_cache_pinned_blocks") == 1
    assert backend.value("redis_breaker_state") == 2
    assert backend.value("ring_size") == 2
    assert backend.value("version_lagging", model="m") == 0
    assert backend.value("models_loaded") == 1


def test_no_label_holds_a_key_a_prompt_or_a_tenant() -> None:
    backend = Recorded()
    ReplicaMetrics(backend)
    RequestMetrics(backend)
    allowed = {"model", "tier", "cause", "reason", "endpoint", "cache"}
    for name, keys in backend.tag_keys.items():
        assert set(keys) <= allowed, name


def test_request_latency_by_cache_outcome() -> None:
    backend = Recorded()
    metrics = RequestMetrics(backend)
    metrics.answered("m", "chat", cache_outcome({"hit": True, "tier": "local"}), 0.01)
    metrics.answered("m", "chat", cache_outcome({"hit": False, "tier": None}), 0.5)
    metrics.first_token("m", "chat", 0.1)
    assert backend.value("request_duration_seconds", model="m", endpoint="chat", cache="local") == 1
    assert backend.value("request_duration_seconds", model="m", endpoint="chat", cache="miss") == 1
    assert backend.value("time_to_first_token_seconds", model="m", endpoint="chat") == 1
    inputs = [{"hit": True, "tier": "local"}, {"hit": False, "tier": None}]
    assert cache_outcome(inputs) == "partial"
    assert cache_outcome(inputs[:1] * 2) == "local"


@pytest.mark.asyncio
async def test_a_replica_core_reports_its_lookups_and_prefix_tokens() -> None:
    backend = Recorded()
    args = app_args()
    specs = {spec.id: spec for spec in args.models}
    core = ReplicaCore(
        args,
        SECRET,
        ReplicaId("r1"),
        {spec.id: TOKENIZER for spec in args.models},
        {spec.id: config_version(spec) for spec in args.models},
        load_weights=lambda record: load_model(weights_spec(specs[record.model], record)),
        estimate_bytes=lambda model: weight_bytes_estimate(specs[model]),
        metrics=ReplicaMetrics(backend),
    )
    await core.start()
    request = job("Counted by the core, twice over")
    await core.complete(request)
    await core.complete(request)
    assert backend.value("result_cache_lookups", model="tiny", tier="local") == 2
    assert backend.value("result_cache_hits", model="tiny", tier="local") == 1
    assert backend.value("result_cache_misses", model="tiny") == 1
    assert backend.value("prefix_cache_queries", model="tiny") == len(request.prompt_tokens)
    ReplicaMetrics(backend).report(core.stats())  # the core's statistics have what it reads
    assert backend.value("prefix_cache_blocks") > 0
    await core.close()
