"""Prompts that share a prefix reuse its cached key/value blocks, with identical outputs."""

from __future__ import annotations

import pytest

from serve_app.config import parse_args
from serve_app.models import ByteTokenizer, SamplingParams, generate
from serve_app.models.loading import load_model
from tests.support.processes import wait_until

pytestmark = pytest.mark.e2e

MODEL = "tiny-gpt"
# Longer than the routing prefix (256 tokens), so both questions meet the same replica.
DOCUMENT = "raycache keeps the key/value blocks of prompt prefixes. " * 8


def completion(prompt: str) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0}


def recompute(running_app, prompt: str) -> str:
    spec = parse_args(running_app.app_args()).model(MODEL)
    tokenizer = ByteTokenizer()
    return generate(
        load_model(spec, device="cpu"),
        tokenizer,
        tokenizer.encode(prompt),
        SamplingParams(max_tokens=8, temperature=0.0),
    ).text


def block_size(running_app) -> int:
    return parse_args(running_app.app_args()).prefix_cache.block_size


def test_shared_prefix_is_prefilled_once_and_outputs_match(running_app):
    first_prompt = DOCUMENT + "Question: what is kept?"
    second_prompt = DOCUMENT + "Question: where does it live?"
    with running_app.http() as http:
        first = http.post("/v1/completions", json=completion(first_prompt)).json()
        second = http.post("/v1/completions", json=completion(second_prompt)).json()
    shared_blocks = len(DOCUMENT.encode()) // block_size(running_app)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= shared_blocks * block_size(running_app) - block_size(running_app)
    assert cached <= len(DOCUMENT.encode())
    assert second["cache"]["hit"] is False  # a new answer, computed on a cached prefix
    assert second["choices"][0]["text"] == recompute(running_app, second_prompt)
    assert first["choices"][0]["text"] == recompute(running_app, first_prompt)


def test_pinned_system_prompt_is_cached_from_start_up(running_app):
    pinned = parse_args(running_app.app_args()).prefix_cache.pinned
    assert pinned, "configs/cluster.yaml declares a pinned system prompt"
    prompt = pinned[0].text + "User: hello there, first time asking."
    with running_app.http() as http:
        response = http.post("/v1/completions", json=completion(prompt)).json()
    size = block_size(running_app)
    expected = (len(pinned[0].text.encode()) // size) * size
    assert response["usage"]["prompt_tokens_details"]["cached_tokens"] == expected
    assert response["choices"][0]["text"] == recompute(running_app, prompt)


def test_prefix_stats_count_queried_and_cached_tokens(running_app):
    with running_app.http() as http:
        before = http.get("/v1/cache/stats").json()["total"]["prefix"]
        for suffix in ("one", "two"):
            http.post("/v1/completions", json=completion(DOCUMENT + f"Stats {suffix}"))

        def counted() -> bool:
            now = http.get("/v1/cache/stats").json()["total"]["prefix"]
            queried = now["queried_tokens"] - before["queried_tokens"]
            return queried >= 2 * len(DOCUMENT.encode())

        wait_until(counted, 10, "prefix stats to count both prompts")
        after = http.get("/v1/cache/stats").json()["total"]["prefix"]
    assert after["cached_tokens"] - before["cached_tokens"] >= len(DOCUMENT.encode()) // 2
    assert after["cached_tokens"] <= after["queried_tokens"]
