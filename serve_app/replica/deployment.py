"""The model replica's Ray Serve shell over `ReplicaCore`.

`ModelReplica` wires the core into the cluster: the cluster secret handed out through Ray, the
peer server other replicas fetch from, membership in the directory (whose ring names every
key's owner, for this replica and for the router alike), the Redis tier, and the
`VersionFollower` that applies published versions and rules through the core before the version
actor counts this replica as acknowledged. Requests go straight to `ReplicaCore.complete`.

Versions: at start-up the replica publishes its configured versions (a no-op when they are
current; refused, and followed instead, when a newer one was published since) and serves the
current ones. `reconfigure` publishes the versions of the deployment's `user_config` through
the same actor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import ray
import torch
from ray import serve
from ray.serve import metrics as serve_metrics

from cluster.ray_secret import shared_secret
from cluster.sharing.directory import Member, ReplicaId
from cluster.sharing.membership import Membership
from cluster.sharing.peer import PeerClient, PeerServer
from cluster.sharing.redis_store import RedisStore
from cluster.versions.actor import version_actor
from cluster.versions.follower import VersionFollower
from cluster.versions.records import ModelVersion, VersionRegression
from cluster.versions.store import VersionStore
from serve_app.api.admin import publish_update
from serve_app.api.completions import CompletionJob, CompletionOutcome
from serve_app.api.embeddings import EmbeddingJob, EmbeddingOutcome
from serve_app.config import AppArgs, ModelSpec, parse_args, parse_user_config
from serve_app.models import CausalLM
from serve_app.models.loading import (
    check_weights,
    load_model,
    load_tokenizer,
    weight_bytes_estimate,
)
from serve_app.replica.core import ReplicaCore
from serve_app.replica.metrics import ReplicaMetrics
from serve_app.replica.serving import config_version, weights_spec
from serve_app.replica.streaming import StreamEvent

logger = logging.getLogger(__name__)

RECONFIGURE_TIMEOUT_S = 60.0


@serve.deployment(name="ModelReplica")
class ModelReplica:
    """Serves every configured model; see `ReplicaCore.complete`."""

    # Serve awaits an async constructor on the replica's event loop, where the peer server
    # must run; instantiating the class any other way is not supported.
    async def __init__(self, args: dict[str, Any]) -> None:  # type: ignore[misc]
        self._args: AppArgs = parse_args(args).with_environment()
        torch.set_num_threads(self._args.torch_threads)
        # Parsing a tokenizer file reads MiBs: in a worker thread, off the replica's loop.
        tokenizers = await asyncio.to_thread(
            lambda: {spec.id: load_tokenizer(spec) for spec in self._args.models}
        )
        secret = await asyncio.to_thread(
            shared_secret, self._args.namespace, self._args.configured_secret()
        )
        self._specs = {spec.id: spec for spec in self._args.models}
        replica_id = ReplicaId(serve.get_replica_context().replica_id.unique_id)
        self._version_actor = version_actor(
            self._args.namespace,
            self._args.redis_url,
            secret.records,
            rule_lifetime_s=self._args.result_cache.longest_life_s(),
        )
        current = await self._startup_versions()
        self._redis = RedisStore(self._args.redis_url) if self._args.redis_url else None
        self._peer_client = PeerClient(secret.peer) if self._args.peer.enabled else None
        self._metrics = ReplicaMetrics(serve_metrics)
        self._core = ReplicaCore(
            self._args,
            secret,
            replica_id,
            tokenizers,
            current,
            load_weights=self._load,
            estimate_bytes=lambda model: weight_bytes_estimate(self._specs[model]),
            check_weights=lambda record: check_weights(self._weights_spec(record)),
            peer=self._peer_client,
            redis=self._redis,
            metrics=self._metrics,
        )
        await self._core.start()
        self._peer_server = PeerServer(self._core.peer_backend, secret.peer)
        # The node's own address, not 0.0.0.0: peers reach it, other networks of the host do not.
        peer_address = await self._peer_server.start(host=ray.util.get_node_ip_address(), port=0)
        self._membership = Membership(
            namespace=self._args.namespace,
            member=Member(
                replica_id,
                node_id=str(ray.get_runtime_context().get_node_id()),
                peer_address=peer_address,
                blocks_address=self._peer_server.blocks_address or "",
            ),
            stats=self._report,
            interval_s=self._args.stats_interval_s,
        )
        self._membership.start()
        self._version_store = (
            VersionStore(self._args.redis_url, self._args.namespace, secret.records)
            if self._args.redis_url
            else None
        )
        self._follower = VersionFollower(
            replica_id,
            actor=lambda: self._version_actor,
            initial=current,
            apply_version=self._core.apply_version,
            apply_rules=self._core.apply_rules,
            store=self._version_store,
            on_change=self._core.versions_changed,
        )
        self._core.connect(owners=self._membership, versions=self._follower)
        self._follower.start()
        logger.info(
            "replica %s serves %s",
            replica_id,
            {model: record.version for model, record in current.items()},
        )

    async def complete(self, job: CompletionJob) -> CompletionOutcome:
        """Answer `job` (see `ReplicaCore.complete`)."""
        return await self._core.complete(job)

    async def embed(self, job: EmbeddingJob) -> list[EmbeddingOutcome]:
        """Embed each input of `job` (see `ReplicaCore.embed`)."""
        return await self._core.embed(job)

    async def stream(self, job: CompletionJob) -> AsyncIterator[StreamEvent]:
        """Answer `job` as events (see `ReplicaCore.stream`); call through
        `handle.options(stream=True)`. Cancelling the call stops what only it waits for."""
        async for event in self._core.stream(job):
            yield event

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

    def stats(self) -> dict[str, Any]:
        """This replica's cache statistics in the `/v1/cache/stats` shape."""
        core = getattr(self, "_core", None)
        if core is None:
            return {}
        stats = core.stats()
        snapshot = self._membership.snapshot if hasattr(self, "_membership") else None
        follower = getattr(self, "_follower", None)
        store = getattr(self, "_version_store", None)
        stats["cluster"].update(
            {
                "version_failures": {
                    model: error
                    for model, (_, error) in (follower.failures() if follower else {}).items()
                },
                "node_id": str(ray.get_runtime_context().get_node_id()),
                "pid": os.getpid(),
                "ring_size": len(snapshot.members) if snapshot else 0,
                "ring_version": snapshot.version if snapshot else None,
                "version_records_refused": store.rejected_records if store else 0,
                "peer_calls_refused": self._peer_server.rejected_calls
                if hasattr(self, "_peer_server")
                else 0,
            }
        )
        return stats

    def _report(self) -> dict[str, Any]:
        """The statistics the replica reports to the directory, exported as metrics too."""
        stats = self.stats()
        if stats:
            self._metrics.report(stats)
        return stats

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

    def _load(self, record: ModelVersion) -> CausalLM:
        """The weights of `record` (blocking: model loading reads files and builds tensors)."""
        return load_model(self._weights_spec(record))

    def _weights_spec(self, record: ModelVersion) -> ModelSpec:
        return weights_spec(self._specs[record.model], record, self._args.checkpoint_dir)

    async def __del__(self) -> None:
        """Serve's shutdown hook: leave the ring, stop serving peers, close connections."""
        # Both stops make blocking actor calls: in worker threads, off the event loop.
        for stopping in (getattr(self, "_membership", None), getattr(self, "_follower", None)):
            if stopping is not None:
                await asyncio.to_thread(stopping.stop)
        core = getattr(self, "_core", None)
        if core is not None:
            await core.close()
        for closing in (getattr(self, "_peer_client", None), getattr(self, "_redis", None)):
            if closing is not None:
                await closing.close()
        server = getattr(self, "_peer_server", None)
        if server is not None:
            await server.stop(grace_s=0.5)
