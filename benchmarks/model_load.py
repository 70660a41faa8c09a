"""Model load time, and what a request costs when its replica must load its model first.

    python -m benchmarks.model_load [--rounds 5] [--hf-path DIR] [--dtype float32]
                                    [--json benchmarks/results/model_load.json]

A `ReplicaCore` without Ray serving two models with room for one (`model_pool.max_loaded_models:
1`): the default TinyGPT of `configs/cluster.yaml` (17 MB of float32 weights) and a Hugging Face
Llama, either `--hf-path` or a random one of 8 layers, width 512 and grouped-query attention
written for the run (about 80 MB in float32). Each round asks each model twice in turn, a new
prompt each time (no cached answer), 8 greedy tokens:

  cold   the first request for the model: its replica evicts the other model and loads this one;
  warm   the second request, the model loaded;
  load   the load alone, from the pool's own counter (`load_seconds`).

Medians over the rounds, in milliseconds; `cold / warm` is what a request that must load its
model costs against one that need not. The numbers are of this machine only (weights read from
the page cache after the first round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.prefix_ttft import _random_llama
from cluster.secret import ClusterSecret
from cluster.sharing.directory import ReplicaId
from serve_app.api.completions import CompletionJob
from serve_app.config import AppArgs, parse_args
from serve_app.models import SamplingParams
from serve_app.models.loading import load_model, load_tokenizer, weight_bytes_estimate
from serve_app.replica.core import ReplicaCore
from serve_app.replica.serving import config_version, weights_spec

ROOT = Path(__file__).resolve().parents[1]


def _args(hf_path: Path, dtype: str) -> AppArgs:
    return parse_args(
        {
            "models": [
                {"id": "tiny-gpt"},
                {"id": "llama", "kind": "hf", "path": str(hf_path), "dtype": dtype},
            ],
            "model_pool": {"max_loaded_models": 1},
            "peer": {"enabled": False},
        }
    )


async def _measure(args: AppArgs, rounds: int) -> dict[str, Any]:
    specs = {spec.id: spec for spec in args.models}
    tokenizers = {spec.id: load_tokenizer(spec) for spec in args.models}
    core = ReplicaCore(
        args,
        ClusterSecret.generate(),
        ReplicaId("bench"),
        tokenizers,
        {spec.id: config_version(spec) for spec in args.models},
        load_weights=lambda record: load_model(weights_spec(specs[record.model], record)),
        estimate_bytes=lambda model: weight_bytes_estimate(specs[model]),
    )
    await core.start()
    timings: dict[str, dict[str, list[float]]] = {
        model: {"cold": [], "warm": [], "load": []} for model in specs
    }
    asked = 0

    async def ask(model: str) -> float:
        nonlocal asked
        asked += 1
        prompt = f"Request {asked} asks {model} what the cache keeps."
        job = CompletionJob(
            model=model,
            tenant="default",
            prompt_tokens=tuple(tokenizers[model].encode(prompt)),
            params=SamplingParams(max_tokens=8, temperature=0.0),
        )
        started = time.perf_counter()
        outcome = await core.complete(job)
        assert outcome.cache_tier is None
        return time.perf_counter() - started

    for _ in range(rounds):
        for model in specs:
            before = core.pool.stats()
            cold = await ask(model)
            after = core.pool.stats()
            if after.loads == before.loads:  # the model was already loaded (the first round)
                continue
            timings[model]["cold"].append(cold)
            timings[model]["load"].append(after.load_seconds - before.load_seconds)
            timings[model]["warm"].append(await ask(model))
    results = {}
    for model, series in timings.items():
        ms = {name: 1000 * statistics.median(values) for name, values in series.items()}
        results[model] = {
            "weight_bytes": weight_bytes_estimate(specs[model]),
            "ms": {name: round(value, 2) for name, value in ms.items()},
            "cold_over_warm": round(ms["cold"] / ms["warm"], 2),
            "samples": len(series["cold"]),
        }
    await core.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hf-path", type=Path, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "model_load.json"
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        path = options.hf_path
        if path is None:
            path = Path(workdir) / "random-llama"
            _random_llama(path)
        results = asyncio.run(_measure(_args(path.resolve(), options.dtype), options.rounds))
    report = {
        "benchmark": "model_load",
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "rounds": options.rounds,
        "hf_model": str(options.hf_path) if options.hf_path else "random llama",
        "dtype": options.dtype,
        "results": results,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'model':10} {'MB':>7} {'load ms':>9} {'warm ms':>9} {'cold ms':>9} {'cold/warm':>10}")
    for model, result in results.items():
        ms = result["ms"]
        print(
            f"{model:10} {result['weight_bytes'] / 1e6:7.1f} {ms['load']:9.1f} {ms['warm']:9.1f}"
            f" {ms['cold']:9.1f} {result['cold_over_warm']:10.2f}"
        )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
