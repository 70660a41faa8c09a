"""A replica's Prometheus metrics, exported through Ray (`ray.serve.metrics`: Ray adds the
`ray_` prefix and the `deployment`, `replica` and `application` tags; counters get `_total`).

Two sources feed them:
- events, as they happen: every tier a result lookup asks, whether it answered and how long a
  peer or Redis fetch took (`lookup`, `fetched_result`), every computed answer (`computed`),
  the prompt tokens of a computation and where its cached ones came from (`prefix`), and each
  prefix fetch from the owner or Redis (`fetched_prefix`);
- the replica's statistics, each time the replica reports them (`report`): its cumulative
  counters become counter increments (the difference from the last report), its sizes and
  states become gauges.

Labels are bounded by configuration: `model` (configured models), `tier` (`local`, `peer`,
`redis`), `cause` and `reason` (fixed sets), and `tenant`. The replica does not know which
tenants are configured (API keys are read on ingress nodes), so `tenant` is the label the
ingress computed for the request and sent with its job (`CompletionJob.tenant_label`, see
`serve_app.api.auth.TenantAuth.tenant_label`): a tenant the configuration names, or `other`,
never a name a client chose. No key or prompt appears in a label.
`backend` is the module of metric classes (`ray.serve.metrics` in a replica; a recording fake
in unit tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Protocol

PREFIX: Final = "raycache_"
FETCH_SECONDS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Bucket boundaries of the fetch histograms (seconds): a fetch within the cluster takes
milliseconds; the peer timeout bounds the slowest."""
BREAKER_STATES: Final = {"closed": 0, "half_open": 1, "open": 2, "disabled": -1}
"""`raycache_redis_breaker_state`: the value of each state of the Redis circuit breaker."""


class _Metric(Protocol):
    def set_default_tags(self, tags: dict[str, str]) -> Any: ...


class MetricsBackend(Protocol):
    """The metric classes of `ray.util.metrics` / `ray.serve.metrics`."""

    Counter: Any
    Gauge: Any
    Histogram: Any


# Cumulative counters of the replica's statistics: (metric, tags, how to read it).
_COUNTERS: Final = (
    ("result_cache_evictions", {"cause": "capacity"}, ("tiers", "local", "evictions")),
    ("result_cache_evictions", {"cause": "ttl"}, ("cluster", "expirations")),
    ("result_cache_evictions", {"cause": "invalidation"}, ("cluster", "invalidations")),
    ("result_cache_evictions", {"cause": "version"}, ("cluster", "version_drops")),
    ("single_flight_waits", {}, ("cluster", "single_flight_waits")),
    ("result_stores_dropped", {}, ("cluster", "stores_dropped")),
    ("shared_writes_refused", {}, ("cluster", "shared_writes_refused")),
    ("generations_stopped", {}, ("cluster", "generations_stopped")),
    ("rejected_values", {"reason": "corrupt"}, ("cluster", "corrupt_values")),
    ("rejected_values", {"reason": "forged"}, ("cluster", "foreign_values")),
    ("rejected_values", {"reason": "stale"}, ("cluster", "stale_values")),
    ("model_loads", {}, ("cluster", "models", "loads")),
    ("model_evictions", {}, ("cluster", "models", "evictions")),
)
_DESCRIPTIONS: Final = {
    "result_cache_lookups": "Result-cache lookups, per tier asked.",
    "result_cache_hits": "Result-cache lookups a tier answered, per tier.",
    "result_cache_misses": "Requests no tier answered (computed).",
    "prefix_cache_queries": "Prompt tokens of computed requests (tokens).",
    "prefix_cache_hits": "Prompt tokens that came from a prefix cache, per tier (tokens).",
    "prefix_fetch_bytes": "Bytes of prefix blocks fetched from another tier.",
    "result_cache_evictions": "Result-cache entries removed, by cause.",
    "single_flight_waits": "Requests that waited for an identical computation.",
    "result_stores_dropped": "Background stores to the owner or Redis dropped (queue full).",
    "shared_writes_refused": "Writes to the owner or Redis not made (the tenant's budget spent).",
    "generations_stopped": "Generations stopped because every client streaming them left.",
    "rejected_values": "Values from a peer or Redis refused, by reason.",
    "model_loads": "Model loads.",
    "model_evictions": "Models evicted to make room.",
}
_GAUGES: Final = {
    "result_cache_entries": "Answers in the local result cache.",
    "result_cache_bytes": "Bytes of the local result cache.",
    "prefix_cache_blocks": "Blocks in the local prefix cache.",
    "prefix_cache_bytes": "Bytes of the local prefix cache.",
    "prefix_cache_pinned_blocks": "Pinned blocks of the local prefix cache.",
    "redis_breaker_state": "Redis circuit breaker: 0 closed, 1 half open, 2 open, -1 no Redis.",
    "ring_size": "Replicas on the directory's ring, as this replica sees it.",
    "ring_version": "Version of the directory's ring, as this replica sees it.",
    "models_loaded": "Models in the replica's memory.",
    "models_loaded_bytes": "Bytes of the models in the replica's memory.",
    "version_lagging": "1 while the replica switches a model to a version it heard of.",
}
_HISTOGRAMS: Final = {
    "result_fetch_seconds": "Seconds per fetch of a result from the owner peer or Redis.",
    "prefix_fetch_seconds": "Seconds per fetch of prefix blocks from the owner peer or Redis.",
}
_LABELS: Final = {
    "result_cache_lookups": ("model", "tier", "tenant"),
    "result_cache_hits": ("model", "tier", "tenant"),
    "result_cache_misses": ("model", "tenant"),
    "prefix_cache_queries": ("model", "tenant"),
    "prefix_cache_hits": ("model", "tier", "tenant"),
    "prefix_fetch_bytes": ("model", "tier"),
    "result_cache_evictions": ("cause",),
    "rejected_values": ("reason",),
    "version_lagging": ("model",),
    "result_fetch_seconds": ("model", "tier"),
    "prefix_fetch_seconds": ("model", "tier"),
}


def make_counter(backend: MetricsBackend, name: str) -> Any:
    """The counter `name` of this catalogue (the ingress counts its own lookups in the same
    series, under tier `ingress`)."""
    return backend.Counter(
        PREFIX + name, description=_DESCRIPTIONS[name], tag_keys=_LABELS.get(name, ())
    )


class ReplicaMetrics:
    """The metrics of one replica (see the module docstring)."""

    def __init__(self, backend: MetricsBackend) -> None:
        self._counters = {name: make_counter(backend, name) for name in _DESCRIPTIONS}
        self._gauges = {
            name: backend.Gauge(PREFIX + name, description=text, tag_keys=_LABELS.get(name, ()))
            for name, text in _GAUGES.items()
        }
        self._histograms = {
            name: backend.Histogram(
                PREFIX + name,
                description=text,
                boundaries=list(FETCH_SECONDS),
                tag_keys=_LABELS[name],
            )
            for name, text in _HISTOGRAMS.items()
        }
        self._reported: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    # -- events -------------------------------------------------------------------------------

    def lookup(self, tier: str, hit: bool, model: str, tenant: str) -> None:
        """A result lookup asked `tier`, which answered (`hit`) or not; `tenant` is the
        request's tenant label."""
        tags = {"model": model, "tier": tier, "tenant": tenant}
        self._counters["result_cache_lookups"].inc(1, tags)
        if hit:
            self._counters["result_cache_hits"].inc(1, tags)

    def fetched_result(self, tier: str, model: str, seconds: float) -> None:
        """A result lookup fetched from `tier` (`peer` or `redis`) for `seconds`."""
        self._histograms["result_fetch_seconds"].observe(seconds, {"model": model, "tier": tier})

    def computed(self, model: str, tenant: str) -> None:
        """A request no tier answered was computed."""
        self._counters["result_cache_misses"].inc(1, {"model": model, "tenant": tenant})

    def prefix(
        self,
        model: str,
        tenant: str,
        prompt_tokens: int,
        cached: Mapping[str, int],
        fetched_bytes: Mapping[str, int],
    ) -> None:
        """A computation's prompt: its tokens, those from each tier's cache (`cached`), and the
        bytes fetched from each other tier."""
        queried = {"model": model, "tenant": tenant}
        self._counters["prefix_cache_queries"].inc(prompt_tokens, queried)
        for tier, tokens in cached.items():
            if tokens:
                tags = {"model": model, "tier": tier, "tenant": tenant}
                self._counters["prefix_cache_hits"].inc(tokens, tags)
        for tier, size in fetched_bytes.items():
            if size:
                self._counters["prefix_fetch_bytes"].inc(size, {"model": model, "tier": tier})

    def fetched_prefix(self, tier: str, model: str, seconds: float) -> None:
        """A computation fetched prefix blocks from `tier` (`peer` or `redis`) for `seconds`."""
        self._histograms["prefix_fetch_seconds"].observe(seconds, {"model": model, "tier": tier})

    # -- reports ------------------------------------------------------------------------------

    def report(self, stats: Mapping[str, Any]) -> None:
        """Export a statistics snapshot of the replica (`/v1/cache/stats`' per-replica entry)."""
        for name, tags, path in _COUNTERS:
            value = _read(stats, path)
            if value is not None:
                self._increase(name, tags, float(value))
        local = stats.get("tiers", {}).get("local", {})
        self._set("result_cache_entries", local.get("entries"))
        self._set("result_cache_bytes", local.get("bytes"))
        prefix = stats.get("prefix", {})
        self._set("prefix_cache_blocks", prefix.get("blocks"))
        self._set("prefix_cache_bytes", prefix.get("bytes"))
        self._set("prefix_cache_pinned_blocks", prefix.get("pinned_blocks"))
        cluster = stats.get("cluster", {})
        self._set("redis_breaker_state", BREAKER_STATES.get(cluster.get("redis_breaker", ""), -1))
        self._set("ring_size", cluster.get("ring_size"))
        self._set("ring_version", cluster.get("ring_version"))
        models = cluster.get("models", {})
        self._set("models_loaded", len(models.get("loaded", ())))
        self._set("models_loaded_bytes", models.get("loaded_bytes"))
        for model, version in cluster.get("versions", {}).items():
            self._set("version_lagging", int(bool(version.get("lagging"))), {"model": model})

    def _increase(self, name: str, tags: dict[str, str], total: float) -> None:
        """Raise counter `name` to the cumulative `total` (a restarted count starts over)."""
        key = (name, tuple(sorted(tags.items())))
        last = self._reported.get(key, 0.0)
        if total > last:
            self._counters[name].inc(total - last, tags)
        self._reported[key] = total

    def _set(self, name: str, value: Any, tags: dict[str, str] | None = None) -> None:
        if isinstance(value, int | float) and not isinstance(value, bool):
            self._gauges[name].set(float(value), tags or {})


def _read(stats: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = stats
    for part in path:
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
