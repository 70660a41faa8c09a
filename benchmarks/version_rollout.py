"""Version rollout: publish-to-acknowledged time, and hit-ratio recovery after a publish.

    python -m benchmarks.version_rollout [--replicas 2,4] [--publishes 30]
        [--prompts 300] [--alpha 1.0] [--window 100] [--before 1500] [--after 2000]
        [--json benchmarks/results/version_rollout.json] [--plot ...version_rollout.png]

Starts its own Ray cluster, redis-server (free port) and Serve instance, and deploys the real
application (ingress + `ModelReplica`s, as configs/cluster.yaml does, 0.1 CPU each).

- **Ack latency**: for each replica count, `--publishes` versions in a row through the version
  actor's `publish` (each a new seed of the built-in model), timed from the call to its return
  with every replica acknowledged (each replica loaded the weights, switched, dropped the old
  entries, drained old requests, re-pinned the system prompts). Median and p99; every publish
  must be acknowledged by all replicas.
- **Recovery**: with the first replica count, a Zipf(`--alpha`) stream over `--prompts` distinct
  greedy prompts, sent by 4 client threads through the ingress handle: `--before` requests to
  reach the steady state, one publish, then `--after` requests. The curve is the hit ratio per
  window of `--window` requests (window 0 starts at the publish), beside the steady state before
  it; the JSON also gives how many windows it takes to return to 90% of the steady state.

Timings are of this machine only (2 cores here, shared by every replica, the actors, Redis and
the clients); the model is the default TinyGPT.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import serve

from cluster.sharing.directory_actor import ACTOR_NAMESPACE
from tests.support.deployments import deploy
from tests.support.processes import RedisServer

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-gpt"
CLIENTS = 4


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def app_args(name: str, redis_url: str) -> dict[str, Any]:
    return {
        "namespace": name,
        "redis_url": redis_url,
        "stats_interval_s": 0.5,
        "models": [{"id": MODEL, "version": "0", "seed": 0}],
    }


def ack_latency(replicas: int, publishes: int, redis_url: str) -> dict[str, Any]:
    """Seconds from `publish` to its return, all replicas acknowledged, over `publishes`."""
    name = f"rollout-{replicas}-{uuid.uuid4().hex[:6]}"
    deploy(name, app_args(name, redis_url), replicas=replicas)
    actor = ray.get_actor(f"versions-{name}", namespace=ACTOR_NAMESPACE)
    seconds, incomplete = [], 0
    try:
        for index in range(1, publishes + 1):
            started = time.perf_counter()
            outcome = ray.get(actor.publish.remote(MODEL, f"v{index}", seed=index, timeout_s=60))
            seconds.append(time.perf_counter() - started)
            if len(outcome.acknowledged) != replicas:
                incomplete += 1
    finally:
        serve.delete(name)
    return {
        "replicas": replicas,
        "publishes": publishes,
        "incomplete": incomplete,
        "median_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * percentile(seconds, 99),
        "max_ms": 1000 * max(seconds),
    }


def recovery(options: argparse.Namespace, replicas: int, redis_url: str) -> dict[str, Any]:
    """The hit ratio per window of requests before and after one publish."""
    name = f"recovery-{uuid.uuid4().hex[:6]}"
    deploy(name, app_args(name, redis_url), replicas=replicas)
    handle = serve.get_app_handle(name)
    rng = np.random.default_rng(11)
    weights = 1.0 / np.arange(1, options.prompts + 1) ** options.alpha
    total = options.before + options.after
    ranks = rng.choice(options.prompts, size=total, p=weights / weights.sum()).tolist()
    hits: list[bool | None] = [None] * total
    next_index = 0
    lock = threading.Lock()

    errors: list[BaseException] = []

    def client() -> None:
        try:
            send_requests()
        except BaseException as exc:  # re-raised by the main thread
            errors.append(exc)

    def send_requests() -> None:
        nonlocal next_index
        while True:
            with lock:
                index = next_index
                next_index += 1
            if index >= total:
                return
            if index == options.before:
                outcome = handle.publish_version.remote(MODEL, {"version": "next", "seed": 99})
                outcome.result(timeout_s=120)
            body = {
                "model": MODEL,
                "prompt": f"recovery prompt number {ranks[index]}",
                "max_tokens": 4,
                "temperature": 0,
            }
            response = handle.complete.remote(body).result(timeout_s=120)
            hits[index] = bool(response["cache"]["hit"])

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        serve.delete(name)
    if errors:
        raise errors[0]
    window = options.window
    steady = hits[options.before - 4 * window : options.before]
    steady_ratio = sum(bool(h) for h in steady) / len(steady)
    after = hits[options.before :]
    curve = [
        sum(bool(h) for h in after[start : start + window]) / len(after[start : start + window])
        for start in range(0, len(after), window)
    ]
    back = next((i for i, ratio in enumerate(curve) if ratio >= 0.9 * steady_ratio), None)
    before_curve = [
        sum(bool(h) for h in hits[start : start + window]) / window
        for start in range(0, options.before, window)
    ]
    return {
        "replicas": replicas,
        "prompts": options.prompts,
        "alpha": options.alpha,
        "window": window,
        "steady_hit_ratio": steady_ratio,
        "curve_before": before_curve,
        "curve_after": curve,
        "windows_to_90pct": back,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = result["recovery"]
    before, after = rec["curve_before"], rec["curve_after"]
    xs = list(range(-len(before), len(after)))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, [*before, *after], marker=".")
    ax.axvline(0, color="grey", linestyle="--", label="publish")
    ax.axhline(rec["steady_hit_ratio"], color="green", linestyle=":", label="steady state")
    ax.set_xlabel(f"window of {rec['window']} requests (0 = first after the publish)")
    ax.set_ylabel("hit ratio")
    ax.set_title(f"Hit ratio around a publish, {rec['replicas']} replicas, Zipf {rec['alpha']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="2,4")
    parser.add_argument("--publishes", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--before", type=int, default=1500)
    parser.add_argument("--after", type=int, default=2000)
    results = ROOT / "benchmarks" / "results"
    parser.add_argument("--json", type=Path, default=results / "version_rollout.json")
    parser.add_argument("--plot", type=Path, default=results / "version_rollout.png")
    options = parser.parse_args()
    counts = [int(n) for n in options.replicas.split(",")]

    with tempfile.TemporaryDirectory() as workdir:
        redis = RedisServer(Path(workdir))
        redis.start()
        ray.init(include_dashboard=False, namespace="raycache-bench", log_to_driver=False)
        try:
            latencies = [ack_latency(n, options.publishes, redis.url) for n in counts]
            for row in latencies:
                print(
                    f"{row['replicas']} replicas: publish -> all acknowledged median "
                    f"{row['median_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms "
                    f"({row['incomplete']} of {row['publishes']} incomplete)"
                )
            rec = recovery(options, counts[0], redis.url)
            print(
                f"recovery ({rec['replicas']} replicas): steady {rec['steady_hit_ratio']:.2f}; "
                f"after the publish, by window: "
                + " ".join(f"{ratio:.2f}" for ratio in rec["curve_after"])
                + f"; back to 90% in {rec['windows_to_90pct']} windows of {rec['window']}"
            )
        finally:
            serve.shutdown()
            ray.shutdown()
            redis.stop()
    result = {"ack_latency": latencies, "recovery": rec}
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, options.plot)
    print(f"wrote {options.json} and {options.plot}")


if __name__ == "__main__":
    main()
