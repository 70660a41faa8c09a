"""Requests per second of `/v1/embeddings` for batches of 64 inputs, 0%, 50% and 100% cached.

    python -m benchmarks.embeddings_throughput [--batch 64] [--requests 20] [--clients 2]
                                               [--input-bytes 200] [--url URL]
                                               [--json benchmarks/results/embeddings.json]

Starts `serve run` of configs/cluster.yaml (its built-in encoder `tiny-embed`) with its own
redis-server on a free port, or measures a running application (`--url`). For each cached
share, every request is a batch of `--batch` distinct inputs of which that share was embedded
by an earlier request (warmed beforehand, not timed), the rest new. The shares run
interleaved, request by request, by `--clients` concurrent clients, so they see the same
machine load. Reports requests/s and inputs/s of each share and the ratio to the uncached
share; every response is checked (the cached inputs are hits, the new ones misses).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-embed"
SHARES = (0.0, 0.5, 1.0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], str]:
    """redis-server and `serve run` on free ports; returns the processes and the app's URL."""
    redis_port = _free_port()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise SystemExit("redis-server is not on the PATH")
    redis = subprocess.Popen(
        [redis_server, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=workdir,
    )
    config = yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    config["http_options"].update(host="127.0.0.1", port=_free_port())
    config["grpc_options"]["port"] = _free_port()
    config["applications"][0]["args"]["redis_url"] = f"redis://127.0.0.1:{redis_port}/0"
    path = workdir / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (workdir / "serve-run.log").open("wb")
    serve = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=dict(os.environ),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    url = f"http://127.0.0.1:{config['http_options']['port']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if serve.poll() is not None:
            raise SystemExit(f"serve run exited; see {workdir / 'serve-run.log'}")
        try:
            if httpx.post(f"{url}/v1/embeddings", json={"model": MODEL, "input": "up?"}).is_success:
                return [serve, redis], url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the application did not answer within 300 s")


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def _text(size: int) -> str:
    word = uuid.uuid4().hex
    return (f"{word} embeds this input " * (size // 24 + 1))[:size]


def _embed(client: httpx.Client, inputs: list[str]) -> tuple[float, list[bool]]:
    started = time.perf_counter()
    response = client.post("/v1/embeddings", json={"model": MODEL, "input": inputs})
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, [entry["hit"] for entry in response.json()["cache"]]


def _batches(options: argparse.Namespace, client: httpx.Client) -> list[tuple[float, list[str]]]:
    """Every timed request: (share, inputs), the cached part embedded beforehand."""
    batches = []
    for _ in range(options.requests):
        for share in SHARES:
            cached = int(share * options.batch)
            inputs = [_text(options.input_bytes) for _ in range(options.batch)]
            if cached:
                _embed(client, inputs[:cached])
            batches.append((share, inputs))
    return batches


def measure(options: argparse.Namespace, url: str) -> dict[str, Any]:
    with httpx.Client(base_url=url, timeout=120) as client:
        batches = _batches(options, client)
        # The share of each request is known: its hits must be exactly its warmed inputs.
        seconds: dict[float, list[float]] = {share: [] for share in SHARES}

        def run(batch: tuple[float, list[str]]) -> None:
            share, inputs = batch
            elapsed, hits = _embed(client, inputs)
            cached = int(share * options.batch)
            assert hits == [True] * cached + [False] * (options.batch - cached), hits
            seconds[share].append(elapsed)

        started = time.perf_counter()
        with ThreadPoolExecutor(options.clients) as pool:
            list(pool.map(run, batches))
        wall = time.perf_counter() - started
    results: dict[str, Any] = {"wall_s": wall, "shares": {}}
    for share in SHARES:
        median = statistics.median(seconds[share])
        results["shares"][f"{share:.0%}"] = {
            "requests": len(seconds[share]),
            "median_ms": median * 1000,
            # One client's view: what a request of this share costs, as a rate.
            "requests_per_s": options.clients / median,
            "inputs_per_s": options.clients * options.batch / median,
        }
    base = results["shares"]["0%"]["requests_per_s"]
    for entry in results["shares"].values():
        entry["vs_uncached"] = entry["requests_per_s"] / base
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per share")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--input-bytes", type=int, default=200)
    parser.add_argument("--url", help="measure a running application instead of starting one")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "embeddings.json"
    )
    options = parser.parse_args()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as workdir:
        url = options.url
        if url is None:
            processes, url = _start(Path(workdir))
        try:
            results = measure(options, url)
        finally:
            _stop(processes)
    results["settings"] = {k: v for k, v in vars(options).items() if k != "json"}
    results["settings"].pop("url", None)
    print(f"batch of {options.batch} inputs, {options.clients} clients, medians:")
    for share, entry in results["shares"].items():
        print(
            f"  {share:>4} cached: {entry['median_ms']:7.1f} ms/request  "
            f"{entry['requests_per_s']:6.2f} requests/s  {entry['inputs_per_s']:7.0f} inputs/s  "
            f"x{entry['vs_uncached']:.2f}"
        )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(results, indent=2))
    print(f"wrote {options.json}")


if __name__ == "__main__":
    main()
