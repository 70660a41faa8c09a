"""A Serve application that streams a chat answer without computing or caching anything: the
floor under raycache's streamed answers (`benchmarks.chat_ttft`).

It has raycache's shape: a FastAPI ingress that parses the JSON body, calls a second
deployment through a streaming handle (`handle.options(stream=True)`), awaits the first piece
before answering, and returns a `StreamingResponse` of server-sent events in OpenAI's
`chat.completion.chunk` format (a role chunk, one chunk per piece, a finishing chunk, a usage
chunk when asked for, `data: [DONE]`). Its pieces are fixed one-character strings, as many as
`max_tokens` asks (16 by default). Deployed from a Serve config as
`import_path: benchmarks.noop_stream_app:app`.
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


@serve.deployment(name="NoopReplica")
class NoopReplica:
    """Yields `max_tokens` pieces of text at once, as a replica streams a cached answer."""

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[str]:
        for _ in range(int(body.get("max_tokens") or 16)):
            yield "x"


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


app = NoopIngress.bind(NoopReplica.bind())
