"""Encoders: an input's embedding is a unit vector that depends on that input alone, equal to
an independent computation (`transformers`' own forward pass for a checkpoint); TinyEncoder
weights are reproducible from their seed."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from serve_app.models.encoder import HFEncoder, SentenceEncoder, TinyEncoder, TinyEncoderConfig
from serve_app.models.hf import HFTokenizer, UnsupportedModel
from tests.support.hf_checkpoints import VOCAB
from tests.support.hf_encoders import CONTEXT, write_bert, write_roberta

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = TinyEncoderConfig(n_layers=2, d_model=64, n_heads=4, max_context=128)


def random_tokens(n: int, seed: int, vocab: int = 256) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny() -> TinyEncoder:
    return TinyEncoder.from_seed(SMALL, seed=0)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[object, Path]:
    """(the reference `transformers` BERT, its saved directory)."""
    directory = tmp_path_factory.mktemp("bert")
    return write_bert(directory), directory


def reference_embedding(model, tokens: list[int]) -> list[float]:
    """Mean pooling and normalization written out over `transformers`' own forward pass."""
    with torch.inference_mode():
        hidden = model(torch.tensor([tokens])).last_hidden_state
    return F.normalize(hidden.float().mean(dim=1), dim=-1)[0].tolist()


def block_stack(model: TinyEncoder, ids: torch.Tensor) -> torch.Tensor:
    x = model.tok_emb(ids) + model.pos_emb(torch.arange(len(ids)))
    for block in model.blocks:
        x = block(x)
    return x


def test_the_same_seed_gives_the_same_floats_and_another_seed_others(tiny) -> None:
    tokens = random_tokens(40, seed=1)
    again = TinyEncoder.from_seed(SMALL, seed=0)
    assert again.embed(tokens) == tiny.embed(tokens)
    assert TinyEncoder.from_seed(SMALL, seed=1).embed(tokens) != tiny.embed(tokens)


def test_seeding_leaves_the_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    TinyEncoder.from_seed(SMALL, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_tiny_embedding_is_a_unit_vector_of_its_dimensions(tiny) -> None:
    assert isinstance(tiny, SentenceEncoder)
    assert (tiny.dimensions, tiny.max_context, tiny.vocab_size) == (64, 128, 257)
    assert tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    embedding = tiny.embed(random_tokens(20, seed=2))
    assert len(embedding) == 64 and all(type(x) is float for x in embedding)
    assert math.isclose(math.fsum(x * x for x in embedding), 1.0, rel_tol=1e-5)


def test_tiny_weight_bytes_count_every_parameter(tiny) -> None:
    assert tiny.weight_bytes == 4 * sum(p.numel() for p in tiny.parameters())
    assert TinyEncoder(SMALL, device="meta").weight_bytes == tiny.weight_bytes


def test_attention_is_bidirectional(tiny) -> None:
    """A change to the last token moves the hidden state of the first (no causal mask)."""
    tokens = random_tokens(10, seed=4)
    changed = [*tokens[:-1], (tokens[-1] + 1) % 256]
    with torch.inference_mode():
        first = [tiny.ln_f(block_stack(tiny, torch.tensor(t)))[0] for t in (tokens, changed)]
    assert not torch.equal(*first)


def test_tiny_embedding_equals_a_reference_computation(tiny) -> None:
    tokens = random_tokens(30, seed=5)
    with torch.inference_mode():
        expected = F.normalize(
            tiny.ln_f(block_stack(tiny, torch.tensor(tokens))).mean(dim=0), dim=0
        )
    assert tiny.embed(tokens) == expected.tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_bert_embedding_equals_transformers_own(bert, dtype) -> None:
    reference, directory = bert
    encoder = HFEncoder.load(directory, dtype=dtype)
    assert isinstance(encoder, SentenceEncoder)
    assert (encoder.dimensions, encoder.max_context, encoder.vocab_size) == (64, CONTEXT, VOCAB)
    assert encoder.dtype == getattr(torch, dtype)
    # A copy: casting in place would round the shared reference's weights for later tests.
    reference = copy.deepcopy(reference).to(getattr(torch, dtype))
    for n in (1, 7, CONTEXT):
        tokens = random_tokens(n, seed=n, vocab=VOCAB)
        embedding = encoder.embed(tokens)
        assert embedding == reference_embedding(reference, tokens)
        assert len(embedding) == 64
        assert math.isclose(math.fsum(x * x for x in embedding), 1.0, rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["tiny", "hf"])
def test_an_embedding_does_not_depend_on_other_inputs(kind, tiny, bert) -> None:
    encoder = tiny if kind == "tiny" else HFEncoder.load(bert[1])
    vocab = min(encoder.vocab_size, 256)
    tokens = random_tokens(25, seed=6, vocab=vocab)
    alone = encoder.embed(tokens)
    for seed, n in enumerate((3, 60, 1)):
        other = random_tokens(n, seed=10 + seed, vocab=vocab)
        before = encoder.embed(other)
        assert encoder.embed(tokens) == alone
        assert encoder.embed(other) == before


@pytest.mark.parametrize("kind", ["tiny", "hf"])
def test_empty_too_long_and_unknown_inputs_are_refused(kind, tiny, bert) -> None:
    encoder = tiny if kind == "tiny" else HFEncoder.load(bert[1])
    with pytest.raises(ValueError, match="non-empty"):
        encoder.embed([])
    with pytest.raises(ValueError, match="exceed max_context"):
        encoder.embed([0] * (encoder.max_context + 1))
    with pytest.raises(ValueError, match="must lie in"):
        encoder.embed([encoder.vocab_size])
    with pytest.raises(ValueError, match="must lie in"):
        encoder.embed([-1])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimated_bytes_match_the_loaded_model(bert, dtype) -> None:
    directory = bert[1]
    assert (
        HFEncoder.estimate_bytes(directory, dtype) == HFEncoder.load(directory, dtype).weight_bytes
    )


def test_a_path_that_is_no_checkpoint_directory_is_refused(tmp_path) -> None:
    for path in (tmp_path, tmp_path / "missing", "bert-base-uncased"):
        with pytest.raises(UnsupportedModel, match="not a checkpoint directory"):
            HFEncoder.load(path)
        with pytest.raises(UnsupportedModel, match="not a checkpoint directory"):
            HFEncoder.estimate_bytes(path)


def test_the_checkpoint_tokenizer_feeds_the_encoder(bert) -> None:
    reference, directory = bert
    tokenizer = HFTokenizer(directory, frozenset())
    tokens = tokenizer.encode("Return a random integer N such that a <= N <= b.")
    assert HFEncoder.load(directory).embed(tokens) == reference_embedding(reference, tokens)


def test_roberta_positions_after_padding_shorten_the_context(tmp_path) -> None:
    reference = write_roberta(tmp_path)
    encoder = HFEncoder.load(tmp_path)
    assert encoder.max_context == CONTEXT  # 514 position embeddings, 2 before the first token
    tokens = random_tokens(CONTEXT, seed=7, vocab=VOCAB)
    assert encoder.embed(tokens) == reference_embedding(reference, tokens)
