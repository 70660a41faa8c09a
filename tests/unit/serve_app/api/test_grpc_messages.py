"""gRPC messages <-> the HTTP API's JSON: bodies hold only what was set, responses keep every
field, embeddings keep every bit of their float32 values."""

import json
import random
import struct

import grpc
import pytest

from serve_app import errors
from serve_app.api import grpc_messages as gm
from serve_app.api.auth import bearer_token
from serve_app.api.completions import (
    CompletionOutcome,
    completion_response,
    parse_completion_request,
)
from serve_app.proto import raycache_pb2 as pb

USAGE = {
    "prompt_tokens": 5,
    "completion_tokens": 3,
    "total_tokens": 8,
    "prompt_tokens_details": {"cached_tokens": 4},
}
HIT = {"hit": True, "tier": "peer", "key": "k1"}
MISS = {"hit": False, "tier": None, "key": None}


# Request bodies.


def test_an_empty_request_leaves_every_field_out() -> None:
    assert gm.completion_body(pb.CompletionRequest()) == {}
    assert gm.chat_body(pb.ChatRequest()) == {}
    assert gm.embedding_body(pb.EmbeddingRequest()) == {"encoding_format": "float"}


def test_a_completion_body_holds_what_was_set_zeros_included() -> None:
    request = pb.CompletionRequest(
        model="m",
        text="",
        max_tokens=0,
        temperature=0.0,
        top_p=0.5,
        seed=0,
        stop=["\n", "END"],
        user="",
        include_usage=False,
    )
    assert gm.completion_body(request) == {
        "model": "m",
        "prompt": "",
        "max_tokens": 0,
        "temperature": 0.0,
        "top_p": 0.5,
        "seed": 0,
        "stop": ["\n", "END"],
        "user": "",
        "stream_options": {"include_usage": False},
    }


def test_a_token_id_prompt_becomes_a_list_of_ints() -> None:
    body = gm.completion_body(pb.CompletionRequest(model="m", tokens=pb.TokenIds(ids=[1, 2, 3])))
    assert body == {"model": "m", "prompt": [1, 2, 3]}
    assert type(body["prompt"]) is list
    assert all(type(i) is int for i in body["prompt"])


def test_stream_asks_for_a_stream() -> None:
    request = pb.CompletionRequest(model="m", text="hi", include_usage=True)
    assert gm.completion_body(request, stream=True) == {
        "model": "m",
        "prompt": "hi",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_the_http_parser_applies_its_defaults_and_its_errors() -> None:
    parsed = parse_completion_request(gm.completion_body(pb.CompletionRequest(model="m", text="x")))
    assert (parsed.max_tokens, parsed.temperature, parsed.top_p, parsed.stop) == (
        16,
        1.0,
        1.0,
        None,
    )
    with pytest.raises(errors.InvalidRequest) as missing:
        parse_completion_request(gm.completion_body(pb.CompletionRequest(text="x")))
    assert missing.value.param == "model"
    with pytest.raises(errors.InvalidRequest) as bad:
        parse_completion_request(
            gm.completion_body(pb.CompletionRequest(model="m", tokens={"ids": [-1]}))
        )
    assert bad.value.param == "prompt"


def test_a_chat_body() -> None:
    request = pb.ChatRequest(
        model="m",
        messages=[pb.ChatMessage(role="system", content="be brief"), pb.ChatMessage(role="user")],
        max_completion_tokens=7,
        seed=3,
    )
    assert gm.chat_body(request, stream=True) == {
        "model": "m",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": ""},
        ],
        "max_completion_tokens": 7,
        "seed": 3,
        "stream": True,
    }


def test_embedding_bodies() -> None:
    texts = pb.EmbeddingRequest(model="e", texts=pb.Texts(items=["a", "b"]), user="u")
    assert gm.embedding_body(texts) == {
        "model": "e",
        "input": ["a", "b"],
        "user": "u",
        "encoding_format": "float",
    }
    tokens = pb.EmbeddingRequest(
        model="e", token_inputs=pb.TokenIdLists(items=[pb.TokenIds(ids=[1, 2]), pb.TokenIds()])
    )
    assert gm.embedding_body(tokens) == {
        "model": "e",
        "input": [[1, 2], []],
        "encoding_format": "float",
    }


# Responses.


def test_a_completion_response() -> None:
    outcome = CompletionOutcome(
        text="hello",
        finish_reason="length",
        prompt_tokens=5,
        completion_tokens=3,
        cached_tokens=4,
        model_version="v2",
        cache_tier="redis",
        cache_key="key",
    )
    response = completion_response("m", outcome)
    message = gm.completion_message(response)
    assert message == pb.CompletionResponse(
        id=response["id"],
        created=response["created"],
        model="m",
        text="hello",
        finish_reason="length",
        usage=pb.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, cached_tokens=4),
        model_version="v2",
        cache=pb.CacheInfo(hit=True, tier="redis", key="key"),
    )


def test_a_miss_has_an_empty_tier_and_key() -> None:
    response = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "t", "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE,
        "model_version": "v1",
        "cache": MISS,
    }
    message = gm.completion_message(response)
    assert message.HasField("cache")
    assert (message.cache.hit, message.cache.tier, message.cache.key) == (False, "", "")


def test_a_chat_response() -> None:
    response = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 2,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": USAGE,
        "model_version": "v1",
        "cache": HIT,
    }
    assert gm.chat_message(response) == pb.ChatResponse(
        id="chatcmpl-1",
        created=2,
        model="m",
        role="assistant",
        content="hi",
        finish_reason="stop",
        usage=pb.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, cached_tokens=4),
        model_version="v1",
        cache=pb.CacheInfo(hit=True, tier="peer", key="k1"),
    )


def _completion_chunk(choices: list, **extra: object) -> dict:
    return {
        "id": "c",
        "object": "text_completion",
        "created": 3,
        "model": "m",
        "choices": choices,
        **extra,
    }


def test_completion_chunks_text_last_and_usage() -> None:
    first = gm.completion_chunk_message(
        _completion_chunk(
            [{"index": 0, "text": "he", "logprobs": None, "finish_reason": None}], usage=None
        )
    )
    assert first == pb.CompletionChunk(id="c", created=3, model="m", text="he")
    assert not first.HasField("usage") and not first.HasField("cache")
    last = gm.completion_chunk_message(
        _completion_chunk(
            [{"index": 0, "text": "llo", "logprobs": None, "finish_reason": "stop"}],
            model_version="v1",
            cache=MISS,
        )
    )
    assert (last.text, last.finish_reason, last.model_version) == ("llo", "stop", "v1")
    assert last.HasField("cache") and not last.cache.hit
    usage = gm.completion_chunk_message(_completion_chunk([], usage=USAGE))
    assert (usage.text, usage.finish_reason) == ("", "")
    assert usage.usage == pb.Usage(
        prompt_tokens=5, completion_tokens=3, total_tokens=8, cached_tokens=4
    )


def _chat_chunk(choices: list, **extra: object) -> dict:
    return {
        "id": "h",
        "object": "chat.completion.chunk",
        "created": 4,
        "model": "m",
        "choices": choices,
        **extra,
    }


def test_chat_chunks_role_first_then_deltas_and_usage() -> None:
    first = gm.chat_chunk_message(
        _chat_chunk(
            [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        )
    )
    assert first == pb.ChatChunk(id="h", created=4, model="m", role="assistant")
    middle = gm.chat_chunk_message(
        _chat_chunk([{"index": 0, "delta": {"content": "yo"}, "finish_reason": None}])
    )
    assert (middle.role, middle.content, middle.finish_reason) == ("", "yo", "")
    last = gm.chat_chunk_message(
        _chat_chunk(
            [{"index": 0, "delta": {}, "finish_reason": "length"}], model_version="v1", cache=HIT
        )
    )
    assert (last.content, last.finish_reason, last.model_version) == ("", "length", "v1")
    assert last.cache == pb.CacheInfo(hit=True, tier="peer", key="k1")
    usage = gm.chat_chunk_message(_chat_chunk([], usage=USAGE, model_version="v1", cache=HIT))
    assert usage.HasField("usage") and usage.usage.total_tokens == 8
    assert usage.model_version == "v1"


def _float32s(count: int) -> list[float]:
    """Python floats that came from float32: random bit patterns (no NaN or infinity) and the
    edges of the format."""
    rng = random.Random(7)
    bits = [rng.getrandbits(32) for _ in range(count)]
    values = [struct.unpack("<f", struct.pack("<I", b))[0] for b in bits]
    edges = [0.0, -0.0, 1.401298464324817e-45, 1.1754943508222875e-38, 3.4028234663852886e38]
    return [v for v in values if v == v and abs(v) != float("inf")] + edges + [-e for e in edges]


def test_embeddings_round_trip_bit_exactly() -> None:
    vectors = [_float32s(500), _float32s(3)]
    response = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)
        ],
        "model": "e",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
        "model_version": "v3",
        "cache": [HIT, MISS],
    }
    message = gm.embedding_message(response)
    received = pb.EmbeddingResponse.FromString(message.SerializeToString())
    assert [item.index for item in received.data] == [0, 1]
    for item, sent in zip(received.data, vectors, strict=True):
        assert struct.pack(f"<{len(sent)}f", *item.embedding) == struct.pack(
            f"<{len(sent)}f", *sent
        )
        assert list(item.embedding) == sent
    assert received.usage == pb.Usage(prompt_tokens=6, total_tokens=6)
    assert received.model_version == "v3"
    assert [c.tier for c in received.cache] == ["peer", ""]


def test_a_double_is_rounded_to_the_nearest_float32() -> None:
    response = {
        "data": [{"index": 0, "embedding": [0.1]}],
        "model": "e",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
        "model_version": "v",
        "cache": [MISS],
    }
    (item,) = gm.embedding_message(response).data
    assert item.embedding[0] == struct.unpack("<f", struct.pack("<f", 0.1))[0]


def test_a_base64_embedding_is_refused() -> None:
    response = {
        "data": [{"index": 0, "embedding": "AAAAAA=="}],
        "model": "e",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
        "model_version": "v",
        "cache": [MISS],
    }
    with pytest.raises(ValueError, match="base64"):
        gm.embedding_message(response)


def test_models() -> None:
    response = {
        "object": "list",
        "data": [
            {
                "id": "a",
                "object": "model",
                "owned_by": "raycache",
                "version": "v1",
                "generation": 0,
            },
            {
                "id": "b",
                "object": "model",
                "owned_by": "raycache",
                "version": "v9",
                "generation": 4,
                "task": "embed",
            },
        ],
    }
    assert gm.models_message(response) == pb.ModelsResponse(
        data=[
            pb.ModelInfo(id="a", owned_by="raycache", version="v1", generation=0),
            pb.ModelInfo(id="b", owned_by="raycache", version="v9", generation=4, task="embed"),
        ]
    )


def test_stats_keep_their_integers_and_nesting() -> None:
    stats = {
        "replicas": {"r1": {"hits": 2**53 + 1, "ratio": 0.5, "tier": "local"}},
        "total": [1, None],
    }
    text = gm.stats_message(stats).json
    assert json.loads(text) == stats
    assert text == json.dumps(stats, separators=(",", ":"))


def test_stats_refuse_nan_as_the_http_route_does() -> None:
    with pytest.raises(ValueError):
        gm.stats_message({"ratio": float("nan")})


# Status codes and credentials.


@pytest.mark.parametrize(
    ("http_status", "code"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT),
        (422, grpc.StatusCode.INVALID_ARGUMENT),
        (413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (401, grpc.StatusCode.UNAUTHENTICATED),
        (403, grpc.StatusCode.PERMISSION_DENIED),
        (404, grpc.StatusCode.NOT_FOUND),
        (409, grpc.StatusCode.FAILED_PRECONDITION),
        (429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (503, grpc.StatusCode.UNAVAILABLE),
        (504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (500, grpc.StatusCode.INTERNAL),
        (502, grpc.StatusCode.INTERNAL),
        (418, grpc.StatusCode.INTERNAL),
    ],
)
def test_grpc_status(http_status: int, code: grpc.StatusCode) -> None:
    assert gm.grpc_status(http_status) is code


def test_grpc_status_agrees_with_every_error_kind() -> None:
    kinds = [
        kind
        for kind in vars(errors).values()
        if isinstance(kind, type) and issubclass(kind, errors.RaycacheError)
    ]
    assert len(kinds) > 5
    for kind in kinds:
        assert gm.grpc_status(kind.http_status) is grpc.StatusCode[kind.grpc_status], kind


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_api_key_is_the_authorization_value(scheme: str) -> None:
    metadata = [
        ("application", "raycache"),
        ("authorization", f"{scheme} sk-123"),
        ("authorization", "Bearer other"),
    ]
    value = gm.api_key(metadata)
    assert value == f"{scheme} sk-123"
    assert bearer_token(value) == b"sk-123"


def test_api_key_without_one() -> None:
    assert gm.api_key([("application", "raycache")]) is None
    assert gm.api_key([]) is None
    assert bearer_token(gm.api_key([("authorization", "Basic abc")])) is None


def test_api_key_metadata_key_case_does_not_matter() -> None:
    assert gm.api_key([("Authorization", "Bearer k")]) == "Bearer k"
