"""The gRPC API (serve_app/proto/raycache.proto) as the HTTP API's JSON: pure translation, no Ray.

A request message becomes the JSON body its HTTP route takes (`completion_body`, `chat_body`,
`embedding_body`), holding only the fields the client set: an unset `optional` field is left out,
so the HTTP defaults and the HTTP parsers' validation apply unchanged, and an error names the same
`param`. A response dict of the HTTP API becomes the response message (`completion_message`,
`chat_message`, the two `*_chunk_message`, `embedding_message`, `models_message`,
`stats_message`); a `None` in the dict (a miss's cache tier, a chunk's finish_reason) becomes the
field's empty value. `grpc_status` maps an HTTP status to a gRPC code, `api_key` reads the
credential from the call's metadata.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

import grpc

from serve_app.proto import raycache_pb2 as pb

__all__ = [
    "GRPC_STATUS",
    "api_key",
    "chat_body",
    "chat_chunk_message",
    "chat_message",
    "completion_body",
    "completion_chunk_message",
    "completion_message",
    "embedding_body",
    "embedding_message",
    "grpc_status",
    "models_message",
    "stats_message",
]

# The `optional` fields copied into the body under their own name when set.
_COMPLETION_OPTIONS: Final = ("max_tokens", "temperature", "top_p", "seed", "user")
_CHAT_OPTIONS: Final = (*_COMPLETION_OPTIONS, "max_completion_tokens")

GRPC_STATUS: Final[Mapping[int, grpc.StatusCode]] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    # As serve_app/errors.py's BodyTooLarge, and what gRPC itself answers to a message over the
    # size limit.
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    # A version that would go backwards: retrying is pointless until the state changes (`force`).
    409: grpc.StatusCode.FAILED_PRECONDITION,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""HTTP status -> gRPC code; agrees with `RaycacheError.grpc_status` of every error kind."""


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC code of an HTTP status: `GRPC_STATUS`, INTERNAL for any status not in it."""
    return GRPC_STATUS.get(http_status, grpc.StatusCode.INTERNAL)


def api_key(metadata: Iterable[tuple[str, str]]) -> str | None:
    """The `authorization` entry of a call's invocation metadata, verbatim (`"Bearer <key>"`),
    or None without one: what HTTP's `Authorization` header carries, so that
    `serve_app.api.auth.bearer_token` parses both alike (scheme case-insensitive). Like
    `request.headers.get`, the first entry wins when there are several."""
    for key, value in metadata:
        if key.lower() == "authorization":
            return value
    return None


def completion_body(request: pb.CompletionRequest, *, stream: bool = False) -> dict[str, Any]:
    """The `/v1/completions` body of `request`; `stream` for `CompleteStream`."""
    body = _body(request, _COMPLETION_OPTIONS, stream)
    prompt = request.WhichOneof("prompt")
    if prompt == "text":
        body["prompt"] = request.text
    elif prompt == "tokens":
        body["prompt"] = list(request.tokens.ids)
    return body


def chat_body(request: pb.ChatRequest, *, stream: bool = False) -> dict[str, Any]:
    """The `/v1/chat/completions` body of `request`; `stream` for `ChatStream`. Every message
    has both `role` and `content`: proto3 cannot tell an empty content from none."""
    body = _body(request, _CHAT_OPTIONS, stream)
    if request.messages:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    return body


def embedding_body(request: pb.EmbeddingRequest) -> dict[str, Any]:
    """The `/v1/embeddings` body of `request`, asking for float embeddings (the only form
    `embedding_message` takes)."""
    body: dict[str, Any] = {"encoding_format": "float"}
    if request.model:
        body["model"] = request.model
    given = request.WhichOneof("input")
    if given == "texts":
        body["input"] = list(request.texts.items)
    elif given == "token_inputs":
        body["input"] = [list(tokens.ids) for tokens in request.token_inputs.items]
    if request.HasField("user"):
        body["user"] = request.user
    return body


def _body(
    request: pb.CompletionRequest | pb.ChatRequest, options: Iterable[str], stream: bool
) -> dict[str, Any]:
    """The fields completions and chat share. An empty model is left out: HTTP then says
    `model` is required, which is what an unset proto3 string means."""
    body: dict[str, Any] = {"model": request.model} if request.model else {}
    body.update((name, getattr(request, name)) for name in options if request.HasField(name))
    if request.stop:
        body["stop"] = list(request.stop)
    if stream:
        body["stream"] = True
    if request.HasField("include_usage"):
        body["stream_options"] = {"include_usage": request.include_usage}
    return body


def completion_message(response: Mapping[str, Any]) -> pb.CompletionResponse:
    """The message of a `text_completion` object."""
    (choice,) = response["choices"]
    return pb.CompletionResponse(
        id=response["id"],
        created=response["created"],
        model=response["model"],
        text=choice["text"],
        finish_reason=choice["finish_reason"] or "",
        usage=_usage(response["usage"]),
        model_version=response["model_version"],
        cache=_cache(response["cache"]),
    )


def chat_message(response: Mapping[str, Any]) -> pb.ChatResponse:
    """The message of a `chat.completion` object."""
    (choice,) = response["choices"]
    return pb.ChatResponse(
        id=response["id"],
        created=response["created"],
        model=response["model"],
        role=choice["message"]["role"],
        content=choice["message"]["content"] or "",
        finish_reason=choice["finish_reason"] or "",
        usage=_usage(response["usage"]),
        model_version=response["model_version"],
        cache=_cache(response["cache"]),
    )


def completion_chunk_message(chunk: Mapping[str, Any]) -> pb.CompletionChunk:
    """The message of one `text_completion` stream chunk, the usage chunk (no choices) too."""
    message = pb.CompletionChunk(
        id=chunk["id"], created=chunk["created"], model=chunk["model"], **_chunk_extras(chunk)
    )
    if chunk["choices"]:
        (choice,) = chunk["choices"]
        message.text = choice.get("text") or ""
        message.finish_reason = choice.get("finish_reason") or ""
    return message


def chat_chunk_message(chunk: Mapping[str, Any]) -> pb.ChatChunk:
    """The message of one `chat.completion.chunk`, the usage chunk (no choices) too."""
    message = pb.ChatChunk(
        id=chunk["id"], created=chunk["created"], model=chunk["model"], **_chunk_extras(chunk)
    )
    if chunk["choices"]:
        (choice,) = chunk["choices"]
        delta = choice.get("delta") or {}
        message.role = delta.get("role") or ""
        message.content = delta.get("content") or ""
        message.finish_reason = choice.get("finish_reason") or ""
    return message


def _chunk_extras(chunk: Mapping[str, Any]) -> dict[str, Any]:
    """What only some chunks carry; OpenAI sends `"usage": null` on the others."""
    extras: dict[str, Any] = {"model_version": chunk.get("model_version") or ""}
    if chunk.get("usage") is not None:
        extras["usage"] = _usage(chunk["usage"])
    if chunk.get("cache") is not None:
        extras["cache"] = _cache(chunk["cache"])
    return extras


def embedding_message(response: Mapping[str, Any]) -> pb.EmbeddingResponse:
    """The message of an embeddings `list`. Each value is stored as float32, exactly what the
    model made; raises `ValueError` for a base64 embedding (HTTP only)."""
    data = []
    for item in response["data"]:
        if isinstance(item["embedding"], str):
            raise ValueError("a base64 embedding: ask for encoding_format 'float'")
        data.append(pb.Embedding(index=item["index"], embedding=item["embedding"]))
    return pb.EmbeddingResponse(
        model=response["model"],
        data=data,
        usage=_usage(response["usage"]),
        model_version=response["model_version"],
        cache=[_cache(cache) for cache in response["cache"]],
    )


def models_message(response: Mapping[str, Any]) -> pb.ModelsResponse:
    """The message of the `/v1/models` list."""
    return pb.ModelsResponse(
        data=[
            pb.ModelInfo(
                id=model["id"],
                owned_by=model.get("owned_by") or "",
                version=model["version"],
                generation=model["generation"],
                task=model.get("task") or "",
            )
            for model in response["data"]
        ]
    )


def stats_message(response: Mapping[str, Any]) -> pb.StatsResponse:
    """The stats document as the JSON text the HTTP route sends (Starlette's `JSONResponse`
    encoding: compact, UTF-8, and `ValueError` on NaN or infinity, as there)."""
    text = json.dumps(response, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return pb.StatsResponse(json=text)


def _usage(usage: Mapping[str, Any]) -> pb.Usage:
    details = usage.get("prompt_tokens_details") or {}
    return pb.Usage(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage.get("completion_tokens") or 0,
        total_tokens=usage["total_tokens"],
        cached_tokens=details.get("cached_tokens") or 0,
    )


def _cache(cache: Mapping[str, Any]) -> pb.CacheInfo:
    return pb.CacheInfo(hit=cache["hit"], tier=cache["tier"] or "", key=cache["key"] or "")
