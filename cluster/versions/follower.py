"""The replica side of the version-broadcast actor: apply new versions and rules, acknowledge.

Two daemon threads feed one serialized `apply` step:

- the watcher long-polls the actor's `watch` (which also carries the acknowledgement of what
  was applied before the call, so acknowledging is simply calling again);
- the Redis listener (when Redis is configured) re-reads the stored versions on every
  (re)connect and takes every pub/sub announcement, so a replica follows versions published by
  another cluster sharing the Redis, and catches up by itself after Redis comes back. Only
  records signed with the cluster secret's records key are taken (`VersionStore`).

Versions are compared by generation only; a record is applied once, in generation order per
model. Applying means calling `apply_version(record)` (load the weights, switch, drop the old
entries; it may raise, and is then reported to the actor and retried, at most once per
`FAILED_RETRY_PAUSE_S` while nothing newer arrives) and `apply_rules(rules)`.

`lagging(model)` is true between hearing of a newer version and having applied it: the replica
must not answer from the old version then. `in_contact()` is false when the actor has not
answered for `contact_s`: a version may have been published meanwhile, so the replica must not
trust its cache until the actor answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import ray
from ray.actor import ActorHandle

from cluster.versions.actor import VersionUpdate
from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion
from cluster.versions.store import VersionStore

__all__ = ["AlwaysCurrent", "VersionFollower", "VersionView"]

logger = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.5
FAILED_RETRY_PAUSE_S = 1.0
CONTACT_S = 10.0


class VersionView(Protocol):
    """What a cache needs to know of published versions (a `VersionFollower` tells it)."""

    def lagging(self, model: str) -> bool: ...

    def in_contact(self) -> bool: ...


class AlwaysCurrent:
    """The view of a process alone: what it serves is current, and it is never out of touch."""

    def lagging(self, model: str) -> bool:
        return False

    def in_contact(self) -> bool:
        return True


class VersionFollower:
    """Keeps one replica on the published versions; see the module docstring."""

    def __init__(
        self,
        replica_id: str,
        actor: Callable[[], ActorHandle[Any]],
        initial: Mapping[str, ModelVersion],
        apply_version: Callable[[ModelVersion], None],
        apply_rules: Callable[[list[InvalidationRule]], None],
        store: VersionStore | None = None,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
        contact_s: float = CONTACT_S,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
        holds_weights: bool = True,
    ) -> None:
        """`on_change()` is called (in the follower's threads) whenever `lagging` may have
        changed: a newer version heard, or one applied. `holds_weights`: false for a follower
        whose `apply_version` loads no weights (an ingress's cache), which the actor must not
        count as a replica that could load a version."""
        self.replica_id = replica_id
        self._holds_weights = holds_weights
        self._on_change = on_change
        self._actor = actor
        self._apply_version = apply_version
        self._apply_rules = apply_rules
        self._store = store
        self._watch_timeout_s = watch_timeout_s
        self._contact_s = contact_s
        self._clock = clock
        self._last_contact = clock()
        self._applied: dict[str, ModelVersion] = dict(initial)
        self._heard: dict[str, ModelVersion] = dict(initial)
        self._failures: dict[str, tuple[int, str]] = {}
        self._rules_seq = 0
        self._state_lock = threading.Lock()  # guards `_heard` and `_applied`
        self._applying = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._watch_forever, name="raycache-versions")]
        if store is not None:
            self._threads.append(
                threading.Thread(
                    target=store.follow,
                    args=(self.offer, self._stopped),
                    name="raycache-versions-redis",
                )
            )
        for thread in self._threads:
            thread.daemon = True

    # -- state --------------------------------------------------------------------------------

    def applied(self, model: str) -> ModelVersion | None:
        """The version this replica serves for `model`."""
        return self._applied.get(model)

    def lagging(self, model: str) -> bool:
        """Whether a newer version of `model` is known but not applied yet."""
        heard, applied = self._heard.get(model), self._applied.get(model)
        return heard is not None and (applied is None or heard.generation > applied.generation)

    def in_contact(self) -> bool:
        """Whether the version actor answered within the last `contact_s` (a long-poll that
        is still pending counts as an answer when it began less than `contact_s` ago)."""
        return self._clock() - self._last_contact < self._contact_s + self._watch_timeout_s

    def failures(self) -> dict[str, tuple[int, str]]:
        """Models whose newest version could not be applied: (its generation, the error)."""
        return dict(self._failures)

    @property
    def rules_seq(self) -> int:
        return self._rules_seq

    # -- feeding ------------------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop following and unsubscribe (best effort: otherwise the lease lapses)."""
        self._stopped.set()
        try:
            ray.get(self._actor().unsubscribe.remote(self.replica_id), timeout=CALL_TIMEOUT_S)
        except Exception:
            logger.info("could not unsubscribe %s; its lease will lapse", self.replica_id)

    def offer(self, record: ModelVersion) -> None:
        """Take `record` if it is newer than what was heard of `record.model`, and apply it."""
        if self._hear(record):
            self.catch_up()

    def _hear(self, record: ModelVersion) -> bool:
        """Note `record` as the newest heard of its model if it is; whether it was."""
        with self._state_lock:
            heard = self._heard.get(record.model)
            if heard is not None and heard.generation >= record.generation:
                return False
            self._heard[record.model] = record
        self._changed_now()
        return True

    def offer_rules(self, rules: list[InvalidationRule]) -> None:
        """Apply `rules` (those after the last one applied)."""
        with self._applying:
            fresh = sorted((r for r in rules if r.seq > self._rules_seq), key=lambda r: r.seq)
            if fresh:
                self._apply_rules(fresh)
                self._rules_seq = max(rule.seq for rule in fresh)

    def catch_up(self) -> None:
        """Apply every heard version not applied yet (one at a time, in generation order)."""
        with self._applying:
            for model, record in sorted(self._heard.items()):
                applied = self._applied.get(model)
                if applied is not None and applied.generation >= record.generation:
                    continue
                try:
                    self._apply_version(record)
                except Exception as exc:  # reported to the actor, retried next round
                    logger.exception("could not apply version %s of %s", record.version, model)
                    self._failures[model] = (record.generation, f"{type(exc).__name__}: {exc}")
                    continue
                self._failures.pop(model, None)
                with self._state_lock:
                    self._applied[model] = record
                self._changed_now()
                logger.info("now serving %s version %s", model, record.version)

    def _changed_now(self) -> None:
        if self._on_change is not None:
            self._on_change()

    def _watch_forever(self) -> None:
        while not self._stopped.is_set():
            try:
                update = cast(
                    VersionUpdate,
                    ray.get(
                        self._actor().watch.remote(
                            self.replica_id,
                            dict(self._applied),
                            self._rules_seq,
                            self.failures(),
                            self._watch_timeout_s,
                            self._holds_weights,
                        ),
                        timeout=self._watch_timeout_s + CALL_TIMEOUT_S,
                    ),
                )
            except Exception:  # the actor may be restarting; retried after a pause
                logger.info("version watch failed; retrying", exc_info=True)
                self._stopped.wait(RETRY_PAUSE_S)
                continue
            self._last_contact = self._clock()
            heard_newer = [self._hear(record) for record in update.records]
            self.catch_up()  # also retries versions that failed to load last round
            if update.rules:
                self.offer_rules(list(update.rules))
            if self._failures and not any(heard_newer):
                # The actor answers at once while a version is not applied here: without a
                # pause, a version that cannot load would be retried in a tight loop.
                self._stopped.wait(FAILED_RETRY_PAUSE_S)
