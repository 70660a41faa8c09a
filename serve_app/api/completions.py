"""The completion request and response: OpenAI's `/v1/completions` subset plus raycache fields.

`parse_completion_request` turns an untrusted JSON body into a `CompletionRequest` or raises
`InvalidRequest` naming the field, whether the body came over HTTP or from a handle caller: every
integer it accepts fits in 64 bits and every string encodes to UTF-8, so no later step (a
message, the tokenizer, the response) can fail on what a client sent. `completion_response` builds
the `text_completion` object from what a replica answered.

`SamplingFields` are the fields completions and chat share (`serve_app.api.chat`), and
`parse_body` their common parse. Fields of OpenAI's API that raycache does not implement are
accepted at their neutral values and otherwise refused (`serve_app.api.openai_fields`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.api.auth import OTHER_TENANTS
from serve_app.api.openai_fields import Endpoint, drop_neutral_fields
from serve_app.errors import InvalidRequest
from serve_app.models import SamplingParams

DEFAULT_COMPLETION_TOKENS = 16
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 64
# Bounds of the integer fields, wider than any limit: the configured ones are checked later.
MAX_INT64 = 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
CacheTier = Literal["ingress", "local", "peer", "redis"]


class StreamOptions(BaseModel):
    """`stream_options` of a streamed request."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    include_usage: bool = Field(
        default=False, description="End the stream with a chunk carrying `usage`."
    )


class SamplingFields(BaseModel):
    """The fields of every generation request: the model, how to pick tokens, when to stop,
    and whether to stream. Unknown fields are rejected."""

    # strict: "16" is not 16 and true is not 1; ints are still accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_INT64,
        description="Most tokens to generate; the application's limit is checked by the ingress.",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice is supported.")
    stream: bool = Field(default=False, description="Answer as server-sent events.")
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256, description="Accepted, unused.")

    @field_validator("model", "stop", "user")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        check_unicode(value)
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

    @model_validator(mode="after")
    def _options_only_when_streaming(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when `stream` is true")
        return self

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    def stop_sequences(self) -> tuple[str, ...]:
        """`stop` as a tuple, whatever form the client sent."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def completion_limit(self) -> int | None:
        """The most tokens the client asked for (None: the application's limit)."""
        return self.max_tokens

    def sampling_params(self, max_tokens: int | None = None) -> SamplingParams:
        """The generation parameters of this request, producing at most `max_tokens` (by
        default what the request asked for)."""
        limit = max_tokens if max_tokens is not None else self.completion_limit()
        if limit is None:
            raise ValueError("the request names no limit: pass max_tokens")
        return SamplingParams(
            max_tokens=limit,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_sequences(),
        )


class CompletionRequest(SamplingFields):
    """The accepted body of `POST /v1/completions`."""

    prompt: str | list[TokenId] = Field(description="Text, or token ids of the model's tokenizer.")
    max_tokens: int | None = Field(
        default=DEFAULT_COMPLETION_TOKENS,
        ge=1,
        le=MAX_INT64,
        description="Most tokens to generate (OpenAI's default for completions).",
    )

    @field_validator("prompt")
    @classmethod
    def _encodable_prompt(cls, value: Any) -> Any:
        check_unicode(value)
        return value

    def completion_limit(self) -> int:
        # An explicit null is OpenAI's default too.
        return DEFAULT_COMPLETION_TOKENS if self.max_tokens is None else self.max_tokens


class FieldError(ValueError):
    """A failed check across fields (raised by a model validator) naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def parse_completion_request(body: object) -> CompletionRequest:
    """Validate a decoded JSON body; raises `InvalidRequest` naming the first bad field."""
    return parse_body(CompletionRequest, body, "completions")


RequestT = TypeVar("RequestT", bound=BaseModel)


def parse_body(kind: type[RequestT], body: object, endpoint: Endpoint) -> RequestT:
    """`body` validated as `kind`; raises `InvalidRequest` naming the first bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object", param="body")
    body = drop_neutral_fields(body, endpoint)
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        # A value that fits no member of a union fails once per member; the deepest failure is
        # the one that says what is wrong (prompt [-1]: the token id, not "should be a string").
        first_field = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
        error = max(first_field, key=lambda e: len(e["loc"]))
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, FieldError):
            raise InvalidRequest(str(cause), param=cause.field) from None
        field = _field_path(error["loc"])
        if error["type"] == "extra_forbidden":
            raise InvalidRequest("unknown field", param=field) from None
        if error["type"] == "missing":
            raise InvalidRequest("field required", param=field) from None
        raise InvalidRequest(error["msg"], param=field) from None


def _field_path(location: tuple[int | str, ...]) -> str:
    """`messages.1.content` as `messages[1].content`; union member names left out."""
    path = ""
    for part in location:
        if not path:
            path = str(part)  # a body's own key, whatever its type (a handle may send any)
        elif isinstance(part, int):
            path += f"[{part}]"
        elif not part.isidentifier() or part[:1].isupper() or part in _TYPE_NAMES:
            break  # a union member's name: what follows describes the member, not the body
        else:
            path += f".{part}" if path else part
    return path or "body"


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict"})


def check_unicode(value: Any) -> None:
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        if isinstance(text, str) and not _is_unicode(text):
            raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)")


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
    answer_end: str | None = None
    """For a chat turn: the next turn's prompt continues this one with the tokens of the
    answer followed by this text, so the replica caches their blocks too."""
    tenant_label: str = OTHER_TENANTS
    """What stands for the tenant in the replica's metrics (`TenantAuth.tenant_label`)."""


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
    pieces: tuple[int, ...] = ()
    """The lengths of the pieces the text was generated in (see `Generation.pieces`)."""
    created_at: float | None = None
    """When the answer was computed (seconds since the epoch), as its cached form records it:
    what invalidation rules are checked against."""


def completion_response(model: str, outcome: CompletionOutcome) -> dict[str, Any]:
    """The OpenAI `text_completion` object for `outcome`, with raycache's fields."""
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
        "usage": usage(outcome),
        **raycache_fields(outcome),
    }


def usage(outcome: CompletionOutcome) -> dict[str, Any]:
    """OpenAI's `usage` object; `cached_tokens` counts prompt tokens from the prefix cache."""
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def raycache_fields(outcome: CompletionOutcome) -> dict[str, Any]:
    """What raycache adds to a response: the weights' version, and where the answer came from."""
    return {
        "model_version": outcome.model_version,
        "cache": {
            "hit": outcome.cache_tier is not None,
            "tier": outcome.cache_tier,
            "key": outcome.cache_key,
        },
    }
