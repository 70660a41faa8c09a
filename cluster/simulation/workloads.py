"""Synthetic workload families for judging eviction policies beyond the public traces.

Each family is a function of named parameters and a seed that returns int64 keys; `generate`
builds one from a spec `FAMILY:NAME=VALUE,...` (unnamed parameters keep their defaults), which
`cluster.simulation.traces` accepts wherever it accepts a trace, so `raycache simulate --trace
chat:hot=0.3` works too. Every family draws from `numpy.random.default_rng(seed)` only.

| family  | shape                                                                          |
|---------|--------------------------------------------------------------------------------|
| `chat`  | a few hot system prompts, plus many short sessions, each revisiting its own    |
|         | handful of keys while it lasts and then abandoned (multi-turn LLM traffic)     |
| `phase` | Zipf over a key set that is replaced every `phase` requests (`sets` cycle)      |
| `scan`  | Zipf over a hot set, interrupted by scans of never-repeated keys               |
| `loop`  | a cyclic scan of `length` keys, mixed with a Zipf share of other keys           |
| `trend` | Zipf whose ranking drifts: a new key takes the top every `1/speed` requests     |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

# Keys of different parts of one workload never collide: each part has its own id range.
_PART = 1 << 40


def _zipf_ranks(rng: np.random.Generator, alpha: float, keys: int, requests: int) -> np.ndarray:
    """`requests` Zipf(`alpha`) ranks in 0..keys-1 (0 the most popular)."""
    weights = np.arange(1, keys + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    ranks = np.searchsorted(cdf, rng.random(requests), side="right")
    return np.minimum(ranks, keys - 1).astype(np.int64)


def chat(
    requests: int = 200_000,
    *,
    hot: float = 0.15,
    prompts: int = 20,
    turns: float = 8.0,
    keys: int = 4,
    window: int = 400,
    seed: int = 1,
) -> np.ndarray:
    """Multi-turn chat: `hot` of the requests go to `prompts` system prompts (Zipf 1.0).

    The rest come from sessions running side by side, `window / turns` of them, so a session's
    requests fall within about `window` requests. A session lasts a geometric number of requests
    (mean `turns`); its t-th request picks one of its first min(t + 1, `keys`) keys, so it adds
    a key per turn, then revisits them. An ended session never comes back; a new one takes its
    place.
    """
    rng = np.random.default_rng(seed)
    concurrent = max(1, round(window / turns))
    is_hot = rng.random(requests) < hot
    prompt = _zipf_ranks(rng, 1.0, prompts, requests)
    slot_of = rng.integers(0, concurrent, requests).tolist()
    pick = rng.random(requests).tolist()
    lengths = rng.geometric(1.0 / max(turns, 1.0), requests // 2 + concurrent + 1).tolist()
    out = np.empty(requests, dtype=np.int64)
    session = list(range(concurrent))
    turn = [0] * concurrent
    left = lengths[:concurrent]
    next_session = concurrent
    hot_list = is_hot.tolist()
    for i in range(requests):
        if hot_list[i]:
            out[i] = int(prompt[i])
            continue
        slot = slot_of[i]
        t = turn[slot]
        out[i] = _PART + session[slot] * keys + int(pick[i] * min(t + 1, keys))
        turn[slot] = t + 1
        left[slot] -= 1
        if left[slot] <= 0:
            session[slot] = next_session
            turn[slot] = 0
            left[slot] = lengths[next_session % len(lengths)]
            next_session += 1
    return out


def phase(
    requests: int = 200_000,
    *,
    alpha: float = 0.9,
    keys: int = 20_000,
    phase: int = 50_000,
    sets: int = 0,
    seed: int = 1,
) -> np.ndarray:
    """Zipf(`alpha`) over `keys` keys, moved to another key set every `phase` requests.

    `sets` > 0 cycles through that many key sets (old favourites return); 0 never reuses one.
    """
    rng = np.random.default_rng(seed)
    ranks = _zipf_ranks(rng, alpha, keys, requests)
    number = np.arange(requests, dtype=np.int64) // max(phase, 1)
    if sets > 0:
        number %= sets
    keys_of_phase: np.ndarray = number * _PART + rng.permutation(keys)[ranks]
    return keys_of_phase


def scan(
    requests: int = 200_000,
    *,
    alpha: float = 0.9,
    hot: int = 20_000,
    length: int = 10_000,
    every: int = 20_000,
    seed: int = 1,
) -> np.ndarray:
    """Zipf(`alpha`) over `hot` keys; after every `every` of its requests, a scan of `length`
    keys never requested before or after."""
    rng = np.random.default_rng(seed)
    ranks = _zipf_ranks(rng, alpha, hot, requests)
    period = every + length
    position = np.arange(requests, dtype=np.int64)
    in_scan = position % period >= every
    scanned = _PART + (position // period) * length + position % period - every
    return np.where(in_scan, scanned, ranks)


def loop(
    requests: int = 200_000,
    *,
    length: int = 2_000,
    noise: float = 0.2,
    alpha: float = 0.9,
    others: int = 20_000,
    seed: int = 1,
) -> np.ndarray:
    """Keys 0..`length`-1 in a cycle; a `noise` share of requests goes to Zipf(`alpha`) over
    `others` other keys instead."""
    rng = np.random.default_rng(seed)
    is_noise = rng.random(requests) < noise
    cycle = np.cumsum(~is_noise) % max(length, 1)
    return np.where(is_noise, _PART + _zipf_ranks(rng, alpha, others, requests), cycle)


def trend(
    requests: int = 200_000,
    *,
    alpha: float = 0.9,
    keys: int = 50_000,
    speed: float = 0.05,
    seed: int = 1,
) -> np.ndarray:
    """Zipf(`alpha`) over ranks whose keys drift: every `1/speed` requests a new key takes rank
    0 and every other key moves one rank down (popular keys fade, new ones trend)."""
    rng = np.random.default_rng(seed)
    ranks = _zipf_ranks(rng, alpha, keys, requests)
    shift = (np.arange(requests, dtype=np.float64) * speed).astype(np.int64)
    return _PART + ranks - shift


FAMILIES: dict[str, Callable[..., np.ndarray]] = {
    "chat": chat,
    "phase": phase,
    "scan": scan,
    "loop": loop,
    "trend": trend,
}


def parse(spec: str) -> tuple[str, dict[str, Any]]:
    """`FAMILY:NAME=VALUE,...` as the family's name and its parameters (ints where they parse)."""
    family, _, args = spec.partition(":")
    if family not in FAMILIES:
        raise ValueError(f"unknown workload family {family!r}; choose one of {list(FAMILIES)}")
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in args.split(","))):
        name, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"parameters are NAME=VALUE, got {item!r} in {spec!r}")
        try:
            params[name] = int(value)
        except ValueError:
            params[name] = float(value)
    return family, params


def generate(spec: str) -> np.ndarray:
    """The keys of workload `spec` (see the module docstring)."""
    family, params = parse(spec)
    try:
        return FAMILIES[family](**params)
    except TypeError as error:
        raise ValueError(f"bad parameters in {spec!r}: {error}") from None
