"""A model replica killed under load costs deterministic requests nothing: those in flight on it
run once more on the other replica (counted in `ray_raycache_requests_retried_total`), and every
answer is the one the weights give."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from serve_app.config import ModelSpec
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.deployments import deploy
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

SHAPE = {"n_layers": 4, "d_model": 128, "n_heads": 4, "max_context": 512}
MAX_TOKENS = 400
REQUESTS = 12


def expected_text(prompt: str) -> str:
    weights = load_model(ModelSpec(id="tiny-gpt", seed=0, **SHAPE), device="cpu")
    tokenizer = ByteTokenizer()
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    return generate(weights, tokenizer, tokenizer.encode(prompt), params).text


def body(prompt: str) -> dict:
    return {"model": "tiny-gpt", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def retried(metrics_url: str, app: str) -> float:
    text = httpx.get(metrics_url, timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "ray_raycache_requests_retried_total"
        and sample.labels.get("application") == app
    )


def model_replicas(app: str) -> list[str]:
    """The ids of the application's replicas in its directory (its namespace is its name)."""
    return sorted(member.replica_id for member in ray.get(directory_actor(app).members.remote()))


def replica_actor(app: str, replica_id: str) -> ray.actor.ActorHandle:
    """Serve's actor of a replica (Serve names each `SERVE_REPLICA::app#deployment#id`)."""
    return ray.get_actor(f"SERVE_REPLICA::{app}#ModelReplica#{replica_id}", namespace="serve")


@pytest.fixture
def app(ray_cluster):
    name = f"loss-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "models": [{"id": "tiny-gpt", "seed": 0, **SHAPE}],
        # Every answer is computed by the weights: none comes from another replica or Redis.
        "peer": {"enabled": False},
        "prefix_cache": {"enabled": False},
    }
    deploy(name, args)
    yield name, serve.get_app_handle(name)
    serve.delete(name)
    for actor in (f"versions-{name}", f"directory-{name}"):
        ray.kill(ray.get_actor(actor, namespace=ACTOR_NAMESPACE), no_restart=True)


@pytest.mark.asyncio
async def test_requests_in_flight_on_a_killed_replica_are_answered_by_the_other(app, metrics_url):
    name, handle = app
    replicas = model_replicas(name)
    assert len(replicas) == 2
    before = retried(metrics_url, name)
    prompts = [f"loss {i} {uuid.uuid4().hex[:6]}" for i in range(REQUESTS)]
    calls = [asyncio.ensure_future(handle.complete.remote(body(p))) for p in prompts]
    await asyncio.sleep(0.3)  # every request reached a replica
    for call in calls:
        if call.done():
            call.result()  # a short answer may be over already; a failure is raised here
    assert sum(not call.done() for call in calls) >= REQUESTS // 2  # most are in flight
    ray.kill(replica_actor(name, replicas[0]), no_restart=True)
    responses = await asyncio.wait_for(asyncio.gather(*calls), timeout=120)
    for prompt, response in zip(prompts, responses, strict=True):
        assert response["choices"][0]["text"] == expected_text(prompt), prompt
    # The ring sends about half of the prompts to each replica: some ran again.
    wait_until(lambda: retried(metrics_url, name) > before, 30, "the retries counted", 0.5)
    assert retried(metrics_url, name) - before <= REQUESTS
    # Serve replaces the killed replica; the application serves on.
    wait_until(
        lambda: len(model_replicas(name)) == 2 and replicas[0] not in model_replicas(name),
        120,
        "a new replica in the directory",
        0.5,
    )
    started = time.monotonic()
    again = await handle.complete.remote(body(prompts[0]))
    assert again["choices"][0]["text"] == expected_text(prompts[0])
    assert time.monotonic() - started < 60
