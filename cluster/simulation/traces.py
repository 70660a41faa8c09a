"""Cache traces as streams of integer keys: file readers and synthetic generators.

A trace spec is a path or a generator spec; `iter_chunks(spec)` yields the keys as int64 numpy
chunks (never one Python object per request) and `load(spec)` concatenates them once, for
simulators that replay a trace at several capacities.

File formats of the public cache traces, chosen by file name:

| name ends with             | format                                                        |
|----------------------------|---------------------------------------------------------------|
| `.trace.gz`                | LIRS: gzip text, one integer per line, `*` lines skipped       |
| `.lis.zst` / `.lis`        | ARC: `start count ignored reqno` = blocks start..start+count-1 |
| `.trace.xz`                | cache2k: xz of big-endian int32 keys                           |
| `oracleGeneral.bin`        | libCacheSim: 24-byte little-endian records, the u64 `id` used  |
| anything else (`.gz` ok)   | plain text, one key per line (non-integers get dense ids)      |

Generators (`KIND:ARGS`):

- `zipf:ALPHA[:KEYS[:REQUESTS]]`: Zipf(ALPHA) over KEYS=100,000 keys, REQUESTS=1,000,000,
  `numpy.random.default_rng(7)`; ranks are drawn by inverse CDF and scattered over the key space
  by a random permutation (so key order says nothing about popularity), as in the README.
- `loop:N[:REQUESTS]`: keys 0..N-1 in a cycle (LRU's worst case once N exceeds the capacity).
- `scan-mix[:REQUESTS]`: Zipf(0.9) over 20,000 hot keys; after every 20,000 requests a scan of
  10,000 never-repeated keys (scan resistance).
- `FAMILY:NAME=VALUE,...`: a workload family of `cluster.simulation.workloads` (`chat`, `phase`,
  `scan`, `loop`, `trend`) with named parameters, as in `chat:hot=0.3,turns=12`; `loop:N` with
  positional arguments is the plain cycle above.
"""

from __future__ import annotations

import gzip
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from cluster.simulation import workloads

CHUNK = 1 << 16
_READ_BYTES = 1 << 20
_ORACLE_RECORD = np.dtype([("time", "<u4"), ("id", "<u8"), ("size", "<u4"), ("next", "<i8")])
_GENERATORS = ("zipf", "loop", "scan-mix", *workloads.FAMILIES)


def is_generator(spec: str) -> bool:
    """Whether `spec` names a generator rather than a file."""
    return spec.split(":", 1)[0] in _GENERATORS


def _is_family(spec: str) -> bool:
    """Whether `spec` names a workload family with named parameters (or none)."""
    kind, _, args = spec.partition(":")
    return kind in workloads.FAMILIES and (kind != "loop" or "=" in args)


def trace_name(spec: str) -> str:
    """A short name: the file name up to its first dot, or the generator spec without colons.

    Matches the section titles of the traces README (`lirs_gli`, `cloudPhysicsIO`, `zipf0.8`).
    """
    if is_generator(spec):
        return spec.replace(":", "").replace(",", "_")
    return Path(spec).name.split(".", 1)[0]


def iter_chunks(spec: str) -> Iterator[np.ndarray]:
    """The keys of trace `spec`, in order, as int64 arrays of at most about `CHUNK` keys."""
    if is_generator(spec):
        keys = generate(spec)
        for start in range(0, len(keys), CHUNK):
            yield keys[start : start + CHUNK]
        return
    path = Path(spec)
    name = path.name
    if name.endswith(".trace.gz"):
        with gzip.open(path, "rb") as stream:
            yield from _integer_lines(stream)
    elif name.endswith((".lis.zst", ".lis")):
        yield from _arc(path)
    elif name.endswith(".trace.xz"):
        with lzma.open(path, "rb") as stream:
            yield from _fixed_records(stream, np.dtype(">i4"))
    elif name.endswith("oracleGeneral.bin"):
        with path.open("rb") as stream:
            for records in _fixed_records_raw(stream, _ORACLE_RECORD):
                yield records["id"].view(np.int64)
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as stream:
            yield from _text_keys(stream)


def load(spec: str) -> np.ndarray:
    """The whole trace as one int64 array (8 bytes a request)."""
    chunks = list(iter_chunks(spec))
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)


class _Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


def _lines(stream: _Readable) -> Iterator[list[bytes]]:
    """Complete lines of a binary stream, in batches, without the trailing newline."""
    rest = b""
    while True:
        block = stream.read(_READ_BYTES)
        if not block:
            break
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield lines
    if rest:
        yield [rest]


def _integer_lines(stream: _Readable) -> Iterator[np.ndarray]:
    for lines in _lines(stream):
        values = [int(line) for line in lines if line.strip() and not line.startswith(b"*")]
        if values:
            yield np.array(values, dtype=np.int64)


def _text_keys(stream: _Readable) -> Iterator[np.ndarray]:
    ids: dict[bytes, int] = {}
    for lines in _lines(stream):
        keys = []
        for line in lines:
            token = line.strip()
            if not token:
                continue
            try:
                keys.append(int(token))
            except ValueError:
                # Non-integer keys get dense negative ids, apart from any integer key.
                keys.append(ids.setdefault(token, -1 - len(ids)))
        if keys:
            yield np.array(keys, dtype=np.int64)


def _arc(path: Path) -> Iterator[np.ndarray]:
    if path.name.endswith(".zst"):
        import zstandard

        with path.open("rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as stream:
            yield from _arc_records(stream)
    else:
        with path.open("rb") as stream:
            yield from _arc_records(stream)


def _arc_records(stream: _Readable) -> Iterator[np.ndarray]:
    for lines in _lines(stream):
        fields = np.array(b" ".join(lines).split(), dtype=np.int64).reshape(-1, 4)
        starts, counts = fields[:, 0], fields[:, 1]
        total = int(counts.sum())
        # Expand each (start, count) to start..start+count-1 without a Python loop.
        offsets = np.repeat(np.cumsum(counts) - counts, counts)
        keys = np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - offsets)
        for begin in range(0, total, CHUNK):
            yield keys[begin : begin + CHUNK]


def _fixed_records_raw(stream: _Readable, dtype: np.dtype) -> Iterator[np.ndarray]:
    size = dtype.itemsize
    rest = b""
    while True:
        block = stream.read(_READ_BYTES // size * size)
        if not block:
            break
        data = rest + block
        whole = len(data) // size * size
        rest = data[whole:]
        if whole:
            yield np.frombuffer(data[:whole], dtype=dtype)


def _fixed_records(stream: _Readable, dtype: np.dtype) -> Iterator[np.ndarray]:
    for records in _fixed_records_raw(stream, dtype):
        yield records.astype(np.int64)


def generate(spec: str) -> np.ndarray:
    """The keys of generator `spec` (see the module docstring) as one int64 array."""
    if _is_family(spec):
        return workloads.generate(spec)
    kind, _, args = spec.partition(":")
    parts = [part for part in args.split(":") if part]
    if kind == "zipf":
        if not parts:
            raise ValueError(f"zipf needs an exponent, as in zipf:0.8; got {spec!r}")
        alpha = float(parts[0])
        keys = int(parts[1]) if len(parts) > 1 else 100_000
        requests = int(parts[2]) if len(parts) > 2 else 1_000_000
        return zipf(alpha, keys, requests, seed=7)
    if kind == "loop":
        if not parts:
            raise ValueError(f"loop needs a length, as in loop:1000; got {spec!r}")
        length = int(parts[0])
        requests = int(parts[1]) if len(parts) > 1 else 1_000_000
        return np.arange(requests, dtype=np.int64) % length
    if kind == "scan-mix":
        requests = int(parts[0]) if parts else 1_000_000
        return scan_mix(requests, seed=7)
    raise ValueError(f"unknown trace generator {kind!r}; choose one of {list(_GENERATORS)}")


def zipf(alpha: float, keys: int, requests: int, seed: int) -> np.ndarray:
    """`requests` draws of Zipf(`alpha`) ranks over `keys` keys, scattered by a permutation."""
    rng = np.random.default_rng(seed)
    weights = np.arange(1, keys + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(requests), side="right"), keys - 1)
    permutation = rng.permutation(keys)
    return permutation[ranks].astype(np.int64)


def scan_mix(requests: int, seed: int, hot: int = 20_000, scan: int = 10_000) -> np.ndarray:
    """Zipf(0.9) over `hot` keys, with a scan of `scan` fresh keys after every `hot` requests."""
    base = zipf(0.9, hot, requests, seed)
    out = np.empty(requests, dtype=np.int64)
    position = 0
    source = 0
    next_fresh = hot
    while position < requests:
        take = min(hot, requests - position, len(base) - source)
        out[position : position + take] = base[source : source + take]
        position += take
        source += take
        take = min(scan, requests - position)
        out[position : position + take] = np.arange(next_fresh, next_fresh + take)
        next_fresh += take
        position += take
    return out
