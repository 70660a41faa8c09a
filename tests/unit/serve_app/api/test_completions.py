"""Parsing of completion bodies and the response object."""

import json

import pytest

from serve_app.api.completions import (
    CompletionOutcome,
    completion_response,
    parse_completion_request,
)
from serve_app.errors import InvalidRequest


def test_minimal_body_gets_openai_defaults():
    request = parse_completion_request({"model": "m", "prompt": "hi"})
    assert (request.max_tokens, request.temperature, request.top_p) == (16, 1.0, 1.0)
    assert request.stop_sequences() == ()
    assert not request.sampling_params().is_deterministic
    assert (
        parse_completion_request({"model": "m", "prompt": [1, 2], "temperature": 0})
        .sampling_params()
        .is_deterministic
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "hi"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": 3, "prompt": "hi"}, "model"),
        ({"model": "m", "prompt": 3}, "prompt"),
        ({"model": "m", "prompt": ["a"]}, "prompt"),
        ({"model": "m", "prompt": "hi", "max_tokens": "16"}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "m", "prompt": "hi", "top_p": 0}, "top_p"),
        ({"model": "m", "prompt": "hi", "seed": -1}, "seed"),
        ({"model": "m", "prompt": "hi", "stop": ["a"] * 5}, "stop"),
        ({"model": "m", "prompt": "hi", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "hi", "n": 2}, "n"),
        ({"model": "m", "prompt": "hi", "stream": "yes"}, "stream"),
        (
            {"model": "m", "prompt": "hi", "stream_options": {"include_usage": True}},
            "stream_options",
        ),
        (
            {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"x": 1}},
            "stream_options.x",
        ),
        ({"model": "m", "prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"model": "m", "prompt": "hi", "echo": True}, "echo"),
        ({"model": "m", "prompt": "hi", "logprobs": 3}, "logprobs"),
        # What a JSON parser accepts but no later step could use.
        ({"model": "m", "prompt": "\ud800"}, "prompt"),
        ({"model": "m", "prompt": "hi", "stop": "\ud800"}, "stop"),
        ({"model": "m", "prompt": "hi", "stop": ["ok", "\udfff"]}, "stop"),
        ({"model": "\ud800", "prompt": "hi"}, "model"),
        ({"model": "m", "prompt": "hi", "user": "\ud83d"}, "user"),
        ({"model": "m", "prompt": "hi", "max_tokens": 10**4000}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "max_tokens": 10**5000}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "max_tokens": -(10**4000)}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "hi", "seed": 10**5000}, "seed"),
        ({"model": "m", "prompt": "hi", "temperature": 10**5000}, "temperature"),
        ({"model": "m", "prompt": "hi", "temperature": float("nan")}, "temperature"),
        ({"model": "m", "prompt": "hi", "top_p": float("inf")}, "top_p"),
        ({"model": "m", "prompt": [1, 10**5000]}, "prompt"),
        ({"model": "m", "prompt": [-1]}, "prompt"),
        ({"model": "m", "prompt": [[1]]}, "prompt"),
        ({"model": "m", "prompt": "hi", "stop": [["a"]]}, "stop"),
        ({"model": "m", "prompt": "hi", 1: 2}, "1"),
    ],
)
def test_bad_fields_are_named(body, param):
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(body)
    assert info.value.param == param
    assert info.value.to_json()["error"]["param"] == param
    assert info.value.http_status == 400


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "hi", "max_tokens": 10**5000},
        {"model": "m", "prompt": [10**5000]},
        {"model": "m", "prompt": "\ud800", "stop": "\ud800", "user": "\ud800"},
    ],
)
def test_errors_can_be_sent(body):
    # The error reaches the client as UTF-8 JSON: it must neither quote a lone surrogate nor
    # convert an integer past Python's digit limit to text.
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(body)
    json.dumps(info.value.to_json(), ensure_ascii=False).encode()


def test_a_bad_token_id_is_reported_as_such():
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request({"model": "m", "prompt": [3, -1]})
    assert "greater than or equal to 0" in info.value.message


def test_accepted_values_reach_generation_unchanged():
    request = parse_completion_request(
        {"model": "m", "prompt": "caf\u00e9 \U0001f600", "max_tokens": 2**63 - 1, "stop": "\u00e9"}
    )
    assert request.prompt == "caf\u00e9 \U0001f600"
    assert request.sampling_params().max_tokens == 2**63 - 1
    assert request.stop_sequences() == ("\u00e9",)
    assert parse_completion_request({"model": "m", "prompt": [0, 2**31 - 1]}).prompt == [
        0,
        2**31 - 1,
    ]


def test_body_must_be_an_object():
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(["model"])
    assert info.value.param == "body"


def test_response_has_the_contract_fields():
    outcome = CompletionOutcome(
        text="abc",
        finish_reason="length",
        prompt_tokens=5,
        completion_tokens=3,
        cached_tokens=0,
        model_version="7",
        cache_tier="local",
    )
    response = completion_response("m", outcome)
    assert response["object"] == "text_completion"
    assert response["choices"][0]["text"] == "abc"
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert response["model_version"] == "7"
    assert response["cache"] == {"hit": True, "tier": "local", "key": None}
