"""The ingress's own result cache: a repeated deterministic completion is answered where it
arrives, without the round trip to a model replica.

It is fenced exactly like a replica's local cache (DESIGN "Hits at the ingress"):

- **Versions**: the ingress follows the version actor as a subscriber of its own
  (`VersionFollower`), so a publish or an invalidation is acknowledged only once the ingress
  has applied it too. An answer is keyed by the result key of the version the ingress follows
  (`completion_key`), and stored only when the replica answered under that same key: an answer
  of other weights than the ones followed is never kept. Applying a version drops every answer
  of its model.
- **Lag and contact**: while a newer version is heard of but not applied, or while the actor
  has not answered for a while (a version may have been published meanwhile), nothing is
  served or stored.
- **Invalidation rules**: applying a rule drops the answers it selects, and an answer that a
  rule covers (created before the rule was issued) is not stored.

Checks and writes share one lock with the follower's thread, so a version or rule applied
while an answer is in flight either drops that answer or keeps it from being stored.
Only answers the replicas computed or served reach this cache, already verified there; it
holds them as Python objects and sends nothing anywhere.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from cluster.keys import ResultKey
from cluster.local.result_cache import EntryTags, ResultCache
from cluster.secret import ClusterSecret
from cluster.versions.follower import AlwaysCurrent, VersionView
from cluster.versions.invalidation import InvalidationRule, InvalidationRules
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CompletionJob, CompletionOutcome
from serve_app.config import IngressCacheSettings, ResultCacheSettings
from serve_app.replica.answers import completion_key

__all__ = ["IngressCache", "Lookup"]

MAX_TENANT_SALTS = 4096


@dataclass(frozen=True, slots=True)
class Lookup:
    """A deterministic job's place in the ingress cache, fixed when the job arrives: its key
    under the version followed then, that version, and the entry's tags."""

    key: ResultKey
    record: ModelVersion
    tags: EntryTags


class IngressCache:
    """Answers of deterministic completions, kept by the ingress under the replicas' fencing
    (see the module docstring). `initial`: the versions followed at first; `connect` hands in
    the follower, whose `apply_version` and `apply_rules` must be this cache's."""

    def __init__(
        self,
        settings: IngressCacheSettings,
        result_cache: ResultCacheSettings,
        namespace: str,
        secret: ClusterSecret,
        initial: Mapping[str, ModelVersion],
    ) -> None:
        self._namespace = namespace
        self._secret = secret
        self._longest_life_s = result_cache.longest_life_s()
        self.cache = ResultCache(
            max_bytes=settings.max_bytes,
            max_entries=settings.max_entries,
            policy=result_cache.policy,
            ttl_s=result_cache.ttl_s,
            ttl_jitter=result_cache.ttl_jitter,
        )
        self.rules = InvalidationRules()
        self._records: dict[str, ModelVersion] = dict(initial)
        self._tenant_salts: dict[str, str] = {}
        self._lock = threading.Lock()
        self._versions: VersionView = AlwaysCurrent()

    def connect(self, versions: VersionView) -> None:
        """Follow `versions` (the ingress's `VersionFollower`)."""
        self._versions = versions

    # -- requests (the event loop) ------------------------------------------------------------

    def lookup(self, job: CompletionJob) -> Lookup | None:
        """Where `job`'s answer is kept; None when it may be neither served nor stored here
        (sampled, a model whose version is changing, or out of touch with the actor)."""
        if not job.params.is_deterministic or not self._trusted(job.model):
            return None
        record = self._records.get(job.model)
        if record is None:
            return None
        salt = self._tenant_salts.get(job.tenant)
        if salt is None:
            if len(self._tenant_salts) >= MAX_TENANT_SALTS:  # names a gateway sends, unbounded
                self._tenant_salts.clear()
            salt = self._tenant_salts[job.tenant] = self._secret.tenant_salt(job.tenant)
        key = completion_key(self._namespace, self._secret, job, record, salt)
        return Lookup(key, record, EntryTags(job.model, record.version, job.tenant))

    def get(self, lookup: Lookup) -> CompletionOutcome | None:
        """The answer kept for `lookup`, as a hit of tier `ingress`; None when there is none
        or when it may not be served now."""
        if not self._current(lookup):
            return None
        found = self.cache.get_decoded(lookup.key)
        if found is None:
            return None
        outcome: CompletionOutcome = found[1]
        return outcome

    def put(self, lookup: Lookup, outcome: CompletionOutcome) -> bool:
        """Keep the replica's `outcome` for `lookup`; True when kept. Refused unless the
        replica answered under `lookup`'s key (the same weights), the version followed is
        still `lookup`'s, and no rule covers the answer."""
        if outcome.cache_key != lookup.key or outcome.created_at is None:
            return False
        kept = replace(outcome, cached_tokens=0, cache_tier="ingress")
        # Charged as the text it holds (the object is a small dataclass around it).
        text = outcome.text.encode("utf-8", "surrogatepass")
        with self._lock:
            if not self._current(lookup):
                return False
            if self.rules.covers(lookup.tags, lookup.key, outcome.created_at):
                return False
            return self.cache.put(lookup.key, text, lookup.tags, decoded=kept)

    def _trusted(self, model: str) -> bool:
        return self._versions.in_contact() and not self._versions.lagging(model)

    def _current(self, lookup: Lookup) -> bool:
        model = lookup.tags.model
        return self._records.get(model) is lookup.record and self._trusted(model)

    # -- versions and rules (the follower's thread) -------------------------------------------

    def apply_version(self, record: ModelVersion) -> None:
        """Follow `record` for its model from now on, and drop that model's answers."""
        with self._lock:
            self._records[record.model] = record
            self.cache.invalidate(lambda tags: tags.model == record.model)

    def apply_rules(self, rules: list[InvalidationRule]) -> None:
        """Enforce `rules`: drop the answers they select, refuse the ones they cover later."""
        with self._lock:
            self.rules.add(rules)
            self.rules.prune(time.time() - self._longest_life_s)
            for rule in rules:
                self.cache.invalidate_entries(lambda key, tags, rule=rule: rule.matches(tags, key))
