"""The version-broadcast actor: publishes model versions and invalidations to every replica.

A thin Ray shell over `VersionRegistry`, `Subscriptions` and `InvalidationRules`:

- Replicas follow it by long-polling `watch` (`cluster.versions.follower`). Each call renews the
  replica's subscription lease and reports what it has applied (generation per model, last rule,
  failures), so a call doubles as the acknowledgement of everything applied before it.
- `publish` makes a version current, stores it in Redis (which announces it on pub/sub), wakes
  every watcher, and waits, up to its deadline, until each replica subscribed when it began has
  applied it. Replicas that did not, or failed to load the weights, are returned and taken out
  of the directory's ring until they catch up (the next `watch` that shows them caught up puts
  them back). Old-version keys in Redis are then purged in the background.
- A version that every replica which answered failed to load (a bad checkpoint, say) is rolled
  back: the version before it is published again as the next generation, stored in Redis in
  its place, and waited for, so replicas serve again instead of refusing every request, and
  replicas started later load the restored version, not the failing one.
- `invalidate` does the same for an `InvalidationRule`.
- Each publish and invalidation is exported as metrics through `ray.util.metrics`
  (`RolloutMetrics`): how long its rollout took until every replica acknowledged, and how it
  ended.

State survives a restart through Redis (versions and rules are reloaded on first use; records
there are signed with the cluster secret's records key, see `cluster.versions.store`) and, when
Redis is away or holds nothing valid, through the replicas: a `watch` carrying a newer record
than the actor holds is adopted. So that a publish or invalidation right after a restart does
not reuse a generation (or rule number) the replicas already hold, which they would take for
applied, those wait `RESTART_SETTLE_S` after the restart for the replicas' reports. All methods
are idempotent (Ray may retry them after a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import ray
from ray.actor import ActorHandle
from ray.util import metrics as ray_metrics

from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from cluster.sharing.redis_store import RedisStore, redis_key_pattern
from cluster.versions.invalidation import InvalidationRule, InvalidationRules
from cluster.versions.records import (
    ModelVersion,
    PublishOutcome,
    Subscriptions,
    VersionRegistry,
    VersionRegression,
)
from cluster.versions.store import VersionStore

__all__ = ["RolloutMetrics", "VersionActor", "VersionUpdate", "version_actor"]

logger = logging.getLogger(__name__)

LOAD_RETRY_S = 1.0
# After a restart, how long operators wait for the replicas' first watch calls (Ray retries
# the calls in flight at once; the others come within the followers' retry pause).
RESTART_SETTLE_S = 3.0
DIRECTORY_TIMEOUT_S = 5.0
RULE_LIFETIME_S = 7 * 24 * 3600.0
ROLLOUT_SECONDS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)
"""Bucket boundaries of `raycache_version_rollout_seconds`, up to the longest wait allowed."""
ANY_MODEL: Final = "*"
"""The `model` label of an invalidation that names no model."""
Operation = Literal["publish", "invalidate"]
Ending = Literal["acknowledged", "incomplete", "rolled_back", "unchanged", "refused"]


class RolloutMetrics:
    """The version actor's metrics; `backend` holds the metric classes (`ray.util.metrics` in
    the actor, a recording fake in unit tests). Ray prefixes the names with `ray_`.

    - `raycache_version_rollout_seconds{model, operation}`: seconds from a publish or an
      invalidation until every replica subscribed when it began acknowledged it. A rollout that
      reached no replica, or not every one in time, is not timed: its ending says why.
    - `raycache_version_operations_total{operation, outcome}`: publishes and invalidations by
      how they ended: `acknowledged` by every replica, `incomplete` (some missed the deadline
      or failed to apply it), `rolled_back`, `unchanged` (a publish of what was current
      already, as every replica's start-up makes), `refused` (`VersionRegression`: a label
      published before, without `force`).

    Labels are bounded by the configuration: `model` is a configured model (the ingress and
    the replicas publish only those) or `*`; `operation` and `outcome` are the sets above.
    """

    def __init__(self, backend: Any) -> None:
        self._seconds = backend.Histogram(
            "raycache_version_rollout_seconds",
            description="Seconds from a publish or invalidation until every replica applied it.",
            boundaries=list(ROLLOUT_SECONDS),
            tag_keys=("model", "operation"),
        )
        self._operations = backend.Counter(
            "raycache_version_operations",
            description="Version publishes and invalidations, by how they ended.",
            tag_keys=("operation", "outcome"),
        )

    def rolled_out(
        self, operation: Operation, model: str | None, outcome: PublishOutcome, seconds: float
    ) -> None:
        """A rollout ended `seconds` after it began, reaching what `outcome` says."""
        ending: Ending = "acknowledged" if outcome.complete else "incomplete"
        if outcome.rolled_back:
            ending = "rolled_back"
        self.ended(operation, ending)
        if ending == "acknowledged" and outcome.acknowledged:
            tags = {"model": model or ANY_MODEL, "operation": operation}
            self._seconds.observe(seconds, tags)

    def ended(self, operation: Operation, ending: Ending) -> None:
        """An operation ended so (`rolled_out` counts the endings of rollouts itself)."""
        self._operations.inc(1, {"operation": operation, "outcome": ending})


@dataclass(frozen=True)
class VersionUpdate:
    """What a replica has not applied yet: newer versions, and rules after its last one."""

    records: tuple[ModelVersion, ...]
    rules: tuple[InvalidationRule, ...]


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class VersionActor:
    """See the module docstring."""

    def __init__(
        self,
        namespace: str,
        redis_url: str | None,
        records_key: bytes,
        lease_s: float,
        rule_lifetime_s: float,
        export_metrics: bool = True,
    ) -> None:
        """`export_metrics`: whether to export `RolloutMetrics` (through `ray.util.metrics`)."""
        self._namespace = namespace
        self._redis_url = redis_url
        self._store = VersionStore(redis_url, namespace, records_key) if redis_url else None
        self._registry = VersionRegistry()
        self._subscriptions = Subscriptions(lease_s)
        self._rules = InvalidationRules()
        self._rule_lifetime_s = rule_lifetime_s
        self._next_rule_seq = 1
        self._loaded = self._store is None
        self._last_load_attempt = float("-inf")
        self._changed: asyncio.Event | None = None
        self._acked: asyncio.Event | None = None
        self._excluded: set[str] = set()
        self._purges: set[asyncio.Task[None]] = set()
        self._metrics = RolloutMetrics(ray_metrics) if export_metrics else None
        with warnings.catch_warnings():
            # Ray's own property reads its deprecated `actor_id` and warns in the user's log.
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self._settled_at = time.monotonic() + (RESTART_SETTLE_S if restarted else 0.0)

    # -- queries ------------------------------------------------------------------------------

    async def current(self) -> dict[str, ModelVersion]:
        """The current version of every model published so far."""
        await self._load()
        return self._registry.all()

    async def subscribers(self) -> list[str]:
        """Replicas whose subscription lease holds."""
        return self._subscriptions.alive(time.monotonic())

    # -- replicas -----------------------------------------------------------------------------

    async def watch(
        self,
        replica_id: str,
        applied: Mapping[str, ModelVersion],
        rules_seq: int,
        failures: Mapping[str, tuple[int, str]],
        timeout_s: float,
        holds_weights: bool = True,
    ) -> VersionUpdate:
        """Acknowledge what `replica_id` applied, then return what it lacks as soon as there is
        something, or an empty update after `timeout_s`. `holds_weights`: false for a
        subscriber that loads no weights (an ingress), whose acknowledgement does not keep a
        version that loaded nowhere from being rolled back."""
        await self._load()
        for record in applied.values():
            if record.generation > 0 and self._registry.adopt(record):
                logger.info("adopted %s %s from a replica", record.model, record.version)
                await self._persist(record)
        self._next_rule_seq = max(self._next_rule_seq, rules_seq + 1)
        generations = {model: record.generation for model, record in applied.items()}
        self._subscriptions.acknowledge(
            replica_id, generations, rules_seq, failures, time.monotonic(), holds_weights
        )
        self._events()[1].set()
        await self._readmit_if_caught_up(replica_id)
        deadline = time.monotonic() + timeout_s
        while True:
            update = self._update_for(generations, rules_seq)
            remaining = deadline - time.monotonic()
            if update.records or update.rules or remaining <= 0:
                return update
            changed = self._events()[0]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            self._subscriptions.renew(replica_id, time.monotonic())

    async def unsubscribe(self, replica_id: str) -> None:
        """Stop waiting for `replica_id` (it is shutting down); idempotent."""
        self._subscriptions.remove(replica_id)
        self._events()[1].set()

    # -- operators ----------------------------------------------------------------------------

    async def publish(
        self,
        model: str,
        version: str,
        source: str = "admin",
        seed: int | None = None,
        checkpoint: str | None = None,
        force: bool = False,
        timeout_s: float = 30.0,
    ) -> PublishOutcome:
        """Make `version` current and wait up to `timeout_s` for every subscribed replica.

        When every replica that answered failed to apply it, the version before it is restored
        (see the module docstring) and waited for, up to `timeout_s` again.
        Raises `VersionRegression` (see `VersionRegistry.publish`) without changing anything.
        """
        await self._settle()
        await self._load(refresh=True)
        before = self._registry.current(model)
        try:
            record = self._registry.publish(
                model,
                version,
                source=source,
                now=time.time(),
                seed=seed,
                checkpoint=checkpoint,
                force=force,
            )
        except VersionRegression:
            self._ended("publish", "refused")
            raise
        started = time.monotonic()
        ours = record is not before
        if ours:
            if before is not None and force and record.version in (before.version, *before.history):
                # The label is reused for other weights: its old answers must not be reachable.
                await self._add_rule(model=model, version=record.version)
            stored = await self._make_current(record)
            ours = stored is record
            record = stored
        outcome = await self._rollout(record, timeout_s)
        if (
            ours
            and before is not None
            and outcome.loaded_nowhere
            and self._registry.current(model) is record  # no newer publish meanwhile
        ):
            outcome = await self._roll_back(outcome, before, timeout_s)
            self._rolled_out("publish", model, outcome, started)
            return outcome
        await self._exclude([*outcome.missing, *outcome.failed])
        if ours and before is not None and before.version != record.version:
            self._purge_later(redis_key_pattern(self._namespace, model, before.version))
        if ours:
            self._rolled_out("publish", model, outcome, started)
        else:
            self._ended("publish", "unchanged")
        return outcome

    async def invalidate(
        self,
        model: str | None = None,
        version: str | None = None,
        tenant: str | None = None,
        key: str | None = None,
        timeout_s: float = 30.0,
    ) -> PublishOutcome:
        """Make every cached answer matching the selectors invalid on every replica and in
        Redis; waits up to `timeout_s` for every subscribed replica to apply it."""
        await self._settle()
        await self._load()
        started = time.monotonic()
        rule = await self._add_rule(model=model, version=version, tenant=tenant, key=key)
        targets = self._subscriptions.alive(time.monotonic())
        await self._wait_for(
            targets, lambda rid: self._subscriptions.has_rules(rid, rule.seq), timeout_s
        )
        outcome = self._outcome(None, targets, rule_seq=rule.seq)
        self._rolled_out("invalidate", model, outcome, started)
        if tenant is None:
            if key is not None:
                self._purge_later(f"{self._namespace}:{model or '*'}:{version or '*'}:r:{key}")
            else:
                self._purge_later(redis_key_pattern(self._namespace, model, version))
        await self._exclude(list(outcome.missing))
        return outcome

    # -- internals ----------------------------------------------------------------------------

    def _rolled_out(
        self, operation: Operation, model: str | None, outcome: PublishOutcome, started: float
    ) -> None:
        if self._metrics is not None:
            self._metrics.rolled_out(operation, model, outcome, time.monotonic() - started)

    def _ended(self, operation: Operation, ending: Ending) -> None:
        if self._metrics is not None:
            self._metrics.ended(operation, ending)

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        # Created on the actor's event loop, on first use.
        if self._changed is None or self._acked is None:
            self._changed, self._acked = asyncio.Event(), asyncio.Event()
        return self._changed, self._acked

    async def _settle(self) -> None:
        """After a restart, wait until the replicas have had time to report what they hold."""
        remaining = self._settled_at - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    def _wake(self) -> None:
        changed, _ = self._events()
        changed.set()
        self._changed = asyncio.Event()  # later watchers wait on a fresh event

    def _update_for(self, generations: Mapping[str, int], rules_seq: int) -> VersionUpdate:
        records = tuple(
            record
            for model, record in sorted(self._registry.all().items())
            if record.generation > generations.get(model, 0)
        )
        rules = tuple(rule for rule in self._rules if rule.seq > rules_seq)
        return VersionUpdate(records, rules)

    async def _wait_for(
        self, targets: list[str], done: Callable[[str], bool], timeout_s: float
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = set(self._subscriptions.alive(time.monotonic()))
            if all(done(rid) or rid not in alive for rid in targets):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            _, acked = self._events()
            acked.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(acked.wait(), timeout=min(remaining, 0.5))

    async def _make_current(self, record: ModelVersion) -> ModelVersion:
        """Store `record` (just made current here) and wake the watchers; returns the record
        now current: `record`, or a newer one another publisher stored first."""
        stored = await self._persist(record)
        if stored is not None and stored.generation > record.generation:
            self._registry.adopt(stored)
            record = stored
        self._wake()
        return record

    async def _rollout(self, record: ModelVersion, timeout_s: float) -> PublishOutcome:
        """Wait up to `timeout_s` until every replica subscribed now applied `record` or
        failed to; who did which."""
        targets = self._subscriptions.alive(time.monotonic())
        await self._wait_for(
            targets,
            lambda rid: (
                self._subscriptions.has_applied(rid, record.model, record.generation)
                or self._subscriptions.failure(rid, record.model, record.generation) is not None
            ),
            timeout_s,
        )
        return self._outcome(record, targets)

    async def _roll_back(
        self, failed: PublishOutcome, previous: ModelVersion, timeout_s: float
    ) -> PublishOutcome:
        """Make `previous` current again after `failed.record` loaded nowhere; wait for it."""
        assert failed.record is not None
        restored = await self._make_current(self._registry.restore(previous, now=time.time()))
        logger.warning(
            "no replica could load %s %s (%s); restored %s as generation %d",
            failed.record.model,
            failed.record.version,
            "; ".join(f"{rid}: {error}" for rid, error in sorted(failed.failed.items())),
            restored.version,
            restored.generation,
        )
        outcome = await self._rollout(restored, timeout_s)
        await self._exclude([*outcome.missing, *outcome.failed])
        return replace(failed, restored=restored)

    def _outcome(
        self, record: ModelVersion | None, targets: list[str], rule_seq: int = 0
    ) -> PublishOutcome:
        acknowledged, missing, failed = [], [], {}
        for rid in targets:
            failure = (
                self._subscriptions.failure(rid, record.model, record.generation)
                if record is not None
                else None
            )
            if failure is not None:
                failed[rid] = failure
            elif self._has_reached(rid, record, rule_seq):
                acknowledged.append(rid)
            else:
                missing.append(rid)
        weightless = tuple(r for r in acknowledged if not self._subscriptions.holds_weights(r))
        return PublishOutcome(
            record, tuple(acknowledged), tuple(missing), failed, weightless=weightless
        )

    def _has_reached(self, replica_id: str, record: ModelVersion | None, rule_seq: int) -> bool:
        if record is None:
            return self._subscriptions.has_rules(replica_id, rule_seq)
        return self._subscriptions.has_applied(replica_id, record.model, record.generation)

    async def _add_rule(self, **selectors: str | None) -> InvalidationRule:
        rule = InvalidationRule(seq=self._next_rule_seq, issued_at=time.time(), **selectors)
        self._next_rule_seq += 1
        self._rules.add([rule])
        self._rules.prune(time.time() - self._rule_lifetime_s)
        if self._store is not None:
            await asyncio.to_thread(self._store.save_rules, list(self._rules))
        self._wake()
        return rule

    async def _persist(self, record: ModelVersion) -> ModelVersion | None:
        if self._store is None:
            return None
        return await asyncio.to_thread(self._store.save, record)

    async def _load(self, refresh: bool = False) -> None:
        """Read versions and rules from Redis: once, retried while Redis is away; `refresh`
        re-reads versions (another cluster may have published)."""
        store = self._store
        if store is None or (self._loaded and not refresh):
            return
        now = time.monotonic()
        if not self._loaded and now - self._last_load_attempt < LOAD_RETRY_S and not refresh:
            return
        self._last_load_attempt = now
        records = await asyncio.to_thread(store.load)
        if records is None:
            return
        for record in records.values():
            self._registry.adopt(record)
        if not self._loaded:
            rules = await asyncio.to_thread(store.load_rules)
            if rules is None:
                return
            self._rules.add(rules)
            self._next_rule_seq = max(self._next_rule_seq, self._rules.last_seq + 1)
            self._loaded = True

    async def _exclude(self, replica_ids: list[str]) -> None:
        """Take `replica_ids` out of the directory's ring (they are behind); best effort."""
        fresh = [rid for rid in replica_ids if rid not in self._excluded]
        if not fresh:
            return
        try:
            directory = directory_actor(self._namespace)
            await asyncio.wait_for(directory.exclude.remote(fresh), DIRECTORY_TIMEOUT_S)
            self._excluded.update(fresh)
        except (ray.exceptions.RayError, TimeoutError):
            logger.warning("could not take %s out of the ring", fresh, exc_info=True)

    async def _readmit_if_caught_up(self, replica_id: str) -> None:
        if replica_id not in self._excluded:
            return
        if replica_id in self._subscriptions.lagging(self._registry, time.monotonic()):
            return
        try:
            directory = directory_actor(self._namespace)
            await asyncio.wait_for(directory.readmit.remote([replica_id]), DIRECTORY_TIMEOUT_S)
            self._excluded.discard(replica_id)
        except (ray.exceptions.RayError, TimeoutError):
            logger.warning("could not put %s back in the ring", replica_id, exc_info=True)

    def _purge_later(self, pattern: str) -> None:
        if self._redis_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._purge(pattern))
        self._purges.add(task)
        task.add_done_callback(self._purges.discard)

    async def _purge(self, pattern: str) -> None:
        assert self._redis_url is not None
        store = RedisStore(self._redis_url)
        try:
            removed = await store.purge(pattern, batch=500, pause_s=0.01)
            logger.info("purged %d Redis keys matching %s", removed, pattern)
        finally:
            await store.close()


def version_actor(
    namespace: str,
    redis_url: str | None,
    records_key: bytes,
    lease_s: float = 10.0,
    rule_lifetime_s: float = RULE_LIFETIME_S,
    export_metrics: bool = True,
) -> ActorHandle[Any]:
    """The version-broadcast actor of raycache namespace `namespace`, created on first use.

    Detached and named ``versions-{namespace}`` in the Ray namespace of the directory; whoever
    creates it first decides its Redis URL and `records_key` (the cluster secret's `records`
    key, which signs what it stores in Redis; every replica of an application shares both).
    The key travels as an actor argument: Ray's token authentication guards actor calls.
    `export_metrics`: whether the actor, when this call creates it, exports `RolloutMetrics`.
    """
    return VersionActor.options(  # type: ignore[attr-defined,no-any-return]
        name=f"versions-{namespace}",
        namespace=ACTOR_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
    ).remote(namespace, redis_url, records_key, lease_s, rule_lifetime_s, export_metrics)
