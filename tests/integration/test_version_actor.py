"""The version actor with real followers, a real Ray and a real redis-server: a version that no
replica can load is rolled back (in memory and in Redis), and records that Redis holds or
announces without a valid signature never reach a replica.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator

import pytest
import ray

from cluster.sharing.directory_actor import ACTOR_NAMESPACE
from cluster.versions.actor import version_actor
from cluster.versions.follower import VersionFollower
from cluster.versions.records import ModelVersion
from cluster.versions.store import RecordSigner, VersionStore, versions_channel
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

KEY = b"r" * 32
MODEL = "m"


def loads_seeds(record: ModelVersion) -> bool:
    """Weights a replica can load: built from a seed; no checkpoint exists."""
    return record.checkpoint is None


class Replica:
    """A follower of the version actor whose weights load when `can_load` says so."""

    def __init__(
        self,
        name: str,
        namespace: str,
        redis_url: str,
        initial: ModelVersion,
        can_load: Callable[[ModelVersion], bool],
        holds_weights: bool = True,
    ) -> None:
        self.loads: list[ModelVersion] = []
        self._can_load = can_load
        self.store = VersionStore(redis_url, namespace, KEY)
        self.follower = VersionFollower(
            name,
            actor=lambda: version_actor(namespace, redis_url, KEY),
            initial={MODEL: initial},
            apply_version=self._load,
            apply_rules=lambda rules: None,
            store=self.store,
            watch_timeout_s=1.0,
            holds_weights=holds_weights,
        )

    def _load(self, record: ModelVersion) -> None:
        if not self._can_load(record):
            raise OSError(f"cannot load {record.checkpoint}")
        self.loads.append(record)


def follower_threads_alive() -> bool:
    return any(t.name.startswith("raycache-versions") for t in threading.enumerate())


@pytest.fixture
def cluster(ray_cluster, redis_server) -> Iterator[tuple[str, ray.actor.ActorHandle, list]]:
    """A fresh namespace: its version actor with version 1 current, and a list to which the
    test adds its `Replica`s (stopped, their threads finished, afterwards)."""
    namespace = f"rollout-{uuid.uuid4().hex[:8]}"
    actor = version_actor(namespace, redis_server.url, KEY, lease_s=5.0)
    ray.get(actor.publish.remote(MODEL, "1", source="config", seed=0, timeout_s=0.0))
    replicas: list[Replica] = []
    yield namespace, actor, replicas
    for replica in replicas:
        replica.follower.stop()
    wait_until(lambda: not follower_threads_alive(), 30, "the followers to stop")
    for replica in replicas:
        replica.store.close()
    for name in (f"versions-{namespace}", f"directory-{namespace}"):
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name, namespace=ACTOR_NAMESPACE), no_restart=True)


def start_replicas(
    cluster, redis_url: str, *can_load: Callable[[ModelVersion], bool], weightless: int = 0
):
    """One started `Replica` per `can_load`, and `weightless` followers that load nothing
    (as an ingress), once each is subscribed."""
    namespace, actor, replicas = cluster
    current = ray.get(actor.current.remote())[MODEL]
    started = [
        Replica(f"replica-{i}", namespace, redis_url, current, loads)
        for i, loads in enumerate(can_load)
    ]
    started += [
        Replica(f"ingress-{i}", namespace, redis_url, current, lambda _: True, holds_weights=False)
        for i in range(weightless)
    ]
    replicas.extend(started)
    for replica in started:
        replica.follower.start()
    wait_until(
        lambda: len(ray.get(actor.subscribers.remote())) == len(started), 30, "subscriptions"
    )
    return started


def test_a_version_no_replica_can_load_is_rolled_back_everywhere(cluster, redis_server):
    _, actor, _ = cluster
    replicas = start_replicas(cluster, redis_server.url, loads_seeds, loads_seeds)
    outcome = ray.get(
        actor.publish.remote(MODEL, "broken", checkpoint="/ckpt/broken", timeout_s=30.0)
    )
    assert outcome.rolled_back, outcome
    assert sorted(outcome.failed) == ["replica-0", "replica-1"]
    assert outcome.acknowledged == () and outcome.as_json()["rolled_back"] is True
    restored = outcome.restored
    assert (restored.version, restored.seed, restored.generation) == ("1", 0, 3)

    # Every replica serves the previous weights again, under a generation above the failed one.
    for replica in replicas:
        assert not replica.follower.lagging(MODEL)
        assert replica.follower.applied(MODEL) == restored
        assert replica.follower.failures() == {}
        assert replica.loads == [restored]
    assert ray.get(actor.current.remote())[MODEL] == restored

    # What a restarted replica or actor reads from Redis is the restored record.
    assert replicas[0].store.load() == {MODEL: restored}
    ray.kill(actor, no_restart=False)
    wait_until(
        lambda: ray.get(actor.current.remote(), timeout=10).get(MODEL) == restored,
        60,
        "the restarted actor to reload the restored version",
        0.5,
    )


def test_a_follower_without_weights_does_not_keep_a_version_no_replica_loads(cluster, redis_server):
    """An ingress applies every version (it only drops answers): its acknowledgement says
    nothing of whether the weights load."""
    _, actor, _ = cluster
    start_replicas(cluster, redis_server.url, loads_seeds, loads_seeds, weightless=1)
    outcome = ray.get(
        actor.publish.remote(MODEL, "broken", checkpoint="/ckpt/broken", timeout_s=30.0)
    )
    assert outcome.rolled_back, outcome
    assert sorted(outcome.failed) == ["replica-0", "replica-1"]
    assert outcome.acknowledged == outcome.weightless == ("ingress-0",)


def test_a_version_some_replicas_load_is_kept(cluster, redis_server):
    _, actor, _ = cluster
    broken, _ = start_replicas(cluster, redis_server.url, loads_seeds, lambda record: True)
    outcome = ray.get(actor.publish.remote(MODEL, "2", checkpoint="/ckpt/2", timeout_s=30.0))
    assert not outcome.rolled_back
    assert outcome.acknowledged == ("replica-1",) and list(outcome.failed) == ["replica-0"]
    assert ray.get(actor.current.remote())[MODEL].version == "2"
    assert broken.follower.lagging(MODEL)  # refuses requests until a version it can load


def test_records_redis_holds_or_announces_unsigned_never_reach_a_replica(cluster, redis_server):
    namespace, actor, _ = cluster
    (replica,) = start_replicas(cluster, redis_server.url, lambda record: True)
    current = replica.follower.applied(MODEL)
    evil = ModelVersion(MODEL, "evil", 99, source="attacker", seed=1337)
    client = redis_server.client()
    for forged in (evil.to_json(), RecordSigner(b"w" * 32, namespace).sign_version(evil)):
        client.hset(f"{namespace}#versions", MODEL, forged)
        client.publish(versions_channel(namespace), forged)
    wait_until(lambda: replica.store.rejected_records >= 2, 30, "the announcements refused")
    client.client_kill_filter(_type="pubsub")  # the follower re-reads the hash on reconnect
    wait_until(lambda: replica.store.rejected_records >= 3, 30, "the stored record refused")
    ray.kill(actor, no_restart=False)  # the restarted actor reads the forged hash too
    wait_until(
        lambda: ray.get(actor.current.remote(), timeout=10).get(MODEL) == current,
        60,
        "the restarted actor to keep the signed version",
        0.5,
    )
    assert replica.follower.applied(MODEL) == current and not replica.follower.lagging(MODEL)
    assert replica.loads == []

    # The next real publish replaces the forged record, though it claims a higher generation.
    outcome = ray.get(actor.publish.remote(MODEL, "2", seed=2, timeout_s=30.0))
    assert outcome.acknowledged == ("replica-0",), outcome
    assert replica.store.load()[MODEL].version == "2"
    assert [record.version for record in replica.loads] == ["2"]
