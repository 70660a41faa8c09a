"""Signed version and rule records in a real redis-server: a reader takes only what a holder of
the records key wrote for this namespace; everything else is ignored, counted and logged.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid

import pytest

from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion
from cluster.versions.store import RecordSigner, VersionStore, eviction_risk, versions_channel
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

KEY = b"k" * 32
GOOD = ModelVersion("m", "2", 2, source="admin", seed=2)


@pytest.fixture
def namespace() -> str:
    return f"signed-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(redis_server, namespace):
    store = VersionStore(redis_server.url, namespace, KEY)
    yield store
    store.close()


def forgeries(namespace: str) -> dict[str, str]:
    """Records for model `m` that must not be taken, each with a higher generation than GOOD."""
    evil = ModelVersion("m", "evil", 50, source="attacker", seed=1337)
    signed = json.loads(RecordSigner(KEY, namespace).sign_version(GOOD))
    record = json.loads(signed["record"])
    seed_edited = {**signed, "record": json.dumps({**record, "seed": 1337, "generation": 51})}
    checkpoint_edited = {**signed, "record": json.dumps({**record, "checkpoint": "/tmp/evil"})}
    return {
        "unsigned": evil.to_json(),
        "wrong-key": RecordSigner(b"w" * 32, namespace).sign_version(evil),
        "other-namespace": RecordSigner(KEY, "elsewhere").sign_version(evil),
        "seed-edited": json.dumps(seed_edited),
        "checkpoint-edited": json.dumps(checkpoint_edited),
    }


@pytest.mark.parametrize("kind", list(forgeries("ns")))
def test_a_stored_record_without_a_valid_signature_is_ignored_counted_and_logged(
    redis_server, namespace, store, kind, caplog
):
    forged = forgeries(namespace)[kind]
    client = redis_server.client()
    client.hset(f"{namespace}#versions", "m", forged)
    with caplog.at_level(logging.WARNING, logger="cluster.versions.store"):
        assert store.load() == {}
    assert store.rejected_records == 1
    assert [r.levelname for r in caplog.records if "ignoring" in r.message] == ["WARNING"]

    # The forgery claims a newer generation; a valid save still replaces it (compare-and-set
    # trusts only signed generations) and readers then see the valid record.
    assert store.save(GOOD) == GOOD
    assert store.load() == {"m": GOOD}


def test_a_valid_record_of_another_model_moved_to_this_field_is_ignored(
    redis_server, namespace, store
):
    other = ModelVersion("other", "9", 9)
    client = redis_server.client()
    client.hset(f"{namespace}#versions", "m", RecordSigner(KEY, namespace).sign_version(other))
    assert store.load() == {}
    assert store.rejected_records == 1


def test_compare_and_set_keeps_the_higher_signed_generation(namespace, store, redis_server):
    assert store.save(GOOD) == GOOD
    older = ModelVersion("m", "1", 1, seed=1)
    assert store.save(older) == GOOD  # Redis holds a newer one: returned, not replaced
    newer = ModelVersion("m", "3", 3, seed=3)
    other = VersionStore(redis_server.url, namespace, KEY)  # a second publisher
    try:
        assert other.save(newer) == newer
        assert store.save(ModelVersion("m", "2b", 2)) == newer
        assert store.load() == {"m": newer}
    finally:
        other.close()
    assert store.rejected_records == 0


def test_announcements_without_a_valid_signature_are_not_followed(redis_server, namespace, store):
    taken: list[ModelVersion] = []
    stopped = threading.Event()
    follower = VersionStore(redis_server.url, namespace, KEY)
    thread = threading.Thread(target=follower.follow, args=(taken.append, stopped), daemon=True)
    thread.start()
    client = redis_server.client()
    channel = versions_channel(namespace)
    try:
        wait_until(lambda: client.pubsub_numsub(channel)[0][1] >= 1, 10, "the subscription")
        forged = forgeries(namespace)
        for raw in forged.values():
            client.publish(channel, raw)
        assert store.save(GOOD) == GOOD  # signed and announced through the script
        wait_until(lambda: taken == [GOOD], 10, "the signed announcement")
        wait_until(lambda: follower.rejected_records == len(forged), 10, "every rejection")
        assert taken == [GOOD]
    finally:
        stopped.set()
        thread.join(timeout=10)
        follower.close()


def test_rules_without_a_valid_signature_are_ignored(redis_server, namespace, store):
    rules = [InvalidationRule(1, 10.0, model="m"), InvalidationRule(2, 11.0, tenant="t")]
    assert store.load_rules() == []
    assert store.save_rules(rules)
    assert store.load_rules() == rules
    client = redis_server.client()
    stored = client.get(f"{namespace}#invalidations")
    edited = stored.replace(b'\\"model\\":\\"m\\"', b'\\"model\\":\\"n\\"')
    assert edited != stored
    client.set(f"{namespace}#invalidations", edited)
    assert store.load_rules() == []
    client.set(f"{namespace}#invalidations", '[{"seq":1,"issued_at":0,"model":"m",'
               '"version":null,"tenant":null,"key":null}]')  # fmt: skip
    assert store.load_rules() == []
    moved = VersionStore(redis_server.url, "elsewhere-" + namespace, KEY)
    try:
        client.set(f"elsewhere-{namespace}#invalidations", stored)
        assert moved.load_rules() == []
        assert moved.rejected_records == 1
    finally:
        moved.close()
    assert store.rejected_records == 2


@pytest.mark.parametrize(
    ("policy", "risky"),
    [("allkeys-lru", True), ("allkeys-lfu", True), ("volatile-lru", False), ("noeviction", False)],
)
def test_an_eviction_policy_that_may_evict_the_records_is_named(redis_server, policy, risky):
    client = redis_server.client()
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    client.config_set("maxmemory-policy", policy)
    try:
        risk = eviction_risk(redis_server.url)
    finally:
        client.config_set("maxmemory-policy", before)
    assert (risk is not None) == risky
    assert risk is None or policy in risk


def test_a_redis_that_cannot_be_reached_reports_no_eviction_risk():
    assert eviction_risk("redis://127.0.0.1:1/0", timeout_s=0.2) is None
