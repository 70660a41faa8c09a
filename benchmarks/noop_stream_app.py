"""Serve applications that answer without computing or caching anything: the floors under
raycache's answers (`benchmarks.chat_ttft`, `benchmarks.hit_floor`).

It has raycache's shape: a FastAPI ingress that parses the JSON body, calls a second
deployment through a streaming handle (`handle.options(stream=True)`), awaits the first piece
before answering, and returns a `StreamingResponse` of server-sent events in OpenAI's
`chat.completion.chunk` format (a role chunk, one chunk per piece, a finishing chunk, a usage
chunk when asked for, `data: [DONE]`). Its pieces are fixed one-character strings, as many as
`max_tokens` asks (16 by default). It also answers `POST /v1/completions` (not streamed) with a
`text_completion` object built from what the second deployment returns: the two hops of a
cached raycache completion (proxy -> ingress -> replica). Deployed from a Serve config as
`import_path: benchmarks.noop_stream_app:app`.

`one_hop_app` answers `POST /v1/completions` from its ingress alone (proxy -> ingress): the
floor of an answer that skips the replica hop.
"""

# No `from __future__ import annotations`: FastAPI must see `Request` itself, not a string, in
# the routes of a class that `serve.ingress` wraps.
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

DONE = b"data: [DONE]\n\n"
http_app = FastAPI(title="noop-stream")


def _sse(chunk: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


one_hop_http_app = FastAPI(title="noop-one-hop")


def _text(body: dict[str, Any]) -> str:
    return "x" * int(body.get("max_tokens") or 16)


def _completion(body: dict[str, Any], text: str) -> dict[str, Any]:
    """A `text_completion` object of `text`, shaped as raycache's."""
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.get("model", "noop"),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(text), "total_tokens": len(text)},
    }


@serve.deployment(name="NoopReplica")
class NoopReplica:
    """Yields `max_tokens` pieces of text at once, as a replica streams a cached answer, or
    returns them whole."""

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        for _ in range(int(body.get("max_tokens") or 16)):
            yield "x"

    async def complete(self, body: dict[str, Any]) -> str:
        return _text(body)


@serve.deployment(name="NoopIngress")
@serve.ingress(http_app)
class NoopIngress:
    """Parses the body and turns the replica's pieces into OpenAI chunks, as SSE."""

    def __init__(self, replica: DeploymentHandle) -> None:
        self._replica = replica

    @http_app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> StreamingResponse:
        body = await request.json()
        model = body.get("model", "noop")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = self._replica.options(stream=True).stream.remote(body)
        first = await anext(stream)
        chunk_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            out: dict[str, Any] = {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [choice],
            }
            if include_usage:
                out["usage"] = None
            return out

        async def events() -> AsyncIterator[bytes]:
            pieces = 1
            try:
                yield _sse(chunk({"role": "assistant", "content": ""}, None))
                yield _sse(chunk({"content": first}, None))
                async for piece in stream:
                    pieces += 1
                    yield _sse(chunk({"content": piece}, None))
                yield _sse(chunk({}, "length"))
                if include_usage:
                    usage = {"prompt_tokens": 0, "completion_tokens": pieces}
                    yield _sse({**chunk({}, None), "choices": [], "usage": usage})
                yield DONE
            finally:
                stream.cancel()

        return StreamingResponse(events(), media_type="text/event-stream")

    @http_app.post("/v1/completions")
    async def complete(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return _completion(body, await self._replica.complete.remote(body))


@serve.deployment(name="NoopOneHop")
@serve.ingress(one_hop_http_app)
class NoopOneHop:
    """Parses the body and answers it itself."""

    @one_hop_http_app.post("/v1/completions")
    async def complete(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        return _completion(body, _text(body))


app = NoopIngress.bind(NoopReplica.bind())
one_hop_app = NoopOneHop.bind()
