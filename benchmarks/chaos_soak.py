"""Sustained load through a schedule of faults: failed, stale and inconsistent answers, latency,
and each process's memory over time.

    python -m benchmarks.chaos_soak [--config configs/cluster.yaml] [--duration-s 180]
                                    [--clients 8] [--repeat 0.35] [--max-tokens 8]
                                    [--two-nodes] [--json benchmarks/results/chaos_soak.json]

Starts its own redis-server (a fixed free port, so it can be killed and started again there)
and Ray cluster (a temporary directory, 4 logical CPUs), then `serve run` of the config with an
admin token, the caches' budgets lowered so that they fill within the warm-up
(`--result-mb`, `--prefix-mb`, `--ingress-mb`; Redis gets `--redis-mb` and `volatile-lru`, as
in k8s/redis.yaml). `--clients` threads send greedy completions back to back for `--duration-s`: a
share `--repeat` of them repeats an earlier prompt, the rest are new. The first 15% of the run
is warm-up; then, at fixed fractions of the duration, one fault each:

  replica_killed       a model replica is killed (Serve replaces it)
  redis_killed         redis-server is killed, and started again (empty) 5 s later
  directory_killed     the directory actor is killed (Ray restarts it)
  redis_frozen         redis-server is stopped (SIGSTOP) for 10 s, then continued
  versions_killed      the version-broadcast actor is killed (Ray restarts it)
  published            a new version of the model is published (other weights)
  node_lost            with `--two-nodes` only: the worker node's raylet is killed, and with
                       it the model replica (and the proxy) on that node

`--two-nodes` runs the application on a Ray cluster of two nodes instead (a head and a worker
from `ray start`, `tests/support/two_nodes.py`): a model replica on each, the ingress on the
head, the clients on the head's proxy.

Counted: `failed` (any answer but a 200), `stale` (an answer of the old version to a request
sent after the publish was acknowledged), `inconsistent` (an answer whose text differs from
another answer to the same prompt from the same version). Latency percentiles per phase
between faults. Every 2 s the resident memory of each Ray worker (by its process title) and of
redis-server is sampled, and so is how full each model replica's result and prefix caches and
the ingress's cache are (`/v1/cache/stats`: `cache_fill`); `rss_growth` compares each process's
last sample with its first once settled: after the warm-up and, for a model replica or the
ingress, once its caches were reported full (a result cache still filling grows its process by
several times the bytes its budget counts: an answer is also kept decoded and in the policy's
bookkeeping), and, apart, from the end of the last fault to the end of the run. Writes the JSON
and two plots beside it (latency over time with the faults marked, memory over time).
`--duration-s` scales the whole schedule.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.serve_cluster import RedisServer, serve_cluster
from benchmarks.two_nodes import app_config
from tests.support.two_nodes import TwoNodeCluster, wait_for_http

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "chaos-soak-admin-token"
WARMUP = 0.15
FAULTS = (
    (0.20, "replica_killed"),
    (0.32, "redis_killed"),
    (0.45, "directory_killed"),
    (0.58, "redis_frozen"),
    (0.70, "versions_killed"),
    (0.80, "published"),
)
NODE_LOST = (0.88, "node_lost")
REDIS_DOWN_S = 5.0
REDIS_FROZEN_S = 10.0
RSS_INTERVAL_S = 2.0
FULL = 0.9
"""A cache counts as full from this share of its byte budget."""
QUIET_AFTER_FAULT_S = 5.0
"""How long after the last fault ended its own rise in memory is over."""


@dataclass
class Answer:
    """One request as the client saw it (`started` and `ended`: seconds from the run's start)."""

    started: float
    ended: float
    status: int
    prompt: str
    text: str | None = None
    version: str | None = None
    tier: str | None = None
    error: str | None = None


class Load:
    """`clients` threads sending completions until `stop` is set."""

    def __init__(self, url: str, options: argparse.Namespace, started: float) -> None:
        self._url = url
        self._options = options
        self._started = started
        self._lock = threading.Lock()
        self._sent: list[str] = []
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True)
            for i in range(options.clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _prompt(self, rng: random.Random) -> str:
        with self._lock:
            if self._sent and rng.random() < self._options.repeat:
                return rng.choice(self._sent)
            prompt = f"soak {uuid.uuid4().hex[:10]}: say something about caches"
            self._sent.append(prompt)
            return prompt

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self._url, timeout=60) as client:
            while not self.stop.is_set():
                prompt = self._prompt(rng)
                body = {
                    "model": self._options.model,
                    "prompt": prompt,
                    "max_tokens": self._options.max_tokens,
                    "temperature": 0,
                }
                started = time.monotonic() - self._started
                answer = Answer(started, started, 0, prompt)
                try:
                    response = client.post("/v1/completions", json=body)
                except httpx.HTTPError as exc:
                    answer.error = f"{type(exc).__name__}: {exc}"
                else:
                    answer.status = response.status_code
                    if response.status_code == 200:
                        data = response.json()
                        answer.text = data["choices"][0]["text"]
                        answer.version = data.get("model_version")
                        cache = data.get("cache") or {}
                        answer.tier = cache.get("tier") if cache.get("hit") else "miss"
                    else:
                        answer.error = response.text[:300]
                answer.ended = time.monotonic() - self._started
                with self._lock:
                    self.answers.append(answer)


def ray_processes(redis_port: int) -> dict[int, str]:
    """pid -> process title of every Ray worker (`ray::...`) on this machine, and of the
    redis-server on `redis_port`."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if title.startswith("ray::") or ("redis-server" in title and f":{redis_port}" in title):
            found[int(entry)] = title.strip()
    return found


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sample_memory(
    stop: threading.Event, started: float, redis_port: int, into: list[dict[str, Any]]
) -> None:
    while not stop.wait(RSS_INTERVAL_S):
        now = time.monotonic() - started
        for pid, title in ray_processes(redis_port).items():
            size = rss_mb(pid)
            if size is not None:
                into.append({"t": now, "pid": pid, "process": title, "rss_mb": size})


def sample_cache_fill(
    stop: threading.Event,
    started: float,
    url: str,
    budgets: dict[str, int],
    into: list[dict[str, Any]],
) -> None:
    """Every RSS_INTERVAL_S, each model replica's process id and the share of its result and
    prefix caches' byte budgets (`budgets`: "result", "prefix") in use, and the ingress's."""
    with httpx.Client(base_url=url, timeout=10) as client:
        while not stop.wait(RSS_INTERVAL_S):
            try:
                stats = client.get("/v1/cache/stats").json()
            except (httpx.HTTPError, ValueError):
                continue  # the next sample will do (the ingress may be busy with a fault)
            now = time.monotonic() - started
            for replica, entry in stats.get("replicas", {}).items():
                into.append(
                    {
                        "t": now,
                        "replica": replica,
                        "pid": entry.get("cluster", {}).get("pid"),
                        "result": entry.get("bytes", 0) / budgets["result"],
                        "prefix": entry.get("prefix", {}).get("bytes", 0) / budgets["prefix"],
                    }
                )
            ingress = stats.get("ingress", {}).get("bytes", 0)
            into.append({"t": now, "replica": "ingress", "ingress": ingress / budgets["ingress"]})


def caches_full_at(fill: list[dict[str, Any]]) -> dict[int | str, float]:
    """When each model replica (by pid) first reported both its result and prefix caches full,
    and the ingress (`"ingress"`: the config runs one ingress replica) its cache."""
    full: dict[int | str, float] = {}
    for sample in fill:
        if "ingress" in sample:
            if sample["ingress"] >= FULL:
                full.setdefault("ingress", sample["t"])
        elif sample["pid"] is not None and sample["result"] >= FULL and sample["prefix"] >= FULL:
            full.setdefault(sample["pid"], sample["t"])
    return full


def inject(
    fault: str, redis: RedisServer, namespace: str, url: str, model: str, nodes: Any = None
) -> dict[str, Any]:
    """Cause `fault` (`nodes`: the two-node cluster, for `node_lost`); returns what happened
    (and, for a publish, when it was acknowledged)."""
    import ray

    from cluster.sharing.directory_actor import ACTOR_NAMESPACE

    detail: dict[str, Any] = {}
    if fault == "replica_killed":
        directory = ray.get_actor(f"directory-{namespace}", namespace=ACTOR_NAMESPACE)
        members = ray.get(directory.members.remote())
        victim = members[0].replica_id
        name = f"SERVE_REPLICA::{namespace}#ModelReplica#{victim}"
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
        detail["replica"] = victim
    elif fault == "redis_killed":
        redis.kill()
        time.sleep(REDIS_DOWN_S)
        redis.start()
    elif fault == "directory_killed":
        actor = ray.get_actor(f"directory-{namespace}", namespace=ACTOR_NAMESPACE)
        ray.kill(actor, no_restart=False)
    elif fault == "redis_frozen":
        redis.signal(signal.SIGSTOP)
        time.sleep(REDIS_FROZEN_S)
        redis.signal(signal.SIGCONT)
    elif fault == "versions_killed":
        actor = ray.get_actor(f"versions-{namespace}", namespace=ACTOR_NAMESPACE)
        ray.kill(actor, no_restart=False)
    elif fault == "published":
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        body = {"version": "soak-2", "seed": 7}
        response = httpx.post(
            f"{url}/v1/models/{model}/version", json=body, headers=headers, timeout=120
        )
        detail["status"] = response.status_code
        detail["answer"] = response.json() if response.status_code == 200 else response.text
    elif fault == "node_lost":
        nodes.kill_worker_node()
    return detail


class TwoNodeRun:
    """The config's application on a Ray cluster of two nodes (a model replica on each, the
    ingress on the head) with `redis_url` and the admin token; entering connects this process
    to the cluster and gives the head proxy's URL."""

    def __init__(self, config: dict[str, Any], workdir: Path, redis_url: str) -> None:
        self.nodes = TwoNodeCluster()
        self._config = app_config(config, self.nodes, redis_url, split=True)
        self._config["applications"][0]["args"]["admin_token"] = ADMIN_TOKEN
        self._workdir = workdir

    def __enter__(self) -> str:
        # Read when Ray is imported: the cluster `ray start` made uses token authentication.
        os.environ["RAY_AUTH_MODE"] = "token"
        import ray

        try:
            self.nodes.start()
            path = self._workdir / "two-nodes.yaml"
            path.write_text(yaml.safe_dump(self._config))
            self.nodes.serve_run(path, self._workdir / "serve-run.log")
            url = f"http://127.0.0.1:{self.nodes.head_http_port}"
            wait_for_http(url, 300)
            ray.init(address=self.nodes.address, log_to_driver=False)
        except BaseException:
            self.nodes.stop()
            raise
        return url

    def __exit__(self, *_: object) -> None:
        import ray

        ray.shutdown()
        self.nodes.stop()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"requests": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"requests": len(ordered), "p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99)}


def judge(answers: list[Answer], published_at: float | None) -> dict[str, Any]:
    """Failed, stale and inconsistent answers."""
    failed = [a for a in answers if a.status != 200]
    stale = [
        a
        for a in answers
        if a.status == 200 and published_at is not None and a.started > published_at
        and a.version != "soak-2"
    ]  # fmt: skip
    texts: dict[tuple[str, str | None], set[str]] = {}
    for a in answers:
        if a.status == 200 and a.text is not None:
            texts.setdefault((a.prompt, a.version), set()).add(a.text)
    inconsistent = sum(len(group) - 1 for group in texts.values())
    return {
        "requests": len(answers),
        "failed": len(failed),
        "stale": len(stale),
        "inconsistent": inconsistent,
        "failures": [asdict(a) for a in failed[:20]],
        "stale_examples": [asdict(a) for a in stale[:20]],
    }


def rss_growth(
    samples: list[dict[str, Any]],
    warmup_s: float,
    full_at: dict[int | str, float] | None = None,
    quiet_from: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Each process's RSS once settled against its last sample, and the change (%), under its
    last title (a new worker is `ray::IDLE` until it becomes a replica). A process settles at
    the end of the warm-up, or one warm-up after it appeared if it came later (a replacement
    of a killed one, which starts empty and fills its caches as the first ones did); a model
    replica not before `full_at[pid]`, when its caches were reported full, and the ingress
    not before `full_at["ingress"]`. One whose caches never filled has `caches_full_at_s`
    None: its change includes their filling. One that lived less than 10 s after settling is
    left out.

    `after_faults_pct` is the change from `quiet_from` (after the last fault) to the end, None
    when that is under 10 s: a fault may raise a process's memory once and for good (a publish
    holds two sets of weights while the old ones drain, and the allocator keeps the heap they
    freed), so memory that still grows where no fault happens is what a leak looks like."""
    full_at = full_at or {}
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for sample in samples:
        by_pid.setdefault(sample["pid"], []).append(sample)
    growth = {}
    for pid, series in by_pid.items():
        appeared = series[0]["t"]
        settled_at = warmup_s if appeared <= 2 * RSS_INTERVAL_S else appeared + warmup_s
        title = series[-1]["process"]
        cached: int | str | None = (
            pid if "ModelReplica" in title else "ingress" if ":Ingress" in title else None
        )
        settled_at = max(settled_at, full_at.get(cached, settled_at))
        settled = [sample for sample in series if sample["t"] >= settled_at]
        if not settled or settled[-1]["t"] - settled[0]["t"] < 10:
            continue
        first, last = settled[0], settled[-1]
        row: dict[str, Any] = {
            "settled_at_s": first["t"],
            "settled_mb": first["rss_mb"],
            "last_mb": last["rss_mb"],
            "change_pct": 100 * (last["rss_mb"] - first["rss_mb"]) / first["rss_mb"],
        }
        if cached is not None:
            row["caches_full_at_s"] = full_at.get(cached)
        if quiet_from is not None:
            quiet = [sample for sample in settled if sample["t"] >= quiet_from]
            row["after_faults_pct"] = (
                100 * (quiet[-1]["rss_mb"] - quiet[0]["rss_mb"]) / quiet[0]["rss_mb"]
                if quiet and quiet[-1]["t"] - quiet[0]["t"] >= 10
                else None
            )
        growth[f"{last['process']} ({pid})"] = row
    return growth


def plot(result: dict[str, Any], answers: list[Answer], memory: list[dict[str, Any]], out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    ok = [a for a in answers if a.status == 200]
    bad = [a for a in answers if a.status != 200]
    axes[0].scatter([a.started for a in ok], [1000 * (a.ended - a.started) for a in ok], s=2)
    if bad:
        axes[0].scatter(
            [a.started for a in bad], [1000 * (a.ended - a.started) for a in bad], s=12, c="red"
        )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("latency (ms)")
    for event in result["faults"]:
        for axis in axes:
            axis.axvline(event["t"], color="grey", linewidth=0.8)
        axes[0].text(event["t"], axes[0].get_ylim()[1], event["fault"], rotation=90, fontsize=7,
                     va="top")  # fmt: skip
    by_pid: dict[int, list[tuple[float, float]]] = {}
    titles: dict[int, str] = {}
    for sample in memory:
        by_pid.setdefault(sample["pid"], []).append((sample["t"], sample["rss_mb"]))
        titles[sample["pid"]] = sample["process"].split(" ")[0].split(".")[0][:48]
    for pid, series in sorted(by_pid.items(), key=lambda item: titles[item[0]]):
        label = f"{titles[pid]} {pid}"
        axes[1].plot([t for t, _ in series], [m for _, m in series], linewidth=0.8, label=label)
    axes[1].set_ylabel("RSS (MB)")
    axes[1].set_xlabel("seconds")
    axes[1].legend(fontsize=5, ncol=2)
    figure.tight_layout()
    figure.savefig(out, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--duration-s", type=float, default=180.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=float, default=0.35)
    parser.add_argument("--max-tokens", type=int, default=8)
    # Small budgets, so that the caches fill within the warm-up: memory that grows after it is
    # not the caches filling. A replica stores about 20 new answers a second here, each
    # counting about 700 bytes: 8 MB would take minutes (the prefix cache fills in seconds).
    parser.add_argument("--result-mb", type=float, default=0.25)
    parser.add_argument("--prefix-mb", type=float, default=32)
    parser.add_argument("--ingress-mb", type=float, default=0.1)
    parser.add_argument("--redis-mb", type=int, default=64)
    parser.add_argument("--two-nodes", action="store_true", help="a head and a worker node")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "chaos_soak.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(options.config.read_text())
    [app] = base["applications"]
    namespace = app["args"]["namespace"]
    options.model = app["args"]["models"][0]["id"]

    workdir = Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    redis = RedisServer(workdir, options.redis_mb)
    config = copy.deepcopy(base)
    args = config["applications"][0]["args"]
    budgets = {
        "result": int(options.result_mb * 2**20),
        "prefix": int(options.prefix_mb * 2**20),
        "ingress": int(options.ingress_mb * 2**20),
    }
    args.setdefault("result_cache", {})["max_bytes"] = budgets["result"]
    args.setdefault("prefix_cache", {})["max_bytes"] = budgets["prefix"]
    args.setdefault("ingress_cache", {})["max_bytes"] = budgets["ingress"]
    env = {"RAYCACHE_REDIS_URL": redis.url, "RAYCACHE_ADMIN_TOKEN": ADMIN_TOKEN}
    probe = {"model": options.model, "prompt": "up?", "max_tokens": 1}
    faults: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    fill: list[dict[str, Any]] = []
    published_at = None
    try:
        two_nodes = TwoNodeRun(config, workdir, redis.url) if options.two_nodes else None
        running = (
            two_nodes
            if two_nodes is not None
            else serve_cluster(
                config,
                workdir,
                env,
                lambda client: client.post("/v1/completions", json=probe).status_code == 200,
            )
        )
        schedule = (*FAULTS, NODE_LOST) if two_nodes is not None else FAULTS
        with running as url:
            nodes = two_nodes.nodes if two_nodes is not None else None
            started = time.monotonic()
            load = Load(url, options, started)
            stop_sampling = threading.Event()
            sampler = threading.Thread(
                target=sample_memory, args=(stop_sampling, started, redis.port, memory)
            )
            filling = threading.Thread(
                target=sample_cache_fill, args=(stop_sampling, started, url, budgets, fill)
            )
            sampler.start()
            filling.start()
            load.start()
            for fraction, fault in schedule:
                time.sleep(max(0.0, started + fraction * options.duration_s - time.monotonic()))
                at = time.monotonic() - started
                print(f"{at:7.1f} s  {fault}", flush=True)
                detail = inject(fault, redis, namespace, url, options.model, nodes)
                if fault == "published" and detail.get("status") == 200:
                    published_at = time.monotonic() - started
                ended = time.monotonic() - started
                faults.append({"t": at, "fault": fault, "ended": ended, **detail})
            time.sleep(max(0.0, started + options.duration_s - time.monotonic()))
            load.stop.set()
            load.join()
            stop_sampling.set()
            sampler.join()
            filling.join()
    finally:
        redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    answers = sorted(load.answers, key=lambda a: a.started)
    bounds = [0.0, *(f["t"] for f in faults), options.duration_s]
    phases = {}
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        label = "before faults" if i == 0 else f"after {faults[i - 1]['fault']}"
        phase = [
            a.ended - a.started for a in answers if start <= a.started < end and a.status == 200
        ]
        phases[label] = percentiles(phase)
    result = {
        "benchmark": "chaos_soak",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "cpu_count": os.cpu_count(),
        "faults": faults,
        "published_acknowledged_at_s": published_at,
        **judge(answers, published_at),
        "latency": percentiles([a.ended - a.started for a in answers if a.status == 200]),
        "latency_by_phase": phases,
        "hits": sum(1 for a in answers if a.tier not in (None, "miss")),
        "rss_growth": rss_growth(
            memory,
            WARMUP * options.duration_s,
            caches_full_at(fill),
            quiet_from=faults[-1]["ended"] + QUIET_AFTER_FAULT_S if faults else None,
        ),
        "memory": memory,
        "cache_fill": fill,
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, answers, memory, options.json.with_suffix(".png"))
    latency = result["latency"]
    print(
        f"{result['requests']} requests, {result['hits']} hits: {result['failed']} failed, "
        f"{result['stale']} stale, {result['inconsistent']} inconsistent; "
        f"p50 {latency.get('p50_ms', 0):.0f} ms, p99 {latency.get('p99_ms', 0):.0f} ms"
    )
    for label, row in phases.items():
        print(f"  {label:<28} {row}")
    worst = max(result["rss_growth"].items(), key=lambda kv: kv[1]["change_pct"], default=None)
    if worst is not None:
        print(f"largest RSS change once settled: {worst[0]} {worst[1]['change_pct']:+.1f}%")
    quiet = [
        (name, row["after_faults_pct"])
        for name, row in result["rss_growth"].items()
        if row.get("after_faults_pct") is not None
    ]
    if quiet:
        name, change = max(quiet, key=lambda item: item[1])
        print(f"largest RSS change after the last fault: {name} {change:+.1f}%")
    for name, row in result["rss_growth"].items():
        if "caches_full_at_s" in row and row["caches_full_at_s"] is None:
            print(f"  caches never reported full: {name} (its change includes their filling)")
    print(f"-> {options.json} and {options.json.with_suffix('.png')}")


if __name__ == "__main__":
    main()
