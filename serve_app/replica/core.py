"""The replica core: everything a model replica does, without Ray.

`ReplicaCore.complete` answers a validated `CompletionJob`:

1. it waits (on an event, holding no thread) while the replica switches the job's model to a
   version it heard of, up to `version_wait_s`, then `ModelUpdating`;
2. it takes the model's weights from the `ModelPool` (loading them, evicting an idle model,
   when they are not in memory);
3. it plans the request once (`RequestPlan`: result key, owner replica, Redis placement) and
   looks the answer up tier by tier (`cluster.sharing.tiered`); on a miss it hashes the prompt's
   blocks once (`PromptChain`), fetches its cached prefix from the owner and Redis
   (`cluster.sharing.tiered_prefix`), generates in the core's own bounded thread pool, and
   stores the answer and the new blocks.

`ReplicaCore.embed` answers an `EmbeddingJob`: each input's embedding is looked up and, on a
miss, computed on its own (tiers, single flight and versions as for completions).

`ReplicaCore.stream` answers the same job as `StreamEvent`s: the text in pieces as it is
generated, then the whole outcome. Every computation of a cached key feeds a `TextFeed` that
any identical request streams from; a stream whose client leaves stops its generation unless
another request still waits for the answer, and a stopped generation stores nothing. An answer
from a cache is streamed in the pieces it was generated in.

A chat turn (`CompletionJob.answer_end`) also caches the blocks of its answer as the next turn
will send it back, so that turn prefills only its new message.

Versions: `apply_version` and `apply_rules` are what the replica's `VersionFollower` calls (in
its thread) before it acknowledges a version or a rule; `versions_changed` is its `on_change`.

What the core does not do is reach other processes by itself: the owner of a key comes from an
`OwnerLookup` (the directory's ring, in a replica), version state from a `VersionView` (the
follower), and the peer and Redis tiers are handed in. Without them it is a replica alone, with
in-memory tiers in unit tests.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from cluster.block_hashes import PrefixScope, keyed_blake2b_256
from cluster.keys import ResultKey
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import EntryTags, ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.directory import Member, ReplicaId
from cluster.sharing.peer import PeerClient
from cluster.sharing.redis_store import RedisStore
from cluster.sharing.tiered import (
    LookupObserver,
    Placement,
    TieredCache,
    TierLookup,
    result_placement,
)
from cluster.sharing.tiered_prefix import (
    BlockLayout,
    PrefixTierCounters,
    PromptChain,
    TieredPrefix,
)
from cluster.sharing.write_budget import TenantWriteBudget
from cluster.versions.follower import AlwaysCurrent, VersionView
from cluster.versions.invalidation import InvalidationRule, InvalidationRules
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CompletionJob, CompletionOutcome
from serve_app.api.embeddings import EmbeddingJob, EmbeddingOutcome, float32_bytes
from serve_app.config import AppArgs, prompt_text
from serve_app.errors import InvalidRequest, ModelNotFound, ModelUpdating
from serve_app.models import Generation, Tokenizer, generate
from serve_app.replica.answers import (
    AnswerIdentity,
    cached_pieces,
    completion_key,
    decode_answer,
    embedding_key,
    encode_answer,
    encode_embedding,
)
from serve_app.replica.change_signal import ChangeSignal
from serve_app.replica.metrics import ReplicaMetrics
from serve_app.replica.model_pool import LoadWeights, ModelPool
from serve_app.replica.peer_backend import ResultPeerBackend
from serve_app.replica.prefix_generation import (
    cache_prompt_prefix,
    generate_with_prefix_cache,
    warm_up_prefix,
)
from serve_app.replica.serving import ServingModel
from serve_app.replica.streaming import StreamEnd, StreamEvent, TextFeed, TextPiece, split_pieces
from serve_app.stats import replica_stats

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


class OwnerLookup(Protocol):
    """Who owns a routing key: the ring's member for it, or None without a ring."""

    def owner(self, routing_key: str) -> Member | None: ...


class _NoRing:
    def owner(self, routing_key: str) -> Member | None:
        return None


@dataclass(frozen=True)
class RequestPlan:
    """Everything derived from a job and the weights that answer it, computed once."""

    job: CompletionJob
    serving: ServingModel
    key: ResultKey | None
    """None when the answer is not cached (sampled, or out of touch with the versions)."""
    tags: EntryTags
    owner: Member | None
    """The replica owning the job's prompt, when that is another one."""
    placement: Placement
    tenant_salt: str


class ReplicaCore:
    """A replica's caches, models, versions and statistics; see the module docstring.

    Used from one event loop (the replica's): `complete`, `stats`, `close`. `apply_version`
    and `apply_rules` block and are called from another thread.
    """

    def __init__(
        self,
        args: AppArgs,
        secret: ClusterSecret,
        replica_id: ReplicaId,
        tokenizers: Mapping[str, Tokenizer],
        versions: Mapping[str, ModelVersion],
        load_weights: LoadWeights,
        estimate_bytes: Callable[[str], int],
        check_weights: Callable[[ModelVersion], None] | None = None,
        peer: PeerClient | None = None,
        redis: RedisStore | None = None,
        metrics: ReplicaMetrics | None = None,
    ) -> None:
        """Must be built on the event loop that will use it. `versions`: the version of every
        configured model to serve first; `load_weights(record)` builds a version's weights;
        `check_weights(record)` raises when they cannot be found (see `ModelPool`)."""
        self.args = args
        self.replica_id = replica_id
        self._secret = secret
        self._tokenizers = dict(tokenizers)
        self._specs = {spec.id: spec for spec in args.models}
        self._block_hash = keyed_blake2b_256(secret.keys)
        self._tenant_salts: dict[str, str] = {}
        self._owners: OwnerLookup = _NoRing()
        self._versions: VersionView = AlwaysCurrent()
        self._version_changed = ChangeSignal()
        self.rules = InvalidationRules()
        self._metrics = metrics
        self.version_drops = 0
        settings = args.result_cache
        self.cache = ResultCache(
            max_bytes=settings.max_bytes,
            max_entries=settings.max_entries,
            policy=settings.policy,
            ttl_s=settings.ttl_s,
            ttl_jitter=settings.ttl_jitter,
        )
        prefix = args.prefix_cache
        self.prefix = (
            PrefixCache(block_size=prefix.block_size, max_bytes=prefix.max_bytes)
            if prefix.enabled
            else None
        )
        self._peer = peer
        self._redis = redis
        writes = args.shared_writes
        self.write_budget = (
            TenantWriteBudget(writes.tenant_bytes_per_s, writes.tenant_burst_bytes)
            if writes.tenant_bytes_per_s is not None
            else None
        )
        self.tiered: TieredCache[CompletionOutcome | EmbeddingOutcome] = TieredCache(
            self.cache,
            decode=lambda blob, key, tags: decode_answer(
                blob, "local", secret, expect=AnswerIdentity.of(key, tags)
            ),
            decode_remote=lambda blob, key, tags: decode_answer(
                blob, "local", secret, rules=self.rules, expect=AnswerIdentity.of(key, tags)
            ),
            peer=peer,
            redis=redis,
            peer_timeout_s=args.peer.timeout_s,
            redis_ttl_s=settings.ttl_s,
            write_budget=self.write_budget,
        )
        self.tiered_prefix = (
            TieredPrefix(
                self.prefix,
                secret,
                args.namespace,
                peer=peer,
                redis=redis,
                redis_chunk_blocks=prefix.redis_chunk_blocks,
                peer_timeout_s=args.peer.timeout_s,
                enqueue=self.tiered.enqueue,
                share_new_tokens=prefix.share_new_tokens,
                write_budget=self.write_budget,
            )
            if self.prefix is not None
            else None
        )
        self.peer_backend = ResultPeerBackend(
            self.cache, self.prefix, secret, self.rules, chunk_bytes=prefix.peer_chunk_bytes
        )
        pool = args.model_pool
        self.pool = ModelPool(
            versions,
            load_weights,
            estimate_bytes,
            max_loaded_models=pool.max_loaded_models,
            max_model_bytes=pool.max_model_bytes,
            pinned=[spec.id for spec in args.models if spec.pinned],
            on_loaded=self._warm_up,
            check=check_weights,
        )
        # Generation's own threads: a bounded number of requests compute at once, and nothing
        # else (block copies, model loads, version waits) queues behind them.
        self._generation = concurrent.futures.ThreadPoolExecutor(
            max_workers=args.generation_threads, thread_name_prefix="raycache-generate"
        )
        # The feed of every computation of a cached key in flight, for streams to follow.
        self._feeds: dict[ResultKey, TextFeed] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.generations_stopped = 0

    def connect(self, owners: OwnerLookup, versions: VersionView) -> None:
        """Join a cluster: the ring that names owners, and the follower of published versions
        (whose `on_change` must call `versions_changed`)."""
        self._owners = owners
        self._versions = versions

    async def start(self) -> None:
        """Load the models that fit (pinned ones first) and warm their pinned prompts."""
        await asyncio.to_thread(self.pool.load_at_start, list(self._specs))

    # -- requests -----------------------------------------------------------------------------

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Answer `job`: from a cache tier when it is deterministic and was answered before
        (here, by its owner replica, or in Redis), otherwise by generating it once.

        Never from weights older than a version this replica has heard of: while it switches,
        the request waits (up to `version_wait_s`, then `ModelUpdating`). A model that is not
        loaded is loaded first (`ModelLoading` when that fails or finds no room in time).
        """
        serving = await self._serving(job.model, embeds=False)
        try:
            return await self._answer(self._plan(job, serving))
        finally:
            self.pool.release(serving)

    async def embed(self, job: EmbeddingJob) -> list[EmbeddingOutcome]:
        """The embedding of each input of `job`, in order: from a cache tier when computed
        before by these weights, otherwise computed (each input on its own, the misses at once
        in the generation threads)."""
        serving = await self._serving(job.model, embeds=True)
        try:
            return list(
                await asyncio.gather(
                    *(self._embedding(job, serving, i) for i in range(len(job.inputs)))
                )
            )
        finally:
            self.pool.release(serving)

    async def _serving(self, model: str, embeds: bool) -> ServingModel:
        """The current weights of `model`, taken from the pool (release them)."""
        spec = self._specs.get(model)
        if spec is None:
            raise ModelNotFound(f"model {model!r} is not served", param="model")
        if spec.is_encoder != embeds:
            kind = "an encoder: ask /v1/embeddings" if spec.is_encoder else "not an encoder"
            raise InvalidRequest(f"model {model!r} is {kind}", param="model")
        if self._versions.lagging(model) and not await self._caught_up(model):
            raise ModelUpdating(
                f"model {model!r} is switching to a new version on this replica", param="model"
            )
        return self.pool.take(model) or await self.pool.acquire(
            model, self.args.model_pool.load_wait_s
        )

    async def stream(self, job: CompletionJob) -> AsyncIterator[StreamEvent]:
        """`complete(job)` as events: `TextPiece`s as the text is generated (or, for a cached
        answer, in the pieces it was generated in), then one `StreamEnd`. Closing the stream
        early stops the generation when no other request waits for the same answer."""
        serving = await self._serving(job.model, embeds=False)
        try:
            async for event in self._stream(self._plan(job, serving)):
                yield event
        finally:
            self.pool.release(serving)

    def versions_changed(self) -> None:
        """The follower's `on_change`: wake requests waiting for a version (any thread)."""
        self._version_changed.notify()

    async def _caught_up(self, model: str) -> bool:
        """Whether this replica serves the newest version of `model` it heard of, waiting up
        to `version_wait_s` for that (on the loop: waiting holds no thread)."""
        deadline = time.monotonic() + self.args.version_wait_s
        seen = self._version_changed.seq
        while self._versions.lagging(model):
            if not await self._version_changed.wait_past(seen, deadline - time.monotonic()):
                return not self._versions.lagging(model)
            seen = self._version_changed.seq
        return True

    def _plan(self, job: CompletionJob, serving: ServingModel) -> RequestPlan:
        # Out of touch with the version actor, a newer version may exist: compute, trust no
        # cached answer, and store none.
        cached = job.params.is_deterministic and self._versions.in_contact()
        salt = self._tenant_salt(job.tenant)
        key = (
            completion_key(self.args.namespace, self._secret, job, serving.record, salt)
            if cached
            else None
        )
        tags = EntryTags(model=job.model, version=serving.version, tenant=job.tenant)
        owner = self._owner(job)
        placement = (
            result_placement(
                key,
                tags,
                owner.peer_address if owner else None,
                self.args.namespace if self._redis is not None else None,
            )
            if key is not None
            else Placement()
        )
        return RequestPlan(job, serving, key, tags, owner, placement, salt)

    async def _embedding(
        self, job: EmbeddingJob, serving: ServingModel, index: int
    ) -> EmbeddingOutcome:
        tokens = job.inputs[index]
        if not self._versions.in_contact():  # as for completions: trust and store nothing
            return (await self._compute_embedding(serving, tokens, None))[0]
        salt = self._tenant_salt(job.tenant)
        key = embedding_key(
            self.args.namespace, self._secret, salt, job.model, serving.record, tokens
        )
        tags = EntryTags(model=job.model, version=serving.version, tenant=job.tenant)
        identity = AnswerIdentity.of(key, tags)
        owner = self._owner_of(job.input_keys[index])
        placement = result_placement(
            key,
            tags,
            owner.peer_address if owner else None,
            self.args.namespace if self._redis is not None else None,
        )
        outcome, tier = await self.tiered.get_or_compute(
            key,
            placement,
            tags,
            lambda: self._compute_embedding(serving, tokens, identity),
            self._lookup_observer(job.model, job.tenant_label),
        )
        assert isinstance(outcome, EmbeddingOutcome)  # the key's kind decides the value's
        if tier is None:
            self._computed(job.model, job.tenant_label)
            return replace(outcome, cache_key=key)
        return replace(outcome, cache_key=key, cache_tier=tier)

    async def _compute_embedding(
        self, serving: ServingModel, tokens: tuple[int, ...], identity: AnswerIdentity | None
    ) -> tuple[EmbeddingOutcome, bytes]:
        serving.hold()
        running = self._generation.submit(serving.model.embed, tokens)
        running.add_done_callback(lambda _: self.pool.release(serving))
        vector = float32_bytes(await asyncio.wrap_future(running))
        outcome = EmbeddingOutcome(vector, len(tokens), serving.version, cache_tier=None)
        if identity is None:
            return outcome, b""
        return outcome, encode_embedding(vector, len(tokens), identity, self._secret)

    def _owner(self, job: CompletionJob) -> Member | None:
        return self._owner_of(job.routing_key)

    def _owner_of(self, routing_key: str | None) -> Member | None:
        if self._peer is None or not routing_key:
            return None
        owner = self._owners.owner(routing_key)
        if owner is None or owner.replica_id == self.replica_id:
            return None
        return owner

    async def _answer(self, plan: RequestPlan) -> CompletionOutcome:
        if plan.key is None:
            return (await self._compute(plan))[0]
        outcome, tier = await self.tiered.get_or_compute(
            plan.key,
            plan.placement,
            plan.tags,
            lambda: self._compute(plan),
            self._lookup_observer(plan.job.model, plan.job.tenant_label),
        )
        if tier is None:
            self._computed(plan.job.model, plan.job.tenant_label)
            return replace(outcome, cache_key=plan.key)
        return replace(outcome, cache_key=plan.key, cache_tier=tier, cached_tokens=0)

    async def _stream(self, plan: RequestPlan) -> AsyncIterator[StreamEvent]:
        answer: asyncio.Future[tuple[CompletionOutcome, object]]
        if plan.key is None:
            feed = TextFeed()
            answer = asyncio.ensure_future(self._compute(plan, feed))
        else:
            observer = self._lookup_observer(plan.job.model, plan.job.tenant_label)
            found = await self.tiered.lookup(plan.key, plan.placement, plan.tags, observer)
            if found is not None:
                outcome, tier = found
                for piece in split_pieces(outcome.text, outcome.pieces):
                    yield TextPiece(piece)
                yield StreamEnd(
                    replace(outcome, cache_key=plan.key, cache_tier=tier, cached_tokens=0)
                )
                return
            self._computed(plan.job.model, plan.job.tenant_label)
            # The feed of the computation in flight, or the one the computation started now
            # will adopt (`_compute`): no await between here and the start. A feed whose
            # computation left the flight (invalidated) is not followed.
            feed = self._feeds.get(plan.key) or TextFeed()
            if feed.adopted and not self.tiered.in_flight(plan.key):
                feed = TextFeed()
            self._feeds[plan.key] = feed
            answer = asyncio.ensure_future(
                self.tiered.compute_once(
                    plan.key,
                    plan.placement,
                    plan.tags,
                    lambda: self._compute(plan),
                    stop_when_abandoned=True,
                )
            )
        try:
            sent = 0
            while True:
                while sent < len(feed.pieces):
                    yield TextPiece(feed.pieces[sent])
                    sent += 1
                if answer.done():
                    break
                grown = asyncio.ensure_future(feed.grown_past(sent))
                await asyncio.wait({answer, grown}, return_when=asyncio.FIRST_COMPLETED)
                grown.cancel()
            outcome = answer.result()[0]
            # What the feed did not carry (a computation that ended before this stream
            # followed it), in the pieces it was generated in.
            delivered = sum(len(piece) for piece in feed.pieces[:sent])
            for piece in split_pieces(outcome.text, outcome.pieces, start=delivered):
                yield TextPiece(piece)
            yield StreamEnd(replace(outcome, cache_key=plan.key))
        finally:
            answer.cancel()
            if plan.key is not None and self._feeds.get(plan.key) is feed and not feed.adopted:
                del self._feeds[plan.key]

    async def _compute(
        self, plan: RequestPlan, feed: TextFeed | None = None
    ) -> tuple[CompletionOutcome, bytes]:
        """Generate the answer and its cached form, pushing its text to `feed` (for a cached
        key: the key's registered feed). When another replica owns the prompt, or Redis holds
        its prefix, the blocks past the local run are copied first, so that only the rest is
        prefilled here. Cancelled, it stops the generation."""
        if feed is None and plan.key is not None:
            # A feed another computation adopted belongs to that one (it left the flight when
            # an invalidation selected it): this computation gets its own.
            feed = self._feeds.get(plan.key)
            if feed is None or feed.adopted:
                feed = self._feeds[plan.key] = TextFeed()
        if feed is not None:
            feed.adopted = True
        try:
            return await self._generate_answer(plan, feed)
        finally:
            if plan.key is not None and self._feeds.get(plan.key) is feed:
                del self._feeds[plan.key]

    async def _generate_answer(
        self, plan: RequestPlan, feed: TextFeed | None
    ) -> tuple[CompletionOutcome, bytes]:
        model = plan.serving.model
        # Hashed here, once per computation: a hit needs no block hashes.
        chain = None
        if self.tiered_prefix is not None:
            block_size = self.tiered_prefix.cache.block_size
            chain = PromptChain.of(
                plan.job.prompt_tokens,
                block_size,
                self._scope(plan.tenant_salt, plan.serving.record),
                self._block_hash,
            )
            layout = BlockLayout(model.kv_block_shape(block_size), model.dtype, model.device)
            owner = plan.owner.blocks_address if plan.owner is not None else None
            fetched = await self.tiered_prefix.fetch(chain, layout, owner)
            self._observe_prefix_fetches(plan.job.model, fetched)
        # The computation holds the weights until its thread ends, not until its request
        # does: a cancelled request must not let the model be evicted or drained under it.
        stop = threading.Event()
        plan.serving.hold()
        running = self._generation.submit(self._generate, plan, chain, feed, stop)
        running.add_done_callback(lambda _: self.pool.release(plan.serving))
        try:
            generation, cached_tokens = await asyncio.wrap_future(running)
        except asyncio.CancelledError:
            stop.set()
            self.generations_stopped += 1
            raise
        if chain is not None and self.tiered_prefix is not None:
            self._observe_prefix(plan, cached_tokens, fetched, layout)
            if plan.key is not None:
                # Only a deterministic request's prompt goes to Redis: sampled requests, which
                # are never cached, cannot fill the shared tier with prompts nobody repeats.
                computed = len(plan.job.prompt_tokens) - cached_tokens
                self.tiered_prefix.share(chain, cached_tokens, computed)
            if plan.job.answer_end is not None:
                # Held from now, not from when the background task runs: the weights must not
                # be evicted or drained between the answer and its blocks.
                plan.serving.hold()
                self._in_background(
                    self._cache_answer(plan, chain, generation.text), "caching a chat answer"
                )
        created_at = time.time()
        outcome = CompletionOutcome(
            text=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=len(generation.tokens),
            cached_tokens=cached_tokens,
            model_version=plan.serving.version,
            cache_tier=None,
            pieces=cached_pieces(generation),  # as a local hit serves this outcome
            created_at=created_at,
        )
        if plan.key is None:
            return outcome, b""
        identity = AnswerIdentity(
            key=plan.key, tenant=plan.job.tenant, model=plan.job.model, version=plan.tags.version
        )
        return outcome, encode_answer(generation, identity, self._secret, created_at)

    def _observe_prefix(
        self,
        plan: RequestPlan,
        cached_tokens: int,
        fetched: PrefixTierCounters,
        layout: BlockLayout,
    ) -> None:
        """The prompt's tokens, and where its cached ones came from: blocks fetched from the
        owner and Redis for this computation, the rest from the local cache."""
        if self._metrics is None:
            return
        size = self.args.prefix_cache.block_size
        peer, redis = fetched.from_peers * size, fetched.from_redis * size
        cached = {
            "local": max(cached_tokens - peer - redis, 0),
            "peer": min(peer, cached_tokens),
            "redis": min(redis, max(cached_tokens - peer, 0)),
        }
        block_bytes = layout.shape.numel() * layout.dtype.itemsize
        self._metrics.prefix(
            plan.job.model,
            plan.job.tenant_label,
            len(plan.job.prompt_tokens),
            cached,
            {"peer": fetched.from_peers * block_bytes, "redis": fetched.from_redis * block_bytes},
        )

    def _observe_prefix_fetches(self, model: str, fetched: PrefixTierCounters) -> None:
        """How long each tier asked for a computation's prefix blocks took."""
        if self._metrics is None:
            return
        if fetched.peer_fetches:
            self._metrics.fetched_prefix("peer", model, fetched.peer_seconds)
        if fetched.redis_fetches:
            self._metrics.fetched_prefix("redis", model, fetched.redis_seconds)

    def _lookup_observer(self, model: str, tenant_label: str) -> LookupObserver | None:
        """What hears of each tier a request's result lookup asks (None without metrics)."""
        metrics = self._metrics
        if metrics is None:
            return None

        def heard(lookup: TierLookup) -> None:
            metrics.lookup(lookup.tier, lookup.hit, model, tenant_label)
            if lookup.seconds is not None:
                metrics.fetched_result(lookup.tier, model, lookup.seconds)

        return heard

    def _computed(self, model: str, tenant_label: str) -> None:
        if self._metrics is not None:
            self._metrics.computed(model, tenant_label)

    def _generate(
        self,
        plan: RequestPlan,
        chain: PromptChain | None,
        feed: TextFeed | None,
        stop: threading.Event,
    ) -> tuple[Generation, int]:
        """Generate (in a generation thread); the generation and its prefix-cached tokens."""
        job, model = plan.job, plan.serving.model
        tokenizer = self._tokenizers[job.model]
        on_text = feed.push_threadsafe if feed is not None else None
        if self.prefix is None or chain is None:
            generation = generate(
                model,
                tokenizer,
                job.prompt_tokens,
                job.params,
                on_text=on_text,
                should_stop=stop.is_set,
            )
            return generation, 0
        return generate_with_prefix_cache(
            model,
            tokenizer,
            job.prompt_tokens,
            job.params,
            self.prefix,
            chain.scope,
            hash_fn=self._block_hash,
            hashes=chain.hashes,
            on_text=on_text,
            should_stop=stop.is_set,
        )

    async def _cache_answer(self, plan: RequestPlan, prompt: PromptChain, answer: str) -> None:
        """Cache the blocks of a chat turn's prompt followed by its answer as the next turn
        sends it back (`answer_end`), and share them, in a generation thread. Releases the
        hold `_generate_answer` took on the weights; does nothing once they are retired (a
        version switch drops what they computed)."""
        assert self.prefix is not None and self.tiered_prefix is not None
        assert plan.job.answer_end is not None
        try:
            if plan.serving.retired:
                return
            tokenizer = self._tokenizers[plan.job.model]
            continuation = prompt_text(answer, self.args) + plan.job.answer_end
            tokens = list(plan.job.prompt_tokens)
            tokens += tokenizer.encode(continuation, add_special_tokens=False)
            tokens = tokens[: plan.serving.model.max_context]
            chain = PromptChain.of(tokens, self.prefix.block_size, prompt.scope, self._block_hash)
            if len(chain.hashes) == len(prompt.hashes):
                return  # the answer completes no block
            plan.serving.hold()  # for the thread, which may outlive this task
            running = self._generation.submit(
                cache_prompt_prefix,
                plan.serving.model,
                tokens,
                self.prefix,
                chain.scope,
                chain.hashes,
            )
            running.add_done_callback(lambda _: self.pool.release(plan.serving))
            await asyncio.wrap_future(running)
            if not plan.serving.retired and plan.key is not None:  # as in `_compute`
                # The answer's blocks were computed now; the prompt's were offered already.
                added = (len(chain.hashes) - len(prompt.hashes)) * self.prefix.block_size
                self.tiered_prefix.share(chain, 0, added)
        finally:
            self.pool.release(plan.serving)

    def _in_background(self, work: Any, what: str) -> None:
        """Run a coroutine that answers no request; its failure is logged as `what` failing."""
        task: asyncio.Task[None] = asyncio.ensure_future(work)
        self._background.add(task)

        def landed(task: asyncio.Task[None]) -> None:
            self._background.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.warning("%s failed", what, exc_info=task.exception())

        task.add_done_callback(landed)

    # -- versions and rules (the follower's thread) -------------------------------------------

    def apply_version(self, record: ModelVersion) -> None:
        """Switch `record.model` to `record`; raises when its weights do not load, and then
        nothing changed. Loaded: the new weights replace the old, whose requests are waited
        for. Not loaded: `record` is what its next load serves. Either way the model's cached
        entries of older weights are dropped."""
        old = self.pool.switch(record)
        self._drop_entries(record)
        if old is not None:
            if not old.wait_drained(DRAIN_TIMEOUT_S):
                logger.warning("requests on %s %s outlived the switch", record.model, old.version)
            # What the old weights' last requests stored while draining goes too.
            self._drop_entries(record)

    def _drop_entries(self, record: ModelVersion) -> None:
        """Drop every local result of `record.model` and its prefix blocks of other weights
        than `record`'s, and keep what computations of it in flight will answer from being
        stored (their weights are being retired)."""
        model = record.model
        dropped = self.tiered.invalidate(lambda _key, tags: tags.model == model)
        self.version_drops += dropped
        if self.prefix is not None:
            # The new weights' pinned prompts were warmed before the switch: they stay.
            dropped += self.prefix.invalidate(
                lambda extra: (
                    isinstance(extra, PrefixScope)
                    and extra.model_id == model
                    and extra.generation != record.generation
                )
            )
        logger.info("dropped %d cached entries of %s", dropped, model)

    def apply_rules(self, rules: list[InvalidationRule]) -> None:
        """Enforce invalidation `rules`: first for values fetched from peers and Redis, then
        by dropping matching local entries and keeping matching computations in flight from
        storing their answers."""
        self.rules.add(rules)
        self.rules.prune(time.time() - self.args.result_cache.longest_life_s())
        for rule in rules:
            self.tiered.invalidate(lambda key, tags, rule=rule: rule.matches(tags, key))
            if rule.key is None and self.prefix is not None:
                salt = None if rule.tenant is None else self._tenant_salt(rule.tenant)
                self.prefix.invalidate(
                    lambda extra, rule=rule, salt=salt: (
                        isinstance(extra, PrefixScope)
                        and (salt is None or extra.tenant == salt)
                        and rule.matches(
                            EntryTags(extra.model_id, extra.model_version, rule.tenant)
                        )
                    )
                )

    def _warm_up(self, serving: ServingModel) -> None:
        """Compute and pin the configured prompts of newly loaded weights (in the loading
        thread, before any request uses them)."""
        if self.prefix is None:
            return
        model = serving.record.model
        for pinned in self.args.prefix_cache.pinned:
            if pinned.model != model:
                continue
            scope = self._scope(self._tenant_salt(pinned.tenant), serving.record)
            tokens = self._tokenizers[model].encode(prompt_text(pinned.text, self.args))
            cached = warm_up_prefix(
                serving.model, tokens, self.prefix, scope, pin=True, hash_fn=self._block_hash
            )
            logger.info("pinned %d tokens of a system prompt for %s", cached, model)

    # -- statistics and shutdown --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """This replica's cache statistics in the `/v1/cache/stats` shape, but for what only
        the replica's shell knows (the ring, the follower's failures, refused peer calls)."""
        prefix = self.prefix.stats() if self.prefix is not None else None
        local = self.cache.stats()
        tiers = self.tiered.stats
        redis = self._redis.stats() if self._redis is not None else None
        blocks = self.tiered_prefix.counters if self.tiered_prefix is not None else None
        versions = {}
        for model, record in self.pool.records().items():
            loaded = self.pool.loaded(model)
            served = loaded.record if loaded is not None else record  # the weights in use
            versions[model] = {
                "version": served.version,
                "generation": served.generation,
                "lagging": self._versions.lagging(model),
            }
        cluster = {
            "versions": versions,
            "models": self.pool.stats().as_json(),
            "invalidation_rules": len(self.rules),
            "redis_breaker": redis.breaker_state if redis else "disabled",
            "redis_errors": redis.errors if redis else 0,
            "peer_fetch_ms": _mean_ms(tiers.peer.fetch_seconds, tiers.peer.fetches),
            "redis_fetch_ms": _mean_ms(tiers.redis.fetch_seconds, tiers.redis.fetches),
            "corrupt_values": tiers.peer.corrupt + tiers.redis.corrupt,
            "foreign_values": tiers.peer.foreign + tiers.redis.foreign,
            "tier_errors": tiers.peer.errors + tiers.redis.errors,
            "invalidated_in_flight": tiers.invalidated_in_flight,
            "peer_values_refused": self.peer_backend.rejected,
            "stale_values": tiers.peer.stale + tiers.redis.stale,
            "single_flight_waits": tiers.single_flight_waits,
            "stores_dropped": tiers.stores_dropped,
            "shared_writes_refused": self.write_budget.refused if self.write_budget else 0,
            "generations_stopped": self.generations_stopped,
            "expirations": local.expirations,
            # Entries dropped by invalidation rules; those of a version switch are apart.
            "invalidations": max(local.invalidations - self.version_drops, 0),
            "version_drops": self.version_drops,
            "prefix_blocks_from_peers": blocks.from_peers if blocks else 0,
            "prefix_blocks_from_redis": blocks.from_redis if blocks else 0,
        }
        counters = replica_stats(
            local=local,
            peer=tiers.peer.as_cache_stats(),
            redis=tiers.redis.as_cache_stats(),
            prefix_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_cached_tokens=prefix.cached_tokens if prefix else 0,
        )
        if prefix is not None:
            counters["prefix"].update(
                blocks=prefix.blocks, bytes=prefix.bytes, pinned_blocks=prefix.pinned_blocks
            )
        return {**counters, "cluster": cluster}

    async def close(self) -> None:
        """Stop the background work: stores, model loads, generation threads."""
        for task in list(self._background):
            task.cancel()
        await self.tiered.close()
        self.pool.close()
        self._generation.shutdown(wait=False, cancel_futures=True)

    # -- keys ---------------------------------------------------------------------------------

    def _tenant_salt(self, tenant: str) -> str:
        """What stands for `tenant` in keys and block hashes (derived from the cluster secret)."""
        salt = self._tenant_salts.get(tenant)
        if salt is None:
            salt = self._tenant_salts[tenant] = self._secret.tenant_salt(tenant)
        return salt

    def _scope(self, tenant_salt: str, weights: ModelVersion) -> PrefixScope:
        return PrefixScope(
            tenant=tenant_salt,
            model_id=weights.model,
            model_version=weights.version,
            generation=weights.generation,
        )


def _mean_ms(seconds: float, count: int) -> float:
    return 1000 * seconds / count if count else 0.0
