"""The application's args and the strict check of Serve config files."""

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs, ConfigError, parse_args
from serve_app.config_file import validate_config, validate_config_file

ROOT = Path(__file__).resolve().parents[3]
CLUSTER_YAML = ROOT / "configs" / "cluster.yaml"


def load_cluster_yaml() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_defaults_are_valid():
    args = parse_args({})
    assert args.models[0].id == "tiny-gpt"
    assert args.redis_url is None


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"result_cache\.max_byte: unknown key"):
        parse_args({"result_cache": {"max_byte": 10}})


def test_bad_value_quotes_the_value():
    with pytest.raises(ConfigError, match=r"models\.0\.n_layers.*-3"):
        parse_args({"models": [{"id": "m", "n_layers": -3}]})


def test_heads_must_divide_width():
    with pytest.raises(ConfigError, match="multiple of n_heads"):
        parse_args({"models": [{"id": "m", "d_model": 100, "n_heads": 3}]})


def test_duplicate_model_ids_are_rejected():
    with pytest.raises(ConfigError, match="duplicate"):
        parse_args({"models": [{"id": "m"}, {"id": "m"}]})


def test_environment_overrides_the_file():
    args = parse_args({"redis_url": "redis://file:6379", "admin_token": "from-file-0123456789"})
    overridden = args.with_environment(
        {"RAYCACHE_REDIS_URL": "redis://env:1", "RAYCACHE_ADMIN_TOKEN": "from-env-0123456789"}
    )
    assert (overridden.redis_url, overridden.admin_token) == (
        "redis://env:1",
        "from-env-0123456789",
    )
    assert args.with_environment({}).redis_url == "redis://file:6379"
    assert args.with_environment({"RAYCACHE_REDIS_URL": ""}).redis_url is None


def test_args_survive_a_json_round_trip():
    """build_app hands the validated args to deployments as plain JSON."""
    args = parse_args(load_cluster_yaml()["applications"][0]["args"])
    assert AppArgs.model_validate(args.model_dump(mode="json")) == args


def test_cluster_yaml_passes_serves_own_schema():
    config = ServeDeploySchema.model_validate(load_cluster_yaml())
    app = config.applications[0]
    assert app.import_path == "serve_app.app:build_app"
    assert config.http_options.port == 8000
    deployments = {d.name: d for d in app.deployments}
    assert deployments["ModelReplica"].num_replicas == 2
    # Serve's default of 5 throttles concurrent clients; fractional CPUs fit a 2-core node.
    for deployment in deployments.values():
        assert deployment.max_ongoing_requests > 5
        assert 0 < deployment.ray_actor_options.num_cpus < 1
    assert sum(d.num_replicas * d.ray_actor_options.num_cpus for d in deployments.values()) < 2


def test_cluster_yaml_has_no_unknown_keys():
    assert validate_config_file(CLUSTER_YAML) == []


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid_with_no_unknown_keys(config):
    assert validate_config_file(config) == []


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ((), "proxy_locaton"),
        (("http_options",), "prot"),
        (("applications", 0), "route_prefx"),
        (("applications", 0, "deployments", 1), "max_ongoing_request"),
        (("applications", 0, "deployments", 1, "ray_actor_options"), "num_cpu"),
        (("applications", 0, "deployments", 1, "request_router_config"), "request_router_kwarg"),
        (("applications", 0, "args"), "redis_uri"),
        (("applications", 0, "args", "models", 0), "seeds"),
        (("applications", 0, "deployments", 1, "user_config"), "model"),
        (("applications", 0, "deployments", 1, "user_config", "models", "tiny-gpt"), "versoin"),
    ],
)
def test_a_misspelt_key_anywhere_is_reported(path, key):
    raw = load_cluster_yaml()
    node = raw
    for part in path:
        node = node[part]
    node[key] = 1
    problems = validate_config(raw)
    assert len(problems) == 1 and key in problems[0], problems
    # Serve's own schema does not notice, which is why this check exists.
    if path[:3] != ("applications", 0, "args") and "user_config" not in path:
        ServeDeploySchema.model_validate(raw)


def test_user_config_must_name_served_models():
    raw = load_cluster_yaml()
    replica = raw["applications"][0]["deployments"][1]
    replica["user_config"]["models"]["no-such-model"] = {"version": "2"}
    problems = validate_config(raw)
    assert len(problems) == 1 and "no-such-model" in problems[0], problems


def test_the_router_must_follow_the_applications_namespace():
    raw = load_cluster_yaml()
    raw["applications"][0]["args"]["namespace"] = "elsewhere"
    problems = validate_config(raw)
    assert len(problems) == 1 and "request_router_kwargs.namespace" in problems[0], problems


def test_pinned_models_must_fit_the_model_pool():
    with pytest.raises(ConfigError, match="max_loaded_models"):
        parse_args(
            {
                "models": [{"id": "a", "pinned": True}, {"id": "b", "pinned": True}],
                "model_pool": {"max_loaded_models": 1},
            }
        )


@pytest.mark.parametrize(
    "secret", ["short", "replace-me-with-openssl-rand-hex-32", "CHANGEME-0123456789abcdef"]
)
def test_a_short_or_placeholder_cluster_secret_is_refused_at_start_up(secret):
    with pytest.raises(ConfigError, match="hmac_secret"):
        parse_args({"hmac_secret": secret})
    with pytest.raises(ConfigError, match="hmac_secret"):
        parse_args({}).with_environment({"RAYCACHE_HMAC_SECRET": secret})


def test_a_configured_secret_derives_distinct_keys_and_tenant_salts():
    secret = parse_args({"hmac_secret": "0123456789abcdef0123"}).configured_secret()
    assert secret is not None
    derived = {secret.values, secret.keys, secret.peer, secret.records}
    assert len(derived) == 4 and all(len(key) == 32 for key in derived)
    assert secret.tenant_salt("alice") != secret.tenant_salt("bob")
    assert "alice" not in secret.tenant_salt("alice")
    assert parse_args({}).configured_secret() is None


@pytest.mark.parametrize(
    "token",
    ["short", "replace-me-with-openssl-rand-hex-32", "t\u00f6ken-0123456789abcdef", "a b" * 10],
)
def test_a_short_or_placeholder_admin_token_is_refused(token):
    with pytest.raises(ConfigError, match="admin_token") as raised:
        parse_args({"admin_token": token})
    assert token not in str(raised.value)  # a secret is never quoted back
