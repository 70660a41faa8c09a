"""Time to first token of a 2,048-token prompt whose first 90% is cached on its owner replica.

    python -m benchmarks.peer_prefix_ttft [--repetitions 7]
                                          [--json benchmarks/results/peer_prefix_ttft.json]

An owner process (a `PeerServer` over the replica's own backend, `ResultPeerBackend`) prefills
the shared 90% into its prefix cache. Then, side by side in one run, with the default TinyGPT on
one thread:

  peer     a fresh replica (empty local prefix cache) fetches the blocks from the owner over the
           block stream (`fetch_prefix_from_owner`: chunks signed by the owner per request,
           checked as they arrive, inserted), prefills the rest and picks the first token;
  scratch  the same prompt with no cache at all (a full prefill).

Reports the medians (and the fetch alone), the ratio peer/scratch and the speed-up. Both
processes share this machine's cores, as two replicas on one node would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import statistics
import time
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.peer import PeerClient, PeerServer
from cluster.sharing.tiered_prefix import fetch_prefix_from_owner
from serve_app.models import ByteTokenizer, SamplingParams, TinyGPT, TinyGPTConfig, generate
from serve_app.replica.peer_backend import ResultPeerBackend
from serve_app.replica.prefix_generation import generate_with_prefix_cache

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 2048
CACHED_FRACTION = 0.9
BLOCK = 16
SCOPE = PrefixScope("tenant", "tiny-gpt", "1")
FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0.0)


def _shared_prefix() -> list[int]:
    rng = random.Random(11)
    return [rng.randrange(256) for _ in range(int(PROMPT_TOKENS * CACHED_FRACTION))]


def _owner_process(conn: Connection, secret_material: bytes) -> None:
    asyncio.run(_own(conn, ClusterSecret(secret_material)))


async def _own(conn: Connection, secret: ClusterSecret) -> None:
    torch.set_num_threads(1)
    model = TinyGPT.from_seed(TinyGPTConfig(), seed=0)
    prefix = PrefixCache(BLOCK, max_bytes=1 << 30)
    generate_with_prefix_cache(
        model, ByteTokenizer(), [*_shared_prefix(), 1], FIRST_TOKEN, prefix, SCOPE
    )  # fills the owner's cache with the shared blocks
    backend = ResultPeerBackend(ResultCache(max_bytes=1 << 20, max_entries=8), prefix, secret)
    server = PeerServer(backend, secret.peer)
    await server.start("127.0.0.1", 0)
    conn.send(server.blocks_address)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await server.stop(0)


async def measure(repetitions: int, owner: str, secret: ClusterSecret) -> dict[str, float]:
    torch.set_num_threads(1)
    config = TinyGPTConfig()
    model = TinyGPT.from_seed(config, seed=0)
    tokenizer = ByteTokenizer()
    shape = torch.Size(
        (config.n_layers, 2, config.n_heads, BLOCK, config.d_model // config.n_heads)
    )
    shared = _shared_prefix()
    client = PeerClient(secret.peer)
    rng = random.Random(5)
    from_peer, fetches, scratch, cached = [], [], [], []
    for _ in range(repetitions):
        prompt = shared + [rng.randrange(256) for _ in range(PROMPT_TOKENS - len(shared))]
        reader = PrefixCache(BLOCK, max_bytes=1 << 30)
        started = time.perf_counter()
        added = await fetch_prefix_from_owner(
            reader,
            prompt_block_hashes(prompt, BLOCK, SCOPE),
            usable=(len(prompt) - 1) // BLOCK,
            scope=SCOPE,
            peer=client,
            owner_address=owner,
            block_shape=shape,
            dtype=torch.float32,
            device=model.device,
            timeout_s=10.0,
            secret=secret,
        )
        fetched = time.perf_counter()
        _, cached_tokens = generate_with_prefix_cache(
            model, tokenizer, prompt, FIRST_TOKEN, reader, SCOPE
        )
        from_peer.append(time.perf_counter() - started)
        fetches.append(fetched - started)
        cached.append(cached_tokens)
        assert added * BLOCK == cached_tokens, "the owner's blocks were not all used"
        started = time.perf_counter()
        generate(model, tokenizer, prompt, FIRST_TOKEN)
        scratch.append(time.perf_counter() - started)
    await client.close()
    peer_ms = statistics.median(from_peer) * 1000
    scratch_ms = statistics.median(scratch) * 1000
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "cached_tokens_from_peer": statistics.median(cached),
        "fetch_ms": statistics.median(fetches) * 1000,
        "ttft_from_peer_ms": peer_ms,
        "ttft_scratch_ms": scratch_ms,
        "peer_over_scratch": peer_ms / scratch_ms,
        "speedup": scratch_ms / peer_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "peer_prefix_ttft.json"
    )
    options = parser.parse_args()
    secret = ClusterSecret.generate()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    owner = context.Process(target=_owner_process, args=(child, secret.material))
    owner.start()
    try:
        if not parent.poll(120):
            raise RuntimeError("the owner process did not start")
        result = asyncio.run(measure(options.repetitions, parent.recv(), secret))
        parent.send("stop")
        owner.join(10)
    finally:
        if owner.is_alive():
            owner.terminate()
            owner.join()
    result = {"benchmark": "peer_prefix_ttft", "repetitions": options.repetitions, **result}
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"2,048-token prompt, {result['cached_tokens_from_peer']:.0f} tokens from the owner "
        f"(fetched in {result['fetch_ms']:.1f} ms): TTFT {result['ttft_from_peer_ms']:.0f} ms vs "
        f"{result['ttft_scratch_ms']:.0f} ms from scratch (x{result['peer_over_scratch']:.2f}, "
        f"speed-up x{result['speedup']:.1f})"
    )


if __name__ == "__main__":
    main()
