"""Model versions: which weights each model serves now, and who has switched to them.

Pure rules, no Ray, Redis or clock (the caller passes `now`): `version_actor` wraps them in the
version-broadcast actor, `version_follower` applies them on a replica.

- A `ModelVersion` is one published version of a model. Versions are opaque labels ("2",
  "2026-11-23", "v7-finetune"), so their order is the order of publication: `generation` grows
  by one with every new version of a model, and every party compares generations, never labels.
  A record also says where the weights come from (`seed` or `checkpoint`; neither means "the
  configured source, reloaded") and keeps the labels published before it (`history`).
- `VersionRegistry.publish` decides what a publish means: the current version again is a no-op
  (at-least-once delivery is fine); an unseen label is the next generation; a label published
  before is going backwards and needs `force`. `adopt` takes a record from elsewhere (Redis,
  another cluster, a replica that outlived a restarted actor) when its generation is newer.
  `restore` brings back the version before one that no replica could load, as the next
  generation, so that replicas waiting for the failed one serve again.
- `Subscriptions` tracks the replicas that follow the versions (under leases renewed by their
  long-polls) and what each has applied, so a publish can wait for exactly the replicas that
  were subscribed when it began.

Records travel as strict JSON (`to_json` / `from_json`), never pickled: they are read back from
Redis, which other processes can write (`version_store` signs them and ignores unsigned ones).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "HISTORY_LIMIT",
    "ModelVersion",
    "PublishOutcome",
    "Subscriptions",
    "VersionFormatError",
    "VersionRegistry",
    "VersionRegression",
]

HISTORY_LIMIT = 32
"""Labels kept per model to refuse going back; older ones may be reused without `force`."""
MAX_RECORD_BYTES = 64 * 1024


class VersionFormatError(ValueError):
    """A stored or received version record is malformed."""


class VersionRegression(ValueError):
    """A publish would go back to (or relabel) a version published before; needs `force`."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version of `model`; see the module docstring."""

    model: str
    version: str
    generation: int
    source: str = "config"
    seed: int | None = None
    checkpoint: str | None = None
    published_at: float = 0.0
    history: tuple[str, ...] = ()

    def same_weights(self, seed: int | None, checkpoint: str | None) -> bool:
        """Whether this record loads its weights from `seed` / `checkpoint`."""
        return (self.seed, self.checkpoint) == (seed, checkpoint)

    def to_json(self) -> str:
        """The record as compact JSON (the form stored in Redis and announced on pub/sub)."""
        return json.dumps(
            {
                "model": self.model,
                "version": self.version,
                "generation": self.generation,
                "source": self.source,
                "seed": self.seed,
                "checkpoint": self.checkpoint,
                "published_at": self.published_at,
                "history": list(self.history),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ModelVersion:
        """Parse `to_json` output strictly; raises `VersionFormatError` naming the bad field."""
        if len(raw) > MAX_RECORD_BYTES:
            raise VersionFormatError(f"record is larger than {MAX_RECORD_BYTES} bytes")
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VersionFormatError(f"record is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise VersionFormatError("record is not a JSON object")
        expected = {
            "model",
            "version",
            "generation",
            "source",
            "seed",
            "checkpoint",
            "published_at",
            "history",
        }
        if set(data) != expected:
            raise VersionFormatError(f"record fields {sorted(data)} are not {sorted(expected)}")
        _expect(data, "model", str)
        _expect(data, "version", str)
        _expect(data, "source", str)
        if type(data["generation"]) is not int or data["generation"] < 1:
            raise VersionFormatError("generation must be a positive integer")
        if data["seed"] is not None and (type(data["seed"]) is not int or data["seed"] < 0):
            raise VersionFormatError("seed must be null or a non-negative integer")
        if data["checkpoint"] is not None:
            _expect(data, "checkpoint", str)
        published_at = data["published_at"]
        if type(published_at) not in (int, float) or not math.isfinite(published_at):
            raise VersionFormatError("published_at must be a finite number")
        history = data["history"]
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise VersionFormatError("history must be a list of strings")
        if not data["model"] or not data["version"]:
            raise VersionFormatError("model and version must not be empty")
        return cls(
            model=data["model"],
            version=data["version"],
            generation=data["generation"],
            source=data["source"],
            seed=data["seed"],
            checkpoint=data["checkpoint"],
            published_at=float(published_at),
            history=tuple(history[-HISTORY_LIMIT:]),
        )


def _expect(data: Mapping[str, Any], name: str, kind: type) -> None:
    if not isinstance(data[name], kind):
        raise VersionFormatError(f"{name} must be a {kind.__name__}")


class VersionRegistry:
    """The current `ModelVersion` of each model, and the rules for changing it."""

    def __init__(self, records: Iterable[ModelVersion] = ()) -> None:
        self._current: dict[str, ModelVersion] = {}
        for record in records:
            self.adopt(record)

    def current(self, model: str) -> ModelVersion | None:
        """The current version of `model`, or None before its first publish."""
        return self._current.get(model)

    def all(self) -> dict[str, ModelVersion]:
        """Every model's current version."""
        return dict(self._current)

    def publish(
        self,
        model: str,
        version: str,
        *,
        source: str,
        now: float,
        seed: int | None = None,
        checkpoint: str | None = None,
        force: bool = False,
    ) -> ModelVersion:
        """Make `version` current for `model` and return its record.

        The current version with the same weights source is returned unchanged (idempotent).
        A label published before, or the current label with another weights source, raises
        `VersionRegression` unless `force`: then it is republished as a new generation.
        """
        current = self._current.get(model)
        if current is not None and current.version == version:
            if current.same_weights(seed, checkpoint):
                return current
            if not force:
                raise VersionRegression(
                    f"version {version!r} of {model!r} is current with other weights "
                    f"(seed {current.seed}, checkpoint {current.checkpoint}); publish a new "
                    "version, or force"
                )
        history = (*current.history, current.version) if current else ()
        if version in history and not force:
            raise VersionRegression(
                f"version {version!r} of {model!r} was published before the current "
                f"{current.version if current else None!r}; versions do not go backwards "
                "unless forced"
            )
        record = ModelVersion(
            model=model,
            version=version,
            generation=(current.generation if current else 0) + 1,
            source=source,
            seed=seed,
            checkpoint=checkpoint,
            published_at=now,
            history=tuple(h for h in history if h != version)[-HISTORY_LIMIT:],
        )
        self._current[model] = record
        return record

    def restore(self, previous: ModelVersion, now: float) -> ModelVersion:
        """Make `previous`'s label and weights current again, as the next generation.

        For a rollout that no replica could load: replicas that wait for the failed version
        (and refuse requests meanwhile) take the restored one as newer and serve again. The
        failed label stays in the history, since a replica may have served it briefly.
        """
        return self.publish(
            previous.model,
            previous.version,
            source="rollback",
            now=now,
            seed=previous.seed,
            checkpoint=previous.checkpoint,
            force=True,
        )

    def adopt(self, record: ModelVersion) -> bool:
        """Take `record` if it is newer (higher generation) than what is known; whether taken."""
        current = self._current.get(record.model)
        if current is not None and current.generation >= record.generation:
            return False
        self._current[record.model] = record
        return True


@dataclass(frozen=True)
class PublishOutcome:
    """What a publish (or an invalidation) reached: who acknowledged, who did not, who failed.

    `acknowledged` applied it in time; `missing` were subscribed when it began and did not
    answer before the deadline; `failed` answered with an error (replica id -> message), e.g.
    weights that would not load. When every replica that answered failed, the version before
    it was made current again: `restored` is that record (a new generation), and the failed
    one is current nowhere. Every replica still behind the current version is out of the ring
    until it catches up.

    `weightless` are the acknowledging subscribers that hold no weights (ingress replicas,
    which apply a version by dropping the answers they keep): their acknowledgement says
    nothing of whether the weights load.
    """

    record: ModelVersion | None
    acknowledged: tuple[str, ...]
    missing: tuple[str, ...]
    failed: Mapping[str, str] = field(default_factory=dict)
    restored: ModelVersion | None = None
    weightless: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every subscribed replica applied it."""
        return not self.missing and not self.failed

    @property
    def rolled_back(self) -> bool:
        """Whether the publish was undone because no replica could apply it."""
        return self.restored is not None

    @property
    def loaded_nowhere(self) -> bool:
        """Whether replicas answered and every one holding weights that did failed to apply it."""
        return bool(self.failed) and not set(self.acknowledged) - set(self.weightless)

    def as_json(self) -> dict[str, Any]:
        record, restored = self.record, self.restored
        return {
            "model": record.model if record else None,
            "version": record.version if record else None,
            "generation": record.generation if record else None,
            "acknowledged": list(self.acknowledged),
            "missing": list(self.missing),
            "failed": dict(self.failed),
            "rolled_back": self.rolled_back,
            "restored": (
                {"version": restored.version, "generation": restored.generation}
                if restored
                else None
            ),
        }


@dataclass
class _Subscriber:
    expires_at: float
    applied: dict[str, int] = field(default_factory=dict)
    rules_seq: int = 0
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)
    holds_weights: bool = True


class Subscriptions:
    """Replicas following the versions, under leases of `lease_s`, and what each applied."""

    def __init__(self, lease_s: float) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be > 0")
        self.lease_s = lease_s
        self._subscribers: dict[str, _Subscriber] = {}

    def renew(self, replica_id: str, now: float) -> None:
        """Start or renew `replica_id`'s lease (every long-poll does)."""
        subscriber = self._subscribers.get(replica_id)
        if subscriber is None:
            self._subscribers[replica_id] = _Subscriber(expires_at=now + self.lease_s)
        else:
            subscriber.expires_at = now + self.lease_s

    def acknowledge(
        self,
        replica_id: str,
        applied: Mapping[str, int],
        rules_seq: int,
        failures: Mapping[str, tuple[int, str]],
        now: float,
        holds_weights: bool = True,
    ) -> None:
        """Record what `replica_id` has applied (generation per model, last rule) and failed
        to apply (model -> (generation, error)), and whether it holds weights."""
        self.renew(replica_id, now)
        subscriber = self._subscribers[replica_id]
        subscriber.holds_weights = holds_weights
        for model, generation in applied.items():
            subscriber.applied[model] = max(subscriber.applied.get(model, 0), generation)
        subscriber.rules_seq = max(subscriber.rules_seq, rules_seq)
        subscriber.failures = dict(failures)

    def holds_weights(self, replica_id: str) -> bool:
        """Whether `replica_id` loads the weights of what it applies (an ingress does not)."""
        subscriber = self._subscribers.get(replica_id)
        return subscriber is None or subscriber.holds_weights

    def remove(self, replica_id: str) -> None:
        """Forget `replica_id` at once (a replica shutting down cleanly)."""
        self._subscribers.pop(replica_id, None)

    def alive(self, now: float) -> list[str]:
        """Replicas whose lease holds, sorted; lapsed ones are forgotten."""
        for replica_id in [r for r, s in self._subscribers.items() if s.expires_at <= now]:
            del self._subscribers[replica_id]
        return sorted(self._subscribers)

    def has_applied(self, replica_id: str, model: str, generation: int) -> bool:
        subscriber = self._subscribers.get(replica_id)
        return subscriber is not None and subscriber.applied.get(model, 0) >= generation

    def has_rules(self, replica_id: str, seq: int) -> bool:
        subscriber = self._subscribers.get(replica_id)
        return subscriber is not None and subscriber.rules_seq >= seq

    def failure(self, replica_id: str, model: str, generation: int) -> str | None:
        """The error of `replica_id` applying `model` at `generation` or later, if any."""
        subscriber = self._subscribers.get(replica_id)
        failed = subscriber.failures.get(model) if subscriber else None
        return failed[1] if failed is not None and failed[0] >= generation else None

    def lagging(self, registry: VersionRegistry, now: float) -> list[str]:
        """Live replicas that have not applied every model's current generation."""
        current = registry.all()
        return [
            replica_id
            for replica_id in self.alive(now)
            if any(
                not self.has_applied(replica_id, model, record.generation)
                for model, record in current.items()
            )
        ]
