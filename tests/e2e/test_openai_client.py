"""The running app as the official `openai` client sees it: completions and chat, streamed and
not, a conversation reusing its earlier turns from the prefix cache, and a stream whose client
leaves."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest
from openai import BadRequestError, OpenAI

from serve_app.config import parse_args
from serve_app.errors import InvalidRequest
from serve_app.models import ByteTokenizer
from serve_app.models.chat_template import ChatFormat, ChatMessage, render_builtin
from tests.conftest import API_KEYS
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"
CHAT = ChatFormat(render_builtin, ByteTokenizer().encode)


@pytest.fixture(scope="module")
def client(running_app) -> OpenAI:
    return OpenAI(base_url=f"{running_app.url}/v1", api_key=API_KEYS["alice"], max_retries=0)


def unique(text: str) -> str:
    """`text` made new to every cache (tests share one running app)."""
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def streamed_completion(client: OpenAI, prompt: str, **params) -> tuple[str, list]:
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True, **params))
    return "".join(c.choices[0].text for c in chunks if c.choices), chunks


def streamed_chat(client: OpenAI, messages: list[dict], **params) -> tuple[str, list]:
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, stream=True, **params)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_a_completion_streamed_and_not_has_the_same_text_cached_or_not(client):
    prompt = unique("Stream me a completion")
    streamed, chunks = streamed_completion(
        client, prompt, max_tokens=24, temperature=0, stream_options={"include_usage": True}
    )
    assert len(chunks) > 3
    last = chunks[-1].model_dump()
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert last["cache"]["hit"] is False and last["model_version"] == "1"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert plain.choices[0].text == streamed
    assert plain.model_dump()["cache"]["hit"] is True
    again, again_chunks = streamed_completion(client, prompt, max_tokens=24, temperature=0)
    assert again == streamed
    # Replayed by the ingress in the pieces the replica generated it in.
    assert again_chunks[-1].model_dump()["cache"]["tier"] == "ingress"
    assert [c.choices[0].text for c in again_chunks] == [c.choices[0].text for c in chunks[:-1]]


def test_chat_streamed_and_not_agree_and_a_repeat_is_a_hit(client):
    messages = [{"role": "user", "content": unique("Say something about caches")}]
    answer = client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=24, temperature=0
    )
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    text = answer.choices[0].message.content
    assert answer.usage.completion_tokens > 0
    streamed, chunks = streamed_chat(client, messages, max_tokens=24, temperature=0)
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].model_dump()["cache"]["hit"] is True
    fresh = [{"role": "user", "content": unique("Another question")}]
    fresh_streamed, _ = streamed_chat(client, fresh, max_tokens=16, temperature=0)
    fresh_plain = client.chat.completions.create(
        model=MODEL, messages=fresh, max_tokens=16, temperature=0
    )
    assert fresh_plain.choices[0].message.content == fresh_streamed


def test_each_turn_of_a_conversation_reuses_the_earlier_turns(client, running_app):
    block = parse_args(running_app.app_args()).prefix_cache.block_size
    conversation = [
        {"role": "system", "content": unique("You are a terse assistant.")},
        {"role": "user", "content": "What does a prefix cache keep? " * 6},
    ]
    earlier_tokens = 0
    for turn in range(3):
        answer = client.chat.completions.create(
            model=MODEL, messages=conversation, max_tokens=32, temperature=0
        )
        cached = answer.usage.prompt_tokens_details.cached_tokens
        if turn > 0:
            # Every full block of the earlier turns: their prompts and their answers.
            assert cached >= earlier_tokens // block * block, (turn, cached, earlier_tokens)
        content = answer.choices[0].message.content
        conversation.append({"role": "assistant", "content": content})
        messages = [ChatMessage(m["role"], m["content"]) for m in conversation]
        earlier_tokens = len(CHAT.prompt_tokens(messages[:-1])) + len(
            ByteTokenizer().encode(content + CHAT.answer_end)
        )
        conversation.append({"role": "user", "content": f"Tell me more, part {turn + 2}."})
        time.sleep(1)  # the answer's blocks are cached in the background, after the answer


def test_unsupported_and_bad_fields_are_named(client):
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], frequency_penalty=0.5
        )
    assert info.value.body["param"] == "frequency_penalty"
    with pytest.raises(BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "tool", "content": "hi", "tool_call_id": "x"}]
        )
    assert info.value.body["param"].startswith("messages[0]")
    neutral = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        frequency_penalty=0,
        store=False,
    )
    assert neutral.choices[0].finish_reason in ("stop", "length")


def cluster_counter(running_app, name: str) -> int:
    with running_app.http() as http:
        stats = http.get("/v1/cache/stats").json()
    return sum(r["cluster"][name] for r in stats["replicas"].values())


def test_a_client_that_leaves_a_stream_stops_it_and_an_identical_request_completes(running_app):
    body = {
        "model": MODEL,
        "prompt": unique("A long answer nobody reads to the end"),
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    stopped = cluster_counter(running_app, "generations_stopped")
    with running_app.http() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())
        wait_until(
            lambda: cluster_counter(running_app, "generations_stopped") > stopped,
            30,
            "the abandoned generation to stop",
        )
        plain = {**body, "stream": False}
        first = http.post("/v1/completions", json=plain).json()
        assert first["cache"]["hit"] is False  # nothing half-done was cached

    # An identical request joins a stream, which then leaves: the request still completes.
    body = {**body, "prompt": unique("Two readers, one leaves"), "max_tokens": 512}
    joined = cluster_counter(running_app, "single_flight_waits")
    results: dict[str, dict] = {}

    def ask() -> None:
        with running_app.http() as other:
            plain = {**body, "stream": False}
            results["answer"] = other.post("/v1/completions", json=plain).json()

    with running_app.http() as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a dropped iterator closes the stream
            next(lines)
            waiter = threading.Thread(target=ask)
            waiter.start()
            time.sleep(1.0)  # the identical request arrives while 512 tokens are generated
        waiter.join(60)
    answer = results["answer"]
    assert answer["choices"][0]["text"]
    assert (
        answer["usage"]["completion_tokens"] == 512
        or answer["choices"][0]["finish_reason"] == "stop"
    )
    wait_until(
        lambda: cluster_counter(running_app, "single_flight_waits") > joined,
        30,
        "the replicas to report that the request joined the stream's computation",
    )
    assert cluster_counter(running_app, "generations_stopped") == stopped + 1  # only the first


def test_sse_ends_with_done_and_an_error_before_the_stream_is_a_status(running_app):
    with running_app.http() as http:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True, "temperature": 0}
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        assert all(line.startswith("data: ") for line in lines)
        json.loads(lines[0][len("data: ") :])
        empty = http.post("/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
        unknown = http.post(
            "/v1/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}], "stream": True},
        )
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_handles_offer_chat_streams_and_embeddings(app_handle, client):
    messages = [{"role": "user", "content": unique("Asked over a handle")}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "temperature": 0}
    answer = app_handle.chat.remote(body, tenant="alice").result(timeout_s=60)
    stream = app_handle.options(stream=True).chat_stream.remote(
        {**body, "stream": True}, tenant="alice"
    )
    chunks = list(stream)
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == answer["choices"][0]["message"]["content"]
    assert chunks[-1]["cache"]["hit"] is True
    over_http = client.chat.completions.create(**body)
    assert over_http.choices[0].message.content == streamed
    embedded = app_handle.embeddings.remote(
        {"model": "tiny-embed", "input": ["a", "b"]}, tenant="alice"
    ).result(timeout_s=60)
    assert len(embedded["data"]) == 2
    with pytest.raises(InvalidRequest) as invalid:
        app_handle.chat.remote({**body, "stream": True}).result(timeout_s=60)
    assert invalid.value.param == "stream"
