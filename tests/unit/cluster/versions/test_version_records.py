"""Signed version and rule records: what a reader of Redis accepts, and everything it refuses."""

from __future__ import annotations

import json

import pytest

from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion
from cluster.versions.store import RecordRejected, RecordSigner

KEY = bytes(range(32))
RECORD = ModelVersion("m", "2", 2, source="admin", seed=7, published_at=1.5, history=("1",))
RULES = [InvalidationRule(1, 10.0, model="m"), InvalidationRule(2, 11.0, key="ab")]


def edited(signed: str, **changes: object) -> str:
    """`signed` with fields of its record changed and its MAC kept."""
    envelope = json.loads(signed)
    record = json.loads(envelope["record"])
    record.update(changes)
    envelope["record"] = json.dumps(record, separators=(",", ":"))
    return json.dumps(envelope)


def test_signed_records_and_rules_open_to_what_was_signed():
    signer = RecordSigner(KEY, "ns")
    assert signer.open_version(signer.sign_version(RECORD)) == RECORD
    assert signer.open_version(signer.sign_version(RECORD).encode()) == RECORD
    assert signer.open_rules(signer.sign_rules(RULES)) == RULES
    assert signer.open_rules(signer.sign_rules([])) == []


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (RecordSigner(bytes(32), "ns").sign_version(RECORD), "badly signed"),
        (RecordSigner(KEY, "other-ns").sign_version(RECORD), "badly signed"),
        (edited(RecordSigner(KEY, "ns").sign_version(RECORD), seed=1337), "badly signed"),
        (edited(RecordSigner(KEY, "ns").sign_version(RECORD), checkpoint="/x"), "badly signed"),
        (edited(RecordSigner(KEY, "ns").sign_version(RECORD), generation=99), "badly signed"),
        (RECORD.to_json(), "unsigned"),
        (json.dumps({"record": RECORD.to_json()}), "unsigned"),
        (json.dumps({"mac": "00" * 32, "record": json.loads(RECORD.to_json())}), "unsigned"),
        (json.dumps({"mac": "zz", "record": RECORD.to_json()}), "badly signed"),
        (json.dumps({"mac": "00" * 32, "record": "\ud800"}), "badly signed"),
        (RecordSigner(KEY, "ns").sign_rules(RULES), "unsigned"),
        (b"[" * 100_000, "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"x" * 300_000, "larger than"),
    ],
    ids=[
        "wrong-key",
        "other-namespace",
        "seed-edited",
        "checkpoint-edited",
        "generation-edited",
        "plain-record",
        "no-mac",
        "record-not-text",
        "mac-not-hex",
        "surrogate",
        "rules-as-record",
        "deep-nesting",
        "not-utf8",
        "huge",
    ],
)
def test_a_version_record_not_signed_by_this_key_for_this_namespace_is_refused(raw, reason):
    with pytest.raises(RecordRejected, match=reason):
        RecordSigner(KEY, "ns").open_version(raw)


def test_rules_signed_elsewhere_or_edited_are_refused():
    signer = RecordSigner(KEY, "ns")
    signed = json.loads(signer.sign_rules(RULES))
    signed["rules"] = signed["rules"].replace('"model":"m"', '"model":"n"')
    for raw in (
        RecordSigner(KEY, "other-ns").sign_rules(RULES),
        json.dumps(signed),
        '[{"seq":1,"issued_at":0,"model":"m","version":null,"tenant":null,"key":null}]',
        signer.sign_version(RECORD),
    ):
        with pytest.raises(RecordRejected):
            signer.open_rules(raw)


def test_a_records_key_must_be_long_enough_for_a_mac_and_short_enough_for_blake2b():
    for key in (b"", b"k" * 15, b"k" * 65):
        with pytest.raises(ValueError, match="records key"):
            RecordSigner(key, "ns")
