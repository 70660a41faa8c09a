"""What one replica computed, another serves: through the owner peer, and through Redis.

Each test deploys the application with two model replicas in the session's Ray cluster, once
with the peer path only (Redis disabled) and once with Redis only (peer path disabled), asks
the owner replica of a key to compute an answer, then asks the OTHER replica for the same key
and checks that it came from the expected tier, identical, without being computed again.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
import ray
from ray import serve

from cluster.keys import routing_key
from cluster.sharing.directory_actor import directory_actor
from cluster.sharing.ring import Ring
from serve_app.api.completions import CompletionJob
from serve_app.config import parse_args
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.deployments import deploy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

TENANT = "default"
MODEL = "tiny-gpt"


def replica_ids_by_ownership(namespace: str, key: str) -> tuple[str, str]:
    members = ray.get(directory_actor(namespace).members.remote())
    ring = Ring({m.replica_id: m.weight for m in members})
    owner = ring.owner(key)
    other = next(m.replica_id for m in members if m.replica_id != owner)
    return owner, other


def job_for(namespace: str, prompt: str) -> CompletionJob:
    tokens = tuple(ByteTokenizer().encode(prompt))
    return CompletionJob(
        model=MODEL,
        tenant=TENANT,
        prompt_tokens=tokens,
        params=SamplingParams(max_tokens=8, temperature=0.0),
        routing_key=routing_key(namespace, TENANT, MODEL, tokens),
    )


def computed_on(namespace: str, replica_id: str) -> int:
    """Answers a replica computed so far: its local misses less what other tiers answered."""
    stats = ray.get(directory_actor(namespace).stats.remote())[replica_id]
    return stats["misses"]


@pytest.fixture
def peer_only(ray_cluster):
    name = f"share-peer-{uuid.uuid4().hex[:6]}"
    deploy(name, {"namespace": name, "redis_url": None, "stats_interval_s": 0.1})
    yield name
    serve.delete(name)


@pytest.fixture
def redis_only(ray_cluster, redis_server):
    name = f"share-redis-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "redis_url": redis_server.url,
        "peer": {"enabled": False},
        "stats_interval_s": 0.1,
    }
    deploy(name, args)
    yield name
    serve.delete(name)


@pytest.mark.parametrize(("app", "tier"), [("peer_only", "peer"), ("redis_only", "redis")])
def test_a_result_computed_on_one_replica_is_served_by_the_other(request, redis_server, app, tier):
    namespace = request.getfixturevalue(app)
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    job = job_for(namespace, f"shared across replicas via {tier}")
    owner, other = replica_ids_by_ownership(namespace, job.routing_key)

    def ask(replica: str):
        return handle.complete.remote(dataclasses.replace(job, replica=replica)).result(
            timeout_s=60
        )

    first = ask(owner)
    assert first.cache_tier is None  # computed on the owner
    if tier == "redis":  # the owner writes to Redis in the background
        wait_until(
            lambda: redis_server.client().keys(f"{namespace}:{MODEL}:*:r:*"), 10, "the Redis write"
        )
    before = computed_on(namespace, other)
    second = ask(other)
    assert second.cache_tier == tier, second
    assert (second.text, second.finish_reason, second.completion_tokens) == (
        first.text,
        first.finish_reason,
        first.completion_tokens,
    )
    assert ask(other).cache_tier == "local"  # and now kept on the other replica too

    def other_counted_the_hit() -> bool:
        stats = ray.get(directory_actor(namespace).stats.remote())[other]
        return stats["tiers"][tier]["hits"] >= 1

    wait_until(other_counted_the_hit, 10, f"the other replica's {tier} hit in its stats")
    assert computed_on(namespace, other) == before  # nothing was recomputed there


def test_redis_failures_and_corruption_never_reach_a_client(redis_only, redis_server):
    """A corrupt value under a live key is never served; a dead Redis is a miss, then recovers."""
    namespace = redis_only
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    job = job_for(namespace, "poisoned key")
    owner, other = replica_ids_by_ownership(namespace, job.routing_key)

    def ask(replica: str, which: CompletionJob = job):
        return handle.complete.remote(dataclasses.replace(which, replica=replica)).result(
            timeout_s=60
        )

    truth = ask(owner)
    pattern = f"{namespace}:{MODEL}:*:r:*"
    wait_until(lambda: redis_server.client().keys(pattern), 10, "the Redis write")
    (live_key,) = redis_server.client().keys(pattern)
    redis_server.client().set(live_key, b"RCEV" + b"\x00" * 64)  # looks like ours, is not
    served = ask(other)
    assert served.cache_tier is None  # recomputed, not served from the corrupt value
    assert served.text == truth.text
    wait_until(
        lambda: redis_server.client().get(live_key) != b"RCEV" + b"\x00" * 64,
        10,
        "the corrupt value to be deleted or replaced",
    )

    redis_server.stop()
    try:
        for i in range(5):
            outcome = ask(other, job_for(namespace, f"while Redis is down {i}"))
            assert outcome.text  # every request still succeeds
    finally:
        redis_server.start()

    # The restarted server is empty (it keeps nothing on disk). The breaker lets a probe through
    # after its reset timeout, so new answers reach Redis again without any intervention.
    def writes_again() -> bool:
        ask(owner, job_for(namespace, f"after Redis came back {uuid.uuid4().hex}"))
        return bool(redis_server.client().keys(pattern))

    wait_until(writes_again, 20, "writes to reach Redis again", 0.5)


def test_a_killed_replica_leaves_the_ring_and_requests_keep_succeeding(peer_only):
    namespace = peer_only
    directory = directory_actor(namespace)
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    before = {m.replica_id for m in ray.get(directory.members.remote())}
    victim = sorted(before)[0]
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].endswith(victim)
    )
    ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)
    for i in range(6):  # served by the survivor (or Serve's replacement) throughout
        assert handle.complete.remote(job_for(namespace, f"during loss {i}")).result(timeout_s=60)

    def victim_left() -> bool:
        return victim not in {m.replica_id for m in ray.get(directory.members.remote())}

    wait_until(victim_left, 15, "the dead replica's lease to lapse", 0.5)
    # Serve replaces the replica; the newcomer registers and the ring is whole again.
    wait_until(lambda: len(ray.get(directory.members.remote())) == 2, 90, "a replacement", 0.5)


def test_a_killed_directory_is_rebuilt_by_the_running_replicas(peer_only):
    namespace = peer_only
    directory = directory_actor(namespace)
    members = {m.replica_id for m in ray.get(directory.members.remote())}
    epoch = ray.get(directory.snapshot.remote()).epoch
    ray.kill(directory, no_restart=False)  # its state is lost; Ray restarts it

    def rebuilt() -> bool:
        snapshot = ray.get(directory_actor(namespace).snapshot.remote())
        return snapshot.epoch != epoch and {m.replica_id for m in snapshot.members} == members

    wait_until(rebuilt, 30, "the replicas to re-register", 0.5)
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    assert handle.complete.remote(job_for(namespace, "after the restart")).result(timeout_s=60)


def test_prefix_blocks_computed_on_the_owner_are_reused_by_the_other(peer_only):
    namespace = peer_only
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    document = "A long shared document that both questions start with. " * 8
    first_job = job_for(namespace, document + "Question one?")
    second_job = job_for(namespace, document + "Question two, asked elsewhere?")
    assert first_job.routing_key == second_job.routing_key  # the same owner for both
    owner, other = replica_ids_by_ownership(namespace, first_job.routing_key)

    first = handle.complete.remote(dataclasses.replace(first_job, replica=owner)).result(
        timeout_s=60
    )
    second = handle.complete.remote(dataclasses.replace(second_job, replica=other)).result(
        timeout_s=60
    )
    block = parse_args({}).prefix_cache.block_size
    shared_blocks = len(document.encode()) // block
    assert first.cache_tier is None and second.cache_tier is None  # both answers are new
    # The other replica prefilled only what follows the owner's cached blocks of the document.
    assert second.cached_tokens >= (shared_blocks - 1) * block
    tokenizer = ByteTokenizer()
    spec = parse_args({}).model(MODEL)
    expected = generate(
        load_model(spec, device="cpu"),
        tokenizer,
        list(second_job.prompt_tokens),
        SamplingParams(max_tokens=8, temperature=0.0),
    )
    assert second.text == expected.text  # identical to a full prefill


def test_prefix_chunks_in_redis_are_reused_by_another_replica(redis_only, redis_server):
    namespace = redis_only
    handle = serve.get_deployment_handle("ModelReplica", app_name=namespace)
    document = "Chunks of key/value blocks travel through Redis. " * 10
    first_job = job_for(namespace, document + "First?")
    again_job = job_for(namespace, document + "Again?")
    second_job = job_for(namespace, document + "Second, on the other replica?")
    owner, other = replica_ids_by_ownership(namespace, first_job.routing_key)
    handle.complete.remote(dataclasses.replace(first_job, replica=owner)).result(timeout_s=60)
    # A document asked about once is not worth Redis's memory; its second use writes it.
    time.sleep(1.0)
    assert not redis_server.client().keys(f"{namespace}:{MODEL}:*:kv:*")
    handle.complete.remote(dataclasses.replace(again_job, replica=owner)).result(timeout_s=60)
    wait_until(
        lambda: redis_server.client().keys(f"{namespace}:{MODEL}:*:kv:*"), 10, "chunks in Redis"
    )
    second = handle.complete.remote(dataclasses.replace(second_job, replica=other)).result(
        timeout_s=60
    )
    settings = parse_args({}).prefix_cache
    whole_chunks = len(document.encode()) // (settings.block_size * settings.redis_chunk_blocks)
    assert whole_chunks >= 1
    assert second.cached_tokens >= whole_chunks * settings.redis_chunk_blocks * settings.block_size
    spec = parse_args({}).model(MODEL)
    expected = generate(
        load_model(spec, device="cpu"),
        ByteTokenizer(),
        list(second_job.prompt_tokens),
        SamplingParams(max_tokens=8, temperature=0.0),
    )
    assert second.text == expected.text
