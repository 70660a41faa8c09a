"""The requests of a `raycache bench` run: a repeat ratio or a trace, as completion calls.

Every prompt of a run begins with the run's id, so no earlier run (nor any other traffic) can
have cached it: the hits a run measures are its own repeats.

- `repeat_workload`: each request repeats an earlier prompt of the run with probability
  `repeat` (uniformly among those sent so far), and is otherwise a new prompt;
- `trace_workload`: request *i* asks the prompt of the trace's *i*-th key (a trace file or a
  generator spec such as `zipf:0.8`, read by `cluster.simulation.traces`).
"""

from __future__ import annotations

import random
from typing import Any

from cluster.simulation import traces
from serve_app.cli.sender import Call
from serve_app.cli.warm import COMPLETIONS

_WORDS = [
    "cache",
    "replica",
    "prefix",
    "token",
    "answer",
    "model",
    "version",
    "tenant",
    "shard",
    "ring",
    "owner",
    "redis",
    "block",
    "latency",
    "prompt",
    "weight",
    "layer",
    "batch",
    "stream",
    "queue",
    "route",
    "node",
    "lease",
    "signal",
    "entry",
    "budget",
]


def _prompt(run_id: str, item: int, words: int) -> str:
    # The filler is a function of the item alone, so a repeated item is the very same prompt.
    filler = random.Random(item)
    return f"[bench {run_id} #{item}] " + " ".join(filler.choices(_WORDS, k=words))


def _call(model: str, prompt: str, max_tokens: int) -> Call:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    return Call(COMPLETIONS, body)


def repeat_workload(
    requests: int,
    repeat: float,
    run_id: str,
    model: str,
    max_tokens: int,
    prompt_words: int = 8,
    seed: int = 0,
) -> list[Call]:
    """`requests` completions of which a share `repeat` (in expectation) repeat earlier ones."""
    if not 0.0 <= repeat <= 1.0:
        raise ValueError("the repeat ratio must be between 0 and 1")
    draws = random.Random(seed)
    items: list[int] = []
    distinct = 0
    for _ in range(requests):
        if items and draws.random() < repeat:
            items.append(draws.choice(items))
        else:
            items.append(distinct)
            distinct += 1
    return [_call(model, _prompt(run_id, item, prompt_words), max_tokens) for item in items]


def trace_workload(
    spec: str, requests: int, run_id: str, model: str, max_tokens: int, prompt_words: int = 8
) -> list[Call]:
    """The first `requests` requests of the trace `spec`, one prompt per distinct key."""
    keys = traces.load(spec)[:requests].tolist()
    if not keys:
        raise ValueError(f"the trace {spec!r} has no requests")
    return [_call(model, _prompt(run_id, int(key), prompt_words), max_tokens) for key in keys]
