"""The embeddings request and response: OpenAI's `/v1/embeddings` plus raycache's fields.

`input` is a string, a list of strings, a list of token ids, or a list of such lists; each input
is embedded, and cached, on its own (a batch with some cached inputs computes only the others).
An embedding travels as the float32 bytes the encoder computed (`EmbeddingOutcome.vector`), so
that `encoding_format: "float"` returns exactly those values and `"base64"` exactly those bytes
(little-endian float32, as OpenAI's clients decode them).
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.api.auth import OTHER_TENANTS
from serve_app.api.completions import CacheTier, TokenId, check_unicode, parse_body

MAX_INPUTS = 2048
TokenList = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingRequest(BaseModel):
    """The accepted body of `POST /v1/embeddings`; unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: str = Field(min_length=1, max_length=128)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | TokenList
        | Annotated[list[TokenList], Field(min_length=1)]
    ) = Field(description="What to embed: text(s) or token ids, at most 2,048 inputs.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(
        default=None, ge=1, description="Accepted only as the model's own dimensions."
    )
    user: str | None = Field(default=None, max_length=256, description="Accepted, unused.")

    @field_validator("model", "input", "user")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        check_unicode(value)
        return value

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_INPUTS and not isinstance(value[0], int):
            raise ValueError(f"at most {MAX_INPUTS} inputs")
        return value

    def inputs(self) -> list[str | list[int]]:
        """Each input on its own: a text, or token ids."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [list(self.input)]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """Validate a decoded JSON body; raises `InvalidRequest` naming the first bad field."""
    return parse_body(EmbeddingRequest, body, "embeddings")


@dataclass(frozen=True)
class EmbeddingJob:
    """What the ingress asks a replica: the tokens of each input of one request."""

    model: str
    tenant: str
    inputs: tuple[tuple[int, ...], ...]
    input_keys: tuple[str, ...]
    """Each input's placement key: where its embedding is owned in the ring."""
    routing_key: str | None = None
    """Placement key of the request (its first input's), read by the router."""
    replica: str | None = None
    tenant_label: str = OTHER_TENANTS
    """What stands for the tenant in the replica's metrics (`TenantAuth.tenant_label`)."""


@dataclass(frozen=True)
class EmbeddingOutcome:
    """One input's embedding, from a cache or computed."""

    vector: bytes
    """Little-endian float32 values, as computed."""
    tokens: int
    model_version: str
    cache_tier: CacheTier | None
    cache_key: str | None = None

    def floats(self) -> list[float]:
        return list(struct.unpack(f"<{len(self.vector) // 4}f", self.vector))


def float32_bytes(values: list[float]) -> bytes:
    """`values` (float32 values held as floats) as little-endian float32."""
    return struct.pack(f"<{len(values)}f", *values)


def embedding_response(
    model: str, outcomes: list[EmbeddingOutcome], encoding_format: str
) -> dict[str, Any]:
    """The OpenAI embeddings list, with the model's version and each input's cache outcome."""
    tokens = sum(o.tokens for o in outcomes)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(o.vector).decode("ascii")
                if encoding_format == "base64"
                else o.floats()
            ),
        }
        for i, o in enumerate(outcomes)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "model_version": outcomes[0].model_version if outcomes else None,
        "cache": [
            {"hit": o.cache_tier is not None, "tier": o.cache_tier, "key": o.cache_key}
            for o in outcomes
        ],
    }
