"""The application entry named in configs/cluster.yaml: `serve_app.app:build_app`."""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serve_app.api.ingress import Ingress
from serve_app.config import parse_args
from serve_app.replica.deployment import ModelReplica


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The raycache application for the `args` of a Serve config file.

    Raises `ConfigError` naming every unknown or invalid key, before anything is deployed.
    Deployment options (replicas, CPUs, `max_ongoing_requests`) come from the config file's
    `deployments` section, not from here.
    """
    validated = parse_args(args).model_dump(mode="json")
    return Ingress.bind(ModelReplica.bind(validated), validated)
