"""Session-wide real infrastructure for integration and end-to-end tests.

Unit tests use none of these fixtures and so never start Ray or Redis. Ray is started once per
test session (by this process, which therefore owns it and shuts it down), Redis once per
session on a free port, and the application once per session through `serve run`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.processes import (
    RedisServer,
    ServeRun,
    metrics_export_port,
    serve_grpc_options,
    serve_http_port,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "configs" / "cluster.yaml"
APP_NAME = "raycache"
# The test cluster's credentials: tenants come from API keys, admin routes need the token.
API_KEYS = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}
ADMIN_TOKEN = "admin-token-0123456789abcdef"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A local Ray cluster owned by this test session; yields its GCS address."""
    import ray

    if ray.is_initialized():  # started by someone else: use it, leave it running
        yield ray.get_runtime_context().gcs_address
        return
    context = ray.init(
        include_dashboard=False,
        namespace="raycache-tests",
        log_to_driver=False,
        # Metrics are exported here (`metrics_url`), reported every second instead of ten.
        _metrics_export_port=metrics_export_port(),
        _system_config={"metrics_report_interval_ms": 1000},
    )
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(ray_cluster: str) -> str:
    """Where the test cluster's node exports its Prometheus metrics."""
    return f"http://127.0.0.1:{metrics_export_port()}/metrics"


@dataclass
class RunningApp:
    """The application as started from configs/cluster.yaml."""

    url: str
    config: dict[str, Any]
    serve_run: ServeRun

    def http(self, tenant: str = "alice") -> httpx.Client:
        """A client that authenticates as `tenant` with its API key."""
        return httpx.Client(base_url=self.url, timeout=60, headers=self.auth_headers(tenant))

    def app_args(self) -> dict[str, Any]:
        return self.config["applications"][0]["args"]

    def auth_headers(self, tenant: str = "alice") -> dict[str, str]:
        """Headers that authenticate a client as `tenant` (an API key the app was given)."""
        return {"authorization": f"Bearer {API_KEYS[tenant]}"}

    def admin_headers(self) -> dict[str, str]:
        """Headers that carry the operator's admin token."""
        return {"authorization": f"Bearer {ADMIN_TOKEN}"}

    def grpc_channel(self):
        """A gRPC channel to Serve's gRPC proxy."""
        import grpc

        return grpc.insecure_channel(f"127.0.0.1:{self.config['grpc_options']['port']}")

    def replica_count(self, deployment: str = "ModelReplica") -> int:
        deployments = self.config["applications"][0]["deployments"]
        return next(d["num_replicas"] for d in deployments if d["name"] == deployment)

    def subscriber_count(self) -> int:
        """Who acknowledges a publish or an invalidation: every model replica, and every
        ingress replica (it keeps answers of its own)."""
        return self.replica_count() + self.replica_count("Ingress")


@pytest.fixture(scope="session")
def running_app(
    ray_cluster: str, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """`serve run configs/cluster.yaml`, changed only where a test machine needs it.

    The HTTP port moves to a free one (8000 may be taken), Redis to the session's private
    server, and the operator's credentials are configured (API keys, one stored as a digest,
    and an admin token, and the pinned prompt's tenant); everything else is the file users run.
    """
    workdir = tmp_path_factory.mktemp("serve")
    keys_file = workdir / "api-keys.txt"
    bob_digest = hashlib.sha256(API_KEYS["bob"].encode()).hexdigest()
    keys_file.write_text(f"# tenant:key\nalice:{API_KEYS['alice']}\nbob:sha256:{bob_digest}\n")
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["http_options"]["port"] = serve_http_port()
    config["http_options"]["host"] = "127.0.0.1"
    assert (
        config["grpc_options"]["grpc_servicer_functions"]
        == (serve_grpc_options()["grpc_servicer_functions"])
    )
    config["grpc_options"]["port"] = serve_grpc_options()["port"]
    args = config["applications"][0]["args"]
    args["redis_url"] = redis_server.url
    args["auth"] = {"api_keys_file": str(keys_file)}
    args["admin_token"] = ADMIN_TOKEN
    # Tenants share no prefix block, a pinned one included: pinned for alice, whom tests ask as.
    for pinned in args["prefix_cache"]["pinned"]:
        pinned["tenant"] = "alice"
    config_path = workdir / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    serve_run = ServeRun(config_path, ray_cluster, workdir / "serve-run.log")
    app = RunningApp(f"http://127.0.0.1:{config['http_options']['port']}", config, serve_run)
    started = time.monotonic()
    serve_run.start()

    def ready() -> bool:
        serve_run.check_alive()
        try:
            health = httpx.get(f"{app.url}/healthz", timeout=5)
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and health.json()["replicas"] == app.replica_count()

    try:
        wait_until(ready, 240, "the application to serve /healthz with every replica", 0.5)
    except TimeoutError as exc:
        serve_run.stop()
        raise TimeoutError(f"{exc}\n{serve_run.log_tail()}") from None
    print(f"\n[raycache] serve run ready in {time.monotonic() - started:.1f}s")
    yield app
    serve_run.stop()


@pytest.fixture(scope="session")
def app_handle(running_app: RunningApp):
    """A Ray Serve handle to the application's ingress."""
    from ray import serve

    return serve.get_app_handle(APP_NAME)
