"""A Hugging Face checkpoint served by the running application: two replicas, a real Redis.

The model is a tiny random Llama (grouped-query attention) written with `save_pretrained`.
Answers are identical to `transformers`' own greedy generation whether the prompt's prefix was
computed here, fetched from the owner replica, or read from Redis, and a repeated request is a
result-cache hit with the same answer. Text prompts go through the checkpoint's own tokenizer.
bfloat16 blocks come back from Redis bit-exact.
"""

from __future__ import annotations

import random
import uuid

import pytest
import ray
import torch
from ray import serve

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.keys import routing_key
from cluster.local.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from cluster.sharing.directory_actor import ACTOR_NAMESPACE, directory_actor
from cluster.sharing.redis_store import RedisStore
from cluster.sharing.ring import Ring
from cluster.sharing.tiered_prefix import fetch_prefix_from_redis, store_prefix_in_redis
from serve_app.api.completions import CompletionJob
from serve_app.errors import InvalidRequest
from serve_app.models import SamplingParams
from serve_app.models.hf import HFCausalLM, HFTokenizer
from serve_app.replica.prefix_generation import generate_with_prefix_cache
from tests.support.deployments import deploy
from tests.support.hf_checkpoints import EOS, VOCAB, reference_greedy, write_checkpoint
from tests.support.processes import wait_until

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
TENANT = "default"
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    return write_checkpoint("llama", directory), directory


def serve_checkpoint(directory, redis_url: str | None, peer: bool) -> str:
    name = f"hf-{uuid.uuid4().hex[:6]}"
    args = {
        "namespace": name,
        "redis_url": redis_url,
        "peer": {"enabled": peer},
        "stats_interval_s": 0.1,
        "models": [{"id": MODEL, "kind": "hf", "path": str(directory)}],
    }
    deploy(name, args)
    return name


def undeploy(name: str) -> None:
    serve.delete(name)
    for actor in (f"versions-{name}", f"directory-{name}"):
        ray.kill(ray.get_actor(actor, namespace=ACTOR_NAMESPACE), no_restart=True)


def owner_and_other(namespace: str, key: str) -> tuple[str, str]:
    members = ray.get(directory_actor(namespace).members.remote())
    owner = Ring({m.replica_id: m.weight for m in members}).owner(key)
    return owner, next(m.replica_id for m in members if m.replica_id != owner)


@pytest.mark.parametrize("tier", ["peer", "redis"])
def test_a_prefix_from_another_replica_answers_as_transformers_does(
    checkpoint, ray_cluster, redis_server, tier
) -> None:
    reference, directory = checkpoint
    name = serve_checkpoint(
        directory, redis_server.url if tier == "redis" else None, tier == "peer"
    )
    try:
        handle = serve.get_deployment_handle("ModelReplica", app_name=name)
        rng = random.Random(tier)
        # Longer than the routing prefix, so that every prompt below has one owner.
        shared = [rng.randrange(4, VOCAB) for _ in range(300)]

        def job(suffix: list[int], replica: str | None = None) -> CompletionJob:
            tokens = tuple(shared + suffix)
            return CompletionJob(
                model=MODEL,
                tenant=TENANT,
                prompt_tokens=tokens,
                params=SamplingParams(max_tokens=MAX_TOKENS),
                routing_key=routing_key(name, TENANT, MODEL, tokens),
                replica=replica,
            )

        owner, other = owner_and_other(name, job([1]).routing_key or "")
        tokenizer = HFTokenizer(directory, frozenset({EOS}))

        def ask(suffix: list[int], replica: str):
            outcome = handle.complete.remote(job(suffix, replica)).result(timeout_s=120)
            expected = reference_greedy(reference, shared + suffix, MAX_TOKENS)
            assert outcome.text == tokenizer.decode(expected), (replica, suffix)
            assert outcome.completion_tokens == len(expected)
            return outcome

        first = ask([5, 6, 7], owner)
        assert first.cache_tier is None and first.cached_tokens == 0
        if tier == "redis":  # its second use on the owner writes the prefix's chunks to Redis
            assert ask([8], owner).cached_tokens >= 256
            wait_until(
                lambda: redis_server.client().keys(f"{name}:{MODEL}:*:kv:*"), 20, "the chunks"
            )
        # Another prompt with the same prefix, on the other replica: its blocks come over.
        second = ask([9, 10], other)
        assert second.cache_tier is None and second.cached_tokens >= 256, second
        # The same request again: a result-cache hit, the same answer.
        again = handle.complete.remote(job([9, 10], other)).result(timeout_s=60)
        assert again.cache_tier == "local" and again.text == second.text
    finally:
        undeploy(name)


def test_text_prompts_use_the_checkpoints_tokenizer(checkpoint, ray_cluster) -> None:
    reference, directory = checkpoint
    name = serve_checkpoint(directory, None, peer=True)
    try:
        handle = serve.get_app_handle(name)
        prompt = "Return a random integer N such that a <= N <= b."
        body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
        answer = handle.complete.remote(body).result(timeout_s=120)
        tokenizer = HFTokenizer(directory, frozenset({EOS}))
        expected = reference_greedy(reference, tokenizer.encode(prompt), MAX_TOKENS)
        assert answer["choices"][0]["text"] == tokenizer.decode(expected)
        assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode(prompt))
        assert handle.complete.remote(body).result(timeout_s=60)["cache"]["hit"]
        # Its versions are checkpoint directories: a seed is refused, naming the field.
        with pytest.raises(InvalidRequest) as refused:
            handle.publish_version.remote(MODEL, {"version": "2", "seed": 1}).result(timeout_s=60)
        assert refused.value.param == "seed"
    finally:
        undeploy(name)


@pytest.mark.asyncio
async def test_bfloat16_blocks_round_trip_bit_exact_through_redis(checkpoint, redis_server) -> None:
    _, directory = checkpoint
    model = HFCausalLM.load(directory, dtype="bfloat16")
    scope = PrefixScope("tenant-salt", MODEL, "1", generation=1)
    writer = PrefixCache(4, max_bytes=1 << 26)
    prompt = list(range(10, 43))  # eight blocks of four, and one token to prefill
    generate_with_prefix_cache(
        model,
        HFTokenizer(directory, frozenset({EOS})),
        prompt,
        SamplingParams(max_tokens=1),
        writer,
        scope,
    )
    hashes = prompt_block_hashes(prompt, 4, scope)
    secret = ClusterSecret(b"hf redis tests' cluster secret")
    store = RedisStore(redis_server.url, socket_timeout_s=2.0, connect_timeout_s=2.0)
    namespace = f"hf{uuid.uuid4().hex[:8]}"
    try:
        assert await store_prefix_in_redis(store, writer, hashes, 0, scope, namespace, 3, secret)
        reader = PrefixCache(4, max_bytes=1 << 26)
        added = await fetch_prefix_from_redis(
            store, reader, hashes, len(hashes), scope, namespace, 3, model.kv_block_shape(4),
            model.dtype, model.device, secret,
        )  # fmt: skip
    finally:
        await store.close()
    assert added == len(hashes) == 8
    for block_hash in hashes:
        written, read = writer.block_kv(block_hash), reader.block_kv(block_hash)
        assert written is not None and read is not None
        assert read[0].dtype == torch.bfloat16
        assert torch.equal(read[0].view(torch.int16), written[0].view(torch.int16))
