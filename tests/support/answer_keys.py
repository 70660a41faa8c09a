"""Where the running application keeps an answer in Redis, computed as a replica computes it
(the tests drive the cluster: they read its secret and its current version as a replica does)."""

from __future__ import annotations

from typing import Any

import ray

from cluster.ray_secret import shared_secret
from cluster.sharing.directory_actor import ACTOR_NAMESPACE
from cluster.sharing.redis_store import redis_key
from cluster.versions.records import ModelVersion
from serve_app.api.completions import CompletionJob, parse_completion_request
from serve_app.models import ByteTokenizer
from serve_app.replica.answers import completion_key


def serving_version(namespace: str, model: str) -> ModelVersion:
    """The record of `model` the replicas serve: its generation enters the result keys."""
    versions = ray.get_actor(f"versions-{namespace}", namespace=ACTOR_NAMESPACE)
    return ray.get(versions.current.remote())[model]


def answer_redis_key(running_app: Any, tenant: str, body: dict[str, object]) -> str:
    """The Redis key the replicas look the answer to completion `body` up under for `tenant`."""
    namespace = running_app.app_args()["namespace"]
    request = parse_completion_request(body)
    job = CompletionJob(
        model=request.model,
        tenant=tenant,
        prompt_tokens=tuple(ByteTokenizer().encode(request.prompt)),
        params=request.sampling_params(),
    )
    record = serving_version(namespace, request.model)
    key = completion_key(namespace, shared_secret(namespace, None), job, record)
    return redis_key(namespace, request.model, record.version, "r", key)
