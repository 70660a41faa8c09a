"""TinyGPT: incremental computation matches a full forward pass; weights are reproducible."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from serve_app.models import CHECKPOINT_FORMAT, CausalLM, TinyGPT, TinyGPTConfig, kv_length

SMALL = TinyGPTConfig(n_layers=2, d_model=64, n_heads=4, max_context=128)
# Chunked and full prefill round differently; observed differences are ~1e-5 on logits of
# standard deviation ~8.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """Run single-threaded: these ops are tiny, and on a busy 2-core machine torch's spinning
    worker threads made the same test 20 to 80 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model() -> TinyGPT:
    return TinyGPT.from_seed(SMALL, seed=0)


def random_tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def test_implements_causal_lm(model: TinyGPT) -> None:
    assert isinstance(model, CausalLM)
    assert (model.vocab_size, model.max_context, model.n_layers) == (257, 128, 2)
    assert model.device == torch.device("cpu")
    assert not model.training


def test_prefill_shapes(model: TinyGPT) -> None:
    logits, past = model.prefill(random_tokens(10, 0))
    assert logits.shape == (10, 257) and logits.dtype == torch.float32
    assert len(past) == SMALL.n_layers and kv_length(past) == 10
    for key, value in past:
        assert key.shape == value.shape == (4, 10, 16)


@pytest.mark.parametrize("splits", [[1], [5], [19], [3, 4, 11], [1, 2, 3, 4, 5]])
def test_chunked_prefill_matches_full(model: TinyGPT, splits: list[int]) -> None:
    tokens = random_tokens(20, 1)
    full, full_past = model.prefill(tokens)
    chunks, past, start = [], None, 0
    for end in [*splits, len(tokens)]:
        logits, past = model.prefill(tokens[start:end], past)
        chunks.append(logits)
        start = end
    torch.testing.assert_close(torch.cat(chunks), full, **TOLERANCE)
    assert past is not None
    for (k, v), (full_k, full_v) in zip(past, full_past, strict=True):
        torch.testing.assert_close(k, full_k, **TOLERANCE)
        torch.testing.assert_close(v, full_v, **TOLERANCE)


def test_decode_steps_match_full(model: TinyGPT) -> None:
    tokens = random_tokens(16, 2)
    full, _ = model.prefill(tokens)
    logits, past = model.prefill(tokens[:4])
    torch.testing.assert_close(logits, full[:4], **TOLERANCE)
    for i in range(4, len(tokens)):
        step, past = model.decode_step(tokens[i], past)
        assert step.shape == (257,)
        torch.testing.assert_close(step, full[i], **TOLERANCE)
    assert kv_length(past) == len(tokens)


def test_past_is_not_modified(model: TinyGPT) -> None:
    _, past = model.prefill(random_tokens(8, 3))
    snapshot = [(k.clone(), v.clone()) for k, v in past]
    model.prefill(random_tokens(5, 4), past)
    model.decode_step(7, past)
    for (k, v), (k0, v0) in zip(past, snapshot, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert k.shape[1] == 8


def test_positions_matter(model: TinyGPT) -> None:
    """The same token after different past lengths sees different positions."""
    _, short = model.prefill([65])
    _, long = model.prefill([65, 65])
    assert not torch.allclose(model.decode_step(66, short)[0], model.decode_step(66, long)[0])


def test_accepts_a_tensor(model: TinyGPT) -> None:
    tokens = random_tokens(6, 5)
    as_list, _ = model.prefill(tokens)
    as_tensor, _ = model.prefill(torch.tensor(tokens))
    assert torch.equal(as_list, as_tensor)


def test_exceeding_max_context_is_an_error(model: TinyGPT) -> None:
    model.prefill(random_tokens(128, 6))
    with pytest.raises(ValueError, match="max_context"):
        model.prefill(random_tokens(129, 6))
    _, past = model.prefill(random_tokens(100, 6))
    with pytest.raises(ValueError, match="max_context"):
        model.prefill(random_tokens(29, 7), past)
    _, full = model.prefill(random_tokens(28, 7), past)
    with pytest.raises(ValueError, match="max_context"):
        model.decode_step(1, full)


@pytest.mark.parametrize("tokens", [[], [257], [-1], [[1, 2]]])
def test_bad_tokens_are_an_error(model: TinyGPT, tokens: list[int]) -> None:
    with pytest.raises(ValueError):
        model.prefill(tokens)


def test_past_of_another_shape_is_an_error(model: TinyGPT) -> None:
    _, past = model.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="past"):
        model.prefill([4], past[:1])
    other = TinyGPT.from_seed(TinyGPTConfig(n_layers=2, d_model=32, n_heads=4), seed=0)
    _, other_past = other.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="past"):
        model.prefill([4], other_past)


def test_same_seed_same_weights_different_seed_different() -> None:
    a, b, c = (TinyGPT.from_seed(SMALL, seed=s) for s in (7, 7, 8))
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name])
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    tokens = random_tokens(12, 8)
    assert torch.equal(a.prefill(tokens)[0], b.prefill(tokens)[0])
    assert not torch.allclose(a.prefill(tokens)[0], c.prefill(tokens)[0])


def test_from_seed_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    TinyGPT.from_seed(SMALL, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_greedy_margins_are_wide(model: TinyGPT) -> None:
    """Near-ties would let float rounding flip greedy tokens between chunked and full prefill."""
    logits, _ = model.prefill(random_tokens(128, 9))
    top2 = logits.topk(2, dim=-1).values
    gaps = top2[:, 0] - top2[:, 1]
    assert gaps.median() > 0.5
    assert (gaps < 1e-3).float().mean() < 0.02


def test_checkpoint_round_trip(model: TinyGPT, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    model.save_checkpoint(path)
    loaded = TinyGPT.load_checkpoint(path)
    assert loaded.config == model.config
    tokens = random_tokens(20, 10)
    assert torch.equal(loaded.prefill(tokens)[0], model.prefill(tokens)[0])


def rewrite(
    source: Path,
    target: Path,
    edit_tensors: Callable[[dict[str, torch.Tensor]], object] | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """A copy of checkpoint `source` with its tensors and/or metadata changed."""
    tensors = load_file(source)
    if edit_tensors is not None:
        edit_tensors(tensors)
    if metadata is None:
        with open(source, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        metadata = header["__metadata__"]
    save_file(tensors, target, metadata=metadata)
    return target


def test_mismatched_checkpoint_is_an_error(model: TinyGPT, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    model.save_checkpoint(good)
    bad_config = {"format": CHECKPOINT_FORMAT, "config": json.dumps({"n_layers": 3})}
    cases = {
        "missing": rewrite(good, tmp_path / "a", lambda t: t.pop("lm_head.weight")),
        "shape": rewrite(good, tmp_path / "b", lambda t: t.update({"ln_f.bias": torch.zeros(3)})),
        "extra": rewrite(good, tmp_path / "c", lambda t: t.update({"extra": torch.zeros(1)})),
        "config": rewrite(good, tmp_path / "d", metadata=bad_config),
    }
    for case, path in cases.items():
        with pytest.raises(ValueError, match="do not match") as caught:
            TinyGPT.load_checkpoint(path)
        assert str(path) in str(caught.value), case


def test_checkpoint_nan_is_an_error(model: TinyGPT, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    model.save_checkpoint(good)
    path = rewrite(good, tmp_path / "nan", lambda t: t["ln_f.weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match="non-finite"):
        TinyGPT.load_checkpoint(path)


@pytest.mark.parametrize(
    "metadata",
    [
        {"format": "something.else", "config": "{}"},
        {"format": CHECKPOINT_FORMAT},
        {"format": CHECKPOINT_FORMAT, "config": "not json"},
        {"format": CHECKPOINT_FORMAT, "config": json.dumps({"d_model": 30, "n_heads": 4})},
        {"format": CHECKPOINT_FORMAT, "config": json.dumps({"unknown": 1})},
    ],
)
def test_checkpoint_with_bad_metadata_is_an_error(
    model: TinyGPT, tmp_path: Path, metadata: dict[str, str]
) -> None:
    good = tmp_path / "good.safetensors"
    model.save_checkpoint(good)
    with pytest.raises(ValueError, match=r"format|config"):
        TinyGPT.load_checkpoint(rewrite(good, tmp_path / "bad", metadata=metadata))


def test_corrupt_checkpoint_is_an_error(model: TinyGPT, tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    model.save_checkpoint(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x80\x04this is a pickle, honest")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            TinyGPT.load_checkpoint(path)


@pytest.mark.parametrize(
    "fields",
    [{"d_model": 30, "n_heads": 4}, {"n_layers": 0}, {"max_context": -1}, {"d_model": 1.5}],
)
def test_config_rejects_bad_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TinyGPTConfig(**fields)  # type: ignore[arg-type]


def test_default_config_prefills_a_long_prompt() -> None:
    config = TinyGPTConfig()
    assert config.max_context >= 4096
    model = TinyGPT.from_seed(config, seed=0)
    tokens = random_tokens(512, 11)
    full, _ = model.prefill(tokens)
    assert full.shape == (512, 257)
    prefix, past = model.prefill(tokens[:300])
    suffix, _ = model.prefill(tokens[300:], past)
    torch.testing.assert_close(torch.cat([prefix, suffix]), full, **TOLERANCE)
    assert torch.equal(torch.cat([prefix, suffix]).argmax(-1), full.argmax(-1))
