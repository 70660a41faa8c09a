"""`ReplicaCore.stream` and chat turns without Ray: real TinyGPT weights and caches.

A stream carries the same text as the answer, in the pieces it was generated in, computed or
cached; a stream whose consumer leaves stops its generation and stores nothing, unless an
identical request still waits; a chat turn leaves its answer's blocks for the next turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace

import pytest

from cluster.sharing.directory import ReplicaId
from cluster.versions.invalidation import InvalidationRule
from serve_app.api.completions import CompletionJob
from serve_app.config import parse_args
from serve_app.models import SamplingParams
from serve_app.models.chat_template import ChatFormat, ChatMessage, render_builtin
from serve_app.models.loading import (
    load_chat_format,
    load_model,
    load_tokenizer,
    weight_bytes_estimate,
)
from serve_app.replica.core import ReplicaCore
from serve_app.replica.serving import config_version, weights_spec
from serve_app.replica.streaming import StreamEnd, TextPiece
from tests.support.hf_checkpoints import reference_greedy, write_checkpoint
from tests.unit.serve_app.replica.test_core import (
    SECRET,
    TOKENIZER,
    app_args,
    job,
    make_core,
)

LONG = SamplingParams(max_tokens=200, temperature=0.0)


async def collect(core: ReplicaCore, request) -> tuple[list[str], StreamEnd]:
    pieces, end = [], None
    async for event in core.stream(request):
        if isinstance(event, TextPiece):
            pieces.append(event.text)
        else:
            end = event
    assert isinstance(end, StreamEnd)
    return pieces, end


@pytest.mark.asyncio
async def test_a_stream_carries_the_answer_in_the_same_pieces_computed_and_cached() -> None:
    core = await make_core(app_args())
    request = job("Streams and answers agree")
    pieces, end = await collect(core, request)
    assert end.outcome.cache_tier is None
    assert "".join(pieces) == end.outcome.text == (await core.complete(request)).text
    assert len(pieces) > 1  # streamed as it grew, not in one piece at the end
    cached_pieces, cached_end = await collect(core, request)
    assert cached_end.outcome.cache_tier == "local"
    assert cached_pieces == pieces
    sampled = job("Sampled", params=SamplingParams(max_tokens=16, temperature=0.8, seed=None))
    sampled_pieces, sampled_end = await collect(core, sampled)
    assert "".join(sampled_pieces) == sampled_end.outcome.text
    await core.close()


@pytest.mark.asyncio
async def test_a_stream_left_early_stops_its_generation_and_stores_nothing() -> None:
    core = await make_core(app_args())
    request = job("A stream whose reader leaves", params=LONG)
    stream = core.stream(request)
    first = await anext(stream)
    assert isinstance(first, TextPiece)
    await stream.aclose()
    for _ in range(100):
        if core.generations_stopped:
            break
        await asyncio.sleep(0.01)
    assert core.generations_stopped == 1
    await asyncio.sleep(0.05)
    assert core.cache.stats().entries == 0
    assert (await core.complete(request)).cache_tier is None  # computed afresh, then stored
    assert (await core.complete(request)).cache_tier == "local"
    await core.close()


@pytest.mark.asyncio
async def test_an_identical_request_keeps_the_generation_going_when_a_stream_leaves() -> None:
    core = await make_core(app_args())
    request = job("Two readers of one answer", params=LONG)
    stream = core.stream(request)
    await anext(stream)
    waiting = asyncio.ensure_future(core.complete(request))
    await asyncio.sleep(0)
    await stream.aclose()
    outcome = await waiting
    assert core.generations_stopped == 0
    assert outcome.completion_tokens > 0
    assert (await core.complete(request)).cache_tier == "local"
    await core.close()


@pytest.mark.asyncio
async def test_a_stream_joining_a_computation_in_flight_gets_all_of_its_text() -> None:
    core = await make_core(app_args())
    request = job("Joined late", params=LONG)
    computing = asyncio.ensure_future(core.complete(request))
    await asyncio.sleep(0.05)
    pieces, end = await collect(core, request)
    assert "".join(pieces) == end.outcome.text == (await computing).text
    assert core.tiered.stats.single_flight_waits == 1
    await core.close()


@pytest.mark.asyncio
async def test_a_chat_turn_caches_its_answer_for_the_next_turn() -> None:
    core = await make_core(app_args())
    chat = ChatFormat(render_builtin, TOKENIZER.encode)
    conversation = [ChatMessage("system", "You answer briefly."), ChatMessage("user", "Hello?")]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    first_turn = replace(
        job(""), prompt_tokens=tuple(chat.prompt_tokens(conversation)), params=params
    )
    first_turn = replace(first_turn, answer_end=chat.answer_end)
    answer = await core.complete(first_turn)
    await asyncio.sleep(0.2)  # the answer's blocks are cached in the background
    conversation += [ChatMessage("assistant", answer.text), ChatMessage("user", "And then?")]
    tokens = chat.prompt_tokens(conversation)
    assert tokens[: len(first_turn.prompt_tokens)] == list(first_turn.prompt_tokens)
    second_turn = replace(first_turn, prompt_tokens=tuple(tokens))
    second = await core.complete(second_turn)
    earlier = len(first_turn.prompt_tokens) + len(TOKENIZER.encode(answer.text + "\n"))
    assert second.cached_tokens == earlier // 4 * 4  # every full block of the earlier turn
    await core.close()


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.asyncio
async def test_a_hugging_face_chat_turn_reuses_the_last_turn_and_matches_transformers(
    tmp_path,
) -> None:
    reference = write_checkpoint("llama", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    args = parse_args(
        {
            "namespace": "unit",
            "models": [{"id": "llama", "kind": "hf", "path": str(tmp_path)}],
            "prefix_cache": {"block_size": 4},
        }
    )
    (spec,) = args.models
    tokenizer = load_tokenizer(spec)
    chat = load_chat_format(spec, tokenizer)
    assert chat is not None and chat.answer_end == "<|im_end|>\n"
    core = ReplicaCore(
        args,
        SECRET,
        ReplicaId("r1"),
        {"llama": tokenizer},
        {"llama": config_version(spec)},
        load_weights=lambda record: load_model(weights_spec(spec, record)),
        estimate_bytes=lambda model: weight_bytes_estimate(spec),
    )
    await core.start()
    conversation = [ChatMessage("user", "What does the cache keep?")]
    params = SamplingParams(max_tokens=12, temperature=0.0)
    earlier = 0
    for turn in range(2):
        tokens = chat.prompt_tokens(conversation)
        request = CompletionJob(
            "llama", "default", tuple(tokens), params, answer_end=chat.answer_end
        )
        answer = await core.complete(request)
        expected = reference_greedy(reference, tokens, params.max_tokens)
        assert answer.completion_tokens == len(expected)
        assert answer.text == tokenizer.decode(expected)
        if turn:
            assert answer.cached_tokens >= earlier // 4 * 4 - 4
        earlier = len(tokens) + len(
            tokenizer.encode(answer.text + chat.answer_end, add_special_tokens=False)
        )
        await asyncio.sleep(0.3)  # the answer's blocks are cached in the background
        conversation += [ChatMessage("assistant", answer.text), ChatMessage("user", "More?")]
    await core.close()


@pytest.mark.asyncio
async def test_a_stream_after_an_invalidation_follows_only_its_own_computation() -> None:
    core = await make_core(app_args())
    request = job("Invalidated while it is computed", params=LONG)
    first = asyncio.ensure_future(core.complete(request))
    await asyncio.sleep(0.05)
    # The computation in flight leaves the flight: its answer is stored nowhere.
    core.apply_rules([InvalidationRule(seq=1, issued_at=time.time(), model="tiny")])
    pieces, end = await collect(core, request)
    assert "".join(pieces) == end.outcome.text == (await first).text
    assert core._feeds == {}
    await core.close()
