"""Parsing of chat bodies, OpenAI's unimplemented fields, and the streamed chunks."""

from __future__ import annotations

import json

import pytest

from serve_app.api.chat import chat_response, parse_chat_request
from serve_app.api.completions import CompletionOutcome
from serve_app.api.streaming import DONE, StreamChunks, sse
from serve_app.errors import InvalidRequest
from serve_app.models.chat_template import ChatMessage

USER = {"role": "user", "content": "hi"}
OUTCOME = CompletionOutcome(
    text="hello",
    finish_reason="length",
    prompt_tokens=7,
    completion_tokens=3,
    cached_tokens=4,
    model_version="2",
    cache_tier=None,
    cache_key="k",
)


def test_messages_become_template_messages() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": "c", "name": "bot"},
            ],
            "max_completion_tokens": 5,
            "temperature": 0,
        }
    )
    assert request.chat_messages() == [
        ChatMessage("system", "be brief"),
        ChatMessage("user", "ab"),
        ChatMessage("assistant", "c"),
    ]
    assert request.completion_limit() == 5
    assert request.sampling_params(5).is_deterministic
    assert parse_chat_request({"model": "m", "messages": [USER]}).completion_limit() is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        (
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
        ),
        (
            {"model": "m", "messages": [USER, {"role": "user", "content": "\ud800"}]},
            "messages[1].content",
        ),
        (
            {"model": "m", "messages": [USER], "max_tokens": 3, "max_completion_tokens": 4},
            "max_completion_tokens",
        ),
        ({"model": "m", "messages": [USER], "tools": [{"type": "function"}]}, "tools"),
        ({"model": "m", "messages": [USER], "logprobs": True}, "logprobs"),
        (
            {"model": "m", "messages": [USER], "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"model": "m", "messages": [USER], "frequency_penalty": False}, "frequency_penalty"),
        (
            {"model": "m", "messages": [USER], "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        ({"model": "m", "messages": [USER], "mystery": 1}, "mystery"),
    ],
)
def test_bad_fields_are_named(body, param) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(body)
    assert info.value.param == param


def test_neutral_and_bookkeeping_fields_are_accepted() -> None:
    request = parse_chat_request(
        {
            "model": "m",
            "messages": [USER],
            "frequency_penalty": 0,
            "presence_penalty": 0.0,
            "logprobs": False,
            "tools": [],
            "tool_choice": "none",
            "response_format": {"type": "text"},
            "store": True,
            "metadata": {"a": "b"},
            "parallel_tool_calls": False,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert request.stream and request.include_usage


def test_the_chat_response_is_openais_object_with_raycache_fields() -> None:
    response = chat_response("m", OUTCOME)
    assert response["object"] == "chat.completion"
    assert response["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert response["usage"]["prompt_tokens_details"]["cached_tokens"] == 4
    assert response["cache"] == {"hit": False, "tier": None, "key": "k"}
    assert response["model_version"] == "2"


def test_chat_chunks_open_with_the_role_and_end_with_usage() -> None:
    chunks = StreamChunks("chat", "m", include_usage=True)
    stream = [*chunks.opening(), chunks.piece("hel"), chunks.piece("lo"), *chunks.ending(OUTCOME)]
    assert stream[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in stream[1:3]] == ["hel", "lo"]
    assert stream[3]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in stream[:4])
    assert stream[4]["choices"] == [] and stream[4]["usage"]["total_tokens"] == 10
    assert stream[4]["model_version"] == "2" and stream[4]["cache"]["hit"] is False
    assert len({c["id"] for c in stream}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in stream)


def test_completion_chunks_carry_text_and_the_last_one_raycache_fields() -> None:
    chunks = StreamChunks("completions", "m", include_usage=False)
    stream = [*chunks.opening(), chunks.piece("hello"), *chunks.ending(OUTCOME)]
    assert [c["choices"][0]["text"] for c in stream] == ["hello", ""]
    assert "usage" not in stream[0] and stream[-1]["cache"]["key"] == "k"
    event = sse(stream[0])
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert json.loads(event[len(b"data: ") :]) == stream[0]
    assert DONE == b"data: [DONE]\n\n"
