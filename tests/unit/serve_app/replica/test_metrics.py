"""The replica's, the ingress's and the version actor's metrics, recorded by a fake of
`ray.serve.metrics`; and the tenant label, which only a configured tenant's name may fill."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict

import pytest

from cluster.sharing.directory import ReplicaId
from cluster.versions.actor import RolloutMetrics
from cluster.versions.records import ModelVersion, PublishOutcome
from serve_app.api import request_metrics
from serve_app.api.auth import OTHER_TENANTS, TenantAuth
from serve_app.api.request_metrics import RequestMetrics, cache_outcome
from serve_app.config import AppArgs
from serve_app.models.loading import load_model, weight_bytes_estimate
from serve_app.replica.core import ReplicaCore
from serve_app.replica.metrics import PREFIX, ReplicaMetrics
from serve_app.replica.serving import config_version, weights_spec
from tests.support.memory_tiers import InProcessPeers, MemoryRedis, untyped
from tests.unit.serve_app.replica.test_core import (
    DOCUMENT,
    SECRET,
    TOKENIZER,
    FixedRing,
    Versions,
    app_args,
    job,
    member,
    serve_peer,
)


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
                assert value >= 0
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


def test_lookups_hits_misses_and_fetch_times_are_counted_per_model_tier_and_tenant() -> None:
    backend = Recorded()
    metrics = ReplicaMetrics(backend)
    metrics.lookup("local", False, "m", "alice")
    metrics.lookup("redis", True, "m", "alice")
    metrics.fetched_result("redis", "m", 0.002)
    metrics.lookup("local", True, "m", "bob")
    metrics.computed("m", "alice")
    assert backend.value("result_cache_lookups", model="m", tier="local", tenant="alice") == 1
    assert backend.value("result_cache_hits", model="m", tier="local", tenant="bob") == 1
    assert backend.value("result_cache_hits", model="m", tier="redis", tenant="alice") == 1
    assert backend.value("result_cache_misses", model="m", tenant="alice") == 1
    assert backend.value("result_fetch_seconds", model="m", tier="redis") == 1  # observations
    metrics.prefix(
        "m", "alice", 100, {"local": 32, "peer": 16, "redis": 0}, {"peer": 4096, "redis": 0}
    )
    metrics.fetched_prefix("peer", "m", 0.01)
    assert backend.value("prefix_cache_queries", model="m", tenant="alice") == 100
    assert backend.value("prefix_cache_hits", model="m", tier="peer", tenant="alice") == 16
    assert backend.value("prefix_fetch_bytes", model="m", tier="peer") == 4096
    assert backend.value("prefix_fetch_seconds", model="m", tier="peer") == 1


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


def test_every_label_is_one_the_configuration_bounds() -> None:
    backend = Recorded()
    ReplicaMetrics(backend)
    RequestMetrics(backend)
    RolloutMetrics(backend)
    allowed = {"model", "tier", "cause", "reason", "endpoint", "cache", "tenant"}
    allowed |= {"operation", "outcome"}
    for name, keys in backend.tag_keys.items():
        assert set(keys) <= allowed, name


KEYS = {b"a" * 32: "alice", b"b" * 32: "bob"}


@pytest.mark.parametrize(
    ("auth", "tenant", "label"),
    [
        (TenantAuth(KEYS), "alice", "alice"),
        (TenantAuth(KEYS), "carol", OTHER_TENANTS),  # named by a handle caller, not by a key
        (TenantAuth(KEYS), "default", OTHER_TENANTS),
        (TenantAuth({}), "default", "default"),
        (TenantAuth({}), "carol", OTHER_TENANTS),
        # A trusted gateway's clients choose the names: none is ever a label.
        (TenantAuth(KEYS, trust_tenant_header=True), "alice", OTHER_TENANTS),
        (TenantAuth({}, trust_tenant_header=True), "default", OTHER_TENANTS),
    ],
)
def test_a_tenant_label_is_a_configured_tenant_or_other(auth, tenant, label) -> None:
    assert auth.tenant_label(tenant) == label


def test_request_latency_by_cache_outcome() -> None:
    backend = Recorded()
    metrics = RequestMetrics(backend)
    hit, miss = cache_outcome({"hit": True, "tier": "local"}), cache_outcome({"hit": False})
    metrics.answered("m", "chat", hit, 0.01, tenant="alice")
    metrics.answered("m", "chat", miss, 0.5, tenant=OTHER_TENANTS)
    metrics.first_token("m", "chat", 0.1, tenant="alice")
    chat = {"model": "m", "endpoint": "chat"}
    assert backend.value("request_duration_seconds", **chat, cache="local", tenant="alice") == 1
    assert backend.value("request_duration_seconds", **chat, cache="miss", tenant="other") == 1
    assert backend.value("time_to_first_token_seconds", **chat, tenant="alice") == 1
    inputs = [{"hit": True, "tier": "local"}, {"hit": False, "tier": None}]
    assert cache_outcome(inputs) == "partial"
    assert cache_outcome(inputs[:1] * 2) == "local"


def test_ingress_lookups_outside_an_event_loop_are_counted_at_once() -> None:
    backend = Recorded()
    RequestMetrics(backend).looked_up("m", True, tenant="alice")
    ingress = {"model": "m", "tier": "ingress", "tenant": "alice"}
    assert backend.value("result_cache_lookups", **ingress) == 1
    assert backend.value("result_cache_hits", **ingress) == 1


@pytest.mark.asyncio
async def test_ingress_lookups_are_tallied_and_counted_within_a_second(monkeypatch) -> None:
    """A burst of hits costs one increment per label set, not one per hit."""
    monkeypatch.setattr(request_metrics, "COUNTS_EVERY_S", 0.05)
    backend = Recorded()
    metrics = RequestMetrics(backend)
    for hit in [True] * 5 + [False] * 2:
        metrics.looked_up("m", hit, tenant="alice")
    metrics.looked_up("m", False, tenant=OTHER_TENANTS)
    alice = {"model": "m", "tier": "ingress", "tenant": "alice"}
    assert backend.value("result_cache_lookups", **alice) == 0  # not yet
    await asyncio.sleep(0.2)
    assert backend.value("result_cache_lookups", **alice) == 7
    assert backend.value("result_cache_hits", **alice) == 5
    other = {**alice, "tenant": OTHER_TENANTS}
    assert backend.value("result_cache_lookups", **other) == 1
    assert backend.value("result_cache_hits", **other) == 0
    metrics.looked_up("m", True, tenant="alice")  # a new tally after the hand-over
    await asyncio.sleep(0.2)
    assert backend.value("result_cache_hits", **alice) == 6


async def metered_core(
    args: AppArgs,
    backend: Recorded,
    name: str = "r1",
    redis: MemoryRedis | None = None,
    peers: InProcessPeers | None = None,
) -> ReplicaCore:
    """A started core whose metrics `backend` records."""
    specs = {spec.id: spec for spec in args.models}
    core = ReplicaCore(
        args,
        SECRET,
        ReplicaId(name),
        {spec.id: TOKENIZER for spec in args.models},
        {spec.id: config_version(spec) for spec in args.models},
        load_weights=lambda record: load_model(weights_spec(specs[record.model], record)),
        estimate_bytes=lambda model: weight_bytes_estimate(specs[model]),
        peer=untyped(peers),
        redis=untyped(redis),
        metrics=ReplicaMetrics(backend),
    )
    await core.start()
    return core


@pytest.mark.asyncio
async def test_a_replica_core_reports_its_lookups_and_prefix_tokens_under_the_jobs_tenant() -> None:
    backend = Recorded()
    core = await metered_core(app_args(), backend)
    request = dataclasses.replace(job("Counted by the core, twice over"), tenant_label="alice")
    await core.complete(request)
    await core.complete(request)
    await core.complete(job("Sent without a label"))
    mine = {"model": "tiny", "tenant": "alice"}
    assert backend.value("result_cache_lookups", **mine, tier="local") == 2
    assert backend.value("result_cache_hits", **mine, tier="local") == 1
    assert backend.value("result_cache_misses", **mine) == 1
    assert backend.value("prefix_cache_queries", **mine) == len(request.prompt_tokens)
    assert backend.value("result_cache_misses", model="tiny", tenant=OTHER_TENANTS) == 1
    ReplicaMetrics(backend).report(core.stats())  # the core's statistics have what it reads
    assert backend.value("prefix_cache_blocks") > 0
    await core.close()


@pytest.mark.asyncio
async def test_fetches_from_the_owner_and_redis_are_timed_per_tier() -> None:
    args, peers, redis = app_args(), InProcessPeers(), MemoryRedis()
    owner = await metered_core(args, Recorded(), "owner", redis=redis, peers=peers)
    serve_peer(peers, "owner", owner)
    await owner.complete(job(DOCUMENT))
    await owner.tiered.drain()
    backend = Recorded()
    here = await metered_core(args, backend, "here", redis=redis, peers=peers)
    here.connect(FixedRing(member("owner")), Versions())
    # A new answer on a prefix the owner holds: the result is asked of the owner and of
    # Redis, then the prefix blocks of the owner, then of Redis (past what the owner had).
    await here.complete(job(DOCUMENT + "What does it keep?"))
    for tier in ("peer", "redis"):
        assert backend.value("result_fetch_seconds", model="tiny", tier=tier) == 1
        assert backend.value("prefix_fetch_seconds", model="tiny", tier=tier) == 1
    assert backend.value("prefix_fetch_bytes", model="tiny", tier="peer") > 0
    # A local hit fetches nothing.
    await here.complete(job(DOCUMENT + "What does it keep?"))
    assert backend.value("result_fetch_seconds", model="tiny", tier="peer") == 1
    for core in (owner, here):
        await core.close()


def outcome(acknowledged=("r1",), missing=(), failed=None, restored=None) -> PublishOutcome:
    record = ModelVersion("m", "2", 2, source="admin", seed=2)
    return PublishOutcome(record, tuple(acknowledged), tuple(missing), failed or {}, restored)


def test_rollouts_are_timed_when_every_replica_acknowledged_and_counted_by_ending() -> None:
    backend = Recorded()
    metrics = RolloutMetrics(backend)
    metrics.rolled_out("publish", "m", outcome(), 0.3)
    metrics.rolled_out("publish", "m", outcome(missing=("r2",)), 30.0)
    metrics.rolled_out("publish", "m", outcome((), failed={"r1": "no weights"}), 1.0)
    restored = ModelVersion("m", "1", 3, source="admin", seed=1)
    metrics.rolled_out("publish", "m", outcome((), {}, {"r1": "x"}, restored), 2.0)
    metrics.rolled_out("publish", "m", outcome(acknowledged=()), 0.0)  # no replica subscribed
    metrics.rolled_out("invalidate", None, outcome(), 0.1)
    metrics.ended("publish", "unchanged")
    assert backend.value("version_rollout_seconds", model="m", operation="publish") == 1
    assert backend.value("version_rollout_seconds", model="*", operation="invalidate") == 1
    publishes = {"operation": "publish"}
    assert backend.value("version_operations", **publishes, outcome="acknowledged") == 2
    assert backend.value("version_operations", **publishes, outcome="incomplete") == 2
    assert backend.value("version_operations", **publishes, outcome="rolled_back") == 1
    assert backend.value("version_operations", **publishes, outcome="unchanged") == 1
    assert backend.value("version_operations", operation="invalidate", outcome="acknowledged") == 1
