"""`raycache warm FILE`: fill the caches with known prompts or conversations before traffic.

FILE holds one JSON value per line (blank lines and lines starting with `#` are skipped):
- a string: a prompt;
- an object with `prompt`: a completion request (`/v1/completions`);
- an object with `messages`: a chat transcript (`/v1/chat/completions`).

Objects may carry any field of their route (`model`, `max_tokens`, `seed`, ...); `model`,
`max_tokens` and `temperature` default to the command's options, `temperature` to 0 because
only deterministic requests are cached. The whole file is read and checked before anything is
sent, so a bad line (named `FILE:LINE`) sends nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from serve_app.cli.errors import CliError, ExitCode
from serve_app.cli.sender import ERROR, HIT_TIERS, MISS, UNCACHED, Call, Sample

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


def read_calls(path: Path, model: str, max_tokens: int) -> list[Call]:
    """The requests of a warm-up file; raises `CliError` (`USAGE`) naming a bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read it ({exc})", ExitCode.USAGE) from None
    calls = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            calls.append(_call(json.loads(line), model, max_tokens))
        except (ValueError, TypeError) as exc:
            raise CliError(f"{path}:{number}: {exc}", ExitCode.USAGE) from None
    if not calls:
        raise CliError(f"{path}: no prompts or transcripts in it", ExitCode.USAGE)
    return calls


def _call(value: Any, model: str, max_tokens: int) -> Call:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise ValueError("expected a string, or an object with `prompt` or `messages`")
    if ("prompt" in value) == ("messages" in value):
        raise ValueError("give exactly one of `prompt` and `messages`")
    if value.get("stream"):
        raise ValueError("`stream` is not for warming: the answer is cached either way")
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, **value}
    return Call(CHAT if "messages" in value else COMPLETIONS, body)


def summarize(samples: list[Sample]) -> dict[str, Any]:
    """Requests sent; hits per tier, misses (computed and now cached), uncacheable and failed;
    tokens now cached (prompt and answer of each miss) and prompt tokens a prefix cache gave."""
    outcomes = Counter(sample.outcome for sample in samples)
    misses = [s for s in samples if s.outcome == MISS]
    errors = [s for s in samples if s.outcome == ERROR]
    return {
        "requests": len(samples),
        "hits": {tier: outcomes[tier] for tier in HIT_TIERS},
        "misses": outcomes[MISS],
        "uncached": outcomes[UNCACHED],
        "failed": outcomes[ERROR],
        "tokens_cached": sum(s.prompt_tokens + s.completion_tokens for s in misses),
        "prefix_tokens_reused": sum(s.cached_prompt_tokens for s in samples),
        "first_error": (
            f"request {errors[0].index + 1}: {errors[0].status} {errors[0].error}"
            if errors
            else None
        ),
    }
