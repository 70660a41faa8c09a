"""Peer fetch (`cluster.peer`) beside the same bytes over a plain asyncio TCP socket.

    python -m benchmarks.peer_fetch [--rounds 7] [--small-calls 100] [--block-calls 8]
                                    [--json benchmarks/results/peer_fetch.json]

One server process holds an in-memory backend: 64 small results (1 KiB each) and the blocks of a
2,048-token prefix (128 blocks x 64 KiB = 8 MiB). It serves them twice, side by side: through a
`PeerServer`, and through a raw TCP server speaking the least framing that can carry a batch (a
count and length-prefixed keys in, length-prefixed values out; one connection, kept open). The
client process measures, interleaved round by round on the same data:

- `small_results`: one batched get of the 64 results over the peer service's gRPC; latency per
  call (median and p99 of all calls, ms).
- `prefix_blocks`: the 128 blocks in one exchange over the peer service's block stream
  (`cluster.peer_blocks`); throughput in MB/s (10^6 bytes) of the median round.

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

from cluster.peer import PeerClient, PeerServer
from cluster.secret import ClusterSecret

ROOT = Path(__file__).resolve().parents[1]
SMALL_COUNT = 64
SMALL_BYTES = 1024
BLOCK_COUNT = 128  # 2,048 tokens in blocks of 16
BLOCK_BYTES = 64 * 1024
_U32 = struct.Struct("<I")
_MISS = 0xFFFFFFFF
_COALESCE_BELOW = 16 * 1024


def _data() -> tuple[dict[str, bytes], dict[bytes, bytes]]:
    """Deterministic contents, rebuilt identically in both processes."""
    results = {
        f"result-{i:02d}": random.Random(i).randbytes(SMALL_BYTES) for i in range(SMALL_COUNT)
    }
    blocks = {
        b"block-%03d" % i: random.Random(1000 + i).randbytes(BLOCK_BYTES)
        for i in range(BLOCK_COUNT)
    }
    return results, blocks


class MemoryBackend:
    """A PeerBackend over two dicts."""

    def __init__(self, results: dict[str, bytes], blocks: dict[bytes, bytes]) -> None:
        self.results = results
        self.blocks = blocks

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self.results.get(key) for key in keys]

    async def get_blocks(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        return [self.blocks.get(h) for h in hashes]

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


def _server_process(conn: Connection, auth_key: bytes) -> None:
    asyncio.run(_serve(conn, auth_key))


async def _serve(conn: Connection, auth_key: bytes) -> None:
    results, blocks = _data()
    backend = MemoryBackend(results, blocks)
    peer = PeerServer(backend, auth_key)
    address = await peer.start("127.0.0.1", 0)
    raw_store = {key.encode(): value for key, value in results.items()} | blocks

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _raw_serve(raw_store, reader, writer)

    raw = await asyncio.start_server(handle, "127.0.0.1", 0)
    raw_port = raw.sockets[0].getsockname()[1]
    conn.send((address, peer.blocks_address, raw_port))
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    raw.close()
    await peer.stop(0)


# --- Measurement ---------------------------------------------------------------------------------


async def _time(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


async def _measure(
    options: argparse.Namespace, address: str, blocks_address: str, raw_port: int, auth_key: bytes
) -> dict[str, Any]:
    results, blocks = _data()
    small_keys = list(results)
    block_hashes = list(blocks)
    total_block_bytes = sum(len(block) for block in blocks.values())
    client = PeerClient(auth_key)
    raw = RawClient(*await asyncio.open_connection("127.0.0.1", raw_port))

    # Same answers both ways (and warm channels, caches and allocators).
    assert await client.get_results(address, small_keys, 5.0) == list(results.values())
    assert await client.get_blocks(blocks_address, block_hashes, 10.0) == list(blocks.values())
    assert await raw.get([key.encode() for key in small_keys]) == list(results.values())
    assert await raw.get(block_hashes) == list(blocks.values())

    methods: dict[str, dict[str, Callable[[], Awaitable[object]]]] = {
        "small_results": {
            "peer": lambda: client.get_results(address, small_keys, 1.0),
            "raw_tcp": lambda: raw.get([key.encode() for key in small_keys]),
        },
        "prefix_blocks": {
            "peer": lambda: client.get_blocks(blocks_address, block_hashes, 10.0),
            "raw_tcp": lambda: raw.get(block_hashes),
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
            "block_bytes": BLOCK_BYTES,
            "total_bytes": total_block_bytes,
            "transport": "block stream",
            **prefix,
            "throughput_ratio_peer_to_raw": prefix["peer"]["MBps"] / prefix["raw_tcp"]["MBps"],
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
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "peer_fetch.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)

    auth_key = ClusterSecret.generate().peer
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    server = context.Process(target=_server_process, args=(child, auth_key))
    server.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server process did not start")
        address, blocks_address, raw_port = parent.recv()
        results = asyncio.run(_measure(options, address, blocks_address, raw_port, auth_key))
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
    print(
        f"{'128 blocks x 64 KiB (stream), MB/s':40} {prefix['peer']['MBps']:12.0f}"
        f" {prefix['raw_tcp']['MBps']:12.0f} {prefix['throughput_ratio_peer_to_raw']:9.2f}"
    )
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
