"""Start-up time of `serve run`, and HTTP latency of cached vs uncached completions.

    python -m benchmarks.http_latency [--config configs/cluster.yaml] [--requests 20]
                                      [--api-key KEY] [--baseline-url URL [--baseline-api-key KEY]]
                                      [--json benchmarks/results/http_latency.json]

Starts `serve run CONFIG` (its own local Ray cluster) and measures the seconds until the first
completion succeeds; then sends N distinct greedy prompts once each (uncached: every one is
computed) and the same N again (cached: every one is a local hit), one at a time, and reports
the median and p90 of each side and their ratio, measured side by side in one run. Stops
`serve run` at the end. Pass `--url` to measure an application that is already running instead
(no start-up time then). `--api-key` is sent as `Authorization: Bearer` (and, when this starts
`serve run`, configured through `RAYCACHE_API_KEYS` as tenant `bench`).

`--baseline-url` measures a second running application in the same run, request by request
alternating with the first (another build, e.g. an earlier commit started from a `git worktree`),
and reports this/baseline ratios of each median: both sides see the same machine load.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]


BENCH_TENANT = "bench"


def _completion(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, dict]:
    body = {"model": "tiny-gpt", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def _start(
    config: Path, log_path: Path, api_key: str | None
) -> tuple[subprocess.Popen[bytes], str, float]:
    port = yaml.safe_load(config.read_text())["http_options"]["port"]
    url = f"http://127.0.0.1:{port}"
    serve = Path(sys.executable).parent / "serve"
    environment = dict(os.environ)
    if api_key is not None:
        environment["RAYCACHE_API_KEYS"] = f"{BENCH_TENANT}:{api_key}"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(serve), "run", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=environment,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    with httpx.Client(base_url=url, timeout=30, headers=_headers(api_key)) as client:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"serve run exited; see {log_path}")
            if time.monotonic() - started > 300:
                raise SystemExit(f"no completion within 300 s; see {log_path}")
            try:
                _completion(client, "warm-up", 1)
                return process, url, time.monotonic() - started
            except httpx.HTTPError:
                time.sleep(0.25)


def _summary(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "median_ms": statistics.median(ordered) * 1000,
        "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1000,
        "min_ms": ordered[0] * 1000,
    }


def _headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"authorization": f"Bearer {api_key}"}


def _measure(
    clients: dict[str, httpx.Client], prompts: list[str], max_tokens: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Uncached then cached seconds of every prompt on every client, alternating clients
    request by request."""
    texts: dict[tuple[str, str], str] = {}
    seconds: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in clients}
    for cached in (False, True):
        for prompt in prompts:
            for name, client in clients.items():
                elapsed, response = _completion(client, prompt, max_tokens)
                text = response["choices"][0]["text"]
                if cached:
                    assert response["cache"]["hit"], f"{name}: a repeated prompt was a miss"
                    assert text == texts[name, prompt], f"{name}: cached answer differs"
                else:
                    assert not response["cache"]["hit"], f"{name}: a fresh prompt was a hit"
                    texts[name, prompt] = text
                seconds[name][cached].append(elapsed)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--url", help="measure a running application instead of starting one")
    parser.add_argument("--api-key", help="API key to send (and to configure, when starting)")
    parser.add_argument("--baseline-url", help="a second running application, measured alongside")
    parser.add_argument("--baseline-api-key", help="API key for the baseline, if it needs one")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prompt-bytes", type=int, default=512)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "http_latency.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)

    process = None
    startup_s = None
    url = options.url
    if url is None:
        log_path = options.json.with_suffix(".serve-run.log")
        process, url, startup_s = _start(options.config, log_path, options.api_key)
    targets = {"this": (url, options.api_key)}
    if options.baseline_url is not None:
        targets["baseline"] = (options.baseline_url, options.baseline_api_key)
    try:
        run_tag = f"{os.getpid()}-{time.time_ns()}"
        filler = "x" * options.prompt_bytes
        prompts = [
            f"{run_tag} request {i} {filler}"[: options.prompt_bytes]
            for i in range(options.requests)
        ]
        clients = {
            name: httpx.Client(base_url=target, timeout=60, headers=_headers(key))
            for name, (target, key) in targets.items()
        }
        try:
            seconds = _measure(clients, prompts, options.max_tokens)
        finally:
            for client in clients.values():
                client.close()
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)

    result: dict = {
        "benchmark": "http_latency",
        "requests": options.requests,
        "prompt_bytes": options.prompt_bytes,
        "max_tokens": options.max_tokens,
        "api_key": options.api_key is not None,
        "serve_run_startup_s": startup_s,
    }
    for name, (uncached, cached) in seconds.items():
        summary = {"uncached": _summary(uncached), "cached": _summary(cached)}
        summary["speedup_median"] = (
            summary["uncached"]["median_ms"] / summary["cached"]["median_ms"]
        )
        result[name] = summary
    if "baseline" in result:
        result["this/baseline"] = {
            side: result["this"][side]["median_ms"] / result["baseline"][side]["median_ms"]
            for side in ("uncached", "cached")
        }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    if startup_s is not None:
        print(f"serve run -> first completion: {startup_s:.1f} s")
    for name in seconds:
        summary = result[name]
        print(
            f"{name}: uncached median {summary['uncached']['median_ms']:.1f} ms "
            f"(p90 {summary['uncached']['p90_ms']:.1f}) | "
            f"cached median {summary['cached']['median_ms']:.1f} ms "
            f"(p90 {summary['cached']['p90_ms']:.1f}) | "
            f"speed-up x{summary['speedup_median']:.1f}"
        )
    if "this/baseline" in result:
        ratios = result["this/baseline"]
        print(
            f"this/baseline medians: uncached x{ratios['uncached']:.2f}, "
            f"cached x{ratios['cached']:.2f}"
        )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
