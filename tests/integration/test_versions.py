"""Model versions on a live application: two replicas, the version actor, a real Redis.

Every answer must name the weights that produced it (checked by recomputing it with those
weights), no request sent after `publish()` returned may get an older version, the actor must
come back from Redis after a kill, a replica that cannot switch must be reported and must not
answer from cache (or from the old weights) until it catches up, a version that no replica can
load is rolled back, invalidations reach every tier, versions announced on Redis by another
cluster holding the secret are followed, and records without its signature are not.
"""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
import ray
from ray import serve

from cluster.secret import ClusterSecret
from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from cluster.versions.records import ModelVersion
from cluster.versions.store import RecordSigner, VersionStore, versions_channel
from serve_app.config import ModelSpec
from serve_app.errors import VersionConflict
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.deployments import deploy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-gpt"
MAX_TOKENS = 6
PROMPTS = [f"versioned prompt {i}" for i in range(6)]
SECRET = "versions-test-secret-0123456789abcdef"
RECORDS_KEY = ClusterSecret.from_text(SECRET).records


def expected_text(version_seed: int, prompt: str) -> str:
    """The greedy answer of the weights built from `version_seed`."""
    model = load_model(ModelSpec(id=MODEL, seed=version_seed), device="cpu")
    tokenizer = ByteTokenizer()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return generate(model, tokenizer, tokenizer.encode(prompt), params).text


def body(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


@pytest.fixture
def app(ray_cluster, redis_server, tmp_path):
    name = f"versions-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "redis_url": redis_server.url,
        "hmac_secret": SECRET,
        "checkpoint_dir": str(tmp_path),
        "stats_interval_s": 0.1,
        "version_wait_s": 2.0,
        "models": [{"id": MODEL, "version": "1", "seed": 0}],
    }
    deploy(name, args)
    yield name, serve.get_app_handle(name)
    serve.delete(name)
    for actor in (f"versions-{name}", f"directory-{name}"):
        ray.kill(ray.get_actor(actor, namespace=ACTOR_NAMESPACE), no_restart=True)


def members(namespace: str) -> list[str]:
    return sorted(m.replica_id for m in ray.get(directory_actor(namespace).members.remote()))


def ingresses(namespace: str) -> list[str]:
    """The ingress replicas following the versions (one, in these apps): they acknowledge too."""
    actor = ray.get_actor(f"versions-{namespace}", namespace=ACTOR_NAMESPACE)
    following = [s for s in ray.get(actor.subscribers.remote()) if s.startswith("ingress-")]
    assert len(following) == 1, following
    return following


def subscribers(namespace: str) -> list[str]:
    """Who must acknowledge a publish or an invalidation: every model replica and the ingress."""
    return sorted(members(namespace) + ingresses(namespace))


def ring_members(namespace: str) -> list[str]:
    snapshot = ray.get(directory_actor(namespace).snapshot.remote())
    return sorted(m.replica_id for m in snapshot.members)


def test_under_load_every_answer_names_the_weights_that_produced_it(app):
    name, handle = app
    seeds = {"1": 0, "2": 2, "3": 3, "4": 4}
    replicas = subscribers(name)
    results: list[tuple[float, str, str, str, bool]] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def client(worker: int) -> None:
        index = worker
        while not stop.is_set():
            prompt = PROMPTS[index % len(PROMPTS)]
            index += 1
            sent = time.monotonic()
            try:
                response = handle.complete.remote(body(prompt)).result(timeout_s=60)
            except BaseException as exc:  # reported below, with the thread's context
                errors.append(exc)
                return
            text = response["choices"][0]["text"]
            results.append(
                (sent, prompt, response["model_version"], text, response["cache"]["hit"])
            )

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    published: list[tuple[float, str]] = []
    try:
        time.sleep(2.0)
        for version in ("2", "3", "4"):
            outcome = handle.publish_version.remote(
                MODEL, {"version": version, "seed": seeds[version]}
            ).result(timeout_s=120)
            published.append((time.monotonic(), version))
            assert sorted(outcome["acknowledged"]) == replicas, outcome
            assert outcome["missing"] == [] and outcome["failed"] == {}, outcome
            time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert not errors, errors

    expected = {
        (version, prompt): expected_text(seed, prompt)
        for version, seed in seeds.items()
        for prompt in PROMPTS
    }
    order = list(seeds)
    for sent, prompt, version, text, _ in results:
        assert text == expected[(version, prompt)], (version, prompt)
        for returned_at, published_version in published:
            if sent > returned_at:
                assert order.index(version) >= order.index(published_version), (sent, version)
    assert {version for _, _, version, _, _ in results} == set(seeds)
    assert any(hit for _, _, version, _, hit in results if version == "4")  # caching resumed
    listing = handle.models.remote().result(timeout_s=30)
    assert listing["data"][0]["version"] == "4"


def test_a_label_republished_with_other_weights_never_answers_from_the_old_ones(app):
    """A forced republish keeps the label, so only the generation tells the weights apart:
    requests in flight during the switch must not leave old answers for the new weights."""
    name, handle = app
    results: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        for index in range(worker, 10_000):
            if stop.is_set():
                return
            prompt = PROMPTS[index % len(PROMPTS)]
            sent = time.monotonic()
            response = handle.complete.remote(body(prompt)).result(timeout_s=60)
            results.append((sent, prompt, response["choices"][0]["text"]))

    threads = [threading.Thread(target=client, args=(worker,)) for worker in range(3)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1.5)
        outcome = handle.publish_version.remote(
            MODEL, {"version": "1", "seed": 7, "force": True}
        ).result(timeout_s=120)
        returned_at = time.monotonic()
        assert sorted(outcome["acknowledged"]) == subscribers(name), outcome
        time.sleep(2.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)

    after = [(prompt, text) for sent, prompt, text in results if sent > returned_at]
    assert after, "no request was sent after the republish"
    for prompt, text in after:
        assert text == expected_text(7, prompt), prompt
    # And nothing stored by the old weights is found later, on any tier.
    for prompt in PROMPTS:
        response = handle.complete.remote(body(prompt)).result(timeout_s=60)
        assert response["choices"][0]["text"] == expected_text(7, prompt), prompt


def test_the_version_actor_comes_back_with_the_current_versions_from_redis(app, redis_server):
    name, handle = app
    handle.publish_version.remote(MODEL, {"version": "2", "seed": 2}).result(timeout_s=120)
    actor = ray.get_actor(f"versions-{name}", namespace=ACTOR_NAMESPACE)
    ray.kill(actor, no_restart=False)
    wait_until(
        lambda: (
            getattr(ray.get(actor.current.remote(), timeout=10).get(MODEL), "version", None) == "2"
        ),
        60,
        "the restarted actor to reload version 2",
        0.5,
    )
    assert redis_server.client().hget(f"{name}#versions", MODEL)  # where it came back from
    outcome = handle.publish_version.remote(MODEL, {"version": "3", "seed": 3}).result(
        timeout_s=120
    )
    assert sorted(outcome["acknowledged"]) == subscribers(name)
    assert outcome["generation"] == 3
    response = handle.complete.remote(body(PROMPTS[0])).result(timeout_s=60)
    assert response["model_version"] == "3"
    assert response["choices"][0]["text"] == expected_text(3, PROMPTS[0])
    with pytest.raises(VersionConflict, match="backwards"):
        handle.publish_version.remote(MODEL, {"version": "2", "seed": 2}).result(timeout_s=60)


def test_a_replica_started_after_a_publish_serves_the_current_version(app):
    name, handle = app
    handle.publish_version.remote(MODEL, {"version": "2", "seed": 2}).result(timeout_s=120)
    victim = members(name)[0]
    actor = next(
        a
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].endswith(victim)
    )
    ray.kill(ray.get_actor(actor["name"], namespace="serve"), no_restart=True)

    def replaced() -> bool:
        current = members(name)
        return len(current) == 2 and victim not in current

    wait_until(replaced, 120, "Serve to start a replacement replica", 0.5)
    # The newcomer loaded version 2 at start-up, though its config says version 1.
    wait_until(lambda: replica_versions(name) == ["2", "2"], 30, "the newcomer's stats", 0.5)


def test_a_version_no_replica_can_load_is_rolled_back_and_serving_resumes(
    app, tmp_path, redis_server
):
    name, handle = app
    replicas = members(name)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"these are not weights")
    outcome = handle.publish_version.remote(
        MODEL, {"version": "broken", "checkpoint": str(broken), "timeout_s": 30}
    ).result(timeout_s=120)
    # Only the ingress applied it (it loads no weights): the version loaded nowhere.
    assert outcome["acknowledged"] == ingresses(name) and outcome["missing"] == []
    assert sorted(outcome["failed"]) == replicas, outcome
    assert outcome["rolled_back"] and outcome["restored"]["version"] == "1", outcome

    # Nothing is left lagging: both replicas serve the first weights, in the ring.
    assert ring_members(name) == replicas
    wait_until(lambda: replica_versions(name) == ["1", "1"], 30, "the replicas' stats")
    response = handle.complete.remote(body(PROMPTS[1])).result(timeout_s=60)
    assert response["model_version"] == "1"
    assert response["choices"][0]["text"] == expected_text(0, PROMPTS[1])
    # A replica or actor started now reads the restored record from Redis, not the failed one.
    stored = VersionStore(redis_server.url, name, RECORDS_KEY).load()[MODEL]
    assert (stored.version, stored.generation) == ("1", outcome["restored"]["generation"])

    # The failed label is history: reusing it for other weights needs force.
    with pytest.raises(VersionConflict):
        handle.publish_version.remote(MODEL, {"version": "broken", "seed": 9}).result(timeout_s=60)
    outcome = handle.publish_version.remote(MODEL, {"version": "5", "seed": 5}).result(
        timeout_s=120
    )
    assert sorted(outcome["acknowledged"]) == subscribers(name), outcome
    assert not outcome["rolled_back"], outcome
    response = handle.complete.remote(body(PROMPTS[1])).result(timeout_s=60)
    assert response["model_version"] == "5" and not response["cache"]["hit"]
    assert response["choices"][0]["text"] == expected_text(5, PROMPTS[1])


def test_invalidation_reaches_every_replica_and_redis(app, redis_server):
    name, handle = app
    first = handle.complete.remote(body(PROMPTS[2])).result(timeout_s=60)
    key = first["cache"]["key"]
    redis_key = f"{name}:{MODEL}:1:r:{key}"
    wait_until(lambda: redis_server.client().exists(redis_key), 10, "the Redis write")
    assert handle.complete.remote(body(PROMPTS[2])).result(timeout_s=60)["cache"]["hit"]

    outcome = handle.invalidate.remote({"key": key}).result(timeout_s=60)
    assert sorted(outcome["acknowledged"]) == subscribers(name)
    wait_until(lambda: not redis_server.client().exists(redis_key), 30, "the Redis purge")
    again = handle.complete.remote(body(PROMPTS[2])).result(timeout_s=60)
    assert not again["cache"]["hit"]
    assert again["choices"][0]["text"] == first["choices"][0]["text"]

    # By model and version: every answer of version 1 goes, on both replicas.
    handle.complete.remote(body(PROMPTS[3])).result(timeout_s=60)
    handle.invalidate.remote({"model": MODEL, "version": "1"}).result(timeout_s=60)
    for prompt in (PROMPTS[3], PROMPTS[2]):
        assert not handle.complete.remote(body(prompt)).result(timeout_s=60)["cache"]["hit"]


def replica_versions(namespace: str) -> list[str]:
    """The version each replica reports serving (from its last heartbeat)."""
    stats = ray.get(directory_actor(namespace).stats.remote())
    return sorted(s["cluster"]["versions"][MODEL]["version"] for s in stats.values() if s)


def test_versions_announced_by_another_cluster_are_followed_even_when_a_message_is_lost(
    app, redis_server
):
    name, handle = app
    store = VersionStore(redis_server.url, name, RECORDS_KEY)
    generation = handle.models.remote().result(timeout_s=30)["data"][0]["generation"]

    # Another cluster sharing this Redis publishes: its actor stores and announces the record.
    remote = ModelVersion(MODEL, "remote-1", generation + 1, source="other-cluster", seed=11)
    assert store.save(remote) == remote
    wait_until(lambda: replica_versions(name) == ["remote-1"] * 2, 60, "both replicas to follow")
    response = handle.complete.remote(body(PROMPTS[4])).result(timeout_s=60)
    assert response["model_version"] == "remote-1"
    assert response["choices"][0]["text"] == expected_text(11, PROMPTS[4])

    # The next announcement is lost (stored without PUBLISH): replicas catch up when their
    # pub/sub connection comes back, because they re-read the stored versions then.
    missed = ModelVersion(MODEL, "remote-2", generation + 2, source="other-cluster", seed=12)
    client = redis_server.client()
    client.hset(f"{name}#versions", MODEL, RecordSigner(RECORDS_KEY, name).sign_version(missed))
    time.sleep(1.0)
    assert replica_versions(name) == ["remote-1"] * 2
    client.client_kill_filter(_type="pubsub")
    wait_until(lambda: replica_versions(name) == ["remote-2"] * 2, 60, "the re-read on reconnect")
    wait_until(
        lambda: handle.models.remote().result(timeout_s=30)["data"][0]["version"] == "remote-2",
        30,
        "the version actor to adopt what the replicas serve",
    )


def test_records_written_to_redis_without_the_secret_do_not_change_the_weights(app, redis_server):
    name, handle = app
    generation = handle.models.remote().result(timeout_s=30)["data"][0]["generation"]
    evil = ModelVersion(MODEL, "evil", generation + 100, source="attacker", seed=1337)
    client = redis_server.client()
    for forged in (evil.to_json(), RecordSigner(b"w" * 32, name).sign_version(evil)):
        client.hset(f"{name}#versions", MODEL, forged)
        client.publish(versions_channel(name), forged)
    client.client_kill_filter(_type="pubsub")  # every replica re-reads the forged hash
    actor = ray.get_actor(f"versions-{name}", namespace=ACTOR_NAMESPACE)
    ray.kill(actor, no_restart=False)  # and so does the restarted version actor
    wait_until(
        lambda: ray.get(actor.current.remote(), timeout=10).get(MODEL) is not None,
        60,
        "the restarted actor to adopt what the replicas serve",
        0.5,
    )
    time.sleep(2.0)  # past the followers' reconnect pause: they have read the hash again
    assert replica_versions(name) == ["1", "1"]
    response = handle.complete.remote(body(PROMPTS[5])).result(timeout_s=60)
    assert response["model_version"] == "1"
    assert response["choices"][0]["text"] == expected_text(0, PROMPTS[5])

    # The next generation is the next after the signed one; a replica that had taken the
    # forged record would ignore it as older, so both acknowledging it shows neither did.
    outcome = handle.publish_version.remote(MODEL, {"version": "2", "seed": 2}).result(
        timeout_s=120
    )
    assert outcome["generation"] == generation + 1
    assert sorted(outcome["acknowledged"]) == subscribers(name), outcome


def test_admin_routes_are_closed_without_an_admin_token(app):
    """The `app` fixture configures no admin token: both admin routes answer 403 over HTTP,
    saying how to open them, whatever the caller sends; the weights stay as they were."""
    name, handle = app
    http = serve.context._get_global_client().http_config
    base = f"http://{http.host}:{http.port}/{name}"
    calls = [
        (f"{base}/v1/models/{MODEL}/version", {"version": "evil", "seed": 1337}),
        (f"{base}/v1/cache/invalidate", {"model": MODEL}),
    ]
    for url, payload in calls:
        for headers in ({}, {"authorization": "Bearer any-token-0123456789abcdef"}):
            response = httpx.post(url, json=payload, headers=headers, timeout=60)
            assert response.status_code == 403, response.text
            assert "RAYCACHE_ADMIN_TOKEN" in response.json()["error"]["message"]
    served = handle.complete.remote(body(PROMPTS[0])).result(timeout_s=60)
    assert served["model_version"] == "1"
