"""Hugging Face checkpoints served through raycache: for each supported architecture (tiny
random configs built here, written with `save_pretrained`, loaded back through raycache), the
prefix cache's output is identical, token for token, to `transformers`' own greedy
`generate()` without any cache; architectures that cannot be served exactly are refused."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from cluster.sharing.tiered_prefix import decode_chunk, encode_chunk
from serve_app.config import ModelSpec
from serve_app.models import SamplingParams, generate
from serve_app.models.hf import HFCausalLM, HFTokenizer, UnsupportedModel, checkpoint_eos
from serve_app.models.loading import load_model, load_tokenizer, model_context
from serve_app.replica.prefix_generation import generate_with_prefix_cache
from tests.support.hf_checkpoints import (
    ARCHITECTURES,
    CONTEXT,
    EOS,
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
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.eos_token_ids == {EOS}
    text = "Return a random integer N such that a <= N <= b."
    assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_output_with_the_prefix_cache_is_transformers_own_greedy_output(
    checkpoint, block_size: int
) -> None:
    _, reference, directory = checkpoint
    model = HFCausalLM.load(directory)
    tokenizer = HFTokenizer(directory, frozenset({EOS}))
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
    tokenizer = HFTokenizer(directory, frozenset({EOS}))
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


def refused(tmp_path: Path, model, edit=None) -> str:
    """Why loading `model`, saved to `tmp_path` (its config.json changed by `edit`), fails."""
    model.save_pretrained(tmp_path)
    if edit is not None:
        config = json.loads((tmp_path / "config.json").read_text())
        edit(config)
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel) as raised:
        HFCausalLM.load(tmp_path)
    return str(raised.value)


def test_an_architecture_not_served_is_refused_even_under_another_name(tmp_path) -> None:
    neox = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        )
    )
    assert "gpt_neox" in refused(tmp_path / "plain", neox)
    # Labelled a Llama: transformers builds by model_type, and so does the check.
    relabel = lambda config: config.update(architectures=["LlamaForCausalLM"])  # noqa: E731
    assert "gpt_neox" in refused(tmp_path / "relabelled", neox, relabel)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            lambda config: config.update(use_sliding_window=True, sliding_window=64),
            "sliding-window",
        ),
        (lambda config: config.update(layer_types=["sliding_attention"] * 2), "layers of types"),
        (
            lambda config: config.update(
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 8,
                    "long_factor": [1.0] * 8,
                    "original_max_position_embeddings": CONTEXT // 2,
                }
            ),
            "rotary scaling",
        ),
    ],
    ids=["sliding-window", "sliding-layers", "longrope"],
)
def test_attention_that_a_prefix_cache_would_change_is_refused(tmp_path, edit, reason) -> None:
    model = ARCHITECTURES["qwen2"]()
    assert reason in refused(tmp_path, model, edit)


def test_a_path_that_is_no_checkpoint_directory_is_refused(tmp_path) -> None:
    for path in ("gpt2", tmp_path / "missing", tmp_path):  # a hub id, nothing, no config.json
        with pytest.raises(UnsupportedModel, match="not a checkpoint directory"):
            HFCausalLM.load(path)


def test_every_end_of_sequence_id_the_checkpoint_declares_ends_a_generation(checkpoint) -> None:
    _, _, directory = checkpoint
    generation_config = directory / "generation_config.json"
    before = generation_config.read_text() if generation_config.is_file() else None
    generation_config.write_text(json.dumps({"eos_token_id": [EOS, 7]}))
    try:
        assert checkpoint_eos(directory) == {EOS, 7}
    finally:
        if before is None:
            generation_config.unlink()
        else:
            generation_config.write_text(before)


def test_a_spec_of_kind_hf_needs_a_path_and_takes_no_tiny_gpt_shape() -> None:
    with pytest.raises(ValueError, match="path"):
        ModelSpec(id="m", kind="hf")
    with pytest.raises(ValueError, match="absolute"):
        ModelSpec(id="m", kind="hf", path="models/m")
    with pytest.raises(ValueError, match="n_layers"):
        ModelSpec(id="m", kind="hf", path="/m", n_layers=2)
    with pytest.raises(ValueError, match="Hugging Face models"):
        ModelSpec(id="m", path="/m")
