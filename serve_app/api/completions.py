"""The completion request and response: OpenAI's `/v1/completions` subset plus raycache fields.

`parse_completion_request` turns an untrusted JSON body into a `CompletionRequest` or raises
`InvalidRequest` naming the field, whether the body came over HTTP or from a handle caller: every
integer it accepts fits in 64 bits and every string encodes to UTF-8, so no later step (a
message, the tokenizer, the response) can fail on what a client sent. `completion_response` builds
the `text_completion` object from what a replica answered.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve_app.errors import InvalidRequest
from serve_app.models import SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# Bounds of the integer fields, wider than any limit: the configured ones are checked later.
MAX_INT64 = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
CacheTier = Literal["local", "peer", "redis"]


class CompletionRequest(BaseModel):
    """The accepted body of `POST /v1/completions`; unknown fields are rejected."""

    # strict: "16" is not 16 and true is not 1; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(min_length=1, max_length=128)
    prompt: str | list[TokenId] = Field(description="Text, or token ids of the model's tokenizer.")
    max_tokens: int = Field(
        default=16,
        ge=1,
        le=MAX_INT64,
        description="Most tokens to generate; the application's limit is checked by the ingress.",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is supported.")
    stream: Literal[False] = Field(default=False, description="Streaming is not supported yet.")
    user: str | None = Field(default=None, max_length=256, description="Accepted, unused.")

    @field_validator("model", "prompt", "stop", "user")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        texts = value if isinstance(value, list) else [value]
        for text in texts:
            if isinstance(text, str) and not _is_unicode(text):
                raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        sequences = [stop] if isinstance(stop, str) else (stop or [])
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in sequences):
            raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        """`stop` as a tuple, whatever form the client sent."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling_params(self) -> SamplingParams:
        """The generation parameters of this request."""
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_sequences(),
        )


def parse_completion_request(body: object) -> CompletionRequest:
    """Validate a decoded JSON body; raises `InvalidRequest` naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body")
    try:
        return CompletionRequest.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        # A value that fits no member of a union fails once per member; the deepest failure is
        # the one that says what is wrong (prompt [-1]: the token id, not "should be a string").
        first_field = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
        error = max(first_field, key=lambda e: len(e["loc"]))
        field = str(error["loc"][0]) if error["loc"] else "body"
        if error["type"] == "extra_forbidden":
            raise InvalidRequest("unknown field", param=field) from None
        if error["type"] == "missing":
            raise InvalidRequest("field required", param=field) from None
        raise InvalidRequest(error["msg"], param=field) from None


def _is_unicode(text: str) -> bool:
    """Whether `text` encodes to UTF-8 (it has no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class CompletionJob:
    """What the ingress asks a model replica: a tokenized, validated completion."""

    model: str
    tenant: str
    prompt_tokens: tuple[int, ...]
    params: SamplingParams
    routing_key: str | None = None
    """Placement key read by `serve_app.router.CacheAffinityRouter`."""
    replica: str | None = None
    """Send to this replica id when it is running, whatever the key (operators, tests)."""


@dataclass(frozen=True)
class CompletionOutcome:
    """What a model replica answers, from cache or computed."""

    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    model_version: str
    cache_tier: CacheTier | None
    cache_key: str | None = None


def completion_response(model: str, outcome: CompletionOutcome) -> dict[str, Any]:
    """The OpenAI `text_completion` object for `outcome`, with raycache's two extra fields."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "text": outcome.text,
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        },
        "model_version": outcome.model_version,
        "cache": {
            "hit": outcome.cache_tier is not None,
            "tier": outcome.cache_tier,
            "key": outcome.cache_key,
        },
    }
