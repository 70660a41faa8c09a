"""What a local result hit costs inside the replica, end to end: `ReplicaCore.complete` on a
request answered before, plus the `text_completion` object the ingress builds from it.

    python -m benchmarks.replica_hit_cost [--calls 2000] [--rounds 7]
                                          [--json benchmarks/results/replica_hit_cost.json]

The default TinyGPT (`configs/cluster.yaml`'s model) in a `ReplicaCore` without Ray (no peer,
no Redis: a hit is answered locally either way), one deterministic request of a 16-token and
one of a 2,048-token prompt, each answered once and then asked again `--calls` times per round.
Measured side by side, per call, median of the rounds' medians, in microseconds:

  hit        `complete` + `completion_response`: what the replica spends and the ingress wraps;
  key        the result key alone (`completion_key`: keyed BLAKE2b over the canonical request);
  lookup     the tier lookup alone with that key (`TieredCache.lookup`: local get + decode of
             the signed answer envelope);
  response   `completion_response` of the outcome alone.

`hit / (key + lookup + response)` is what the rest of the path (the version check, taking the
weights from the pool, the plan, the single-flight check) adds over the steps it cannot avoid.
The numbers are of this machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from cluster.local.result_cache import EntryTags
from cluster.secret import ClusterSecret
from cluster.sharing.directory import ReplicaId
from cluster.sharing.tiered import Placement
from serve_app.api.completions import CompletionJob, completion_response
from serve_app.config import parse_args
from serve_app.models import ByteTokenizer, SamplingParams
from serve_app.models.loading import load_model, weight_bytes_estimate
from serve_app.replica.answers import completion_key
from serve_app.replica.core import ReplicaCore
from serve_app.replica.serving import config_version, weights_spec

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = (16, 2048)


async def _per_call_us(call: Callable[[], Awaitable[object]], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await call()
    return 1e6 * (time.perf_counter() - started) / calls


async def _measure(calls: int, rounds: int) -> dict[str, Any]:
    args = parse_args({"models": [{"id": "tiny-gpt"}], "peer": {"enabled": False}})
    (spec,) = args.models
    secret = ClusterSecret.generate()
    tokenizer = ByteTokenizer()
    core = ReplicaCore(
        args,
        secret,
        ReplicaId("bench"),
        {spec.id: tokenizer},
        {spec.id: config_version(spec)},
        load_weights=lambda record: load_model(weights_spec(spec, record)),
        estimate_bytes=lambda _model: weight_bytes_estimate(spec),
    )
    await core.start()
    results: dict[str, Any] = {}
    for length in PROMPT_TOKENS:
        tokens = tuple((i * 7919) % 256 for i in range(length))
        job = CompletionJob(
            model=spec.id,
            tenant="default",
            prompt_tokens=tokens,
            params=SamplingParams(max_tokens=4, temperature=0.0),
        )
        computed = await core.complete(job)
        assert computed.cache_tier is None
        serving = core.pool.loaded(spec.id)
        assert serving is not None
        key = completion_key(args.namespace, secret, job, serving.record)
        tags = EntryTags(model=spec.id, version=serving.version, tenant=job.tenant)
        outcome = await core.complete(job)
        assert outcome.cache_tier == "local"

        async def hit(job: CompletionJob = job) -> object:
            return completion_response(job.model, await core.complete(job))

        async def key_only(job: CompletionJob = job, record: Any = serving.record) -> object:
            return completion_key(args.namespace, secret, job, record)

        async def lookup(key: str = key, tags: EntryTags = tags) -> object:
            found = await core.tiered.lookup(key, Placement(), tags)
            assert found is not None
            return found

        async def response(outcome: Any = outcome) -> object:
            return completion_response(spec.id, outcome)

        steps: dict[str, Callable[[], Awaitable[object]]] = {
            "hit": hit,
            "key": key_only,
            "lookup": lookup,
            "response": response,
        }
        medians: dict[str, list[float]] = {name: [] for name in steps}
        for _ in range(rounds):
            for name, step in steps.items():
                medians[name].append(await _per_call_us(step, calls))
        us = {name: statistics.median(values) for name, values in medians.items()}
        floor = us["key"] + us["lookup"] + us["response"]
        results[f"{length}_tokens"] = {
            "prompt_tokens": length,
            "us": {name: round(value, 2) for name, value in us.items()},
            "hit_over_unavoidable_steps": round(us["hit"] / floor, 3),
        }
    await core.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "replica_hit_cost.json"
    )
    options = parser.parse_args()
    results = asyncio.run(_measure(options.calls, options.rounds))
    report = {
        "benchmark": "replica_hit_cost",
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "calls": options.calls,
        "rounds": options.rounds,
        "results": results,
    }
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'prompt':>8} {'hit':>9} {'key':>9} {'lookup':>9} {'response':>9} {'hit/steps':>10}")
    for result in results.values():
        us = result["us"]
        print(
            f"{result['prompt_tokens']:8d} {us['hit']:9.1f} {us['key']:9.1f} {us['lookup']:9.1f}"
            f" {us['response']:9.1f} {result['hit_over_unavoidable_steps']:10.2f}"
        )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
