"""Start-up time of `serve run`, and HTTP latency of cached vs uncached completions.

    python -m benchmarks.http_latency [--config configs/cluster.yaml] [--requests 20]
                                      [--json benchmarks/results/http_latency.json]

Starts `serve run CONFIG` (its own local Ray cluster) and measures the seconds until the first
completion succeeds; then sends N distinct greedy prompts once each (uncached: every one is
computed) and the same N again (cached: every one is a local hit), one at a time, and reports
the median and p90 of each side and their ratio, measured side by side in one run. Stops
`serve run` at the end. Pass `--url` to measure an application that is already running instead
(no start-up time then).
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


def _completion(client: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, dict]:
    body = {"model": "tiny-gpt", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    started = time.perf_counter()
    response = client.post("/v1/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.json()


def _start(config: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str, float]:
    port = yaml.safe_load(config.read_text())["http_options"]["port"]
    url = f"http://127.0.0.1:{port}"
    serve = Path(sys.executable).parent / "serve"
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(serve), "run", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    with httpx.Client(base_url=url, timeout=30) as client:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--url", help="measure a running application instead of starting one")
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
        process, url, startup_s = _start(options.config, log_path)
    try:
        run_tag = f"{os.getpid()}-{time.time_ns()}"
        filler = "x" * options.prompt_bytes
        prompts = [
            f"{run_tag} request {i} {filler}"[: options.prompt_bytes]
            for i in range(options.requests)
        ]
        uncached, cached = [], []
        with httpx.Client(base_url=url, timeout=60) as client:
            for prompt in prompts:
                elapsed, response = _completion(client, prompt, options.max_tokens)
                assert not response["cache"]["hit"], "a fresh prompt was a hit"
                uncached.append((elapsed, response["choices"][0]["text"]))
            for (_, first_text), prompt in zip(uncached, prompts, strict=True):
                elapsed, response = _completion(client, prompt, options.max_tokens)
                assert response["cache"]["hit"], "a repeated prompt was a miss"
                assert response["choices"][0]["text"] == first_text, "cached answer differs"
                cached.append(elapsed)
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)

    result = {
        "benchmark": "http_latency",
        "requests": options.requests,
        "prompt_bytes": options.prompt_bytes,
        "max_tokens": options.max_tokens,
        "serve_run_startup_s": startup_s,
        "uncached": _summary([seconds for seconds, _ in uncached]),
        "cached": _summary(cached),
    }
    result["speedup_median"] = result["uncached"]["median_ms"] / result["cached"]["median_ms"]
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    if startup_s is not None:
        print(f"serve run -> first completion: {startup_s:.1f} s")
    print(
        f"uncached median {result['uncached']['median_ms']:.1f} ms "
        f"(p90 {result['uncached']['p90_ms']:.1f}) | "
        f"cached median {result['cached']['median_ms']:.1f} ms "
        f"(p90 {result['cached']['p90_ms']:.1f}) | "
        f"speed-up x{result['speedup_median']:.1f}  -> {options.json}"
    )


if __name__ == "__main__":
    main()
