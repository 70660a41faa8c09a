"""Fields of OpenAI's completions and chat APIs that raycache does not implement, and the one
rule for them: accepted at their neutral value (what the field's absence means), refused
otherwise with `InvalidRequest` naming the field, so that no request gets an answer to another
question than the one it asked. Fields that change nothing in the answer (bookkeeping for
OpenAI's own platform) are accepted and ignored. Any other unknown field is refused by the
request models ("unknown field").
"""

from __future__ import annotations

from typing import Any, Literal

from serve_app.errors import InvalidRequest

Endpoint = Literal["completions", "chat", "embeddings"]

_SHARED_NEUTRAL: dict[str, tuple[object, ...]] = {
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
}
NEUTRAL: dict[Endpoint, dict[str, tuple[object, ...]]] = {
    "embeddings": {},
    "completions": {**_SHARED_NEUTRAL, "best_of": (None, 1), "echo": (False,), "suffix": (None,)},
    "chat": {
        **_SHARED_NEUTRAL,
        "top_logprobs": (None, 0),
        "tools": (None, []),
        "tool_choice": (None, "none", "auto"),
        "functions": (None, []),
        "function_call": (None, "none", "auto"),
        "response_format": (None, {"type": "text"}),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "reasoning_effort": (None,),
        "verbosity": (None,),
        "web_search_options": (None,),
    },
}
"""Per endpoint: each unimplemented field and the values that mean "not used"."""

IGNORED: dict[Endpoint, frozenset[str]] = {
    "embeddings": frozenset(),
    "completions": frozenset(),
    "chat": frozenset(
        {
            "metadata",
            "store",
            "service_tier",
            "parallel_tool_calls",
            "prompt_cache_key",
            "safety_identifier",
        }
    ),
}
"""Per endpoint: fields accepted whatever their value, since they change no answer."""


def drop_neutral_fields(body: dict[str, Any], endpoint: Endpoint) -> dict[str, Any]:
    """`body` without its unimplemented fields at their neutral values and its ignored fields;
    raises `InvalidRequest` for an unimplemented field set to anything else."""
    neutral, ignored = NEUTRAL[endpoint], IGNORED[endpoint]
    kept = {}
    for name, value in body.items():
        if name in ignored:
            continue
        if name in neutral:
            if not any(_same(value, accepted) for accepted in neutral[name]):
                raise InvalidRequest(
                    f"is not supported by raycache (only {_shown(neutral[name])})", param=name
                )
            continue
        kept[name] = value
    return kept


def _same(value: object, accepted: object) -> bool:
    """Equal and of the same JSON type (so `false` is not `0`)."""
    if isinstance(value, bool) or isinstance(accepted, bool):
        return type(value) is type(accepted) and value == accepted
    return value == accepted


def _shown(values: tuple[object, ...]) -> str:
    return " or ".join("null" if v is None else repr(v) for v in values)
