"""Deploying the raycache application into the test session's Ray cluster from Python."""

from __future__ import annotations

from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from cluster.sharing.directory_actor import directory_actor
from serve_app.api.ingress import Ingress
from serve_app.config import parse_args
from serve_app.replica.deployment import ModelReplica
from tests.support.processes import serve_grpc_options, serve_http_port, wait_until


def deploy(
    name: str, args: dict[str, Any], replicas: int = 2, user_config: dict | None = None
) -> None:
    """The application with `replicas` model replicas, as configs/cluster.yaml deploys it,
    under app name and route prefix `name`; returns once every replica is in the directory."""
    if not _serve_running():
        serve.start(
            http_options={"host": "127.0.0.1", "port": serve_http_port()},
            grpc_options=serve_grpc_options(),
        )
    validated = parse_args(args).model_dump(mode="json")
    options: dict[str, Any] = {
        "num_replicas": replicas,
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 0.1},
        "request_router_config": RequestRouterConfig(
            request_router_class="serve_app.router:CacheAffinityRouter",
            request_router_kwargs={"namespace": validated["namespace"]},
        ),
    }
    if user_config is not None:
        options["user_config"] = user_config
    model_replicas = ModelReplica.options(**options)
    ingress = Ingress.options(num_replicas=1, ray_actor_options={"num_cpus": 0.02})
    serve.run(
        ingress.bind(model_replicas.bind(validated), validated), name=name, route_prefix=f"/{name}"
    )
    directory = directory_actor(args["namespace"])
    wait_until(
        lambda: len(ray.get(directory.members.remote())) == replicas,
        60,
        f"{name}: {replicas} members",
        0.2,
    )


def _serve_running() -> bool:
    try:
        serve.context._get_global_client()
        return True
    except Exception:
        return False
