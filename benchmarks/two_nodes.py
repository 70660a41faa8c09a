"""Hit ratio and latency with the model replicas split across two Ray nodes, against the same
replicas on one node, one workload, in one run.

    python -m benchmarks.two_nodes [--config configs/cluster.yaml] [--clients 8]
                                   [--requests 400] [--prompts 120] [--alpha 1.0]
                                   [--json benchmarks/results/two_nodes.json]

Starts its own redis-server, then in turn:

  one_node    a Ray cluster of one node (`ray start --head`, 4 CPUs) running the config's
              application; clients send to its proxy;
  two_nodes   a Ray cluster of two nodes (a head and a worker from `ray start`, 2 CPUs each,
              `tests/support/two_nodes.py`), at most one model replica per node, the ingress on
              the head; clients alternate between the two nodes' proxies.

Both get the same requests: `--clients` closed-loop clients, `--requests` each, greedy
completions of prompts drawn Zipf(`--alpha`) from `--prompts` distinct ones (a fresh Redis each
cluster: every prompt's first request is a miss). Reports per cluster the hit ratio, the
median and p90 latency of hits and of misses, and requests per second, and the two-node /
one-node ratios. Both clusters live on this machine: the second node adds a proxy and a
raylet, not cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml

from benchmarks.serve_cluster import RedisServer, latency_summary
from tests.support.two_nodes import TwoNodeCluster, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-gpt"


def app_config(base: dict[str, Any], cluster: TwoNodeCluster, redis_url: str, split: bool):
    """`base` on `cluster`'s ports and `redis_url`; `split`: a model replica per node."""
    config = copy.deepcopy(base)
    config["http_options"] = {"host": "127.0.0.1", "port": cluster.head_http_port}
    config.pop("grpc_options", None)
    [app] = config["applications"]
    app["args"]["redis_url"] = redis_url
    for deployment in app["deployments"]:
        options = deployment.setdefault("ray_actor_options", {})
        if deployment["name"] == "Ingress":
            options["resources"] = {cluster.head_resource: 0.01}
        elif split:
            deployment["max_replicas_per_node"] = 1
        else:
            options["resources"] = {cluster.head_resource: 0.01}
    return config


def workload(options: argparse.Namespace) -> list[list[str]]:
    """Each client's prompts: Zipf-drawn from `--prompts` distinct ones, the same every run."""
    rng = np.random.default_rng(options.seed)
    weights = 1.0 / np.arange(1, options.prompts + 1) ** options.alpha
    tag = uuid.uuid4().hex[:6]
    prompts = [
        f"Two-node prompt {i} {tag}: what does the cache keep?" for i in range(options.prompts)
    ]
    draws = rng.choice(
        options.prompts, size=(options.clients, options.requests), p=weights / weights.sum()
    )
    return [[prompts[i] for i in row] for row in draws]


def run_clients(urls: list[str], prompts: list[list[str]]) -> dict[str, Any]:
    """Every client sends its prompts in turn, to `urls` alternately; latencies by outcome."""
    seconds: dict[str, list[float]] = {"hit": [], "miss": []}
    failures: list[str] = []

    def client(index: int) -> None:
        clients = [httpx.Client(base_url=url, timeout=120) for url in urls]
        for i, prompt in enumerate(prompts[index]):
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}
            started = time.perf_counter()
            response = clients[(index + i) % len(clients)].post("/v1/completions", json=body)
            took = time.perf_counter() - started
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text[:200]}")
                continue
            seconds["hit" if response.json()["cache"]["hit"] else "miss"].append(took)
        for http in clients:
            http.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    answered = len(seconds["hit"]) + len(seconds["miss"])
    return {
        "hit_ratio": len(seconds["hit"]) / max(answered, 1),
        "hits": latency_summary(seconds["hit"]) if seconds["hit"] else None,
        "misses": latency_summary(seconds["miss"]) if seconds["miss"] else None,
        "requests_per_s": answered / elapsed,
        "failed": len(failures),
    }


def measure(base: dict[str, Any], split: bool, prompts: list[list[str]], workdir: Path):
    """Start a cluster (one node, or two with the replicas split), run the workload, stop."""
    redis_server = RedisServer(workdir)
    cluster = TwoNodeCluster(cpus=2 if split else 4)
    try:
        cluster.start(worker=split)
        path = workdir / f"serve-{'two' if split else 'one'}.yaml"
        path.write_text(yaml.safe_dump(app_config(base, cluster, redis_server.url, split)))
        cluster.serve_run(path, workdir / f"serve-run-{'two' if split else 'one'}.log")
        ports = [cluster.head_http_port, *([cluster.worker_http_port] if split else [])]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            wait_for_http(url, 300)
        return run_clients(urls, prompts)
    finally:
        cluster.stop()
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=120)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "two_nodes.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(options.config.read_text())
    prompts = workload(options)
    workdir = Path(tempfile.mkdtemp(prefix="two-nodes-"))
    load_before = os.getloadavg()
    try:
        one = measure(base, False, prompts, workdir)
        two = measure(base, True, prompts, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = {
        "hit_ratio": two["hit_ratio"] / max(one["hit_ratio"], 1e-9),
        "requests_per_s": two["requests_per_s"] / one["requests_per_s"],
    }
    for outcome in ("hits", "misses"):
        if one[outcome] and two[outcome]:
            ratios[f"{outcome}_median"] = two[outcome]["median_ms"] / one[outcome]["median_ms"]
    result = {
        "benchmark": "two_nodes",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "one_node": one,
        "two_nodes": two,
        "two_over_one": ratios,
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in (("one node", one), ("two nodes", two)):
        hits, misses = row["hits"] or {}, row["misses"] or {}
        print(
            f"{name:<10} hit ratio {row['hit_ratio']:.3f}, hits {hits.get('median_ms', 0):.1f} ms, "
            f"misses {misses.get('median_ms', 0):.1f} ms, {row['requests_per_s']:.1f} req/s, "
            f"{row['failed']} failed"
        )
    print("two / one:", {k: round(v, 3) for k, v in ratios.items()})
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
