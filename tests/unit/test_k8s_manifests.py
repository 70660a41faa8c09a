"""The Kubernetes manifests in k8s/ agree with KubeRay, Ray Serve, the app and each other.

Pure: the files are only parsed, against the KubeRay v1.7.0 CRD vendored in tests/data/kuberay/
(see its SOURCE.md) and Ray Serve's own config schema; nothing talks to a cluster.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import REDIS_URL_ENV, parse_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRD = ROOT / "tests" / "data" / "kuberay" / "ray.io_rayservices.v1.7.0.yaml"

Manifest = dict[str, Any]


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of `path`."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def only(documents: list[Manifest], kind: str) -> Manifest:
    """The single document of `kind`."""
    matches = [doc for doc in documents if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {len(matches)}"
    return matches[0]


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with unknown fields rejected, as strict field validation on the API server does.

    Without it (kubectl asks for it by default, other clients may not) the API server prunes
    unknown fields silently: a misspelt `serveConfigv2` would leave a RayService with no serve
    config. The CRD never says `additionalProperties: false`; Kubernetes treats every field
    outside `properties` as unknown unless `x-kubernetes-preserve-unknown-fields` is set.
    Int-or-string and nullable, which JSON Schema lacks, become lists of types.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(sub) for name, sub in out["properties"].items()}
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = closed(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [closed(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if out.get("nullable") and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def schema_errors(rayservice: Manifest) -> list[str]:
    """Every way `rayservice` breaks the closed CRD schema, as `path: message`."""
    return [
        f"{error.json_path}: {error.message}" for error in RAYSERVICE_SCHEMA.iter_errors(rayservice)
    ]


def crd_validator() -> jsonschema.Draft7Validator:
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [version for version in crd["spec"]["versions"] if version["name"] == "v1"]
    schema = closed(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


RAYSERVICE_SCHEMA = crd_validator()
RAYSERVICE_DOCS = load_documents(K8S / "rayservice.yaml")
REDIS_DOCS = load_documents(K8S / "redis.yaml")
RAYSERVICE = only(RAYSERVICE_DOCS, "RayService")
CLUSTER = RAYSERVICE["spec"]["rayClusterConfig"]
SERVE_CONFIG = yaml.safe_load(RAYSERVICE["spec"]["serveConfigV2"])
SECRETS = {
    doc["metadata"]["name"]: doc for doc in RAYSERVICE_DOCS + REDIS_DOCS if doc["kind"] == "Secret"
}


def ray_containers(cluster: Manifest) -> dict[str, Manifest]:
    """The Ray container of the head and of each worker group, by group.

    KubeRay runs Ray in the first container of each pod; the others are sidecars.
    """
    groups = {"head": cluster["headGroupSpec"]}
    groups |= {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    return {name: group["template"]["spec"]["containers"][0] for name, group in groups.items()}


def head_container(rayservice: Manifest) -> Manifest:
    return ray_containers(rayservice["spec"]["rayClusterConfig"])["head"]


def resolved_env(container: Manifest, secret_value: Callable[[str, str], str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it.

    `secretKeyRef`s are read through `secret_value(name, key)`, and `$(VAR)` in a value is
    replaced by the variable of that name defined earlier in the list (left as is otherwise).
    """
    env: dict[str, str] = {}
    for var in container.get("env", []):
        secret_ref = var.get("valueFrom", {}).get("secretKeyRef")
        if secret_ref is not None:
            env[var["name"]] = secret_value(secret_ref["name"], secret_ref["key"])
        elif "value" in var:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda ref: env.get(ref[1], ref[0]), var["value"]
            )
    return env


def secret_marker(name: str, key: str) -> str:
    """A stand-in for key `key` of Secret `name` that shows where a value came from.

    Fails when the manifests hold no such Secret and key, as the kubelet would.
    """
    assert key in SECRETS[name]["stringData"], f"Secret {name} has no key {key}"
    return f"secret.{name}.{key}"


def without_redis_url(config: dict[str, Any]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for app in config["applications"]:
        app["args"].pop("redis_url", None)
    return config


# --- the RayService against the CRD ---------------------------------------------------------


def test_rayservice_satisfies_the_crd_schema() -> None:
    assert schema_errors(RAYSERVICE) == []


def misspell_serve_config(rayservice: Manifest) -> None:
    rayservice["spec"]["serveConfigv2"] = rayservice["spec"].pop("serveConfigV2")


def misspell_container_field(rayservice: Manifest) -> None:
    head_container(rayservice)["imagePullPolice"] = "Always"


def give_replicas_as_string(rayservice: Manifest) -> None:
    rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replicas"] = "2"


def give_ray_start_param_as_number(rayservice: Manifest) -> None:
    # rayStartParams values are strings; YAML reads an unquoted `num-cpus: 0` as a number.
    rayservice["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


@pytest.mark.parametrize(
    ("mistake", "reported"),
    [
        (misspell_serve_config, "'serveConfigv2' was unexpected"),
        (misspell_container_field, "'imagePullPolice' was unexpected"),
        (give_replicas_as_string, "workerGroupSpecs[0].replicas: '2' is not of type 'integer'"),
        (give_ray_start_param_as_number, "rayStartParams['num-cpus']: 0 is not of type 'string'"),
    ],
    ids=["misspelt-spec-field", "misspelt-pod-field", "string-for-int", "int-for-string"],
)
def test_schema_rejects_unknown_fields_and_wrong_types(
    mistake: Callable[[Manifest], None], reported: str
) -> None:
    broken = copy.deepcopy(RAYSERVICE)
    mistake(broken)
    errors = schema_errors(broken)
    assert any(reported in error for error in errors), errors


@pytest.mark.parametrize("cpu", [2, "2", "1500m"])
def test_schema_takes_quantities_as_int_or_string(cpu: int | str) -> None:
    rayservice = copy.deepcopy(RAYSERVICE)
    head_container(rayservice)["resources"]["limits"]["cpu"] = cpu
    assert schema_errors(rayservice) == []


def test_rayservice_follows_kuberay_rules_beyond_the_schema() -> None:
    assert len(RAYSERVICE["metadata"]["name"]) <= 47
    ports = {port["name"]: port["containerPort"] for port in head_container(RAYSERVICE)["ports"]}
    assert ports["serve"] == 8000
    assert ports["serve-grpc"] == 9000
    assert ports["gcs-server"] == 6379
    assert ports["dashboard"] == 8265
    assert ports["client"] == 10001


def test_token_auth_comes_from_a_secret_in_the_manifests() -> None:
    auth = CLUSTER["authOptions"]
    # KubeRay enables auth only for an explicit "token"; an omitted mode means disabled.
    assert auth["mode"] == "token"
    assert "auth_token" in SECRETS[auth["secretName"]]["stringData"]
    for group, container in ray_containers(CLUSTER).items():
        own = {var["name"] for var in container.get("env", [])}
        # KubeRay injects these only where absent: one set by hand would override authOptions.
        assert not own & {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}, group


# --- the serve config inside the RayService ---------------------------------------------------


def test_serve_config_is_complete_for_ray_serve() -> None:
    parsed = ServeDeploySchema.model_validate(SERVE_CONFIG)
    # Serve ignores unknown keys silently; a round trip that loses nothing proves there are none.
    assert parsed.model_dump(mode="json", exclude_unset=True) == SERVE_CONFIG


def test_serve_config_is_the_one_of_configs_cluster_yaml() -> None:
    # redis_url alone may differ: 127.0.0.1 means nothing in a pod, and the pods' real URL
    # carries the Redis password, so it reaches them through RAYCACHE_REDIS_URL instead.
    on_one_machine = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    assert without_redis_url(SERVE_CONFIG) == without_redis_url(on_one_machine)


def test_serve_config_args_are_valid_and_name_the_redis_service() -> None:
    services = {doc["metadata"]["name"] for doc in REDIS_DOCS if doc["kind"] == "Service"}
    for app in SERVE_CONFIG["applications"]:
        args = parse_args(app["args"])
        assert args.redis_url is not None
        assert urlsplit(args.redis_url).hostname in services


# --- how the pods reach Redis -----------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(ray_containers(CLUSTER)))
def test_every_ray_container_gets_the_redis_url_from_the_secret(group: str) -> None:
    redis_secret = only(REDIS_DOCS, "Secret")["metadata"]["name"]
    service = only(REDIS_DOCS, "Service")
    env = resolved_env(ray_containers(CLUSTER)[group], secret_marker)

    url = urlsplit(env[REDIS_URL_ENV])
    assert url.scheme in ("redis", "rediss")
    assert url.password == secret_marker(redis_secret, "password")
    assert url.hostname == service["metadata"]["name"]
    assert url.port in {port["port"] for port in service["spec"]["ports"]}
    for app in SERVE_CONFIG["applications"]:
        assert parse_args(app["args"]).with_environment(env).redis_url == env[REDIS_URL_ENV]


# --- the image --------------------------------------------------------------------------------


def test_image_matches_ray_version_python_and_project() -> None:
    dockerfile = (K8S / "Dockerfile").read_text()
    base = re.findall(r"^FROM\s+(\S+)", dockerfile, flags=re.MULTILINE)[-1]
    repository, tag = base.rsplit(":", 1)
    assert repository == "rayproject/ray"
    ray_version, python, *_ = tag.split("-")
    assert ray_version == CLUSTER["rayVersion"]
    assert python == "py311"

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"ray[serve]=={CLUSTER['rayVersion']}" in project["dependencies"]
    for group, container in ray_containers(CLUSTER).items():
        assert container["image"] == f"raycache:{project['version']}", group


# --- Redis ------------------------------------------------------------------------------------


def test_redis_manifests_hold_a_secret_deployment_and_service() -> None:
    assert sorted(doc["kind"] for doc in REDIS_DOCS) == ["Deployment", "Secret", "Service"]
    assert only(REDIS_DOCS, "Service")["metadata"]["name"] == "raycache-redis"


def test_redis_password_comes_from_the_secret() -> None:
    secret = only(REDIS_DOCS, "Secret")["metadata"]["name"]
    (container,) = only(REDIS_DOCS, "Deployment")["spec"]["template"]["spec"]["containers"]
    env = resolved_env(container, secret_marker)
    password = secret_marker(secret, "password")

    (password_var,) = [name for name, value in env.items() if value == password]
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == f"$({password_var})"
    for probe in ("readinessProbe", "livenessProbe"):
        command = " ".join(container[probe]["exec"]["command"])
        assert "redis-cli" in command
        assert "ping" in command
        assert f"${password_var}" in command, probe


def test_redis_evicts_only_keys_with_a_ttl_so_never_the_version_records() -> None:
    (container,) = only(REDIS_DOCS, "Deployment")["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--maxmemory-policy") + 1].startswith("volatile-")


def test_redis_service_selects_the_deployment_pods() -> None:
    deployment = only(REDIS_DOCS, "Deployment")
    service = only(REDIS_DOCS, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    container_ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in container_ports or target in container_ports.values()
