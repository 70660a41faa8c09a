"""Invalidation rules: selectors, creation-time cover, ordering, pruning, strict JSON."""

from __future__ import annotations

import pytest

from cluster.local.result_cache import EntryTags
from cluster.versions.invalidation import (
    SKEW_MARGIN_S,
    InvalidationRule,
    InvalidationRules,
    RuleFormatError,
    rules_from_json,
    rules_to_json,
)

TAGS = EntryTags(model="m", version="1", tenant="alice")


@pytest.mark.parametrize(
    ("selectors", "matches"),
    [
        ({"model": "m"}, True),
        ({"model": "other"}, False),
        ({"model": "m", "version": "1"}, True),
        ({"model": "m", "version": "2"}, False),
        ({"tenant": "alice"}, True),
        ({"tenant": "bob"}, False),
        ({"key": "ab12"}, True),
        ({"key": "cd34"}, False),
    ],
)
def test_a_rule_matches_entries_with_every_given_selector(selectors, matches):
    rule = InvalidationRule(seq=1, issued_at=100.0, **selectors)
    assert rule.matches(TAGS, "ab12") is matches


def test_a_rule_covers_only_values_created_before_it_give_or_take_clock_skew():
    rule = InvalidationRule(seq=1, issued_at=100.0, model="m")
    assert rule.covers(TAGS, None, created_at=50.0)
    assert rule.covers(TAGS, None, created_at=100.0 + SKEW_MARGIN_S)
    assert not rule.covers(TAGS, None, created_at=100.0 + SKEW_MARGIN_S + 0.1)


def test_a_rule_must_select_something():
    with pytest.raises(ValueError, match="needs"):
        InvalidationRule(seq=1, issued_at=0.0)


def test_rules_are_kept_once_in_order_and_pruned_by_age():
    rules = InvalidationRules()
    first = InvalidationRule(seq=2, issued_at=10.0, model="m")
    second = InvalidationRule(seq=1, issued_at=20.0, tenant="alice")
    assert rules.add([first, second]) == [second, first]
    assert rules.add([first]) == []
    assert rules.last_seq == 2 and len(rules) == 2
    assert rules.covers(TAGS, None, created_at=5.0)
    assert rules.prune(issued_before=15.0) == 1
    assert [rule.seq for rule in rules] == [1]


def test_rules_round_trip_and_malformed_json_is_refused():
    rules = [InvalidationRule(3, 1.5, model="m", key="ff"), InvalidationRule(4, 2.0, tenant="t")]
    assert rules_from_json(rules_to_json(rules)) == rules
    for bad in (
        b"{}",
        b"[1]",
        b'[{"seq": 1}]',
        b"nope",
        b'[{"seq":1,"issued_at":0,"model":null,"version":null,"tenant":null,"key":null}]',
    ):
        with pytest.raises(RuleFormatError):
            rules_from_json(bad)
