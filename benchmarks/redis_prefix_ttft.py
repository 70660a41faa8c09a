"""Time to first token of a 2,048-token prompt whose first 90% is cached only in Redis.

    python -m benchmarks.redis_prefix_ttft [--repetitions 7]
                                           [--json benchmarks/results/redis_prefix_ttft.json]

Starts its own redis-server on a free loopback port. One replica's prefix cache prefills the
shared 90% and writes it to Redis in aligned chunks (`cluster.sharing.tiered_prefix`); then, side by
side in one run, with the default TinyGPT on one thread:

  redis    a fresh replica (empty local prefix cache) fetches the chunks in one round trip,
           decoding each as it arrives, inserts them, prefills the rest and picks the first
           token;
  scratch  the same prompt with no cache at all (a full prefill).

Reports the medians, the ratio redis/scratch and the speed-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from cluster.sharing.redis_store import RedisStore
from cluster.sharing.tiered_prefix import fetch_prefix_from_redis, store_prefix_in_redis
from serve_app.models import ByteTokenizer, SamplingParams, TinyGPT, TinyGPTConfig, generate
from serve_app.replica.prefix_generation import generate_with_prefix_cache
from tests.support.processes import RedisServer

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 2048
CACHED_FRACTION = 0.9
BLOCK = 16
CHUNK = 16
NAMESPACE = "bench"
SCOPE = PrefixScope("tenant", "tiny-gpt", "1")
SECRET = ClusterSecret.generate()
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


async def measure(repetitions: int, url: str) -> dict[str, float]:
    torch.set_num_threads(1)
    config = TinyGPTConfig()
    model = TinyGPT.from_seed(config, seed=0)
    tokenizer = ByteTokenizer()
    rng = random.Random(11)
    shared = [rng.randrange(256) for _ in range(int(PROMPT_TOKENS * CACHED_FRACTION))]
    shape = torch.Size(
        (config.n_layers, 2, config.n_heads, BLOCK, config.d_model // config.n_heads)
    )
    store = RedisStore(url, socket_timeout_s=5.0)
    writer = PrefixCache(BLOCK, max_bytes=1 << 30)
    generate_with_prefix_cache(
        model, tokenizer, [*shared, 1], FIRST_TOKEN, writer, SCOPE
    )  # fills the writer's cache with the shared blocks
    hashes = prompt_block_hashes(shared, BLOCK, SCOPE)
    written = await store_prefix_in_redis(store, writer, hashes, 0, SCOPE, NAMESPACE, CHUNK, SECRET)
    assert written, "nothing reached Redis"
    from_redis, scratch, cached = [], [], []
    for _ in range(repetitions):
        rest = [rng.randrange(256) for _ in range(PROMPT_TOKENS - len(shared))]
        prompt = shared + rest
        reader = PrefixCache(BLOCK, max_bytes=1 << 30)
        started = time.perf_counter()
        prompt_hashes = prompt_block_hashes(prompt, BLOCK, SCOPE)
        await fetch_prefix_from_redis(
            store,
            reader,
            prompt_hashes,
            usable=(len(prompt) - 1) // BLOCK,
            scope=SCOPE,
            namespace=NAMESPACE,
            chunk_blocks=CHUNK,
            block_shape=shape,
            dtype=torch.float32,
            device=model.device,
            secret=SECRET,
        )
        _, cached_tokens = generate_with_prefix_cache(
            model, tokenizer, prompt, FIRST_TOKEN, reader, SCOPE
        )
        from_redis.append(time.perf_counter() - started)
        cached.append(cached_tokens)
        started = time.perf_counter()
        generate(model, tokenizer, prompt, FIRST_TOKEN)
        scratch.append(time.perf_counter() - started)
    await store.close()
    redis_ms = statistics.median(from_redis) * 1000
    scratch_ms = statistics.median(scratch) * 1000
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "cached_tokens_from_redis": statistics.median(cached),
        "ttft_from_redis_ms": redis_ms,
        "ttft_scratch_ms": scratch_ms,
        "redis_over_scratch": redis_ms / scratch_ms,
        "speedup": scratch_ms / redis_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "redis_prefix_ttft.json"
    )
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(Path(workdir))
        server.start()
        try:
            result = asyncio.run(measure(options.repetitions, server.url))
        finally:
            server.stop()
    result = {"benchmark": "redis_prefix_ttft", "repetitions": options.repetitions, **result}
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"2,048-token prompt, {result['cached_tokens_from_redis']:.0f} tokens from Redis: "
        f"TTFT {result['ttft_from_redis_ms']:.0f} ms vs {result['ttft_scratch_ms']:.0f} ms from "
        f"scratch (x{result['redis_over_scratch']:.2f}, speed-up x{result['speedup']:.1f})"
    )


if __name__ == "__main__":
    main()
