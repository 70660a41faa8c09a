"""Many models per replica on a live application: three models, replicas with room for two.

Every request succeeds (the replica loads the model it lacks, evicting the least recently used
idle one), loads and evictions are counted in the replicas' stats, answers after a reload are
identical to the first ones (and to freshly built weights), and a version published while a
model is unloaded is the version it serves once it loads.
"""

from __future__ import annotations

import uuid

import pytest
import ray
from ray import serve

from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from serve_app.config import ModelSpec
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.deployments import deploy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

MODELS = {"alpha": 11, "beta": 12, "gamma": 13}
SHAPE = {"n_layers": 2, "d_model": 64, "n_heads": 4, "max_context": 256}
MAX_TOKENS = 6


def expected_text(model: str, seed: int, prompt: str) -> str:
    weights = load_model(ModelSpec(id=model, seed=seed, **SHAPE), device="cpu")
    tokenizer = ByteTokenizer()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return generate(weights, tokenizer, tokenizer.encode(prompt), params).text


def body(model: str, prompt: str) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


@pytest.fixture
def app(ray_cluster, redis_server):
    name = f"pool-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "stats_interval_s": 0.1,
        "models": [{"id": m, "seed": seed, **SHAPE} for m, seed in MODELS.items()],
        "model_pool": {"max_loaded_models": 2},
        # Only the weights decide: no answer comes from another replica's cache or Redis.
        "peer": {"enabled": False},
        "prefix_cache": {"enabled": False},
    }
    deploy(name, args, replicas=1)
    yield name, serve.get_app_handle(name)
    serve.delete(name)
    for actor in (f"versions-{name}", f"directory-{name}"):
        ray.kill(ray.get_actor(actor, namespace=ACTOR_NAMESPACE), no_restart=True)


def pool_stats(namespace: str) -> dict:
    (stats,) = [s for s in ray.get(directory_actor(namespace).stats.remote()).values() if s]
    return stats["cluster"]["models"]


def test_three_models_on_room_for_two_answer_every_request(app):
    name, handle = app
    first: dict[tuple[str, str], str] = {}
    for round_ in range(3):
        for model in MODELS:
            # A new prompt each round: the answer is computed by the weights loaded now.
            prompt = f"round {round_} asks {model}"
            response = handle.complete.remote(body(model, prompt)).result(timeout_s=120)
            assert response["cache"]["hit"] is False
            first[(model, prompt)] = response["choices"][0]["text"]
    for (model, prompt), text in first.items():
        assert text == expected_text(model, MODELS[model], prompt), (model, prompt)
    wait_until(lambda: pool_stats(name)["loads"] >= 2 + 3 * 3 - 2, 30, "the pool's stats", 0.2)
    stats = pool_stats(name)
    assert len(stats["loaded"]) == 2
    assert stats["evictions"] == stats["loads"] - 2
    assert stats["load_seconds"] > 0


def test_a_version_published_while_its_model_is_unloaded_is_served_after_it_loads(app):
    name, handle = app
    wait_until(lambda: len(pool_stats(name)["loaded"]) == 2, 30, "the models loaded at start")
    (unloaded,) = set(MODELS) - set(pool_stats(name)["loaded"])
    outcome = handle.publish_version.remote(unloaded, {"version": "2", "seed": 99}).result(
        timeout_s=120
    )
    assert outcome["missing"] == [] and outcome["failed"] == {}, outcome
    assert unloaded not in pool_stats(name)["loaded"]  # acknowledged without loading
    prompt = "which weights answer now?"
    response = handle.complete.remote(body(unloaded, prompt)).result(timeout_s=120)
    assert response["model_version"] == "2"
    assert response["choices"][0]["text"] == expected_text(unloaded, 99, prompt)
