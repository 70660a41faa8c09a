"""The model replica: the models, the local result cache, and membership in the directory.

`ModelReplica.complete` answers a validated `CompletionJob`: from the local result cache when
the request is deterministic and was answered before, otherwise by generating (in a worker
thread, so the replica's event loop keeps serving hits) and caching the answer.

Versions: at start-up the replica publishes its configured versions (a no-op when they are
current; refused, and followed instead, when a newer one was published since) and loads the
current ones. A `VersionFollower` then applies every new version (`_apply_version`: load,
switch, drop the model's entries, wait for requests on the old weights, warm pinned prompts)
and every invalidation rule before the version actor counts the replica as acknowledged.
`reconfigure` publishes the versions of the deployment's `user_config` through the same actor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import ray
import torch
from ray import serve

from cluster.block_hashes import BlockHash, PrefixScope, keyed_blake2b_256, prompt_block_hashes
from cluster.directory import Member, ReplicaId
from cluster.invalidation import InvalidationRule, InvalidationRules
from cluster.keys import RequestIdentity, ResultKey, result_key
from cluster.membership import Membership
from cluster.peer import PeerClient, PeerServer
from cluster.prefix_cache import PrefixCache
from cluster.ray_secret import shared_secret
from cluster.redis_store import RedisStore, redis_key
from cluster.result_cache import EntryTags, ResultCache
from cluster.secret import ClusterSecret
from cluster.tiered import Placement, TieredCache
from cluster.version_actor import version_actor
from cluster.version_follower import VersionFollower
from cluster.version_store import VersionStore
from cluster.versions import ModelVersion, VersionRegression
from serve_app.admin import publish_update
from serve_app.answers import AnswerIdentity, decode_answer, encode_answer
from serve_app.completions import CompletionJob, CompletionOutcome
from serve_app.config import AppArgs, parse_args, parse_user_config, prompt_text
from serve_app.errors import ModelNotFound, ModelUpdating
from serve_app.models import CausalLM, Generation, SamplingParams, generate
from serve_app.models.loading import load_model, load_tokenizer
from serve_app.peer_backend import ResultPeerBackend
from serve_app.prefix_generation import generate_with_prefix_cache, warm_up_prefix
from serve_app.serving import ServingModel, config_version, weights_spec
from serve_app.shared_blocks import (
    fetch_prefix_from_owner,
    fetch_prefix_from_redis,
    store_prefix_in_redis,
)
from serve_app.stats import replica_stats

logger = logging.getLogger(__name__)

COMPLETION_KIND = "completion"
RECONFIGURE_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0


def cache_params(params: SamplingParams) -> dict[str, object]:
    """The parameters that decide a completion, as they enter its key.

    Greedy decoding ignores `top_p` and `seed`, so they are left out of greedy keys: greedy
    requests that differ only in them share one answer.
    """
    key: dict[str, object] = {
        "max_tokens": params.max_tokens,
        "temperature": float(params.temperature),
        "stop": list(params.stop),
    }
    if params.temperature > 0:
        key["top_p"] = float(params.top_p)
        key["seed"] = params.seed
    return key


def completion_key(
    namespace: str,
    secret: ClusterSecret,
    job: CompletionJob,
    weights: ModelVersion,
    tenant_salt: str | None = None,
) -> ResultKey:
    """The result key of `job` answered by `weights` (a version and its generation): keyed
    with the cluster secret, and with the tenant's salt (derived from the secret when not
    given) standing for the tenant."""
    identity = RequestIdentity(
        namespace=namespace,
        tenant=secret.tenant_salt(job.tenant) if tenant_salt is None else tenant_salt,
        model_id=job.model,
        model_version=weights.version,
        model_generation=weights.generation,
        kind=COMPLETION_KIND,
    )
    return result_key(identity, list(job.prompt_tokens), cache_params(job.params), secret.keys)


@serve.deployment(name="ModelReplica")
class ModelReplica:
    """Serves every configured model; see `complete`."""

    # Serve awaits an async constructor on the replica's event loop, where the peer server
    # must run; instantiating the class any other way is not supported.
    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]
        self._args: AppArgs = parse_args(args).with_environment()
        torch.set_num_threads(self._args.torch_threads)
        # Parsing a tokenizer file reads MiBs: in a worker thread, off the replica's loop.
        self._tokenizers = await asyncio.to_thread(
            lambda: {spec.id: load_tokenizer(spec) for spec in self._args.models}
        )
        self._cluster_secret = await asyncio.to_thread(
            shared_secret, self._args.namespace, self._args.configured_secret()
        )
        self._block_hash = keyed_blake2b_256(self._cluster_secret.keys)
        self._tenant_salts: dict[str, str] = {}
        self._specs = {spec.id: spec for spec in self._args.models}
        self._version_actor = version_actor(
            self._args.namespace,
            self._args.redis_url,
            self._cluster_secret.records,
            rule_lifetime_s=self._rule_lifetime_s(),
        )
        current = await self._startup_versions()
        self._serving: dict[str, ServingModel] = {
            model: ServingModel(await asyncio.to_thread(self._load, record), record)
            for model, record in current.items()
        }
        self._rules = InvalidationRules()
        self._fetched_blocks = 0
        self._redis_blocks = 0
        settings = self._args.result_cache
        self._cache = ResultCache(
            max_bytes=settings.max_bytes,
            max_entries=settings.max_entries,
            policy=settings.policy,
            ttl_s=settings.ttl_s,
            ttl_jitter=settings.ttl_jitter,
        )
        self._prefix = await asyncio.to_thread(self._build_prefix_cache)
        self._replica_id = ReplicaId(serve.get_replica_context().replica_id.unique_id)
        self._redis = RedisStore(self._args.redis_url) if self._args.redis_url else None
        peer_key = self._cluster_secret.peer
        self._peer_client = PeerClient(peer_key) if self._args.peer.enabled else None
        self._peer_backend = ResultPeerBackend(
            self._cache,
            self._prefix,
            self._cluster_secret,
            self._rules,
            chunk_bytes=self._args.prefix_cache.peer_chunk_bytes,
        )
        self._peer_server = PeerServer(self._peer_backend, peer_key)
        # The node's own address, not 0.0.0.0: peers reach it, other networks of the host do not.
        peer_address = await self._peer_server.start(host=ray.util.get_node_ip_address(), port=0)
        self._tiered: TieredCache[CompletionOutcome] = TieredCache(
            self._cache,
            decode=lambda blob, key, tags: decode_answer(
                blob, "local", self._cluster_secret, expect=AnswerIdentity.of(key, tags)
            ),
            decode_remote=lambda blob, key, tags: decode_answer(
                blob,
                "local",
                self._cluster_secret,
                rules=self._rules,
                expect=AnswerIdentity.of(key, tags),
            ),
            peer=self._peer_client,
            redis=self._redis,
            peer_timeout_s=self._args.peer.timeout_s,
            redis_ttl_s=self._args.result_cache.ttl_s,
        )
        self._membership = Membership(
            namespace=self._args.namespace,
            member=Member(
                self._replica_id,
                node_id=_node_id(),
                peer_address=peer_address,
                blocks_address=self._peer_server.blocks_address or "",
            ),
            stats=self.stats,
            interval_s=self._args.stats_interval_s,
        )
        self._membership.start()
        self._version_store = (
            VersionStore(self._args.redis_url, self._args.namespace, self._cluster_secret.records)
            if self._args.redis_url
            else None
        )
        self._follower = VersionFollower(
            self._replica_id,
            actor=lambda: self._version_actor,
            initial=current,
            apply_version=self._apply_version,
            apply_rules=self._apply_rules,
            store=self._version_store,
        )
        self._follower.start()
        logger.info(
            "replica %s serves %s",
            self._replica_id,
            {model: serving.version for model, serving in self._serving.items()},
        )

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Answer `job`: from a cache tier when it is deterministic and was answered before
        (here, by its owner replica, or in Redis), otherwise by generating it once.

        Never from weights older than a version this replica has heard of: while it switches,
        the request waits (up to `version_wait_s`, then `ModelUpdating`).
        """
        if job.model not in self._serving:
            raise ModelNotFound(f"model {job.model!r} is not served", param="model")
        if self._follower.lagging(job.model) and not await self._caught_up(job.model):
            raise ModelUpdating(
                f"model {job.model!r} is switching to a new version on this replica",
                param="model",
            )
        # A switch retires the old weights before it waits for their requests: a request that
        # read them just before the swap finds them retired and takes the new ones.
        serving = self._serving[job.model]
        while not serving.enter():
            serving = self._serving[job.model]
        try:
            return await self._answer(serving, job)
        finally:
            serving.leave()

    async def _caught_up(self, model: str) -> bool:
        """Wait, on the event loop, until this replica serves the newest version of `model`
        it heard of (True), or `version_wait_s` passed (False). Polling, so that waiting
        requests hold no worker thread that generation needs."""
        deadline = time.monotonic() + self._args.version_wait_s
        pause = 0.005
        while self._follower.lagging(model):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)
        return True

    async def _answer(self, serving: ServingModel, job: CompletionJob) -> CompletionOutcome:
        # Out of touch with the version actor, a newer version may exist: compute, trust no
        # cached answer, and store none.
        if not job.params.is_deterministic or not self._follower.in_contact():
            return (await self._compute(serving, job))[0]
        key = self._key(job, serving.record)
        tags = EntryTags(model=job.model, version=serving.version, tenant=job.tenant)
        outcome, tier = await self._tiered.get_or_compute(
            key,
            self._placement(job, key, serving.version),
            tags,
            lambda: self._compute(serving, job),
        )
        outcome = replace(outcome, cache_key=key)
        return outcome if tier is None else replace(outcome, cache_tier=tier, cached_tokens=0)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve's `user_config` hook: publish each listed version through the version actor
        and wait for the replicas. A version older than the current one is ignored (logged):
        a replica restarting with an old `user_config` follows the newer version instead."""
        config = parse_user_config(user_config, self._args)
        for model, update in sorted(config.models.items()):
            try:
                outcome = await publish_update(
                    self._version_actor,
                    model,
                    update,
                    source="user_config",
                    timeout_s=RECONFIGURE_TIMEOUT_S,
                )
            except VersionRegression as exc:
                logger.warning("user_config version of %s not published: %s", model, exc)
                continue
            logger.info("user_config published %s: %s", model, outcome.as_json())

    async def _compute(
        self, serving: ServingModel, job: CompletionJob
    ) -> tuple[CompletionOutcome, bytes]:
        """Generate the answer (in a worker thread) and its cached form.

        When another replica owns the prompt, the blocks of its prefix that the owner holds are
        copied first, so that only the rest is prefilled here.
        """
        chain = self._prefix_chain(job, serving) if self._prefix is not None else None
        if chain is not None:
            await self._fetch_prefix(serving.model, job, chain)
        generation, cached_tokens = await asyncio.to_thread(self._generate, serving, job)
        if chain is not None and self._redis is not None:
            self._share_prefix(chain, already_shared=cached_tokens)
        outcome = CompletionOutcome(
            text=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=len(generation.tokens),
            cached_tokens=cached_tokens,
            model_version=serving.version,
            cache_tier=None,
        )
        identity = AnswerIdentity(
            key=self._key(job, serving.record),
            tenant=job.tenant,
            model=job.model,
            version=serving.version,
        )
        encoded = encode_answer(generation, identity, self._cluster_secret)
        return outcome, encoded

    def _owner(self, job: CompletionJob) -> Member | None:
        """The replica owning `job`'s prompt, when that is another replica."""
        snapshot = self._membership.snapshot
        if self._peer_client is None or snapshot is None or not job.routing_key:
            return None
        owner = snapshot.member(self._membership.ring().owner(job.routing_key) or "")
        if owner is None or owner.replica_id == self._replica_id:
            return None
        return owner

    def _placement(self, job: CompletionJob, key: ResultKey, version: str) -> Placement:
        """Where `key` lives beyond this replica: its owner on the ring, and its Redis key."""
        redis = None
        if self._redis is not None:
            redis = redis_key(self._args.namespace, job.model, version, "r", key)
        owner = self._owner(job)
        return Placement(redis_key=redis, owner_address=owner.peer_address if owner else None)

    def _prefix_chain(
        self, job: CompletionJob, serving: ServingModel
    ) -> tuple[PrefixScope, list[BlockHash], torch.Size]:
        """The scope, block hashes and block shape (the model's own layout) of `job`'s prompt
        on `serving`'s weights."""
        assert self._prefix is not None
        size = self._prefix.block_size
        scope = self._scope(job.tenant, serving.record)
        hashes = prompt_block_hashes(job.prompt_tokens, size, scope, self._block_hash)
        return scope, hashes, serving.model.kv_block_shape(size)

    async def _fetch_prefix(
        self,
        model: CausalLM,
        job: CompletionJob,
        chain: tuple[PrefixScope, list[BlockHash], torch.Size],
    ) -> None:
        """Copy cached blocks of `job`'s prompt from the owner replica, then from Redis."""
        assert self._prefix is not None
        scope, hashes, shape = chain
        usable = (len(job.prompt_tokens) - 1) // self._prefix.block_size
        owner = self._owner(job)
        if owner is not None and owner.blocks_address and self._peer_client is not None:
            self._fetched_blocks += await fetch_prefix_from_owner(
                self._prefix,
                hashes,
                usable=usable,
                scope=scope,
                peer=self._peer_client,
                owner_address=owner.blocks_address,
                block_shape=shape,
                dtype=model.dtype,
                device=model.device,
                timeout_s=self._args.peer.timeout_s,
                secret=self._cluster_secret,
            )
        if self._redis is not None:
            self._redis_blocks += await fetch_prefix_from_redis(
                self._redis,
                self._prefix,
                hashes,
                usable=usable,
                scope=scope,
                namespace=self._args.namespace,
                chunk_blocks=self._args.prefix_cache.redis_chunk_blocks,
                block_shape=shape,
                dtype=model.dtype,
                device=model.device,
                secret=self._cluster_secret,
            )

    def _share_prefix(
        self, chain: tuple[PrefixScope, list[BlockHash], torch.Size], already_shared: int
    ) -> None:
        """Write the prompt's new blocks to Redis in the background."""
        assert self._prefix is not None and self._redis is not None
        scope, hashes, _ = chain
        prefix, redis = self._prefix, self._redis
        self._tiered.enqueue(
            lambda: store_prefix_in_redis(
                redis,
                prefix,
                hashes,
                already_shared=already_shared // prefix.block_size,
                scope=scope,
                namespace=self._args.namespace,
                chunk_blocks=self._args.prefix_cache.redis_chunk_blocks,
                secret=self._cluster_secret,
            )
        )

    def stats(self) -> dict[str, Any]:
        """This replica's cache statistics in the `/v1/cache/stats` shape."""
        prefix = self._prefix.stats() if self._prefix is not None else None
        tiers = self._tiered.stats
        snapshot = self._membership.snapshot
        redis = self._redis.stats() if self._redis is not None else None
        follower = getattr(self, "_follower", None)
        versions = {
            model: {
                "version": serving.version,
                "generation": serving.record.generation,
                "lagging": follower.lagging(model) if follower else False,
            }
            for model, serving in self._serving.items()
        }
        cluster = {
            "versions": versions,
            "version_failures": {
                model: error
                for model, (_, error) in (follower.failures() if follower else {}).items()
            },
            "invalidation_rules": len(self._rules),
            "ring_size": len(snapshot.members) if snapshot else 0,
            "ring_version": snapshot.version if snapshot else None,
            "redis_breaker": redis.breaker_state if redis else "disabled",
            "redis_errors": redis.errors if redis else 0,
            "peer_fetch_ms": _mean_ms(tiers.peer.fetch_seconds, tiers.peer.fetches),
            "redis_fetch_ms": _mean_ms(tiers.redis.fetch_seconds, tiers.redis.fetches),
            "corrupt_values": tiers.peer.corrupt + tiers.redis.corrupt,
            "foreign_values": tiers.peer.foreign + tiers.redis.foreign,
            "tier_errors": tiers.peer.errors + tiers.redis.errors,
            "invalidated_in_flight": tiers.invalidated_in_flight,
            "peer_values_refused": self._peer_backend.rejected,
            "version_records_refused": self._version_store.rejected_records
            if self._version_store is not None
            else 0,
            "peer_calls_refused": self._peer_server.rejected_calls,
            "stale_values": tiers.peer.stale + tiers.redis.stale,
            "single_flight_waits": tiers.single_flight_waits,
            "stores_dropped": tiers.stores_dropped,
            "prefix_blocks_from_peers": self._fetched_blocks,
            "prefix_blocks_from_redis": self._redis_blocks,
        }
        counters = replica_stats(
            local=self._cache.stats(),
            peer=tiers.peer.as_cache_stats(),
            redis=tiers.redis.as_cache_stats(),
            prefix_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_cached_tokens=prefix.cached_tokens if prefix else 0,
        )
        return {**counters, "cluster": cluster}

    def _generate(self, serving: ServingModel, job: CompletionJob) -> tuple[Generation, int]:
        """Generate in a worker thread; returns the generation and its prefix-cached tokens."""
        if self._prefix is None:
            tokenizer = self._tokenizers[job.model]
            return generate(serving.model, tokenizer, job.prompt_tokens, job.params), 0
        scope = self._scope(job.tenant, serving.record)
        return generate_with_prefix_cache(
            serving.model,
            self._tokenizers[job.model],
            job.prompt_tokens,
            job.params,
            self._prefix,
            scope,
            hash_fn=self._block_hash,
        )

    def _build_prefix_cache(self) -> PrefixCache | None:
        """The prefix cache, with the configured pinned prompts computed and pinned."""
        settings = self._args.prefix_cache
        if not settings.enabled:
            return None
        cache = PrefixCache(block_size=settings.block_size, max_bytes=settings.max_bytes)
        for model in self._serving:
            self._pin_prompts(cache, model)
        return cache

    def _pin_prompts(self, cache: PrefixCache, model_id: str) -> None:
        """Compute and pin the configured prompts of `model_id` at its serving version."""
        serving = self._serving[model_id]
        for pinned in self._args.prefix_cache.pinned:
            if pinned.model != model_id:
                continue
            scope = self._scope(pinned.tenant, serving.record)
            tokens = self._tokenizers[model_id].encode(prompt_text(pinned.text, self._args))
            cached = warm_up_prefix(
                serving.model, tokens, cache, scope, pin=True, hash_fn=self._block_hash
            )
            logger.info("pinned %d tokens of a system prompt for %s", cached, pinned.model)

    # -- versions -----------------------------------------------------------------------------

    async def _startup_versions(self) -> dict[str, ModelVersion]:
        """Publish the configured versions (no wait) and return the current ones.

        A configured version that was published before a newer one is refused by the actor:
        the newer one is served. Without an answer from the actor the config is served.
        """
        current = {spec.id: config_version(spec) for spec in self._args.models}
        try:
            for spec in self._args.models:
                record = current[spec.id]
                try:
                    await self._version_actor.publish.remote(
                        spec.id,
                        spec.version,
                        source="config",
                        seed=record.seed,
                        checkpoint=record.checkpoint,
                        timeout_s=0.0,
                    )
                except VersionRegression:
                    logger.info("configured version of %s is older than the current", spec.id)
            published = await self._version_actor.current.remote()
        except ray.exceptions.RayError:
            logger.warning("version actor unavailable; serving the configured versions")
            return current
        for model in current:
            if model in published:
                current[model] = published[model]
        return current

    def _apply_version(self, record: ModelVersion) -> None:
        """Switch `record.model` to `record` (in the follower's thread); raises when the
        weights do not load, and then nothing changed."""
        model = self._load(record)
        old = self._serving[record.model]
        self._serving = {**self._serving, record.model: ServingModel(model, record)}
        old.retire()
        self._drop_entries(record.model)
        if not old.wait_drained(DRAIN_TIMEOUT_S):
            logger.warning("requests on %s %s outlived the switch", record.model, old.version)
        # What the old weights' last requests stored while draining goes too.
        self._drop_entries(record.model)
        if self._prefix is not None:
            self._pin_prompts(self._prefix, record.model)

    def _drop_entries(self, model_id: str) -> None:
        """Drop every local result and prefix block of `model_id`, and keep what computations
        of it in flight will answer from being stored (their weights are being retired)."""
        dropped = self._tiered.invalidate(lambda _key, tags: tags.model == model_id)
        if self._prefix is not None:
            dropped += self._prefix.invalidate(
                lambda extra: isinstance(extra, PrefixScope) and extra.model_id == model_id
            )
        logger.info("dropped %d cached entries of %s", dropped, model_id)

    def _apply_rules(self, rules: list[InvalidationRule]) -> None:
        """Enforce invalidation `rules` (in the follower's thread): first for values fetched
        from peers and Redis, then by dropping matching local entries and keeping matching
        computations in flight from storing their answers."""
        self._rules.add(rules)
        self._rules.prune(time.time() - self._rule_lifetime_s())
        for rule in rules:
            self._tiered.invalidate(lambda key, tags, rule=rule: rule.matches(tags, key))
            if rule.key is None and self._prefix is not None:
                salt = None if rule.tenant is None else self._tenant_salt(rule.tenant)
                self._prefix.invalidate(
                    lambda extra, rule=rule, salt=salt: (
                        isinstance(extra, PrefixScope)
                        and (salt is None or extra.tenant == salt)
                        and rule.matches(
                            EntryTags(extra.model_id, extra.model_version, rule.tenant)
                        )
                    )
                )

    def _rule_lifetime_s(self) -> float:
        """How long an invalidation rule matters: the longest life of a cached answer."""
        settings = self._args.result_cache
        if settings.ttl_s is None:
            return 365 * 24 * 3600.0
        return settings.ttl_s * (1 + settings.ttl_jitter)

    async def __del__(self) -> None:
        """Serve's shutdown hook: leave the ring, stop serving peers, close connections."""
        # Both stops make blocking actor calls: in worker threads, off the event loop.
        for stopping in (getattr(self, "_membership", None), getattr(self, "_follower", None)):
            if stopping is not None:
                await asyncio.to_thread(stopping.stop)
        for closing in (
            getattr(self, "_tiered", None),
            getattr(self, "_peer_client", None),
            getattr(self, "_redis", None),
        ):
            if closing is not None:
                await closing.close()
        server = getattr(self, "_peer_server", None)
        if server is not None:
            await server.stop(grace_s=0.5)

    def _load(self, record: ModelVersion) -> CausalLM:
        """The weights of `record` (blocking: model loading reads files and builds tensors)."""
        spec = weights_spec(self._specs[record.model], record, self._args.checkpoint_dir)
        return load_model(spec)

    def _tenant_salt(self, tenant: str) -> str:
        """What stands for `tenant` in keys and block hashes (derived from the cluster secret)."""
        salt = self._tenant_salts.get(tenant)
        if salt is None:
            salt = self._tenant_salts[tenant] = self._cluster_secret.tenant_salt(tenant)
        return salt

    def _scope(self, tenant: str, weights: ModelVersion) -> PrefixScope:
        return PrefixScope(
            tenant=self._tenant_salt(tenant),
            model_id=weights.model,
            model_version=weights.version,
            generation=weights.generation,
        )

    def _key(self, job: CompletionJob, weights: ModelVersion) -> ResultKey:
        return completion_key(
            self._args.namespace, self._cluster_secret, job, weights, self._tenant_salt(job.tenant)
        )


def _mean_ms(seconds: float, count: int) -> float:
    return 1000 * seconds / count if count else 0.0


def _node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())
