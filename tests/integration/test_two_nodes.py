"""raycache on a Ray cluster of two nodes (a head and a worker started with `ray start`, each
with its own CPUs and its own Serve proxy), one model replica on each: answers and prefix
blocks are shared across the nodes, both replicas see one ring and follow every version, and
the worker node lost under load costs no client a request.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from tests.conftest import ADMIN_TOKEN, CLUSTER_YAML
from tests.support.processes import RedisServer, wait_until
from tests.support.two_nodes import TwoNodeCluster, wait_for_http

pytestmark = pytest.mark.integration

MODEL = "tiny-gpt"
DOCUMENT = "Two nodes share the blocks of one document through Redis and the owner. " * 6


@dataclass
class TwoNodeApp:
    """The application running on a two-node cluster, in its own namespace."""

    cluster: TwoNodeCluster
    namespace: str


@pytest.fixture(scope="module")
def two_nodes(redis_server: RedisServer, tmp_path_factory) -> Iterator[TwoNodeApp]:
    """configs/cluster.yaml on two nodes: a model replica on each (at most one per node), the
    ingress on the head (a proxy on each node reaches it)."""
    workdir = tmp_path_factory.mktemp("two-nodes")
    cluster = TwoNodeCluster()
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    config["http_options"] = {"host": "127.0.0.1", "port": cluster.head_http_port}
    config.pop("grpc_options")
    [app] = config["applications"]
    namespace = f"two-nodes-{uuid.uuid4().hex[:6]}"
    app["args"].update(namespace=namespace, redis_url=redis_server.url, admin_token=ADMIN_TOKEN)
    for deployment in app["deployments"]:
        options = deployment.setdefault("ray_actor_options", {})
        if deployment["name"] == "Ingress":
            options["resources"] = {cluster.head_resource: 0.01}
        else:
            deployment["max_replicas_per_node"] = 1
            deployment["request_router_config"]["request_router_kwargs"]["namespace"] = namespace
    path = workdir / "two-nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        cluster.start()
        cluster.serve_run(path, workdir / "serve-run.log")
        for port in (cluster.head_http_port, cluster.worker_http_port):
            wait_for_http(f"http://127.0.0.1:{port}", 240)
        running = TwoNodeApp(cluster, namespace)
        wait_until(lambda: len(nodes_of_replicas(running)) == 2, 60, "a replica on each node")
        yield running
    finally:
        cluster.stop()


def url(app: TwoNodeApp, node: str) -> str:
    port = app.cluster.head_http_port if node == "head" else app.cluster.worker_http_port
    return f"http://127.0.0.1:{port}"


def complete(app: TwoNodeApp, node: str, prompt: str, max_tokens: int = 6) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url(app, node)}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def stats(app: TwoNodeApp) -> dict:
    return httpx.get(f"{url(app, 'head')}/v1/cache/stats", timeout=30).json()


def nodes_of_replicas(app: TwoNodeApp) -> dict[str, str]:
    """Replica id -> the node it runs on, as each replica reports."""
    return {rid: s["cluster"]["node_id"] for rid, s in stats(app)["replicas"].items()}


def test_each_node_runs_a_replica_and_its_own_proxy(two_nodes):
    assert len(set(nodes_of_replicas(two_nodes).values())) == 2
    for node in ("head", "worker"):
        health = httpx.get(f"{url(two_nodes, node)}/healthz", timeout=30).json()
        assert health["status"] == "ok" and health["replicas"] == 2


def test_an_answer_computed_through_one_node_is_a_hit_through_the_other(two_nodes):
    prompt = f"Asked on the head, then on the worker {uuid.uuid4().hex[:6]}"
    first = complete(two_nodes, "head", prompt)
    again = complete(two_nodes, "worker", prompt)
    assert first["cache"]["hit"] is False and again["cache"]["hit"] is True
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_prefix_blocks_of_one_node_serve_the_replica_on_the_other(two_nodes):
    """A document used twice on one node's replica is used by the other node's replica."""
    driver = two_nodes.cluster.run_driver
    replicas = driver(REPLICAS_BY_NODE.format(namespace=two_nodes.namespace))
    head_replica, worker_replica = replicas["head"], replicas["worker"]
    for question in ("First?", "Second?"):  # its second use shares it
        driver(ASK.format(replica=head_replica, prompt=DOCUMENT + question))
    other = driver(ASK.format(replica=worker_replica, prompt=DOCUMENT + "Third?"))
    assert other["cached_tokens"] >= 256, other  # at least one whole chunk came across


def test_both_replicas_see_one_ring_and_follow_a_published_version(two_nodes):
    def one_ring() -> bool:
        return {s["cluster"]["ring_size"] for s in stats(two_nodes)["replicas"].values()} == {2}

    wait_until(one_ring, 30, "both replicas on one ring of two")
    prompt = f"Which version on both nodes? {uuid.uuid4().hex[:6]}"
    complete(two_nodes, "head", prompt)
    published = httpx.post(
        f"{url(two_nodes, 'head')}/v1/models/{MODEL}/version",
        json={"version": "two-nodes-2", "seed": 5},
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=120,
    )
    assert published.status_code == 200, published.text
    outcome = published.json()
    assert len(outcome["acknowledged"]) == 3 and not outcome["missing"], outcome  # + the ingress
    for node in ("head", "worker"):
        answer = complete(two_nodes, node, prompt)
        assert answer["model_version"] == "two-nodes-2"


def test_the_worker_node_lost_under_load_fails_no_request(two_nodes):
    """Greedy requests run again on the replica left (the node's replica died under them)."""
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def client(worker: int) -> None:
        i = 0
        with httpx.Client(base_url=url(two_nodes, "head"), timeout=120) as http:
            while not stop.is_set():
                body = {
                    "model": MODEL,
                    "prompt": f"node loss {worker} {i} {uuid.uuid4().hex[:4]}",
                    "max_tokens": 6,
                    "temperature": 0,
                }
                response = http.post("/v1/completions", json=body)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                answered[0] += 1
                i += 1

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3.0)
        two_nodes.cluster.kill_worker_node()
        time.sleep(12.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert answered[0] > 20 and failures == [], failures[:5]
    wait_until(lambda: len(nodes_of_replicas(two_nodes)) == 1, 60, "the lost replica to leave")


# A driver's view of where each replica runs, by node (the directory's members).
REPLICAS_BY_NODE = """
import json
from cluster.sharing.directory_actor import directory_actor
heads = {{n["NodeID"] for n in ray.nodes() if n["Alive"] and any(
    r.startswith("raycache_head_") for r in n["Resources"])}}
members = ray.get(directory_actor({namespace!r}).members.remote())
print(json.dumps({{("head" if m.node_id in heads else "worker"): m.replica_id for m in members}}))
"""

# A completion asked of one replica through its deployment handle.
ASK = """
import json
from ray import serve
from serve_app.api.completions import CompletionJob
from serve_app.models import ByteTokenizer, SamplingParams
handle = serve.get_deployment_handle("ModelReplica", app_name="raycache")
job = CompletionJob("tiny-gpt", "default", tuple(ByteTokenizer().encode({prompt!r})),
                    SamplingParams(max_tokens=6), replica={replica!r})
outcome = handle.complete.remote(job).result(timeout_s=120)
print(json.dumps({{"cached_tokens": outcome.cached_tokens, "text": outcome.text}}))
"""
