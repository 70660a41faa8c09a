"""Parsing of completion bodies and the response object."""

import pytest

from serve_app.completions import (
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
        ({"model": "m", "prompt": "hi", "stream": True}, "stream"),
        ({"model": "m", "prompt": "hi", "logprobs": 3}, "logprobs"),
    ],
)
def test_bad_fields_are_named(body, param):
    with pytest.raises(InvalidRequest) as info:
        parse_completion_request(body)
    assert info.value.param == param
    assert info.value.to_json()["error"]["param"] == param
    assert info.value.http_status == 400


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
