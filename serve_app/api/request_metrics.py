"""The ingress's metrics of the path a user sees: how long each request took, by endpoint and
by where its answer came from, the time to the first token of a stream
(`ray_raycache_request_duration_seconds`, `ray_raycache_time_to_first_token_seconds`), and the
requests run again because their replica died under them
(`ray_raycache_requests_retried_total`).

The ingress's own cache counts its lookups and hits in the replicas' series
(`ray_raycache_result_cache_lookups_total` and `_hits_total`, tier `ingress`): a request it
answers asks no replica, and one it does not answer is looked up at the replica as before.
These two are tallied here and handed to Ray at most `COUNTS_EVERY_S` later, as one increment
per label set: a Ray metric record is a noticeable part of a hit the ingress answers (see
docs/benchmarks.md, `hit_floor`), and Prometheus scrapes far less often than that.

`cache` is the answer's tier (`ingress`, `local`, `peer`, `redis`), `miss` when it was
computed, and for embeddings `partial` when some inputs were cached and some not. Labels are
bounded: `model` by the configuration, `endpoint` and `cache` by these sets, `tenant` by the
configured tenants (`TenantAuth.tenant_label`: a tenant the configuration names, or `other`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from serve_app.replica.metrics import PREFIX, MetricsBackend, make_counter

Endpoint = Literal["completions", "chat", "embeddings"]
SECONDS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COUNTS_EVERY_S: Final = 1.0


def cache_outcome(cache: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """The `cache` label of a response's `cache` field (one entry, or one per input)."""
    entries = [cache] if isinstance(cache, Mapping) else list(cache)
    tiers = {entry.get("tier") if entry.get("hit") else "miss" for entry in entries}
    if len(tiers) == 1:
        return str(tiers.pop())
    return "partial" if "miss" in tiers else "mixed"


class RequestMetrics:
    """Latency histograms, the retry counter, and the lookups and hits of the ingress's cache
    (tallied, see the module docstring)."""

    def __init__(self, backend: MetricsBackend) -> None:
        self._duration = backend.Histogram(
            PREFIX + "request_duration_seconds",
            description="Seconds from a request's arrival to its whole answer, by cache outcome.",
            boundaries=list(SECONDS),
            tag_keys=("model", "endpoint", "cache", "tenant"),
        )
        self._first_token = backend.Histogram(
            PREFIX + "time_to_first_token_seconds",
            description="Seconds from a streamed request's arrival to its first text.",
            boundaries=list(SECONDS),
            tag_keys=("model", "endpoint", "tenant"),
        )
        self._lookups = make_counter(backend, "result_cache_lookups")
        self._hits = make_counter(backend, "result_cache_hits")
        # (model, tenant label) -> [lookups, hits] not yet handed to Ray.
        self._tally: dict[tuple[str, str], list[int]] = {}
        self._handing: asyncio.TimerHandle | None = None
        self._retried = backend.Counter(
            PREFIX + "requests_retried",
            description="Requests run again on another replica after theirs died under them.",
            tag_keys=("model",),
        )

    def answered(
        self, model: str, endpoint: Endpoint, cache: str, seconds: float, *, tenant: str
    ) -> None:
        """A request answered whole after `seconds`; `tenant` is its tenant label."""
        tags = {"model": model, "endpoint": endpoint, "cache": cache, "tenant": tenant}
        self._duration.observe(seconds, tags)

    def first_token(self, model: str, endpoint: Endpoint, seconds: float, *, tenant: str) -> None:
        """A stream's first text after `seconds`; `tenant` is its tenant label."""
        tags = {"model": model, "endpoint": endpoint, "tenant": tenant}
        self._first_token.observe(seconds, tags)

    def looked_up(self, model: str, hit: bool, *, tenant: str) -> None:
        """The ingress's cache was asked for an answer of `model`, and had it (`hit`) or not;
        counted within `COUNTS_EVERY_S` (at once when called outside an event loop)."""
        counts = self._tally.get((model, tenant))
        if counts is None:
            counts = self._tally[model, tenant] = [0, 0]
        counts[0] += 1
        counts[1] += hit
        if self._handing is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.hand_over()
                return
            self._handing = loop.call_later(COUNTS_EVERY_S, self.hand_over)

    def hand_over(self) -> None:
        """Add the tallied lookups and hits to their counters."""
        if self._handing is not None:
            self._handing.cancel()
            self._handing = None
        tally, self._tally = self._tally, {}
        for (model, tenant), (lookups, hits) in tally.items():
            tags = {"model": model, "tier": "ingress", "tenant": tenant}
            self._lookups.inc(lookups, tags)
            if hits:
                self._hits.inc(hits, tags)

    def retried(self, model: str) -> None:
        """A request of `model` runs again, its replica having died under it."""
        self._retried.inc(1, {"model": model})
