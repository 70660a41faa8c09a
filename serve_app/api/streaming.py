"""Streamed answers in OpenAI's chunk format, and as server-sent events.

`StreamChunks` turns a replica's stream events (`serve_app.replica.streaming`) into the chunk
objects OpenAI streams for completions (`text_completion`) and chat (`chat.completion.chunk`):
one chunk per piece of text (chat opens with one naming the `assistant` role), then one with the
`finish_reason`. With `stream_options.include_usage`, every chunk carries `"usage": null` and a
last chunk with no choices carries `usage`. The last chunk also carries raycache's fields
(`model_version`, `cache`). `sse` frames a chunk as an event; `DONE` ends the stream.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from serve_app.api.completions import CompletionOutcome, raycache_fields, usage
from serve_app.errors import RaycacheError

Kind = Literal["completions", "chat"]
DONE = b"data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> bytes:
    """`chunk` as one server-sent event."""
    return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"


def error_event(error: RaycacheError) -> bytes:
    """An error after the stream began (its status line is sent), as OpenAI streams one."""
    return sse(error.to_json())


class StreamChunks:
    """The chunks of one streamed answer, built in order: `opening()`, `piece(text)` for each
    piece, then `ending(outcome)`."""

    def __init__(self, kind: Kind, model: str, include_usage: bool) -> None:
        self._kind = kind
        self._model = model
        self._include_usage = include_usage
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        self._id = f"{prefix}-{uuid.uuid4().hex}"
        self._created = int(time.time())

    def opening(self) -> list[dict[str, Any]]:
        """What comes before the text: chat names the role."""
        if self._kind != "chat":
            return []
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def piece(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text} if self._kind == "chat" else text, None)

    def ending(self, outcome: CompletionOutcome) -> list[dict[str, Any]]:
        """The finishing chunk, and the usage chunk when asked for; the last carries
        raycache's fields."""
        finish = self._chunk({} if self._kind == "chat" else "", outcome.finish_reason)
        if not self._include_usage:
            return [{**finish, **raycache_fields(outcome)}]
        last = {**self._frame(), "choices": [], "usage": usage(outcome)}
        return [finish, {**last, **raycache_fields(outcome)}]

    def _chunk(self, content: dict[str, str] | str, finish_reason: str | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if self._kind == "chat":
            choice["delta"] = content
        else:
            choice["text"] = content
        choice["logprobs"] = None
        choice["finish_reason"] = finish_reason
        chunk = {**self._frame(), "choices": [choice]}
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def _frame(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self._kind == "chat" else "text_completion"
        return {"id": self._id, "object": kind, "created": self._created, "model": self._model}
