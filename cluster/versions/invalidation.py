"""Invalidation rules: which cached answers must no longer be served, wherever they are.

Dropping matching entries from every replica's local cache is not enough: copies live in Redis
and on peers, and a replica that dropped its copy would fetch one of those right back. So an
invalidation is also a rule, `InvalidationRule`: a selector (model, version, tenant, key; each
None for any) and the time it was issued. Every replica holds the rules and treats a value
fetched from a peer or Redis that a rule covers (it matches, and was created before the rule
was issued) as a miss. A background purge deletes what it can from Redis later; until then the
rules keep the old copies unreachable. A rule can be forgotten once everything it covers has
expired (`prune`), i.e. after the longest cache lifetime.

Creation times come from the clock of the replica that computed a value, issue times from the
version actor's: `SKEW_MARGIN_S` of slack covers clocks that disagree a little (a value created
just after a rule is then treated as covered too, which costs a recomputation, never a stale
answer).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cluster.local.result_cache import EntryTags

__all__ = ["SKEW_MARGIN_S", "InvalidationRule", "InvalidationRules", "RuleFormatError"]

SKEW_MARGIN_S = 2.0
_SELECTORS = ("model", "version", "tenant", "key")


class RuleFormatError(ValueError):
    """A stored or received rule is malformed."""


@dataclass(frozen=True)
class InvalidationRule:
    """Entries matching every given selector and created before `issued_at` are invalid.

    `seq` orders rules (the version actor numbers them); `key` is a result key's hex digest.
    At least one selector is set: a rule that matches everything is a `clear`, which callers
    express as one selector per model.
    """

    seq: int
    issued_at: float
    model: str | None = None
    version: str | None = None
    tenant: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if all(getattr(self, name) is None for name in _SELECTORS):
            raise ValueError("an invalidation rule needs a model, version, tenant or key")

    def matches(self, tags: EntryTags, key_hex: str | None = None) -> bool:
        """Whether an entry with `tags` (and result key `key_hex`) is selected."""
        return (
            (self.model is None or tags.model == self.model)
            and (self.version is None or tags.version == self.version)
            and (self.tenant is None or tags.tenant == self.tenant)
            and (self.key is None or key_hex == self.key)
        )

    def covers(self, tags: EntryTags, key_hex: str | None, created_at: float) -> bool:
        """Whether a value with `tags` created at `created_at` is invalid under this rule."""
        return created_at <= self.issued_at + SKEW_MARGIN_S and self.matches(tags, key_hex)

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "issued_at": self.issued_at,
            **{name: getattr(self, name) for name in _SELECTORS},
        }

    @classmethod
    def from_json(cls, data: Any) -> InvalidationRule:
        """Parse `as_json` output strictly; raises `RuleFormatError`."""
        if not isinstance(data, dict) or set(data) != {"seq", "issued_at", *_SELECTORS}:
            raise RuleFormatError("a rule has exactly seq, issued_at, model, version, tenant, key")
        if type(data["seq"]) is not int or data["seq"] < 1:
            raise RuleFormatError("seq must be a positive integer")
        issued_at = data["issued_at"]
        if type(issued_at) not in (int, float) or not math.isfinite(issued_at):
            raise RuleFormatError("issued_at must be a finite number")
        for name in _SELECTORS:
            if data[name] is not None and not isinstance(data[name], str):
                raise RuleFormatError(f"{name} must be null or a string")
        try:
            return cls(
                seq=data["seq"],
                issued_at=float(issued_at),
                **{name: data[name] for name in _SELECTORS},
            )
        except ValueError as exc:
            raise RuleFormatError(str(exc)) from None


class InvalidationRules:
    """The rules a replica enforces, ordered by `seq`. Not thread-safe for writers; readers
    see either the old or the new tuple (it is replaced whole)."""

    def __init__(self, rules: Iterable[InvalidationRule] = ()) -> None:
        self._rules: tuple[InvalidationRule, ...] = ()
        self.add(rules)

    @property
    def last_seq(self) -> int:
        """The highest `seq` held (0 when none)."""
        return self._rules[-1].seq if self._rules else 0

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Any:
        return iter(self._rules)

    def add(self, rules: Iterable[InvalidationRule]) -> list[InvalidationRule]:
        """Add the rules not held yet (by `seq`); returns the new ones, in order."""
        held = {rule.seq for rule in self._rules}
        fresh = sorted((r for r in rules if r.seq not in held), key=lambda r: r.seq)
        if fresh:
            self._rules = tuple(sorted((*self._rules, *fresh), key=lambda r: r.seq))
        return fresh

    def covers(self, tags: EntryTags, key_hex: str | None, created_at: float) -> bool:
        """Whether any rule makes a value with `tags` created at `created_at` invalid."""
        return any(rule.covers(tags, key_hex, created_at) for rule in self._rules)

    def prune(self, issued_before: float) -> int:
        """Forget rules issued before `issued_before` (their values have expired); how many."""
        kept = tuple(r for r in self._rules if r.issued_at >= issued_before)
        dropped = len(self._rules) - len(kept)
        self._rules = kept
        return dropped


def rules_to_json(rules: Iterable[InvalidationRule]) -> str:
    """Rules as one JSON array (the form stored in Redis)."""
    return json.dumps([rule.as_json() for rule in rules], separators=(",", ":"))


def rules_from_json(raw: str | bytes, max_bytes: int = 4 * 1024 * 1024) -> list[InvalidationRule]:
    """Parse `rules_to_json` output strictly; raises `RuleFormatError`."""
    if len(raw) > max_bytes:
        raise RuleFormatError(f"rules are larger than {max_bytes} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RuleFormatError(f"rules are not JSON: {exc}") from None
    if not isinstance(data, list):
        raise RuleFormatError("rules are not a JSON array")
    return [InvalidationRule.from_json(item) for item in data]
