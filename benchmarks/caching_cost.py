"""What caching costs a miss, and what it gains on a workload with repeats: the application
with every cache on against the same application with every cache off, side by side in one run.

    python -m benchmarks.caching_cost [--config configs/cluster.yaml] [--prompt-tokens 320]
                                      [--alone 40] [--clients 8] [--phase-s 20] [--phases 2]
                                      [--repeat 0.35] [--json benchmarks/results/caching_cost.json]

Starts its own redis-server (free port) and Ray cluster, then `serve run` of one Serve config
with two applications on one HTTP port, each with the config's replicas:

  on    configs/cluster.yaml's application as it is (result caches, prefix cache, owner
        peers, Redis, the ingress's cache), at `/`;
  off   the same application with every cache off (no result or prefix cache, no peers, no
        Redis, no ingress cache), at `/off`, in its own namespace.

Every prompt is new to both (a random tag), about `--prompt-tokens` tokens, greedy, 16 tokens
out. Measured:

- **alone**: `--alone` rounds, each one new prompt sent to each application in a shuffled
  order, one at a time: the latency of a miss with caching on and off (median, p90, ratio);
  then the same prompts again on `on`: the latency of a hit.
- **distinct, under load**: `--clients` closed-loop clients sending new prompts, for
  `--phase-s` seconds on each application in turn, `--phases` times (on, off, on, off...):
  requests per second of each (summed over its phases) and their ratio.
- **repeats, under load**: the same, but each request repeats one of the last 64 prompts sent
  to that application with probability `--repeat` (the same seeded sequence on both): the
  lift (on / off requests per second) against what the alone costs predict,
  off_miss / (repeat * hit + (1 - repeat) * on_miss), and their ratio.

Numbers are of this machine only: the clients share its cores with the cluster.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.chat_ttft import model_replicas
from benchmarks.serve_cluster import RedisServer, latency_summary, serve_cluster

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-gpt"
ROUTES = {"on": "", "off": "/off"}
MAX_TOKENS = 16
RECENT = 64
WORDS = [
    "cache",
    "prefix",
    "block",
    "replica",
    "owner",
    "tier",
    "answer",
    "token",
    "version",
    "ring",
    "redis",
    "peer",
]


def serve_config(base: dict[str, Any], redis_url: str) -> dict[str, Any]:
    """`base` on `redis_url`, and beside it the same application with every cache off."""
    config = copy.deepcopy(base)
    [on] = config["applications"]
    on["args"]["redis_url"] = redis_url
    off = copy.deepcopy(on)
    off["name"], off["route_prefix"] = "uncached", ROUTES["off"]
    args = off["args"]
    args["namespace"] = "uncached"
    args["redis_url"] = None
    args["result_cache"] = {**args.get("result_cache", {}), "max_entries": 0}
    args["prefix_cache"] = {"enabled": False}
    args["ingress_cache"] = {"enabled": False}
    args["peer"] = {"enabled": False}
    for deployment in off["deployments"]:
        router = deployment.get("request_router_config")
        if router is not None:
            router["request_router_kwargs"]["namespace"] = "uncached"
    config["applications"] = [on, off]
    return config


def new_prompt(rng: random.Random, tokens: int) -> str:
    """A prompt no cache has seen, of about `tokens` bytes (the tiny GPT reads bytes)."""
    words = [uuid.UUID(int=rng.getrandbits(128)).hex[:8]]
    while sum(len(w) + 1 for w in words) < tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)[:tokens]


def body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}


def complete(client: httpx.Client, app: str, prompt: str) -> tuple[float, bool]:
    """Seconds of one completion on `app`, and whether it was a hit; raises unless answered."""
    started = time.perf_counter()
    response = client.post(f"{ROUTES[app]}/v1/completions", json=body(prompt))
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"{app} answered {response.status_code}: {response.text[:300]}")
    return seconds, bool(response.json()["cache"]["hit"])


def all_answer(client: httpx.Client) -> bool:
    return all(
        client.post(f"{route}/v1/completions", json=body("up?")).status_code == 200
        for route in ROUTES.values()
    )


def alone(url: str, rounds: int, tokens: int, seed: int) -> dict[str, list[float]]:
    """Interleaved single misses on both applications, then the same prompts as hits on `on`."""
    rng = random.Random(seed)
    seconds: dict[str, list[float]] = {"on": [], "off": [], "hit": []}
    prompts = [new_prompt(rng, tokens) for _ in range(rounds)]
    order = list(ROUTES)
    with httpx.Client(base_url=url, timeout=120) as client:
        for prompt in prompts:
            rng.shuffle(order)
            for app in order:
                took, hit = complete(client, app, prompt)
                if hit:
                    raise SystemExit(f"{app} had a new prompt cached")
                seconds[app].append(took)
        for prompt in prompts:
            took, hit = complete(client, "on", prompt)
            if not hit:
                raise SystemExit("a repeated prompt was computed again")
            seconds["hit"].append(took)
    return seconds


def under_load(
    url: str, app: str, clients: int, duration_s: float, tokens: int, repeat: float, seed: int
) -> dict[str, float]:
    """`clients` closed-loop clients on `app` for `duration_s`: requests and hits."""
    done, hits = [0] * clients, [0] * clients
    stop_at = time.perf_counter() + duration_s

    def client_loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        recent: list[str] = []
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.perf_counter() < stop_at:
                if recent and rng.random() < repeat:
                    prompt = rng.choice(recent)
                else:
                    prompt = new_prompt(rng, tokens)
                    recent = [*recent[-(RECENT - 1) :], prompt]
                _, hit = complete(client, app, prompt)
                done[index] += 1
                hits[index] += hit

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"requests": sum(done), "hits": sum(hits), "seconds": time.perf_counter() - started}


def phases(url: str, options: argparse.Namespace, repeat: float, seed: int) -> dict[str, Any]:
    """Alternating phases on each application; requests per second of each over its phases."""
    totals = {app: {"requests": 0.0, "hits": 0.0, "seconds": 0.0} for app in ROUTES}
    for phase in range(options.phases):
        for app in ROUTES:
            # The same seeds on both: the same sequence of new prompts and repeats.
            got = under_load(
                url,
                app,
                options.clients,
                options.phase_s,
                options.prompt_tokens,
                repeat,
                seed + phase,
            )
            for name, value in got.items():
                totals[app][name] += value
    if totals["off"]["hits"]:
        raise SystemExit("the application with caching off answered from a cache")
    rates = {app: t["requests"] / t["seconds"] for app, t in totals.items()}
    return {
        "totals": totals,
        "requests_per_s": rates,
        "hit_ratio": {app: t["hits"] / max(t["requests"], 1) for app, t in totals.items()},
        "on_over_off": rates["on"] / rates["off"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--prompt-tokens", type=int, default=320)
    parser.add_argument("--alone", type=int, default=40)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--phase-s", type=float, default=20.0)
    parser.add_argument("--phases", type=int, default=2)
    parser.add_argument("--repeat", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "caching_cost.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(options.config.read_text())

    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="caching-cost-"))
    redis_server = RedisServer(workdir)
    try:
        config = serve_config(base, redis_server.url)
        # No RAYCACHE_REDIS_URL: it would override the `off` application's null redis_url.
        with serve_cluster(config, workdir, {}, all_answer) as url:
            seconds = alone(url, options.alone, options.prompt_tokens, options.seed)
            distinct = phases(url, options, 0.0, options.seed + 100)
            repeats = phases(url, options, options.repeat, options.seed + 200)
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    latency = {name: latency_summary(values) for name, values in seconds.items()}
    on_miss, off_miss = latency["on"]["median_ms"], latency["off"]["median_ms"]
    hit = latency["hit"]["median_ms"]
    share = repeats["hit_ratio"]["on"]  # the repeats that were hits, as measured
    predicted = off_miss / (share * hit + (1 - share) * on_miss)
    result = {
        "benchmark": "caching_cost",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "model_replicas": model_replicas(base["applications"][0]),
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        "alone": latency,
        "miss_on_over_off": on_miss / off_miss,
        "distinct_under_load": distinct,
        "repeats_under_load": repeats,
        "repeats_lift": repeats["on_over_off"],
        "repeats_predicted_lift": predicted,
        "repeats_lift_over_predicted": repeats["on_over_off"] / predicted,
        "raw_seconds": seconds,
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"alone: miss on {on_miss:.1f} ms, off {off_miss:.1f} ms ({on_miss / off_miss:.3f}x);")
    print(f"       hit {hit:.2f} ms")
    rates = distinct["requests_per_s"]
    print(
        f"distinct, {options.clients} clients: on {rates['on']:.2f} req/s, "
        f"off {rates['off']:.2f} req/s ({distinct['on_over_off']:.3f}x)"
    )
    rates = repeats["requests_per_s"]
    print(
        f"repeats {options.repeat:.0%}, {options.clients} clients: on {rates['on']:.2f} req/s "
        f"(hit ratio {share:.2f}), off {rates['off']:.2f} req/s: lift "
        f"{repeats['on_over_off']:.3f}x, predicted {predicted:.3f}x "
        f"({result['repeats_lift_over_predicted']:.2f} of it)"
    )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
