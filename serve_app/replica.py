"""The model replica: the models, the local result cache, and membership in the directory.

`ModelReplica.complete` answers a validated `CompletionJob`: from the local result cache when
the request is deterministic and was answered before, otherwise by generating (in a worker
thread, so the replica's event loop keeps serving hits) and caching the answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import ray
import torch
from ray import serve

from cluster.block_hashes import PrefixScope, blake2b_256, keyed_blake2b_256
from cluster.codec import CodecError
from cluster.directory import Member, ReplicaId
from cluster.keys import RequestIdentity, ResultKey, result_key
from cluster.membership import Membership
from cluster.prefix_cache import PrefixCache
from cluster.result_cache import EntryTags, ResultCache
from serve_app.answers import decode_answer, encode_answer
from serve_app.completions import CompletionJob, CompletionOutcome
from serve_app.config import AppArgs, parse_args, prompt_text
from serve_app.errors import ModelNotFound
from serve_app.models import ByteTokenizer, CausalLM, Generation, SamplingParams, generate
from serve_app.models.loading import load_model
from serve_app.prefix_generation import generate_with_prefix_cache, warm_up_prefix
from serve_app.stats import replica_stats

logger = logging.getLogger(__name__)

COMPLETION_KIND = "completion"


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


@serve.deployment(name="ModelReplica")
class ModelReplica:
    """Serves every configured model; see `complete`."""

    def __init__(self, args: dict[str, Any]) -> None:
        self._args: AppArgs = parse_args(args).with_environment()
        torch.set_num_threads(self._args.torch_threads)
        self._tokenizer = ByteTokenizer()
        self._secret = self._args.secret_bytes()
        # BLAKE2b takes a key of at most 64 bytes: key it with a digest of the secret.
        self._key_secret = (
            hashlib.blake2b(self._secret, digest_size=32).digest() if self._secret else b""
        )
        self._block_hash = keyed_blake2b_256(self._key_secret) if self._secret else blake2b_256
        self._models: dict[str, CausalLM] = {
            spec.id: load_model(spec) for spec in self._args.models
        }
        self._versions = {spec.id: spec.version for spec in self._args.models}
        settings = self._args.result_cache
        self._cache = ResultCache(
            max_bytes=settings.max_bytes,
            max_entries=settings.max_entries,
            policy=settings.policy,
            ttl_s=settings.ttl_s,
            ttl_jitter=settings.ttl_jitter,
        )
        self._prefix = self._build_prefix_cache()
        self._replica_id = ReplicaId(serve.get_replica_context().replica_id.unique_id)
        self._membership = Membership(
            namespace=self._args.namespace,
            member=Member(replica_id=self._replica_id, node_id=_node_id()),
            stats=self.stats,
            interval_s=self._args.stats_interval_s,
        )
        self._membership.start()
        logger.info("replica %s serves %s", self._replica_id, sorted(self._models))

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Answer `job`, from the local cache when it is deterministic and was seen before."""
        model = self._models.get(job.model)
        if model is None:
            raise ModelNotFound(f"model {job.model!r} is not served", param="model")
        version = self._versions[job.model]
        key = None
        if job.params.is_deterministic:
            key = self._key(job, version)
            blob = self._cache.get(key)
            if blob is not None:
                try:
                    return decode_answer(blob, tier="local", secret=self._secret)
                except CodecError:
                    logger.warning("dropping an undecodable local entry %s", key)
                    self._cache.pop(key)
        generation, cached_tokens = await asyncio.to_thread(self._generate, model, job, version)
        if key is not None:
            tags = EntryTags(model=job.model, version=version, tenant=job.tenant)
            answer = encode_answer(generation, job.model, version, secret=self._secret)
            self._cache.put(key, answer, tags)
        return CompletionOutcome(
            text=generation.text,
            finish_reason=generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=len(generation.tokens),
            cached_tokens=cached_tokens,
            model_version=version,
            cache_tier=None,
        )

    def stats(self) -> dict[str, Any]:
        """This replica's cache statistics in the `/v1/cache/stats` shape."""
        prefix = self._prefix.stats() if self._prefix is not None else None
        return replica_stats(
            local=self._cache.stats(),
            prefix_queried_tokens=prefix.queried_tokens if prefix else 0,
            prefix_cached_tokens=prefix.cached_tokens if prefix else 0,
        )

    def _generate(
        self, model: CausalLM, job: CompletionJob, version: str
    ) -> tuple[Generation, int]:
        """Generate in a worker thread; returns the generation and its prefix-cached tokens."""
        if self._prefix is None:
            return generate(model, self._tokenizer, job.prompt_tokens, job.params), 0
        scope = PrefixScope(tenant=job.tenant, model_id=job.model, model_version=version)
        return generate_with_prefix_cache(
            model,
            self._tokenizer,
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
        for pinned in settings.pinned:
            scope = PrefixScope(pinned.tenant, pinned.model, self._versions[pinned.model])
            tokens = self._tokenizer.encode(prompt_text(pinned.text, self._args))
            cached = warm_up_prefix(
                self._models[pinned.model], tokens, cache, scope, pin=True, hash_fn=self._block_hash
            )
            logger.info("pinned %d tokens of a system prompt for %s", cached, pinned.model)
        return cache

    def __del__(self) -> None:
        membership = getattr(self, "_membership", None)
        if membership is not None:
            membership.stop()

    def _key(self, job: CompletionJob, version: str) -> ResultKey:
        identity = RequestIdentity(
            namespace=self._args.namespace,
            tenant=job.tenant,
            model_id=job.model,
            model_version=version,
            kind=COMPLETION_KIND,
        )
        return result_key(
            identity, list(job.prompt_tokens), cache_params(job.params), self._key_secret
        )


def _node_id() -> str:
    return str(ray.get_runtime_context().get_node_id())
