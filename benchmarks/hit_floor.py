"""A cached completion over HTTP against the floors under it: Serve no-op apps of one and of
two hops, side by side in one run.

    python -m benchmarks.hit_floor [--config configs/cluster.yaml] [--prompts 20]
                                   [--requests 300] [--clients 16] [--throughput-s 5]
                                   [--rounds 3]
                                   [--ingress-cache config|off]
                                   [--json benchmarks/results/hit_floor.json]

Starts its own redis-server (free port) and Ray cluster (a temporary directory, 4 logical CPUs),
then `serve run` of one Serve config with three applications on one HTTP port:

  raycache   configs/cluster.yaml's application as it is, at `/`;
  two_hop    `benchmarks.noop_stream_app:app` at `/noop`: proxy -> ingress -> a second
             deployment, which returns the text (the hops of a hit a replica answers, as
             with `--ingress-cache off`);
  one_hop    `benchmarks.noop_stream_app:one_hop_app` at `/noop1`: proxy -> ingress, which
             answers itself (the hops of a hit the ingress answers).

`--prompts` distinct greedy completions are computed once on raycache (not measured). Then
latency: `--requests` rounds, each sending one request to every application in a shuffled
order, one at a time on one kept-alive connection: raycache gets the prompts again in turn
(every answer must be a result-cache hit), the no-ops the same bodies. Then throughput, in
`--rounds` rounds, each application in a shuffled order per round: for `--throughput-s`
seconds, `--clients` threads each send requests back to back (closed loop), raycache's again
all hits. Reports the median and p90 latency of each, the ratio of raycache's median to each
floor's, and each application's median requests per second over the rounds and their ratios
(a machine that speeds up or slows down during the run moves every application alike).
Numbers are of this machine only: the client shares its cores with the cluster.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.chat_ttft import model_replicas
from benchmarks.serve_cluster import RedisServer, latency_summary, serve_cluster

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-gpt"
ROUTES = {"raycache": "", "two_hop": "/noop", "one_hop": "/noop1"}
MAX_TOKENS = 16


def serve_config(base: dict[str, Any], redis_url: str) -> dict[str, Any]:
    """`base` on `redis_url`, plus the two no-op applications."""
    config = copy.deepcopy(base)
    [cache] = config["applications"]
    cache["args"]["redis_url"] = redis_url
    small = {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.1}}
    two_hop = {
        "name": "two_hop",
        "route_prefix": ROUTES["two_hop"],
        "import_path": "benchmarks.noop_stream_app:app",
        "deployments": [{"name": "NoopIngress", **small}, {"name": "NoopReplica", **small}],
    }
    one_hop = {
        "name": "one_hop",
        "route_prefix": ROUTES["one_hop"],
        "import_path": "benchmarks.noop_stream_app:one_hop_app",
        "deployments": [{"name": "NoopOneHop", **small}],
    }
    config["applications"] = [cache, two_hop, one_hop]
    return config


def body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def complete(client: httpx.Client, app: str, prompt: str, hit: bool) -> float:
    """Seconds of one completion on `app`; raises unless it answered (a hit, when `hit`)."""
    started = time.perf_counter()
    response = client.post(f"{ROUTES[app]}/v1/completions", json=body(prompt))
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{app} answered {response.status_code}: {response.text[:300]}")
    if hit and not response.json()["cache"]["hit"]:
        raise SystemExit(f"raycache computed {prompt!r} again: not a hit")
    return seconds


def all_answer(client: httpx.Client) -> bool:
    """Whether every application answers a completion."""
    return all(
        client.post(f"{route}/v1/completions", json=body("up?")).status_code == 200
        for route in ROUTES.values()
    )


def latencies(url: str, prompts: list[str], rounds: int, seed: int) -> dict[str, list[float]]:
    """Interleaved single requests: each round sends one to every app, in a shuffled order."""
    rng = random.Random(seed)
    seconds: dict[str, list[float]] = {app: [] for app in ROUTES}
    order = list(ROUTES)
    with httpx.Client(base_url=url, timeout=30) as client:
        for i in range(rounds):
            rng.shuffle(order)
            prompt = prompts[i % len(prompts)]
            for app in order:
                seconds[app].append(complete(client, app, prompt, hit=app == "raycache"))
    return seconds


def throughput(url: str, app: str, prompts: list[str], clients: int, duration_s: float) -> float:
    """Requests per second of `clients` closed-loop threads on `app` for `duration_s`."""
    done = [0] * clients
    stop_at = time.perf_counter() + duration_s

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            i = index
            while time.perf_counter() < stop_at:
                complete(client, app, prompts[i % len(prompts)], hit=app == "raycache")
                done[index] += 1
                i += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--throughput-s", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ingress-cache",
        choices=("config", "off"),
        default="config",
        help="off: hits take the ingress -> replica hop (the cache before the ingress had one)",
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "hit_floor.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(options.config.read_text())
    if options.ingress_cache == "off":
        base["applications"][0]["args"]["ingress_cache"] = {"enabled": False}

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="hit-floor-"))
    redis_server = RedisServer(workdir)
    prompts = [f"Hit floor prompt {i}: tell me about caches." for i in range(options.prompts)]
    try:
        config = serve_config(base, redis_server.url)
        env = {"RAYCACHE_REDIS_URL": redis_server.url}
        with serve_cluster(config, workdir, env, all_answer) as url:
            with httpx.Client(base_url=url, timeout=120) as client:
                for prompt in prompts:  # computed once: every later raycache request is a hit
                    complete(client, "raycache", prompt, hit=False)
            seconds = latencies(url, prompts, options.requests, options.seed)
            rounds: dict[str, list[float]] = {app: [] for app in ROUTES}
            order = list(ROUTES)
            rng = random.Random(options.seed)
            for _ in range(options.rounds):
                rng.shuffle(order)
                for app in order:
                    rate = throughput(url, app, prompts, options.clients, options.throughput_s)
                    rounds[app].append(rate)
            rates = {app: statistics.median(values) for app, values in rounds.items()}
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    latency = {app: latency_summary(values) for app, values in seconds.items()}
    cached = latency["raycache"]["median_ms"]
    result = {
        "benchmark": "hit_floor",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "model_replicas": model_replicas(base["applications"][0]),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "latency": latency,
        "median_ratio": {
            "cached_over_two_hop": cached / latency["two_hop"]["median_ms"],
            "cached_over_one_hop": cached / latency["one_hop"]["median_ms"],
        },
        "requests_per_s": rates,
        "requests_per_s_per_round": rounds,
        "throughput_ratio": {
            "cached_over_two_hop": rates["raycache"] / rates["two_hop"],
            "cached_over_one_hop": rates["raycache"] / rates["one_hop"],
        },
        "raw_seconds": seconds,
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'app':<10} {'median ms':>10} {'p90 ms':>8} {'req/s':>8}")
    for app in ROUTES:
        row = latency[app]
        print(f"{app:<10} {row['median_ms']:>10.2f} {row['p90_ms']:>8.2f} {rates[app]:>8.1f}")
    ratios = result["median_ratio"]
    print(
        f"cached / two-hop no-op: {ratios['cached_over_two_hop']:.2f}x median, "
        f"{result['throughput_ratio']['cached_over_two_hop']:.2f}x throughput; "
        f"cached / one-hop no-op: {ratios['cached_over_one_hop']:.2f}x median, "
        f"{result['throughput_ratio']['cached_over_one_hop']:.2f}x throughput"
    )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
