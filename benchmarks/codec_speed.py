"""Encode and decode throughput of the envelope codec, beside raw bytes and pickle.

    python -m benchmarks.codec_speed [--rounds 5] [--min-seconds 0.2]
                                     [--json benchmarks/results/codec_speed.json]

Three payloads: one KV block (4 layers x K and V, each 4 heads x 16 tokens x 64 float32: eight
16 KiB tensors), one 1 MiB tensor and one 16 MiB tensor. Methods, measured side by side in one
run on the same tensors:

- `raw`: `tensor.numpy().tobytes()` per tensor, and back with `torch.frombuffer` over a
  `bytearray` copy (bytes from Redis are read-only; this is the copy `decode` makes too). No
  header, no checksum: the floor any format pays.
- `codec`: `cluster.codec.encode` / `decode` from bytes (signed: Poly1305 under a one-time
  key from the cluster secret; tensors copied once).
- `codec (bytearray)`: `decode` from a `bytearray` (as a transport that receives into one would
  hand it over), whose memory the tensors share: no copy. Its encode is `codec`'s.
- `pickle`: `pickle.dumps(tensors, protocol=5)` / `pickle.loads`, a reference only: raycache never
  unpickles what it reads from Redis or a peer.

Throughput is tensor bytes per second (GB/s, 10^9 bytes) of the median round; each round repeats
an operation for at least `--min-seconds`. Prints a table and the codec/raw ratios, and writes
them to `--json`. The numbers are of this machine only: compare ratios, not absolute values.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cluster import codec
from cluster.secret import ClusterSecret

ROOT = Path(__file__).resolve().parents[1]
SECRET = ClusterSecret(b"benchmark-secret")
Tensors = dict[str, torch.Tensor]


def _payloads() -> dict[str, Tensors]:
    generator = torch.Generator().manual_seed(0)
    kv_block = {
        f"layer{layer}.{part}": torch.randn(4, 16, 64, generator=generator)
        for layer in range(4)
        for part in ("k", "v")
    }
    return {
        "kv_block_128KiB": kv_block,
        "tensor_1MiB": {"x": torch.randn(256 * 1024, generator=generator)},
        "tensor_16MiB": {"x": torch.randn(4 * 1024 * 1024, generator=generator)},
    }


def _raw_encode(tensors: Tensors) -> list[bytes]:
    return [tensor.numpy().tobytes() for tensor in tensors.values()]


def _raw_decode(parts: list[bytes], like: Tensors) -> Tensors:
    return {
        name: torch.frombuffer(bytearray(part), dtype=tensor.dtype).view(tensor.shape)
        for part, (name, tensor) in zip(parts, like.items(), strict=True)
    }


Method = tuple[Callable[[], Any], Callable[[Any], Any], Callable[[Any], Tensors]]
"""Encode; what the transport hands the reader (not timed); decode."""


def _same(data: Any) -> Any:
    return data


def _methods(tensors: Tensors) -> dict[str, Method]:
    def encode() -> bytes:
        return codec.encode("kv", "m", "1", created_at=0.0, tensors=tensors, secret=SECRET)

    def decode(data: bytes | bytearray) -> Tensors:
        return codec.decode(data, secret=SECRET).tensors

    return {
        "raw": (lambda: _raw_encode(tensors), _same, lambda parts: _raw_decode(parts, tensors)),
        "codec": (encode, _same, decode),
        "codec (bytearray)": (encode, bytearray, decode),
        "pickle": (
            lambda: pickle.dumps(tensors, protocol=5),
            _same,
            pickle.loads,  # a reference only; never done on bytes from Redis or a peer
        ),
    }


def _seconds_per_call(call: Callable[[], Any], rounds: int, min_seconds: float) -> float:
    """The median over `rounds` of the mean time of one call, each round lasting `min_seconds`."""
    call()
    started = time.perf_counter()
    call()
    repeat = max(1, int(min_seconds / max(time.perf_counter() - started, 1e-9)))
    means = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeat):
            call()
        means.append((time.perf_counter() - started) / repeat)
    return statistics.median(means)


def _same_bits(left: Tensors, right: Tensors) -> bool:
    return list(left) == list(right) and all(
        left[name].dtype == right[name].dtype
        and torch.equal(left[name].view(torch.int32), right[name].view(torch.int32))
        for name in left
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=0.2)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "codec_speed.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)

    rows = []
    for payload, tensors in _payloads().items():
        nbytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        for method, (encode, transport, decode) in _methods(tensors).items():
            encoded = transport(encode())
            assert _same_bits(decode(encoded), tensors), f"{method} changed {payload}"
            size = sum(map(len, encoded)) if isinstance(encoded, list) else len(encoded)
            encode_s = _seconds_per_call(encode, options.rounds, options.min_seconds)
            decode_s = _seconds_per_call(
                functools.partial(decode, encoded), options.rounds, options.min_seconds
            )
            rows.append(
                {
                    "payload": payload,
                    "method": method,
                    "tensor_bytes": nbytes,
                    "encoded_bytes": size,
                    "encode_us": encode_s * 1e6,
                    "decode_us": decode_s * 1e6,
                    "encode_gbps": nbytes / encode_s / 1e9,
                    "decode_gbps": nbytes / decode_s / 1e9,
                }
            )
            print(
                f"{payload:16} {method:18} encode {rows[-1]['encode_gbps']:6.2f} GB/s "
                f"({rows[-1]['encode_us']:9.1f} us)  decode {rows[-1]['decode_gbps']:6.2f} GB/s "
                f"({rows[-1]['decode_us']:9.1f} us)  {size - nbytes:+d} bytes",
                flush=True,
            )

    by_key = {(row["payload"], row["method"]): row for row in rows}
    ratios = {
        f"{payload} {method}/raw": {
            f"{step}_time": row[f"{step}_us"] / by_key[payload, "raw"][f"{step}_us"]
            for step in ("encode", "decode")
        }
        for (payload, method), row in by_key.items()
        if method != "raw"
    }
    result = {
        "benchmark": "codec_speed",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "rounds": options.rounds,
        "min_seconds": options.min_seconds,
        "results": rows,
        "time_ratio_to_raw": ratios,
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print("time relative to raw (encode, decode):")
    for name, ratio in ratios.items():
        print(f"  {name:40} x{ratio['encode_time']:5.2f}  x{ratio['decode_time']:5.2f}")
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
