"""`ReplicaCore` without Ray: real TinyGPT weights, real caches and codecs, and in-memory
stand-ins for Redis and the peer network (`tests.support.memory_tiers`).

What a replica does between receiving a job and answering it: local hits, placement with the
owner and in Redis, prefix blocks from the owner and from Redis, version switches with requests
in flight, waits for a version, invalidation rules, warm-up of pinned prompts, and many models
on a replica with room for fewer.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace

import pytest

from cluster.keys import ResultKey
from cluster.local.result_cache import EntryTags
from cluster.secret import ClusterSecret
from cluster.sharing.directory import Member, ReplicaId
from cluster.versions.invalidation import InvalidationRule
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CompletionJob, CompletionOutcome
from serve_app.config import AppArgs, parse_args
from serve_app.errors import ModelNotFound, ModelUpdating
from serve_app.models import SamplingParams, generate
from serve_app.models.loading import load_model, weight_bytes_estimate
from serve_app.models.tokenizer import ByteTokenizer
from serve_app.replica.answers import AnswerIdentity, decode_answer
from serve_app.replica.core import ReplicaCore
from serve_app.replica.serving import config_version, weights_spec
from tests.support.memory_tiers import InProcessPeers, MemoryRedis, untyped

TOKENIZER = ByteTokenizer()
SHAPE = {"n_layers": 1, "d_model": 32, "n_heads": 2, "max_context": 256}
BLOCK = 4
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)
DOCUMENT = "raycache keeps the keys and values of shared prompt prefixes. " * 2


def app_args(models: Sequence[str] = ("tiny",), **settings: object) -> AppArgs:
    raw: dict[str, object] = {
        "namespace": "unit",
        "models": [{"id": m, "seed": i + 1, **SHAPE} for i, m in enumerate(models)],
        "prefix_cache": {"block_size": BLOCK},
    }
    return parse_args({**raw, **settings})


def job(prompt: str, model: str = "tiny", params: SamplingParams = GREEDY) -> CompletionJob:
    return CompletionJob(
        model=model,
        tenant="default",
        prompt_tokens=tuple(TOKENIZER.encode(prompt)),
        params=params,
        routing_key=f"{model}:{prompt[:32]}",
    )


def reference(args: AppArgs, request: CompletionJob, record: ModelVersion | None = None) -> str:
    """The answer of `request` from freshly built weights, without any cache."""
    spec = args.model(request.model)
    assert spec is not None
    weights = load_model(weights_spec(spec, record or config_version(spec)))
    return generate(weights, TOKENIZER, request.prompt_tokens, request.params).text


class FixedRing:
    """Every key is owned by `member` (None: no ring)."""

    def __init__(self, member: Member | None) -> None:
        self.member = member

    def owner(self, routing_key: str) -> Member | None:
        return self.member


class Versions:
    """What the follower says: `lag` models are behind a heard version."""

    def __init__(self) -> None:
        self.lag: set[str] = set()
        self.contact = True

    def lagging(self, model: str) -> bool:
        return model in self.lag

    def in_contact(self) -> bool:
        return self.contact


SECRET = ClusterSecret.generate()


async def make_core(
    args: AppArgs,
    name: str = "r1",
    redis: MemoryRedis | None = None,
    peers: InProcessPeers | None = None,
) -> ReplicaCore:
    specs = {spec.id: spec for spec in args.models}
    core = ReplicaCore(
        args,
        SECRET,
        ReplicaId(name),
        {spec.id: TOKENIZER for spec in args.models},
        {spec.id: config_version(spec) for spec in args.models},
        load_weights=lambda record: load_model(weights_spec(specs[record.model], record)),
        estimate_bytes=lambda model: weight_bytes_estimate(specs[model]),
        peer=untyped(peers),
        redis=untyped(redis),
    )
    await core.start()
    return core


def member(name: str) -> Member:
    return Member(
        ReplicaId(name),
        node_id="node",
        peer_address=f"{name}:results",
        blocks_address=f"{name}:blocks",
    )


def serve_peer(peers: InProcessPeers, name: str, core: ReplicaCore) -> None:
    peers.backends[f"{name}:results"] = core.peer_backend
    peers.backends[f"{name}:blocks"] = core.peer_backend


@pytest.mark.asyncio
async def test_a_repeated_request_is_a_local_hit_identical_to_the_computed_answer() -> None:
    args = app_args()
    core = await make_core(args)
    request = job("The quick brown fox")
    first = await core.complete(request)
    second = await core.complete(request)
    assert first.cache_tier is None and second.cache_tier == "local"
    assert first.text == second.text == reference(args, request)
    assert second.cache_key == first.cache_key is not None
    # The hit served the answer kept decoded: exactly what its stored bytes decode to.
    blob, _ = core.cache.get_decoded(ResultKey(first.cache_key)) or (b"", None)
    tags = EntryTags(model=request.model, version=first.model_version, tenant=request.tenant)
    identity = AnswerIdentity.of(first.cache_key, tags)
    assert replace(decode_answer(blob, "local", SECRET, expect=identity), cache_key=None) == (
        replace(second, cache_key=None)
    )
    await core.close()


@pytest.mark.asyncio
async def test_a_sampled_request_is_never_stored_nor_shared() -> None:
    redis = MemoryRedis()
    core = await make_core(app_args(), redis=redis)
    sampled = job(DOCUMENT, params=SamplingParams(max_tokens=4, temperature=0.9))
    for _ in range(2):
        assert (await core.complete(sampled)).cache_tier is None
    await core.tiered.drain()
    assert core.cache.stats().entries == 0
    assert redis.values == {}  # neither the answer nor the prompt's blocks
    # Its prompt's blocks are still reused locally.
    assert (await core.complete(job(DOCUMENT))).cached_tokens > 0
    await core.close()


@pytest.mark.asyncio
async def test_an_unknown_model_is_not_found() -> None:
    core = await make_core(app_args())
    with pytest.raises(ModelNotFound):
        await core.complete(job("hello", model="nope"))
    await core.close()


@pytest.mark.asyncio
async def test_an_answer_is_stored_with_its_owner_and_served_from_there() -> None:
    args, peers = app_args(), InProcessPeers()
    owner = await make_core(args, "owner", peers=peers)
    serve_peer(peers, "owner", owner)
    here = await make_core(args, "here", peers=peers)
    here.connect(FixedRing(member("owner")), Versions())
    request = job("A prompt that the owner replica keeps")
    computed = await here.complete(request)
    await here.tiered.drain()
    assert owner.cache.stats().entries == 1  # stored with the owner, in the background
    other = await make_core(args, "other", peers=peers)
    other.connect(FixedRing(member("owner")), Versions())
    fetched = await other.complete(request)
    assert (fetched.cache_tier, fetched.text) == ("peer", computed.text)
    for core in (owner, here, other):
        await core.close()


@pytest.mark.asyncio
async def test_a_replica_that_owns_the_key_calls_no_peer() -> None:
    peers = InProcessPeers()
    core = await make_core(app_args(), "me", peers=peers)
    core.connect(FixedRing(member("me")), Versions())
    await core.complete(job("mine alone"))
    await core.tiered.drain()
    assert peers.calls == []
    await core.close()


@pytest.mark.asyncio
async def test_answers_go_to_redis_under_the_readable_key_layout() -> None:
    args, redis = app_args(), MemoryRedis()
    writer = await make_core(args, "writer", redis=redis)
    request = job("Stored for the whole cluster")
    computed = await writer.complete(request)
    await writer.tiered.drain()
    assert f"unit:tiny:1:r:{computed.cache_key}" in redis.values
    reader = await make_core(args, "reader", redis=redis)
    fetched = await reader.complete(request)
    assert (fetched.cache_tier, fetched.text) == ("redis", computed.text)
    for core in (writer, reader):
        await core.close()


@pytest.mark.asyncio
async def test_a_failing_redis_is_a_miss() -> None:
    args, redis = app_args(), MemoryRedis()
    redis.down = True
    core = await make_core(args, redis=redis)
    request = job("Redis is down")
    assert (await core.complete(request)).text == reference(args, request)
    await core.close()


@pytest.mark.asyncio
async def test_a_prefix_cached_at_the_owner_is_fetched_and_the_answer_is_unchanged() -> None:
    args, peers = app_args(), InProcessPeers()
    owner = await make_core(args, "owner", peers=peers)
    serve_peer(peers, "owner", owner)
    await owner.complete(job(DOCUMENT))
    here = await make_core(args, "here", peers=peers)
    here.connect(FixedRing(member("owner")), Versions())
    request = job(DOCUMENT + "What does it keep?")
    answer = await here.complete(request)
    assert here.tiered_prefix is not None and here.tiered_prefix.counters.from_peers > 0
    assert answer.cached_tokens >= len(DOCUMENT) - BLOCK
    assert answer.text == reference(args, request)
    for core in (owner, here):
        await core.close()


def prefix_keys(redis: MemoryRedis) -> list[str]:
    return [key for key in redis.values if ":kv:" in key]


@pytest.mark.asyncio
async def test_a_prompt_used_once_writes_no_block_to_redis_and_its_second_use_does() -> None:
    args, redis = app_args(), MemoryRedis()
    core = await make_core(args, redis=redis)
    await core.complete(job(DOCUMENT + "First question?"))
    await core.tiered.drain()
    assert prefix_keys(redis) == []  # a prompt nobody repeats costs Redis nothing
    await core.complete(job(DOCUMENT + "Second question?"))
    await core.tiered.drain()
    written = prefix_keys(redis)
    assert written  # the document's blocks, used twice
    await core.complete(job(DOCUMENT + "Third question?"))
    await core.tiered.drain()
    assert prefix_keys(redis) == written  # already there: not written again
    await core.close()


@pytest.mark.asyncio
async def test_a_long_prefill_writes_its_blocks_at_once() -> None:
    args = app_args(prefix_cache={"block_size": BLOCK, "share_new_tokens": len(DOCUMENT)})
    redis = MemoryRedis()
    core = await make_core(args, redis=redis)
    await core.complete(job(DOCUMENT))
    await core.tiered.drain()
    assert prefix_keys(redis)
    await core.close()


@pytest.mark.asyncio
async def test_a_tenant_past_its_write_budget_writes_nothing_to_the_shared_tiers() -> None:
    args = app_args(
        prefix_cache={"block_size": BLOCK, "share_new_tokens": 1},
        shared_writes={"tenant_bytes_per_s": 1, "tenant_burst_bytes": 64},
    )
    redis = MemoryRedis()
    core = await make_core(args, redis=redis)
    answer = await core.complete(job(DOCUMENT))
    await core.tiered.drain()
    assert answer.text == reference(args, job(DOCUMENT))  # answered, and cached locally
    assert redis.values == {} and core.write_budget is not None and core.write_budget.refused
    assert (await core.complete(job(DOCUMENT))).cache_tier == "local"
    await core.close()


@pytest.mark.asyncio
async def test_a_prefix_shared_through_redis_is_fetched_and_the_answer_is_unchanged() -> None:
    args, redis = app_args(), MemoryRedis()
    writer = await make_core(args, "writer", redis=redis)
    await writer.complete(job(DOCUMENT))
    await writer.complete(job(DOCUMENT + "Asked twice, the document is shared."))
    await writer.tiered.drain()
    assert prefix_keys(redis)
    reader = await make_core(args, "reader", redis=redis)
    request = job(DOCUMENT + "Where do the blocks live?")
    answer = await reader.complete(request)
    assert reader.tiered_prefix is not None and reader.tiered_prefix.counters.from_redis > 0
    assert answer.cached_tokens > 0
    assert answer.text == reference(args, request)
    for core in (writer, reader):
        await core.close()


@pytest.mark.asyncio
async def test_a_version_switch_waits_for_requests_in_flight_and_then_serves_new_weights() -> None:
    args = app_args()
    core = await make_core(args)
    long_job = job("A long answer", params=SamplingParams(max_tokens=200, temperature=0.0))
    in_flight = asyncio.create_task(core.complete(long_job))
    old = core.pool.loaded("tiny")
    assert old is not None
    while old.inflight == 0:
        await asyncio.sleep(0.001)
    record = ModelVersion("tiny", "2", generation=1, source="admin", seed=42)
    switch = asyncio.create_task(asyncio.to_thread(core.apply_version, record))
    answered: CompletionOutcome = await in_flight
    await switch
    assert answered.model_version == "1"  # began on the old weights, ended on them
    after = await core.complete(long_job)
    assert (after.model_version, after.cache_tier) == ("2", None)  # the old answer was not kept
    assert after.text == reference(args, long_job, record)
    assert (await core.complete(long_job)).cache_tier == "local"
    await core.close()


@pytest.mark.asyncio
async def test_a_drained_versions_weights_are_freed_without_garbage_collection() -> None:
    core = await make_core(app_args())
    long_job = job("A long answer", params=SamplingParams(max_tokens=100, temperature=0.0))
    old = core.pool.loaded("tiny")
    assert old is not None
    weights = weakref.ref(old.model)
    del old
    gc.disable()  # nothing may keep them in a reference cycle: their heap is returned at once
    try:
        in_flight = asyncio.create_task(core.complete(long_job))
        await asyncio.sleep(0.01)
        record = ModelVersion("tiny", "2", generation=1, source="admin", seed=42)
        await asyncio.to_thread(core.apply_version, record)
        assert (await in_flight).model_version == "1"
        # The generation thread lets go of its work item just after it hands over the answer.
        for _ in range(100):
            if weights() is None:
                break
            await asyncio.sleep(0.01)
        assert weights() is None
    finally:
        gc.enable()
    await core.close()


@pytest.mark.asyncio
async def test_a_request_waits_while_the_replica_is_behind_a_heard_version() -> None:
    core = await make_core(app_args())
    versions = Versions()
    core.connect(FixedRing(None), versions)
    versions.lag.add("tiny")
    waiting = asyncio.create_task(core.complete(job("after the switch")))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    versions.lag.clear()
    core.versions_changed()
    assert (await asyncio.wait_for(waiting, 5)).text
    await core.close()


@pytest.mark.asyncio
async def test_a_switch_that_takes_too_long_is_a_503() -> None:
    core = await make_core(app_args(version_wait_s=0.1))
    versions = Versions()
    core.connect(FixedRing(None), versions)
    versions.lag.add("tiny")
    with pytest.raises(ModelUpdating):
        await core.complete(job("never switched"))
    await core.close()


@pytest.mark.asyncio
async def test_out_of_touch_with_the_versions_answers_are_computed_and_not_stored() -> None:
    core = await make_core(app_args())
    versions = Versions()
    versions.contact = False
    core.connect(FixedRing(None), versions)
    for _ in range(2):
        assert (await core.complete(job("is this current?"))).cache_tier is None
    assert core.cache.stats().entries == 0
    await core.close()


@pytest.mark.asyncio
async def test_an_invalidation_drops_local_answers_and_refuses_older_copies_in_redis() -> None:
    args, redis = app_args(), MemoryRedis()
    core = await make_core(args, redis=redis)
    request = job("invalidate me")
    await core.complete(request)
    await core.tiered.drain()
    rule = InvalidationRule(seq=1, issued_at=time.time(), model="tiny")
    await asyncio.to_thread(core.apply_rules, [rule])
    assert core.cache.stats().entries == 0
    again = await core.complete(request)
    assert again.cache_tier is None  # the copy in Redis predates the rule
    assert core.stats()["cluster"]["stale_values"] == 1
    await core.close()


@pytest.mark.asyncio
async def test_pinned_prompts_are_warmed_at_start_and_again_for_new_weights() -> None:
    system = "You are a helpful assistant who answers briefly."
    args = app_args(
        prefix_cache={"block_size": BLOCK, "pinned": [{"model": "tiny", "text": system}]}
    )
    core = await make_core(args)
    assert core.prefix is not None
    pinned = core.prefix.stats().pinned_blocks
    assert pinned == len(system) // BLOCK
    answer = await core.complete(job(system + " Hi!"))
    assert answer.cached_tokens == pinned * BLOCK
    record = ModelVersion("tiny", "2", generation=1, source="admin", seed=9)
    await asyncio.to_thread(core.apply_version, record)
    assert core.prefix.stats().pinned_blocks == pinned  # the new weights' blocks, the old gone
    request = job(system + " Hello again!")
    after = await core.complete(request)
    assert after.cached_tokens == pinned * BLOCK
    assert after.text == reference(args, request, record)
    await core.close()


@pytest.mark.asyncio
async def test_three_models_on_room_for_two_all_answer_and_loads_are_counted() -> None:
    args = app_args(("a", "b", "c"), model_pool={"max_loaded_models": 2})
    core = await make_core(args)
    for round_ in range(2):
        for model in ("a", "b", "c"):
            request = job(f"round {round_} for {model}", model=model)
            assert (await core.complete(request)).text == reference(args, request)
    models = core.stats()["cluster"]["models"]
    assert len(models["loaded"]) == 2
    assert models["loads"] == 2 + 4 and models["evictions"] == 4
    await core.close()


@pytest.mark.asyncio
async def test_a_version_published_while_a_model_is_unloaded_is_served_when_it_loads() -> None:
    args = app_args(("a", "b"), model_pool={"max_loaded_models": 1})
    core = await make_core(args)
    assert core.pool.loaded("b") is None
    record = ModelVersion("b", "7", generation=1, source="admin", seed=77)
    await asyncio.to_thread(core.apply_version, record)
    request = job("which weights?", model="b")
    answer = await core.complete(request)
    assert answer.model_version == "7"
    assert answer.text == reference(args, request, record)
    await core.close()


@pytest.mark.asyncio
async def test_a_cancelled_request_keeps_its_model_until_the_computation_ends() -> None:
    args = app_args(("a", "b"), model_pool={"max_loaded_models": 1})
    core = await make_core(args)
    sampled = SamplingParams(max_tokens=200, temperature=0.8, seed=1)
    running = asyncio.create_task(core.complete(job("a long one", model="a", params=sampled)))
    serving = core.pool.loaded("a")
    assert serving is not None
    while serving.inflight < 2:  # the request and its computation
        await asyncio.sleep(0.001)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert serving.inflight == 1  # the computation still holds the weights
    other = asyncio.create_task(core.complete(job("meanwhile", model="b")))
    await asyncio.sleep(0.05)
    assert not serving.retired  # not evicted under the running computation
    await asyncio.wait_for(other, 30)
    assert serving.retired and serving.inflight == 0
    await core.close()
