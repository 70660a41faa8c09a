"""Strict validation of a Serve config file that runs raycache.

Ray Serve validates a config file with its own schema but ignores keys it does not know, so a
misspelt `max_ongoing_request` or `num_replica` silently takes the default. This module checks
the file against Serve's schema, rejects every unknown key at any depth, and validates the
raycache application's `args` (and the `ModelReplica` deployment's `user_config`) with
`serve_app.config`:

    python -m serve_app.config_file configs/cluster.yaml
"""

from __future__ import annotations

import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import ConfigError, parse_args, parse_user_config
from serve_app.router import DEFAULT_NAMESPACE

RAYCACHE_IMPORT_PATH = "serve_app.app:build_app"
ROUTER_CLASS = "serve_app.router:CacheAffinityRouter"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation can hold (through Optional, list, dict)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _is_mapping_of_models(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_is_mapping_of_models(arg) for arg in typing.get_args(annotation))
    args = typing.get_args(annotation)
    return origin in (dict, Mapping) and bool(args) and bool(_models_in(args[-1]))


def unknown_keys(raw: object, model: type[BaseModel], path: str = "") -> list[str]:
    """Dotted paths of keys in `raw` that `model` (recursively) does not declare.

    Free-form fields (`args`, `user_config`, `runtime_env`, ...) are dicts in Serve's schema,
    not models, so their contents are not checked here.
    """
    if not isinstance(raw, Mapping):
        return []
    fields = model.model_fields
    by_name = {name: name for name in fields}
    by_name.update({f.alias: name for name, f in fields.items() if f.alias})
    problems = []
    for key, value in raw.items():
        where = f"{path}.{key}" if path else str(key)
        name = by_name.get(key)
        if name is None:
            problems.append(where)
            continue
        annotation = fields[name].annotation
        nested = _models_in(annotation)
        if not nested:
            continue
        if _is_mapping_of_models(annotation) and isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                problems.extend(unknown_keys(sub_value, nested[0], f"{where}.{sub_key}"))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                problems.extend(unknown_keys(item, nested[0], f"{where}[{index}]"))
        else:
            problems.extend(unknown_keys(value, nested[0], where))
    return problems


def validate_config(raw: Mapping[str, Any]) -> list[str]:
    """Every problem found in a parsed Serve config; empty when it is valid."""
    try:
        ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        return [f"serve schema: {exc}"]
    problems = [f"{where}: unknown key" for where in unknown_keys(raw, ServeDeploySchema)]
    for index, app in enumerate(raw.get("applications", [])):
        if app.get("import_path") != RAYCACHE_IMPORT_PATH:
            continue
        try:
            args = parse_args(app.get("args"))
        except ConfigError as exc:
            problems.append(f"applications[{index}].args: {exc}")
            continue
        for deployment in app.get("deployments", []):
            if deployment.get("name") != "ModelReplica":
                continue
            where = f"applications[{index}].deployments.ModelReplica"
            problems.extend(_router_problems(deployment, args.namespace, where))
            if "user_config" not in deployment:
                continue
            try:
                parse_user_config(deployment["user_config"], args)
            except ConfigError as exc:
                problems.append(f"{where}: {exc}")
    return problems


def _router_problems(deployment: Mapping[str, Any], namespace: str, where: str) -> list[str]:
    """The cache-affinity router follows the ring of its `namespace`: it must be the app's."""
    config = deployment.get("request_router_config") or {}
    if config.get("request_router_class") != ROUTER_CLASS:
        return []
    routed = (config.get("request_router_kwargs") or {}).get("namespace", DEFAULT_NAMESPACE)
    if routed == namespace:
        return []
    return [
        f"{where}.request_router_config.request_router_kwargs.namespace: {routed!r} is not the "
        f"application's namespace {namespace!r} (the router follows that namespace's ring)"
    ]


def validate_config_file(path: str | Path) -> list[str]:
    """`validate_config` of the YAML file at `path`."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, Mapping):
        return [f"{path}: not a YAML mapping"]
    return validate_config(raw)


def main(argv: list[str]) -> int:
    """Validate each file named in `argv`; exit status 1 when any has a problem."""
    status = 0
    for path in argv:
        problems = validate_config_file(path)
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        status |= bool(problems)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
