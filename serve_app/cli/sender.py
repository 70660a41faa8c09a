"""Sending many API requests to the cluster at a bounded concurrency and rate, timing each.

`send` drives one list of `Call`s:
- closed loop (the default): `concurrency` workers, each sending its next call when its last
  one is answered, started no faster than `rate` per second when a rate is given;
- open loop (`open_loop=True`): calls are due at Poisson arrivals of `rate` per second whatever
  the cluster's pace, at most `concurrency` in flight; a call's latency counts from when it was
  due, so a cluster that falls behind shows it (no coordinated omission).

Every call yields a `Sample`; a call that fails (refused, unreachable, timed out) is a sample
with `outcome == "error"`, never an exception, so a run always completes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

HIT_TIERS = ("local", "peer", "redis")
MISS = "miss"
UNCACHED = "uncached"
ERROR = "error"
OUTCOMES = (*HIT_TIERS, MISS, UNCACHED, ERROR)


@dataclass(frozen=True)
class Call:
    """One API request: a route and its JSON body."""

    path: str
    body: dict[str, Any]


@dataclass
class Sample:
    """What became of one call: `started` is seconds from the run's start (when it was due, in
    an open loop), `outcome` one of `OUTCOMES` (the tier that answered it, `miss` when it was
    computed, `uncached` when it could not be cached, `error`)."""

    index: int
    started: float
    latency_s: float
    outcome: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    error: str | None = None

    @property
    def hit(self) -> bool:
        return self.outcome in HIT_TIERS


@dataclass
class SendOptions:
    concurrency: int = 4
    rate: float | None = None
    open_loop: bool = False
    timeout_s: float = 60.0
    seed: int = 0
    headers: dict[str, str] = field(default_factory=dict)


def outcome_of(answer: dict[str, Any]) -> str:
    """The outcome of an answered completion or chat: the tier that hit, or `miss`."""
    cache = answer.get("cache") or {}
    if cache.get("hit"):
        tier = cache.get("tier")
        return tier if tier in HIT_TIERS else "local"
    return MISS if cache.get("key") else UNCACHED


def _sample(index: int, started: float, latency: float, response: httpx.Response) -> Sample:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.reason_phrase
        return Sample(index, started, latency, ERROR, response.status_code, error=message)
    answer = response.json()
    usage = answer.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return Sample(
        index,
        started,
        latency,
        outcome_of(answer),
        response.status_code,
        prompt_tokens=int(usage.get("prompt_tokens", 0)),
        completion_tokens=int(usage.get("completion_tokens", 0)),
        cached_prompt_tokens=int(details.get("cached_tokens", 0)),
    )


async def _one(
    client: httpx.AsyncClient, index: int, call: Call, due: float, run_start: float
) -> Sample:
    try:
        response = await client.post(call.path, json=call.body)
    except httpx.HTTPError as exc:
        latency = time.perf_counter() - due
        reason = "timed out" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__
        return Sample(index, due - run_start, latency, ERROR, 0, error=reason)
    return _sample(index, due - run_start, time.perf_counter() - due, response)


async def send(
    url: str,
    calls: Sequence[Call],
    options: SendOptions,
    on_sample: Callable[[Sample], None] | None = None,
) -> list[Sample]:
    """Send every call of `calls` to the cluster at `url`; the samples in the order of `calls`."""
    samples: list[Sample | None] = [None] * len(calls)
    limits = httpx.Limits(max_connections=options.concurrency)
    async with httpx.AsyncClient(
        base_url=url, timeout=options.timeout_s, headers=options.headers, limits=limits
    ) as client:
        run_start = time.perf_counter()

        def done(sample: Sample) -> None:
            samples[sample.index] = sample
            if on_sample is not None:
                on_sample(sample)

        if options.open_loop:
            await _open_loop(client, calls, options, run_start, done)
        else:
            await _closed_loop(client, calls, options, run_start, done)
    return [sample for sample in samples if sample is not None]


async def _closed_loop(
    client: httpx.AsyncClient,
    calls: Sequence[Call],
    options: SendOptions,
    run_start: float,
    done: Callable[[Sample], None],
) -> None:
    indexes = iter(range(len(calls)))
    interval = 1.0 / options.rate if options.rate else 0.0
    next_start = [run_start]

    async def worker() -> None:
        for index in indexes:  # one shared iterator: each call is taken by one worker
            if interval:
                due = max(next_start[0], time.perf_counter())
                next_start[0] = due + interval
                await asyncio.sleep(max(due - time.perf_counter(), 0.0))
            done(await _one(client, index, calls[index], time.perf_counter(), run_start))

    await asyncio.gather(*(worker() for _ in range(min(options.concurrency, len(calls)))))


async def _open_loop(
    client: httpx.AsyncClient,
    calls: Sequence[Call],
    options: SendOptions,
    run_start: float,
    done: Callable[[Sample], None],
) -> None:
    if not options.rate:
        raise ValueError("an open loop needs a rate")
    arrivals = random.Random(options.seed)
    in_flight = asyncio.Semaphore(options.concurrency)
    tasks = []

    async def timed(index: int, due: float) -> None:
        async with in_flight:
            done(await _one(client, index, calls[index], due, run_start))

    due = run_start
    for index in range(len(calls)):
        due += arrivals.expovariate(options.rate)
        await asyncio.sleep(max(due - time.perf_counter(), 0.0))
        tasks.append(asyncio.create_task(timed(index, due)))
    await asyncio.gather(*tasks)
