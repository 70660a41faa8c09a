"""Time to first streamed token of a chat over HTTP: a late turn of a conversation with and
without the prefix cache, and a cached answer against a no-op Serve stream.

    python -m benchmarks.chat_ttft [--turns 5] [--turn-tokens 400] [--conversations 8]
                                   [--answer-tokens 32] [--hit-requests 120]
                                   [--json benchmarks/results/chat_ttft.json]

Starts its own redis-server (free port) and Ray cluster (a temporary directory, 4 logical CPUs:
the two applications below ask 2.2 of them, on however many cores the machine has), then
`serve run` of one Serve config built from configs/cluster.yaml with three applications on one
HTTP port:

  cache     configs/cluster.yaml's application as it is, at `/`;
  nocache   the same with `prefix_cache.enabled: false`, its own namespace, at `/nocache`;
  noop      `benchmarks.noop_stream_app` (same shape: ingress -> streaming handle -> SSE, no
            model), at `/noop`.

Part 1, conversations: each conversation (the pinned system prompt, then user messages of
`--turn-tokens` bytes of words drawn from the standard library's docstrings, distinct per
conversation) is played turn by turn on `cache` and `nocache`, alternating which goes first,
greedy, `--answer-tokens` per answer, each side sending back its own answers. Every turn is
timed; the last turn's TTFT is the result. `--pause-s` between requests lets each replica
finish what it does after an answer (caching the answer's blocks) before the next timed
request, so neither side's background work lands in the other's measurement.

Part 2, cached answers: `--hit-prompts` distinct streamed chat requests are each sent once
(computed), then repeated `--hit-requests` times in all (each a result-cache hit, checked),
one by one alternating with the same number of requests to `noop`.

TTFT is from just before the request is sent to the first SSE chunk whose `delta.content` is
non-empty, on one kept-alive httpx connection, measured with `time.perf_counter`. Prints a table
and writes every raw number to the JSON file; `serve run`'s log goes beside it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import random
import re
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.serve_cluster import RedisServer, serve_cluster

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-gpt"
SIDES = ("cache", "nocache")
ROUTES = {"cache": "", "nocache": "/nocache", "noop": "/noop"}
NOCACHE_NAMESPACE = "raycache-nocache"
BUILTIN_SYSTEM = re.compile(r"^System: (.*)\n$", re.S)
# Modules whose docstrings are the word list of the user messages (stable, plain English).
DOC_MODULES = (
    "argparse", "asyncio", "collections", "contextlib", "dataclasses", "email", "functools",
    "http.client", "inspect", "json", "logging", "pathlib", "random", "re", "shutil",
    "socket", "statistics", "subprocess", "tempfile", "threading", "typing", "unittest",
)  # fmt: skip


class AppError(RuntimeError):
    """A request the application answered with an error: the request and the response."""


# -- infrastructure ---------------------------------------------------------------------------


def serve_config(base: dict[str, Any], redis_url: str) -> dict[str, Any]:
    """`base` (configs/cluster.yaml) on `redis_url`, plus the same application without a
    prefix cache and the no-op stream app."""
    config = copy.deepcopy(base)
    [cache] = config["applications"]
    cache["args"]["redis_url"] = redis_url
    nocache = copy.deepcopy(cache)
    nocache["name"] = "raycache-nocache"
    nocache["route_prefix"] = ROUTES["nocache"]
    nocache["args"]["namespace"] = NOCACHE_NAMESPACE
    nocache["args"]["prefix_cache"]["enabled"] = False
    for deployment in nocache["deployments"]:
        router = deployment.get("request_router_config")
        if router is not None:
            router.setdefault("request_router_kwargs", {})["namespace"] = NOCACHE_NAMESPACE
    noop = {
        "name": "noop",
        "route_prefix": ROUTES["noop"],
        "import_path": "benchmarks.noop_stream_app:app",
        "deployments": [
            {"name": "NoopIngress", "max_ongoing_requests": 256,
             "ray_actor_options": {"num_cpus": 0.1}},
            {"name": "NoopReplica", "max_ongoing_requests": 64,
             "ray_actor_options": {"num_cpus": 0.1}},
        ],
    }  # fmt: skip
    config["applications"] = [cache, nocache, noop]
    return config


def model_replicas(app: dict[str, Any]) -> int:
    return next(d["num_replicas"] for d in app["deployments"] if d["name"] == "ModelReplica")


def all_up(client: httpx.Client, replicas: int) -> bool:
    """Whether both raycache applications report every replica and the no-op app answers."""
    healthy = all(
        client.get(f"{ROUTES[side]}/healthz").json().get("replicas") == replicas for side in SIDES
    )
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    noop = client.post(f"{ROUTES['noop']}/v1/chat/completions", json=probe)
    if 400 <= noop.status_code < 500:
        raise SystemExit(f"the no-op app answered {noop.status_code}: {noop.text}")
    return healthy and noop.status_code == 200


# -- the client -------------------------------------------------------------------------------


@dataclass
class Streamed:
    """One streamed chat answer as the client saw it."""

    ttft_s: float
    first_event_s: float
    total_s: float
    text: str
    usage: dict[str, Any] | None
    cache: dict[str, Any] | None
    model_version: str | None


def stream_chat(client: httpx.Client, route: str, body: dict[str, Any]) -> Streamed:
    """POST a streamed chat `body` to `route` and read it to `data: [DONE]`."""
    path = f"{route}/v1/chat/completions"
    ttft = first_event = None
    pieces: list[str] = []
    last: dict[str, Any] = {}
    usage = None
    started = time.perf_counter()
    with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            raise AppError(
                f"POST {path} {json.dumps(body)[:400]} -> {response.status_code} {response.text}"
            )
        done = False
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            now = time.perf_counter()
            if first_event is None:
                first_event = now - started
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise AppError(f"POST {path} {json.dumps(body)[:400]} -> error event {data}")
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    if ttft is None:
                        ttft = now - started
                    pieces.append(content)
            if chunk.get("usage"):
                usage = chunk["usage"]
            last = chunk
        total = time.perf_counter() - started
    if not done or ttft is None or first_event is None:
        raise AppError(f"POST {path}: the stream ended without [DONE] or without any text")
    return Streamed(
        ttft,
        first_event,
        total,
        "".join(pieces),
        usage,
        last.get("cache"),
        last.get("model_version"),
    )


def chat_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# -- workload ---------------------------------------------------------------------------------


def doc_words() -> list[str]:
    """Distinct ASCII words of some standard-library docstrings, in a stable order."""
    import importlib

    seen: dict[str, None] = {}
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        docs = [module.__doc__ or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in sorted(vars(module).items())
                 if callable(obj) and getattr(obj, "__module__", None) == name]  # fmt: skip
        for doc in docs:
            for word in re.findall(r"[A-Za-z][A-Za-z'-]*[.,;:]?", doc):
                seen.setdefault(word, None)
    return list(seen)


def user_message(words: list[str], rng: random.Random, size: int) -> str:
    """Random words, exactly `size` bytes (ASCII: one byte, one token)."""
    text = ""
    while len(text) < size:
        text += rng.choice(words) + " "
    return text[:size]


def system_prompt(app: dict[str, Any]) -> str | None:
    """The content of the first pinned prompt, when it is a built-in template system line."""
    for pinned in app["args"].get("prefix_cache", {}).get("pinned", []):
        match = BUILTIN_SYSTEM.match(pinned["text"])
        if match and pinned.get("tenant", "default") == "default":
            return match.group(1)
    return None


@dataclass
class Turn:
    side: str
    conversation: int
    turn: int
    ttft_ms: float
    first_event_ms: float
    total_ms: float
    prompt_tokens: int
    cached_tokens: int
    earlier_tokens: int
    completion_tokens: int
    answer: str
    cache: dict[str, Any] | None = field(default=None)


def play_conversations(
    client: httpx.Client, options: argparse.Namespace, system: str | None
) -> list[Turn]:
    words = doc_words()
    turns: list[Turn] = []
    for index in range(options.conversations):
        rng = random.Random(f"{options.seed}:conversation:{index}")
        users = [user_message(words, rng, options.turn_tokens) for _ in range(options.turns)]
        histories: dict[str, list[dict[str, str]]] = {
            side: ([{"role": "system", "content": system}] if system else []) for side in SIDES
        }
        order = SIDES if index % 2 == 0 else SIDES[::-1]
        for number, user in enumerate(users, start=1):
            for side in order:
                history = histories[side]
                history.append({"role": "user", "content": user})
                answer = stream_chat(
                    client, ROUTES[side], chat_body(history, options.answer_tokens)
                )
                history.append({"role": "assistant", "content": answer.text})
                assert answer.usage is not None, f"{side}: no usage chunk"
                details = answer.usage.get("prompt_tokens_details") or {}
                new = len(f"User: {user}\nAssistant: ".encode())
                turns.append(
                    Turn(
                        side=side,
                        conversation=index,
                        turn=number,
                        ttft_ms=answer.ttft_s * 1000,
                        first_event_ms=answer.first_event_s * 1000,
                        total_ms=answer.total_s * 1000,
                        prompt_tokens=answer.usage["prompt_tokens"],
                        cached_tokens=details.get("cached_tokens") or 0,
                        earlier_tokens=answer.usage["prompt_tokens"] - new,
                        completion_tokens=answer.usage["completion_tokens"],
                        answer=answer.text,
                        cache=answer.cache,
                    )
                )
                time.sleep(options.pause_s)
        last = turns[-len(SIDES) :]
        print(
            f"  conversation {index}: turn {options.turns} TTFT "
            + ", ".join(f"{t.side} {t.ttft_ms:.0f} ms ({t.cached_tokens} cached)" for t in last),
            flush=True,
        )
    return turns


def cached_answers(client: httpx.Client, options: argparse.Namespace) -> dict[str, Any]:
    """TTFT of result-cache hits on `cache`, interleaved with no-op streams."""
    bodies = [
        chat_body(
            [{"role": "user", "content": f"Cached answer {i}: what does a result cache keep?"}],
            options.answer_tokens,
        )
        for i in range(options.hit_prompts)
    ]
    first = [stream_chat(client, ROUTES["cache"], body) for body in bodies]
    for answer in first:
        assert answer.cache is not None and not answer.cache["hit"], "a fresh request was a hit"
    for _ in range(10):  # the no-op app's first requests warm its handle
        stream_chat(client, ROUTES["noop"], bodies[0])
    hits: list[Streamed] = []
    noop: list[Streamed] = []
    for i in range(options.hit_requests):
        body = bodies[i % len(bodies)]
        for name in ("cache", "noop") if i % 2 == 0 else ("noop", "cache"):
            answer = stream_chat(client, ROUTES[name], body)
            if name == "noop":
                noop.append(answer)
                continue
            if not (answer.cache and answer.cache["hit"]):
                raise AppError(f"a repeated identical request was not a hit: {answer.cache}")
            if answer.text != first[i % len(bodies)].text:
                raise AppError("a cached answer differs from the computed one")
            hits.append(answer)
    tiers: dict[str, int] = {}
    for answer in hits:
        tier = str((answer.cache or {}).get("tier"))
        tiers[tier] = tiers.get(tier, 0) + 1
    return {
        "computed_ttft_ms": [a.ttft_s * 1000 for a in first],
        "hit_ttft_ms": [a.ttft_s * 1000 for a in hits],
        "hit_total_ms": [a.total_s * 1000 for a in hits],
        "noop_ttft_ms": [a.ttft_s * 1000 for a in noop],
        "noop_total_ms": [a.total_s * 1000 for a in noop],
        "hit_tiers": tiers,
    }


# -- report -----------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        # Interpolated between the ranks around 90% (the largest value at rank n - 1).
        "p90": statistics.quantiles(ordered, n=10, method="inclusive")[8]
        if len(ordered) > 1
        else ordered[0],
        "min": ordered[0],
        "max": ordered[-1],
    }


def report(
    turns: list[Turn], hits: dict[str, Any], options: argparse.Namespace, block: int
) -> dict:
    by_turn: dict[str, dict[int, dict[str, Any]]] = {side: {} for side in SIDES}
    for side in SIDES:
        for number in range(1, options.turns + 1):
            rows = [t for t in turns if t.side == side and t.turn == number]
            by_turn[side][number] = {
                "ttft_ms": summary([t.ttft_ms for t in rows]),
                "cached_tokens": summary([t.cached_tokens for t in rows]),
                "prompt_tokens": summary([t.prompt_tokens for t in rows]),
            }
    last = {
        side: [t for t in turns if t.side == side and t.turn == options.turns] for side in SIDES
    }
    coverage = [t.cached_tokens / (t.earlier_tokens // block * block) for t in last["cache"]]
    pairs = {(t.conversation, t.turn): t for t in turns if t.side == "cache"}
    mismatched = [
        [t.conversation, t.turn]
        for t in turns
        if t.side == "nocache" and t.answer != pairs[t.conversation, t.turn].answer
    ]
    cache_ms = by_turn["cache"][options.turns]["ttft_ms"]
    nocache_ms = by_turn["nocache"][options.turns]["ttft_ms"]
    hit = summary(hits["hit_ttft_ms"])
    noop = summary(hits["noop_ttft_ms"])
    return {
        "conversations": {
            "turn": options.turns,
            "ttft_ms": {"cache": cache_ms, "nocache": nocache_ms},
            "nocache_over_cache": {
                "median": nocache_ms["median"] / cache_ms["median"],
                "p90": nocache_ms["p90"] / cache_ms["p90"],
            },
            "cached_tokens": {side: [t.cached_tokens for t in last[side]] for side in SIDES},
            "prompt_tokens": [t.prompt_tokens for t in last["cache"]],
            "earlier_tokens": [t.earlier_tokens for t in last["cache"]],
            "cache_coverage_of_earlier_blocks": coverage,
            "answers_differing_between_sides": mismatched,
            "by_turn": by_turn,
        },
        "cached_answers": {
            "hit_ttft_ms": hit,
            "noop_ttft_ms": noop,
            "hit_over_noop_median": hit["median"] / noop["median"],
            "computed_ttft_ms": summary(hits["computed_ttft_ms"]),
            "hit_total_ms": summary(hits["hit_total_ms"]),
            "noop_total_ms": summary(hits["noop_total_ms"]),
            "hit_tiers": hits["hit_tiers"],
        },
    }


def print_table(result: dict, options: argparse.Namespace) -> None:
    conv = result["conversations"]
    print(
        f"\nTTFT by turn, ms (median / p90 of {options.conversations} conversations; "
        f"{options.turn_tokens}-byte user turns, {options.answer_tokens}-token answers)"
    )
    print(
        f"{'turn':>4} {'prompt tok':>10} | {'cache':>15} {'cached tok':>10} | "
        f"{'nocache':>15} {'cached tok':>10} | {'nocache/cache':>13}"
    )
    for number in range(1, options.turns + 1):
        row = {side: conv["by_turn"][side][number] for side in SIDES}
        ttft = {side: row[side]["ttft_ms"] for side in SIDES}
        print(
            f"{number:>4} {row['cache']['prompt_tokens']['median']:>10.0f} | "
            f"{ttft['cache']['median']:>7.1f} / {ttft['cache']['p90']:>5.1f} "
            f"{row['cache']['cached_tokens']['median']:>10.0f} | "
            f"{ttft['nocache']['median']:>7.1f} / {ttft['nocache']['p90']:>5.1f} "
            f"{row['nocache']['cached_tokens']['median']:>10.0f} | "
            f"x{ttft['nocache']['median'] / ttft['cache']['median']:>12.2f}"
        )
    ratio = conv["nocache_over_cache"]
    print(
        f"turn {options.turns}: without/with the prefix cache x{ratio['median']:.2f} (median), "
        f"x{ratio['p90']:.2f} (p90); cached tokens with: {conv['cached_tokens']['cache']}, "
        f"without: {conv['cached_tokens']['nocache']}; coverage of the earlier turns' whole "
        f"blocks: min {min(conv['cache_coverage_of_earlier_blocks']):.2f}"
    )
    if conv["answers_differing_between_sides"]:
        print(f"answers differing between sides (conversation, turn): "
              f"{conv['answers_differing_between_sides']}")  # fmt: skip
    hits = result["cached_answers"]
    print(f"\ncached answer vs no-op Serve stream, TTFT ms ({hits['hit_ttft_ms']['n']} each, "
          f"interleaved)")  # fmt: skip
    for name, key in (("result-cache hit", "hit_ttft_ms"), ("no-op stream", "noop_ttft_ms"),
                      ("computed (first)", "computed_ttft_ms")):  # fmt: skip
        s = hits[key]
        print(f"  {name:<17} median {s['median']:7.2f}  p90 {s['p90']:7.2f}  min {s['min']:7.2f}")
    print(f"  hit/no-op median x{hits['hit_over_noop_median']:.2f}; tiers {hits['hit_tiers']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "cluster.yaml")
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--turn-tokens", type=int, default=400)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--pause-s", type=float, default=0.3)
    parser.add_argument("--hit-prompts", type=int, default=12)
    parser.add_argument("--hit-requests", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "chat_ttft.json"
    )
    options = parser.parse_args()
    options.json.parent.mkdir(parents=True, exist_ok=True)
    log_path = options.json.with_suffix(".serve-run.log")

    base = yaml.safe_load(options.config.read_text())
    [app] = base["applications"]
    block = app["args"].get("prefix_cache", {}).get("block_size", 16)
    replicas = model_replicas(app)
    system = system_prompt(app)

    from serve_app.config_file import validate_config

    # Other work on the machine shows here: the timings share its cores.
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="chat-ttft-"))
    redis_server = RedisServer(workdir)
    try:
        config = serve_config(base, redis_server.url)
        problems = validate_config(config)
        if problems:
            raise SystemExit(f"the generated Serve config is invalid: {problems}")
        started = time.monotonic()
        env = {"RAYCACHE_REDIS_URL": redis_server.url}
        with serve_cluster(config, workdir, env, lambda c: all_up(c, replicas), log_path) as url:
            startup_s = time.monotonic() - started
            print(f"serve run -> three applications answering: {startup_s:.1f} s", flush=True)
            with httpx.Client(base_url=url, timeout=120) as client:
                for side in SIDES:  # the first request of each app, not measured
                    hello = chat_body([{"role": "user", "content": "hi"}], 4)
                    stream_chat(client, ROUTES[side], hello)
                started = time.monotonic()
                turns = play_conversations(client, options, system)
                conversations_s = time.monotonic() - started
                started = time.monotonic()
                hits = cached_answers(client, options)
                cached_s = time.monotonic() - started
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "benchmark": "chat_ttft",
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(options).items()},
        "model_replicas_per_app": replicas,
        "block_size": block,
        "system_prompt": system,
        "serve_run_startup_s": startup_s,
        "phase_seconds": {"conversations": conversations_s, "cached_answers": cached_s},
        "cpu_count": os.cpu_count(),
        "loadavg_1_5_15": {"before": load_before, "after": os.getloadavg()},
        **report(turns, hits, options, block),
        "raw": {"turns": [asdict(t) for t in turns], "cached_answers": hits},
    }
    options.json.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, options)
    print(f"-> {options.json}")


if __name__ == "__main__":
    main()
