"""Hugging Face checkpoints served through raycache: for each supported architecture (tiny
random configs built here, written with `save_pretrained`, loaded back through raycache), the
prefix cache's output is identical, token for token, to `transformers`' own greedy
`generate()` without any cache; architectures that cannot be served exactly are refused."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from serve_app.config import ModelSpec
from serve_app.models import SamplingParams, generate
from serve_app.models.hf import HFCausalLM, HFTokenizer, UnsupportedModel
from serve_app.models.loading import load_model, load_tokenizer, model_context
from serve_app.prefix_generation import generate_with_prefix_cache
from serve_app.shared_blocks import decode_chunk, encode_chunk
from tests.support.hf_checkpoints import (
    ARCHITECTURES,
    CONTEXT,
    EOS,
    GQA,
    SMALL,
    VOCAB,
    reference_greedy,
    write_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCOPE = PrefixScope("tenant", "model", "1", generation=1)


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def checkpoint(request, tmp_path_factory) -> tuple[str, object, Path]:
    """(architecture, the reference `transformers` model, its saved directory)."""
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, write_checkpoint(request.param, directory), directory


def test_a_checkpoint_loads_through_its_spec_with_its_own_shape(checkpoint) -> None:
    name, _, directory = checkpoint
    spec = ModelSpec(id=name, kind="hf", path=str(directory))
    model = load_model(spec, device="cpu")
    assert isinstance(model, HFCausalLM)
    assert (model.vocab_size, model.max_context, model.n_layers) == (VOCAB, CONTEXT, 2)
    kv_heads = 4 if name == "gpt2" else 2  # grouped-query attention keeps its fewer KV heads
    assert model.kv_block_shape(16) == torch.Size((2, 2, kv_heads, 16, 16))
    assert model_context(spec) == CONTEXT
    tokenizer = load_tokenizer(spec)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_id == EOS
    text = "Return a random integer N such that a <= N <= b."
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_output_with_the_prefix_cache_is_transformers_own_greedy_output(
    checkpoint, block_size: int
) -> None:
    _, reference, directory = checkpoint
    model = HFCausalLM.load(directory)
    tokenizer = HFTokenizer(directory, EOS)
    cache = PrefixCache(block_size, max_bytes=1 << 28)
    rng = random.Random(block_size)
    shared = [rng.randrange(4, VOCAB) for _ in range(rng.randrange(20, 90))]
    for _ in range(6):
        # Prompts that share a prefix, so later ones start from cached blocks.
        prompt = shared[: rng.randrange(1, len(shared) + 1)]
        prompt += [rng.randrange(4, VOCAB) for _ in range(rng.randrange(1, 30))]
        params = SamplingParams(max_tokens=10)
        expected = reference_greedy(reference, prompt, 10)
        generation, cached = generate_with_prefix_cache(
            model, tokenizer, prompt, params, cache, SCOPE
        )
        assert list(generation.tokens) == expected
        assert cached <= len(prompt) - 1
        assert list(generate(model, tokenizer, prompt, params).tokens) == expected
    assert cache.stats().cached_tokens > 0  # the cache was used, not just filled


def test_bfloat16_blocks_round_trip_bit_exact(checkpoint) -> None:
    _, _, directory = checkpoint
    model = HFCausalLM.load(directory, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    cache = PrefixCache(4, max_bytes=1 << 26)
    tokenizer = HFTokenizer(directory, EOS)
    prompt = list(range(10, 30))
    generate_with_prefix_cache(model, tokenizer, prompt, SamplingParams(max_tokens=1), cache, SCOPE)
    hashes = prompt_block_hashes(prompt, 4, SCOPE)[:4]
    blocks = [cache.block_kv(h)[0] for h in hashes]
    assert all(block.dtype == torch.bfloat16 for block in blocks)
    secret = ClusterSecret(b"hf tests' cluster secret, long enough")
    blob = encode_chunk(blocks, hashes, SCOPE, secret)
    shape = model.kv_block_shape(4)
    decoded = decode_chunk(blob, hashes, SCOPE, shape, torch.bfloat16, secret)
    assert all(
        torch.equal(a.view(torch.int16), b.view(torch.int16))
        for a, b in zip(decoded, blocks, strict=True)
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: GPTNeoXForCausalLM(
            GPTNeoXConfig(
                vocab_size=VOCAB,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
            )
        ),
        lambda: MistralForCausalLM(
            MistralConfig(
                vocab_size=VOCAB, max_position_embeddings=CONTEXT, sliding_window=64, **SMALL, **GQA
            )
        ),
    ],
    ids=["unsupported-architecture", "sliding-window-within-the-context"],
)
def test_what_cannot_be_served_exactly_is_refused_at_load(build, tmp_path) -> None:
    build().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel):
        HFCausalLM.load(tmp_path)


def test_a_spec_of_kind_hf_needs_a_path_and_takes_no_tiny_gpt_shape() -> None:
    with pytest.raises(ValueError, match="path"):
        ModelSpec(id="m", kind="hf")
    with pytest.raises(ValueError, match="n_layers"):
        ModelSpec(id="m", kind="hf", path="/m", n_layers=2)
    with pytest.raises(ValueError, match="kind `hf`"):
        ModelSpec(id="m", path="/m")
