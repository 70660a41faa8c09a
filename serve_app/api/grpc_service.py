"""The gRPC API of `serve_app/proto/raycache.proto`, served through Ray Serve's gRPC proxy by
methods of the ingress named like its RPCs (`GrpcMethods`, which `Ingress` inherits).

Each RPC is its HTTP route in another encoding: the request message becomes the route's JSON
body (`serve_app.api.grpc_messages`), goes through the same parsing, validation, tenant and
routing, and the JSON answer becomes the response message. The tenant comes from the call's
`authorization` metadata (`Bearer <key>`), as from HTTP's header. A `RaycacheError` sets the
call's status code (`INVALID_ARGUMENT`, `UNAUTHENTICATED`, `NOT_FOUND`, `UNAVAILABLE`, ...) and
details (`param: message`): a unary RPC returns an empty message, a stream raises after setting
them (Serve's proxy then sends that status).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import ray
from ray.serve.grpc_util import RayServegRPCContext

from serve_app.api import grpc_messages as messages
from serve_app.errors import RaycacheError, ReplicaUnavailable
from serve_app.proto import raycache_pb2 as pb

Message = TypeVar("Message")


def _fail(context: RayServegRPCContext, error: RaycacheError) -> None:
    context.set_code(messages.grpc_status(error.http_status))
    context.set_details(f"{error.param}: {error}" if error.param else str(error))


class GrpcMethods:
    """The RPCs of `raycache.v1.RayCache`; mixed into the ingress, whose handle methods
    (`complete`, `chat`, `embeddings`, their `*_stream` forms, `models`, `cache_stats`) they
    call."""

    # Provided by the ingress.
    complete: Callable[..., Awaitable[dict[str, Any]]]
    chat: Callable[..., Awaitable[dict[str, Any]]]
    embeddings: Callable[..., Awaitable[dict[str, Any]]]
    complete_stream: Callable[..., AsyncIterator[dict[str, Any]]]
    chat_stream: Callable[..., AsyncIterator[dict[str, Any]]]
    models: Callable[[], Awaitable[dict[str, Any]]]
    cache_stats: Callable[[], Awaitable[dict[str, Any]]]
    _grpc_tenant: Callable[[RayServegRPCContext], str]

    async def Complete(
        self, request: pb.CompletionRequest, grpc_context: RayServegRPCContext
    ) -> pb.CompletionResponse:
        async def answer() -> pb.CompletionResponse:
            body = messages.completion_body(request)
            return messages.completion_message(
                await self.complete(body, self._grpc_tenant(grpc_context))
            )

        return await _unary(answer, grpc_context, pb.CompletionResponse)

    async def CompleteStream(
        self, request: pb.CompletionRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.CompletionChunk]:
        try:
            body = messages.completion_body(request, stream=True)
            chunks = self.complete_stream(body, self._grpc_tenant(grpc_context))
            async for chunk in chunks:
                yield messages.completion_chunk_message(chunk)
        except (RaycacheError, ray.exceptions.RayError) as error:
            _fail(grpc_context, _client_error(error))
            raise  # a stream's status is the one set before its exception

    async def Chat(
        self, request: pb.ChatRequest, grpc_context: RayServegRPCContext
    ) -> pb.ChatResponse:
        async def answer() -> pb.ChatResponse:
            body = messages.chat_body(request)
            return messages.chat_message(await self.chat(body, self._grpc_tenant(grpc_context)))

        return await _unary(answer, grpc_context, pb.ChatResponse)

    async def ChatStream(
        self, request: pb.ChatRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.ChatChunk]:
        try:
            body = messages.chat_body(request, stream=True)
            async for chunk in self.chat_stream(body, self._grpc_tenant(grpc_context)):
                yield messages.chat_chunk_message(chunk)
        except (RaycacheError, ray.exceptions.RayError) as error:
            _fail(grpc_context, _client_error(error))
            raise

    async def Embed(
        self, request: pb.EmbeddingRequest, grpc_context: RayServegRPCContext
    ) -> pb.EmbeddingResponse:
        async def answer() -> pb.EmbeddingResponse:
            body = messages.embedding_body(request)
            tenant = self._grpc_tenant(grpc_context)
            return messages.embedding_message(await self.embeddings(body, tenant))

        return await _unary(answer, grpc_context, pb.EmbeddingResponse)

    async def Models(
        self, request: pb.ModelsRequest, grpc_context: RayServegRPCContext
    ) -> pb.ModelsResponse:
        async def answer() -> pb.ModelsResponse:
            return messages.models_message(await self.models())

        return await _unary(answer, grpc_context, pb.ModelsResponse)

    async def Stats(
        self, request: pb.StatsRequest, grpc_context: RayServegRPCContext
    ) -> pb.StatsResponse:
        async def answer() -> pb.StatsResponse:
            return messages.stats_message(await self.cache_stats())

        return await _unary(answer, grpc_context, pb.StatsResponse)


def _client_error(error: Exception) -> RaycacheError:
    """What the client is told: a replica that failed under the request is `UNAVAILABLE`, as
    over HTTP."""
    if isinstance(error, RaycacheError):
        return error
    return ReplicaUnavailable("the request's replica failed", param="model")


async def _unary(
    answer: Callable[[], Awaitable[Message]],
    context: RayServegRPCContext,
    empty: Callable[[], Message],
) -> Message:
    try:
        return await answer()
    except (RaycacheError, ray.exceptions.RayError) as error:
        _fail(context, _client_error(error))
        return empty()
