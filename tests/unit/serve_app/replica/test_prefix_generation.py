"""Generation through the prefix cache gives the same tokens as without it, and reuses blocks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from cluster.block_hashes import BlockHash, PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache, of_model
from serve_app.models import (
    ByteTokenizer,
    Generation,
    KVCache,
    SamplingParams,
    TinyGPT,
    TinyGPTConfig,
    generate,
)
from serve_app.replica.prefix_generation import generate_with_prefix_cache, warm_up_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKENIZER = ByteTokenizer()
SMALL = TinyGPTConfig(n_layers=2, d_model=64, n_heads=4, max_context=256)
SCOPE = PrefixScope(tenant="acme", model_id="tiny-gpt", model_version="1")
GREEDY = SamplingParams(max_tokens=6)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, seed=5)
BIG = 1 << 30


@pytest.fixture(scope="module")
def model() -> TinyGPT:
    return TinyGPT.from_seed(SMALL, seed=0)


class CountingLM:
    """Delegates to a model and records how many tokens each `prefill` call ran."""

    def __init__(self, model: TinyGPT) -> None:
        self.model = model
        self.vocab_size, self.max_context = model.vocab_size, model.max_context
        self.n_layers, self.device = model.n_layers, model.device
        self.prefilled: list[int] = []

    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        self.prefilled.append(len(tokens))
        return self.model.prefill(tokens, past)

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        return self.model.decode_step(token, past)


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts sharing random-length prefixes of a few documents, plus edge cases: prompts
    aligned to every block size (multiples of 32), shorter than a block, and repeats."""
    rng = random.Random(seed)
    documents = [[rng.randrange(256) for _ in range(120)] for _ in range(3)]
    prompts = []
    for _ in range(n):
        prefix = rng.choice(documents)[: rng.randint(0, 120)]
        prompt = prefix + [rng.randrange(256) for _ in range(rng.randint(0, 40))]
        prompts.append(prompt or [rng.randrange(256)])
    prompts += [documents[0][:32], documents[0][:64], documents[1][:96], documents[0][:64]]
    prompts += [[7], documents[2][:2], documents[2][:3], documents[2][:3]]
    prompts.append(prompts[5])
    return prompts


PROMPTS = random_prompts(40)


@pytest.fixture(scope="module")
def uncached(model: TinyGPT) -> dict[SamplingParams, list[Generation]]:
    return {
        params: [generate(model, TOKENIZER, prompt, params) for prompt in PROMPTS]
        for params in (GREEDY, SEEDED)
    }


def leading_run(hashes: Sequence[BlockHash], seen: set[BlockHash]) -> int:
    n = 0
    while n < len(hashes) and hashes[n] in seen:
        n += 1
    return n


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_outputs_are_identical_with_and_without_the_cache(
    model: TinyGPT,
    uncached: dict[SamplingParams, list[Generation]],
    block_size: int,
    params: SamplingParams,
) -> None:
    cache = PrefixCache(block_size=block_size, max_bytes=BIG)
    counting = CountingLM(model)
    seen: set[BlockHash] = set()  # every full prompt block generated so far
    total_cached = 0
    for prompt, expected in zip(PROMPTS, uncached[params], strict=True):
        hashes = prompt_block_hashes(prompt, block_size, SCOPE)
        usable = (len(prompt) - 1) // block_size
        reusable = leading_run(hashes[:usable], seen) * block_size
        counting.prefilled.clear()
        got, cached = generate_with_prefix_cache(counting, TOKENIZER, prompt, params, cache, SCOPE)
        assert got == expected, (block_size, prompt)
        assert cached == reusable
        assert counting.prefilled[0] == len(prompt) - cached  # only the rest was prefilled
        seen.update(hashes)
        cache.check_integrity()
        assert cache.stats().referenced_blocks == 0
        total_cached += cached
    stats = cache.stats()
    assert stats.blocks == len(seen)  # every full prompt block, and nothing else
    assert stats.cached_tokens == total_cached > 0
    assert stats.queried_tokens == sum(map(len, PROMPTS))


def test_a_repeated_prompt_reuses_all_but_the_last_needed_block(model: TinyGPT) -> None:
    cache = PrefixCache(block_size=16, max_bytes=BIG)
    aligned, ragged = list(range(64)), list(range(100, 170))
    for prompt, reused in ((aligned, 48), (ragged, 64)):
        results = [
            generate_with_prefix_cache(model, TOKENIZER, prompt, GREEDY, cache, SCOPE)
            for _ in range(3)
        ]
        assert [cached for _, cached in results] == [0, reused, reused]
        assert len({generation for generation, _ in results}) == 1
    assert cache.stats().blocks == 4 + 4


def test_only_full_prompt_blocks_are_stored(model: TinyGPT) -> None:
    cache = PrefixCache(block_size=4, max_bytes=BIG)
    generate_with_prefix_cache(model, TOKENIZER, [1, 2, 3], SamplingParams(20), cache, SCOPE)
    assert len(cache) == 0
    prompt = list(range(10))
    generate_with_prefix_cache(model, TOKENIZER, prompt, SamplingParams(20), cache, SCOPE)
    assert len(cache) == 2  # the 20 generated tokens' keys and values are not kept
    assert cache.cached_run(prompt_block_hashes(prompt, 4, SCOPE)) == 2


def test_pinned_warm_up_prefix_is_reused_and_survives_pressure(model: TinyGPT) -> None:
    rng = random.Random(1)
    system = TOKENIZER.encode("You are a helpful assistant. Be brief.")  # 38 tokens
    block_bytes = SMALL.n_layers * 2 * SMALL.d_model * 4 * 4  # block_size 4, float32
    cache = PrefixCache(block_size=4, max_bytes=24 * block_bytes)
    assert warm_up_prefix(model, system, cache, SCOPE) == 36
    assert cache.stats().pinned_blocks == 9
    for _ in range(20):  # unrelated prompts churn the 15 unpinned slots
        prompt = [rng.randrange(256) for _ in range(40)]
        generate_with_prefix_cache(model, TOKENIZER, prompt, GREEDY, cache, SCOPE)
        cache.check_integrity()
    assert cache.stats().evictions > 0
    assert cache.cached_run(prompt_block_hashes(system, 4, SCOPE)) == 9
    question = system + TOKENIZER.encode(" What is 2+2?")
    got, cached = generate_with_prefix_cache(model, TOKENIZER, question, GREEDY, cache, SCOPE)
    assert cached >= 36
    assert got == generate(model, TOKENIZER, question, GREEDY)


def test_warm_up_caches_what_fits(model: TinyGPT) -> None:
    block_bytes = SMALL.n_layers * 2 * SMALL.d_model * 4 * 4
    cache = PrefixCache(block_size=4, max_bytes=3 * block_bytes)
    assert warm_up_prefix(model, list(range(30)), cache, SCOPE) == 12
    assert warm_up_prefix(model, [1, 2, 3], cache, SCOPE) == 0
    assert warm_up_prefix(model, list(range(100, 112)), cache, SCOPE, pin=False) == 0
    cache.check_integrity()


def test_other_tenants_models_and_versions_reuse_nothing(model: TinyGPT) -> None:
    cache = PrefixCache(block_size=4, max_bytes=BIG)
    prompt = TOKENIZER.encode("a prompt that several parties send")
    expected = generate(model, TOKENIZER, prompt, GREEDY)

    def cached_for(scope: PrefixScope) -> int:
        got, cached = generate_with_prefix_cache(model, TOKENIZER, prompt, GREEDY, cache, scope)
        assert got == expected
        return cached

    assert cached_for(SCOPE) == 0
    assert cached_for(SCOPE._replace(tenant="globex")) == 0
    assert cached_for(SCOPE._replace(model_id="tiny-gpt-2")) == 0
    assert cached_for(SCOPE._replace(model_version="2")) == 0
    assert cached_for(SCOPE) == 32
    assert cached_for(SCOPE._replace(model_version="2")) == 32
    cache.invalidate(of_model("tiny-gpt", "1"))
    assert cached_for(SCOPE) == 0
    assert cached_for(SCOPE._replace(model_version="2")) == 32


def test_invalidation_during_a_request_leaves_its_answer_and_caches_nothing_stale(
    model: TinyGPT,
) -> None:
    cache = PrefixCache(block_size=4, max_bytes=BIG)
    prompt = list(range(40))
    generate_with_prefix_cache(model, TOKENIZER, prompt[:20], GREEDY, cache, SCOPE)

    class InvalidatingLM(CountingLM):
        def prefill(
            self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
        ) -> tuple[torch.Tensor, KVCache]:
            cache.invalidate(of_model("tiny-gpt", "1"))  # a model update arrives mid-request
            return super().prefill(tokens, past)

    got, cached = generate_with_prefix_cache(
        InvalidatingLM(model), TOKENIZER, prompt, GREEDY, cache, SCOPE
    )
    assert cached == 20 and got == generate(model, TOKENIZER, prompt, GREEDY)
    assert len(cache) == 0  # the rest of the old chain was not attached to a dropped parent
    cache.check_integrity()
    stats = cache.stats()
    assert stats.referenced_blocks == 0 and stats.bytes == 0


def test_references_are_released_when_generation_fails(model: TinyGPT) -> None:
    cache = PrefixCache(block_size=4, max_bytes=BIG)
    generate_with_prefix_cache(model, TOKENIZER, list(range(16)), GREEDY, cache, SCOPE)
    too_long = list(range(16)) + [1] * SMALL.max_context
    with pytest.raises(ValueError, match="max_context"):
        generate_with_prefix_cache(model, TOKENIZER, too_long, GREEDY, cache, SCOPE)
    assert cache.stats().referenced_blocks == 0
    with pytest.raises(ValueError, match="at least one token"):
        generate_with_prefix_cache(model, TOKENIZER, [], GREEDY, cache, SCOPE)
    cache.check_integrity()
