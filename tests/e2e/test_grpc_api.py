"""Every RPC of serve_app/proto/raycache.proto through Serve's gRPC proxy, with `grpcio`: the
same answers as HTTP, the same validation (`INVALID_ARGUMENT` naming the field), tenants from
the metadata's API key."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest

from serve_app.proto import raycache_pb2 as pb
from serve_app.proto import raycache_pb2_grpc
from tests.conftest import API_KEYS

pytestmark = pytest.mark.e2e

ALICE = (("authorization", f"Bearer {API_KEYS['alice']}"),)


@pytest.fixture(scope="module")
def stub(running_app):
    with running_app.grpc_channel() as channel:
        yield raycache_pb2_grpc.RayCacheStub(channel)


def chat_request(text: str, **fields) -> pb.ChatRequest:
    message = pb.ChatMessage(role="user", content=text)
    return pb.ChatRequest(model="tiny-gpt", messages=[message], temperature=0, **fields)


def test_completion_over_grpc_is_the_http_answer(stub, running_app):
    prompt = f"gRPC completion {uuid.uuid4().hex[:8]}"
    request = pb.CompletionRequest(model="tiny-gpt", text=prompt, max_tokens=12, temperature=0)
    answer = stub.Complete(request, metadata=ALICE, timeout=60)
    with running_app.http() as http:
        body = {"model": "tiny-gpt", "prompt": prompt, "max_tokens": 12, "temperature": 0}
        over_http = http.post("/v1/completions", json=body).json()
    assert answer.text == over_http["choices"][0]["text"]
    assert answer.cache.hit is False and over_http["cache"]["hit"] is True
    assert answer.usage.completion_tokens == over_http["usage"]["completion_tokens"]
    chunks = list(stub.CompleteStream(request, metadata=ALICE, timeout=60))
    assert "".join(c.text for c in chunks) == answer.text
    assert chunks[-1].cache.hit is True


def test_streamed_chat_over_grpc_is_the_http_stream(stub, running_app):
    text = f"gRPC chat {uuid.uuid4().hex[:8]}"
    request = chat_request(text, max_tokens=16, include_usage=True)
    chunks = list(stub.ChatStream(request, metadata=ALICE, timeout=60))
    streamed = "".join(c.content for c in chunks)
    assert chunks[0].role == "assistant"
    assert chunks[-1].usage.completion_tokens > 0
    with running_app.http() as http:
        body = {
            "model": "tiny-gpt",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 16,
            "temperature": 0,
        }
        over_http = http.post("/v1/chat/completions", json=body).json()
    assert streamed == over_http["choices"][0]["message"]["content"]
    unary = stub.Chat(chat_request(text, max_tokens=16), metadata=ALICE, timeout=60)
    assert unary.content == streamed and unary.cache.hit is True


def test_embeddings_models_and_stats_over_grpc(stub, running_app):
    texts = [f"embed {uuid.uuid4().hex[:8]}", "second"]
    request = pb.EmbeddingRequest(model="tiny-embed", texts=pb.Texts(items=texts))
    answer = stub.Embed(request, metadata=ALICE, timeout=60)
    with running_app.http() as http:
        over_http = http.post("/v1/embeddings", json={"model": "tiny-embed", "input": texts}).json()
    assert [list(d.embedding) for d in answer.data] == [d["embedding"] for d in over_http["data"]]
    models = stub.Models(pb.ModelsRequest(), metadata=ALICE, timeout=30)
    assert {m.id for m in models.data} == {"tiny-gpt", "tiny-embed"}
    stats = json.loads(stub.Stats(pb.StatsRequest(), metadata=ALICE, timeout=30).json)
    assert "replicas" in stats and "total" in stats


@pytest.mark.parametrize(
    ("call", "request_message", "code", "field"),
    [
        (
            "Complete",
            pb.CompletionRequest(model="tiny-gpt", text="hi", temperature=5),
            "INVALID_ARGUMENT",
            "temperature",
        ),
        ("Complete", pb.CompletionRequest(model="nope", text="hi"), "NOT_FOUND", "model"),
        ("Chat", pb.ChatRequest(model="tiny-gpt"), "INVALID_ARGUMENT", "messages"),
        ("ChatStream", chat_request("hi", max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
        ("Embed", pb.EmbeddingRequest(model="tiny-embed"), "INVALID_ARGUMENT", "input"),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    stub, call, request_message, code, field
):
    with pytest.raises(grpc.RpcError) as info:
        result = getattr(stub, call)(request_message, metadata=ALICE, timeout=30)
        list(result) if call.endswith("Stream") else result
    assert info.value.code() == grpc.StatusCode[code]
    assert info.value.details().startswith(f"{field}:")


def test_a_call_without_a_valid_key_is_unauthenticated(stub):
    request = pb.CompletionRequest(model="tiny-gpt", text="hi", max_tokens=2)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Complete(request, metadata=metadata, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
