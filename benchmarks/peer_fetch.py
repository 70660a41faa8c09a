"""Peer fetch (`cluster.sharing.peer`) beside the same bytes over a plain asyncio TCP socket.

    python -m benchmarks.peer_fetch [--rounds 7] [--small-calls 100] [--block-calls 8]
                                    [--dtype float32|bfloat16|float16]
                                    [--json benchmarks/results/peer_fetch.json]

One server process holds 64 small results (1 KiB each) and the prefix blocks of a 2,048-token prompt
(128 blocks of a small model's keys and values, 64 KiB each in float32, 8 MiB in all) in chunk
envelopes of 16 blocks, signed as replicas sign them. It serves them side by side: through a
`PeerServer`, and through a raw TCP server speaking the least framing that can carry a batch (a
count and length-prefixed keys in, length-prefixed values out; one connection, kept open). The
client process measures, interleaved round by round on the same data:

- `small_results`: one batched get of the 64 results over the peer service's gRPC; latency per
  call (median and p99 of all calls, ms).
- `prefix_blocks`: the prefix (8 MiB in float32, 4 MiB in bfloat16) in one exchange over the peer
  service's block stream (`cluster.sharing.peer_blocks`), throughput in MB/s (10^6 bytes) of the
  median round, three ways: `peer` (the bytes only), `peer_verified` (each chunk's signature checked
  and its blocks decoded as it arrives, as a replica does: `decode_leading_chunk`), and
  `replica_backend` (that, from a server whose backend is the replica's own, `ResultPeerBackend`,
  which encodes and signs the chunks from its prefix cache on every request).

Both sides run in separate processes, as two replicas would, on loopback. The peer calls are
authenticated as in production (a per-call credential from a cluster secret generated for the
run); the raw baseline is not, so the ratios include what authentication costs. Prints a table
and the peer/raw ratios, and writes them to `--json`. The numbers are of this machine only
(compare ratios, not absolute values); on a shared 2-core machine the two processes compete for
cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import statistics
import struct
import time
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import torch

from cluster.block_hashes import BlockHash, PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.peer import PeerClient, PeerServer
from cluster.sharing.tiered_prefix import decode_leading_chunk, encode_chunk
from serve_app.replica.peer_backend import ResultPeerBackend

ROOT = Path(__file__).resolve().parents[1]
SMALL_COUNT = 64
SMALL_BYTES = 1024
BLOCK_COUNT = 128  # 2,048 tokens in blocks of 16
BLOCK_TOKENS = 16
BLOCK_SHAPE = torch.Size((4, 2, 4, BLOCK_TOKENS, 32))  # layers, K and V, heads, tokens, dims
CHUNK_BLOCKS = 16  # the replica's default chunk of 1 MiB (prefix_cache.peer_chunk_bytes)
SCOPE = PrefixScope("bench-tenant", "tiny-gpt", "1")
_U32 = struct.Struct("<I")
_MISS = 0xFFFFFFFF
_COALESCE_BELOW = 16 * 1024


def _results() -> dict[str, bytes]:
    """Deterministic results, rebuilt identically in both processes."""
    return {f"result-{i:02d}": random.Random(i).randbytes(SMALL_BYTES) for i in range(SMALL_COUNT)}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prefix(dtype: torch.dtype) -> tuple[list[BlockHash], list[torch.Tensor]]:
    """The prompt's block hashes and blocks (in `dtype`), rebuilt identically in both
    processes."""
    tokens = [random.Random(7).randrange(256) for _ in range(BLOCK_COUNT * BLOCK_TOKENS)]
    hashes = prompt_block_hashes(tokens, BLOCK_TOKENS, SCOPE)
    generator = torch.Generator().manual_seed(11)
    return hashes, [torch.randn(BLOCK_SHAPE, generator=generator).to(dtype) for _ in hashes]


class MemoryBackend:
    """A PeerBackend over results and the chunks of one prefix, signed once."""

    def __init__(self, results: dict[str, bytes], chunks: list[bytes]) -> None:
        self.results = results
        self.chunks = chunks

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.results.get(key) for key in keys]

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        return self.chunks  # the benchmark asks for the whole prefix only

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        self.results.update(items)


# --- The raw baseline: the same batch over a plain TCP stream ----------------------------------


async def _raw_serve(
    store: dict[bytes, bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while True:
            (count,) = _U32.unpack(await reader.readexactly(4))
            keys = [
                await reader.readexactly(_U32.unpack(await reader.readexactly(4))[0])
                for _ in range(count)
            ]
            # Small values coalesce into one send; large ones go out as they are, uncopied.
            pending = bytearray()
            for key in keys:
                value = store.get(key)
                pending += _U32.pack(_MISS if value is None else len(value))
                if value is not None and len(value) < _COALESCE_BELOW:
                    pending += value
                elif value is not None:
                    writer.write(pending)
                    writer.write(value)
                    pending = bytearray()
            writer.write(pending)
            await writer.drain()
    except asyncio.IncompleteReadError:
        writer.close()


class RawClient:
    """The baseline's client: one open connection, one batch at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def get(self, keys: Sequence[bytes]) -> list[bytes | None]:
        self._writer.write(
            _U32.pack(len(keys)) + b"".join(_U32.pack(len(key)) + key for key in keys)
        )
        await self._writer.drain()
        values: list[bytes | None] = []
        for _ in keys:
            (size,) = _U32.unpack(await self._reader.readexactly(4))
            values.append(None if size == _MISS else await self._reader.readexactly(size))
        return values

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


# --- Server process ------------------------------------------------------------------------------


def _server_process(conn: Connection, secret_material: bytes, dtype: str) -> None:
    asyncio.run(_serve(conn, ClusterSecret(secret_material), DTYPES[dtype]))


async def _serve(conn: Connection, secret: ClusterSecret, dtype: torch.dtype) -> None:
    results = _results()
    hashes, blocks = _prefix(dtype)
    chunks = [
        encode_chunk(blocks[i : i + CHUNK_BLOCKS], hashes[i : i + CHUNK_BLOCKS], SCOPE, secret)
        for i in range(0, BLOCK_COUNT, CHUNK_BLOCKS)
    ]
    peer = PeerServer(MemoryBackend(results, chunks), secret.peer)
    address = await peer.start("127.0.0.1", 0)
    prefix_cache = PrefixCache(BLOCK_TOKENS, max_bytes=1 << 30)
    assert prefix_cache.insert(hashes, blocks, parent=None, extra=SCOPE) == BLOCK_COUNT
    replica_backend = ResultPeerBackend(
        ResultCache(max_bytes=1 << 20, max_entries=16),
        prefix_cache,
        secret,
        chunk_bytes=CHUNK_BLOCKS * BLOCK_SHAPE.numel() * dtype.itemsize,
    )
    replica = PeerServer(replica_backend, secret.peer)
    await replica.start("127.0.0.1", 0)
    raw_store = {key.encode(): value for key, value in results.items()}
    raw_store |= {b"chunk-%d" % i: chunk for i, chunk in enumerate(chunks)}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _raw_serve(raw_store, reader, writer)

    raw = await asyncio.start_server(handle, "127.0.0.1", 0)
    raw_port = raw.sockets[0].getsockname()[1]
    conn.send((address, peer.blocks_address, replica.blocks_address, raw_port))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    raw.close()
    await peer.stop(0)
    await replica.stop(0)


# --- Measurement ---------------------------------------------------------------------------------


async def _time(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


def _verifier(
    hashes: list[BlockHash], secret: ClusterSecret, dtype: torch.dtype
) -> Callable[[bytes], Any]:
    """A decoder of one exchange's chunks, as a replica checks them (`fetch_prefix_from_owner`)."""
    taken = 0

    def decode(blob: bytes) -> list[torch.Tensor]:
        nonlocal taken
        chunk = decode_leading_chunk(blob, hashes[taken:], SCOPE, BLOCK_SHAPE, dtype, secret)
        taken += len(chunk)
        return chunk

    return decode


def _keep(value: bytes) -> bytes:
    return value


async def _measure(
    options: argparse.Namespace,
    addresses: tuple[str, str, str, int],
    secret: ClusterSecret,
) -> dict[str, Any]:
    address, blocks_address, replica_address, raw_port = addresses
    results = _results()
    dtype = DTYPES[options.dtype]
    hashes, blocks = _prefix(dtype)
    small_keys = list(results)
    chunk_keys = [b"chunk-%d" % i for i in range(BLOCK_COUNT // CHUNK_BLOCKS)]
    client = PeerClient(secret.peer)
    # The reader's buffer as large as the block stream client's (`cluster.sharing.peer_blocks`).
    raw = RawClient(*await asyncio.open_connection("127.0.0.1", raw_port, limit=4 * 1024 * 1024))

    async def verified(at: str) -> list[torch.Tensor]:
        chunks = await client.get_prefix(at, hashes, _verifier(hashes, secret, dtype), 10.0)
        return [block for chunk in chunks for block in chunk]

    # Same answers every way (and warm channels, caches and allocators).
    assert await client.get_results(address, small_keys, 5.0) == list(results.values())
    assert await raw.get([key.encode() for key in small_keys]) == list(results.values())
    raw_chunks = await raw.get(chunk_keys)
    assert await client.get_prefix(blocks_address, hashes, _keep, 10.0) == raw_chunks
    for at in (blocks_address, replica_address):
        assert all(map(torch.equal, await verified(at), blocks))
    total_block_bytes = sum(len(chunk or b"") for chunk in raw_chunks)

    methods: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
        "small_results": {
            "peer": lambda: client.get_results(address, small_keys, 1.0),
            "raw_tcp": lambda: raw.get([key.encode() for key in small_keys]),
        },
        "prefix_blocks": {
            "peer": lambda: client.get_prefix(blocks_address, hashes, _keep, 10.0),
            "peer_verified": lambda: verified(blocks_address),
            "replica_backend": lambda: verified(replica_address),
            "raw_tcp": lambda: raw.get(chunk_keys),
        },
    }
    calls = {"small_results": options.small_calls, "prefix_blocks": options.block_calls}
    samples: dict[str, dict[str, list[float]]] = {
        workload: {name: [] for name in by_name} for workload, by_name in methods.items()
    }
    for _ in range(options.rounds):
        for workload, by_name in methods.items():
            for name, call in by_name.items():
                samples[workload][name].extend([await _time(call) for _ in range(calls[workload])])
    await raw.close()
    stats = client.stats()
    await client.close()
    if stats.misses or stats.errors or stats.timeouts:
        raise RuntimeError(f"the peer client missed during the benchmark: {stats}")

    small = {
        name: {
            "median_ms": statistics.median(times) * 1e3,
            "p99_ms": _quantile(times, 0.99) * 1e3,
            "calls": len(times),
        }
        for name, times in samples["small_results"].items()
    }
    prefix = {}
    for name, times in samples["prefix_blocks"].items():
        per_round = [
            statistics.median(times[i : i + options.block_calls])
            for i in range(0, len(times), options.block_calls)
        ]
        prefix[name] = {
            "MBps": total_block_bytes / statistics.median(per_round) / 1e6,
            "median_ms": statistics.median(times) * 1e3,
            "calls": len(times),
        }
    return {
        "small_results": {
            "keys": SMALL_COUNT,
            "value_bytes": SMALL_BYTES,
            **small,
            "transport": "grpc",
            "latency_ratio_peer_to_raw": small["peer"]["median_ms"] / small["raw_tcp"]["median_ms"],
        },
        "prefix_blocks": {
            "blocks": BLOCK_COUNT,
            "dtype": options.dtype,
            "block_bytes": BLOCK_SHAPE.numel() * dtype.itemsize,
            "chunk_blocks": CHUNK_BLOCKS,
            "total_bytes": total_block_bytes,
            "transport": "block stream",
            **prefix,
            "throughput_ratio_to_raw": {
                name: prefix[name]["MBps"] / prefix["raw_tcp"]["MBps"]
                for name in ("peer", "peer_verified", "replica_backend")
            },
        },
    }


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--small-calls", type=int, default=100, help="calls per round")
    parser.add_argument("--block-calls", type=int, default=8, help="calls per round")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="of the blocks")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "peer_fetch.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)

    secret = ClusterSecret.generate()
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=_server_process, args=(child, secret.material, options.dtype))
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server process did not start")
        results = asyncio.run(_measure(options, parent.recv(), secret))
        parent.send("stop")
        server.join(10)
    finally:
        if server.is_alive():
            server.terminate()
            server.join()

    report = {
        "benchmark": "peer_fetch",
        "machine": {
            "python": platform.python_version(),
            "grpcio": grpc.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "rounds": options.rounds,
        "results": results,
    }
    options.json.write_text(json.dumps(report, indent=2) + "\n")
    small, prefix = results["small_results"], results["prefix_blocks"]
    print(f"{'workload':40} {'peer':>12} {'raw tcp':>12} {'peer/raw':>9}")
    print(
        f"{'64 results x 1 KiB (gRPC), median ms':40} {small['peer']['median_ms']:12.3f}"
        f" {small['raw_tcp']['median_ms']:12.3f} {small['latency_ratio_peer_to_raw']:9.2f}"
    )
    print(
        f"{'64 results x 1 KiB (gRPC), p99 ms':40} {small['peer']['p99_ms']:12.3f}"
        f" {small['raw_tcp']['p99_ms']:12.3f}"
    )
    ratios = prefix["throughput_ratio_to_raw"]
    for name, label in (
        ("peer", f"{prefix['total_bytes'] / 2**20:.0f} MiB {options.dtype} prefix (stream), MB/s"),
        ("peer_verified", "  + verified and decoded, MB/s"),
        ("replica_backend", "  + signed per request, MB/s"),
    ):
        print(
            f"{label:40} {prefix[name]['MBps']:12.0f}"
            f" {prefix['raw_tcp']['MBps']:12.0f} {ratios[name]:9.2f}"
        )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
