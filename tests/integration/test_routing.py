"""The router and the replicas route on one ring, the directory's: a replica taken out of the
ring (as the version actor does with one behind on a version) stops receiving keyed requests
through the ingress, and gets them again once readmitted."""

from __future__ import annotations

import time
import uuid

import pytest
import ray
from ray import serve

from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from tests.support.deployments import deploy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def app(ray_cluster):
    name = f"routing-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "stats_interval_s": 0.1,
        "models": [{"id": "tiny-gpt", "n_layers": 1, "d_model": 32, "n_heads": 2}],
    }
    deploy(name, args)
    yield name, serve.get_app_handle(name)
    serve.delete(name)
    for actor in (f"versions-{name}", f"directory-{name}"):
        ray.kill(ray.get_actor(actor, namespace=ACTOR_NAMESPACE), no_restart=True)


def local_lookups(namespace: str) -> dict[str, int]:
    """Each replica's local lookups (hits and misses) as it last reported them."""
    stats = ray.get(directory_actor(namespace).stats.remote())
    return {
        replica: s["tiers"]["local"]["hits"] + s["tiers"]["local"]["misses"]
        for replica, s in stats.items()
        if s
    }


def ask(handle, prompts: list[str]) -> None:
    for prompt in prompts:
        body = {"model": "tiny-gpt", "prompt": prompt, "max_tokens": 2, "temperature": 0}
        handle.complete.remote(body).result(timeout_s=60)


def test_an_excluded_replica_gets_no_keyed_requests_until_readmitted(app):
    name, handle = app
    directory = directory_actor(name)
    wait_until(lambda: len(local_lookups(name)) == 2, 60, "both replicas' stats", 0.2)
    excluded, kept = sorted(local_lookups(name))
    ask(handle, [f"warm-up {i}" for i in range(8)])  # the ingress's router has seen the ring
    version = ray.get(directory.exclude.remote([excluded]))
    wait_until(lambda: ray.get(directory.snapshot.remote()).version >= version, 10, "the exclusion")
    time.sleep(1.0)  # the warm-up's last stats, and the new ring at the ingress's router
    before = local_lookups(name)
    prompts = [f"prompt {i} for the ring" for i in range(24)]
    ask(handle, prompts)

    def counted() -> bool:
        return local_lookups(name)[kept] >= before[kept] + len(prompts)

    wait_until(counted, 10, "the kept replica's stats", 0.1)
    assert local_lookups(name)[excluded] == before[excluded]

    ray.get(directory.readmit.remote([excluded]))
    back = local_lookups(name)
    ask(handle, [f"after readmission {i}" for i in range(24)])
    wait_until(
        lambda: local_lookups(name)[excluded] > back[excluded], 10, "keys for the readmitted one"
    )
