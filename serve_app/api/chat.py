"""The chat completion request and response: OpenAI's `/v1/chat/completions` subset plus
raycache's fields.

`parse_chat_request` validates an untrusted body like `parse_completion_request` does (same
sampling fields, same limits on strings and integers) and raises `InvalidRequest` naming the
field, e.g. `messages[2].role`. Roles are `system`, `developer` (OpenAI's newer name for a
system message, read as one), `user` and `assistant`; a content is a string or a list of
`{"type": "text", "text": ...}` parts, joined. Tool calls, images and audio are refused.
`max_completion_tokens` is OpenAI's current name for `max_tokens`; either may be sent.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.api.completions import (
    MAX_INT64,
    CompletionOutcome,
    FieldError,
    SamplingFields,
    parse_body,
    raycache_fields,
    usage,
)
from serve_app.models.chat_template import ChatMessage

MAX_MESSAGES = 256
"""Most messages of one request: its template is rendered once per message."""


class TextPart(BaseModel):
    """One part of a message's content; only text is supported."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    type: Literal["text"]
    text: str


class MessageBody(BaseModel):
    """One message as a client sends it."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=256, description="Accepted, unused.")

    @field_validator("content")
    @classmethod
    def _encodable(cls, content: str | list[TextPart]) -> str | list[TextPart]:
        texts = [content] if isinstance(content, str) else [part.text for part in content]
        for text in texts:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("not valid Unicode (a lone surrogate such as \\ud800)") from None
        return content

    def message(self) -> ChatMessage:
        """The message as the chat template reads it."""
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=text)


class ChatRequest(SamplingFields):
    """The accepted body of `POST /v1/chat/completions`."""

    messages: list[MessageBody] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(
        default=None, ge=1, le=MAX_INT64, description="OpenAI's current name for `max_tokens`."
    )

    @model_validator(mode="after")
    def _one_limit(self) -> ChatRequest:
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise FieldError("max_completion_tokens", "differs from max_tokens; send one of them")
        return self

    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens

    def chat_messages(self) -> list[ChatMessage]:
        return [body.message() for body in self.messages]


def parse_chat_request(body: object) -> ChatRequest:
    """Validate a decoded JSON body; raises `InvalidRequest` naming the first bad field."""
    return parse_body(ChatRequest, body, "chat")


def chat_response(model: str, outcome: CompletionOutcome) -> dict[str, Any]:
    """The OpenAI `chat.completion` object for `outcome`, with raycache's fields."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.text},
                "logprobs": None,
                "finish_reason": outcome.finish_reason,
            }
        ],
        "usage": usage(outcome),
        **raycache_fields(outcome),
    }
