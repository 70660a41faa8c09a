"""generate: a cached prefix changes nothing; sampling is reproducible; stop rules hold."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest
import torch

from serve_app.models import (
    EOS_TOKEN_ID,
    ByteTokenizer,
    CausalLM,
    Generation,
    KVCache,
    SamplingParams,
    TinyGPT,
    TinyGPTConfig,
    generate,
    kv_length,
    pick_token,
)
from serve_app.models.generation import GenerationStopped
from tests.support.processes import python_output

TOKENIZER = ByteTokenizer()
SMALL = TinyGPTConfig(n_layers=2, d_model=64, n_heads=4, max_context=128)


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


class ScriptedLM:
    """A `CausalLM` whose completion of a `prompt_len`-token prompt is `script`, then EOS."""

    vocab_size = 257
    n_layers = 1
    device = torch.device("cpu")
    dtype = torch.float32
    weight_bytes = 0

    def kv_block_shape(self, block_size: int) -> torch.Size:
        return torch.Size((self.n_layers, 2, 1, block_size, 1))

    def __init__(self, prompt_len: int, script: Sequence[int], max_context: int = 64) -> None:
        self.prompt_len = prompt_len
        self.script = list(script)
        self.max_context = max_context
        self.prefilled: list[int] = []  # tokens run per call

    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        start, n = kv_length(past), len(tokens)
        if start + n > self.max_context:
            raise ValueError("exceeds max_context")
        self.prefilled.append(n)
        logits = torch.zeros(n, self.vocab_size)
        for row, position in enumerate(range(start, start + n)):
            i = position + 1 - self.prompt_len
            logits[row, self.script[i] if 0 <= i < len(self.script) else EOS_TOKEN_ID] = 1.0
        kv = torch.zeros(1, start + n, 1)
        return logits, ((kv, kv),)

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        logits, cache = self.prefill([token], past)
        return logits[0], cache


def scripted(text: str, params: SamplingParams, max_context: int = 64) -> Generation:
    prompt = TOKENIZER.encode("> ")
    lm = ScriptedLM(len(prompt), TOKENIZER.encode(text), max_context)
    assert isinstance(lm, CausalLM)
    return generate(lm, TOKENIZER, prompt, params)


def test_sampling_params_validation() -> None:
    for bad in (
        {"max_tokens": 0},
        {"max_tokens": 1, "temperature": -0.1},
        {"max_tokens": 1, "temperature": float("nan")},
        {"max_tokens": 1, "top_p": 0.0},
        {"max_tokens": 1, "top_p": 1.5},
        {"max_tokens": 1, "stop": ("",)},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)  # type: ignore[arg-type]


def test_is_deterministic() -> None:
    assert SamplingParams(max_tokens=1).is_deterministic
    assert SamplingParams(max_tokens=1, temperature=0.7, seed=3).is_deterministic
    assert not SamplingParams(max_tokens=1, temperature=0.7).is_deterministic


@pytest.mark.parametrize(
    "params",
    [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0.9, seed=5)],
    ids=["greedy", "seeded"],
)
def test_cached_prefix_gives_the_same_tokens(model: TinyGPT, params: SamplingParams) -> None:
    rng = random.Random(0)
    for _ in range(40):
        prompt = [rng.randrange(256) for _ in range(rng.randint(2, 100))]
        expected = generate(model, TOKENIZER, prompt, params)
        for split in {1, rng.randint(1, len(prompt) - 1), len(prompt) - 1}:
            _, past = model.prefill(prompt[:split])
            got = generate(model, TOKENIZER, prompt, params, past=past)
            assert got == expected, (prompt, split)


def test_only_the_uncached_suffix_is_prefilled() -> None:
    prompt = TOKENIZER.encode("cached prefix + suffix")
    lm = ScriptedLM(len(prompt), TOKENIZER.encode("ok"))
    _, past = lm.prefill(prompt[:14])
    lm.prefilled.clear()
    result = generate(lm, TOKENIZER, prompt, SamplingParams(max_tokens=5), past=past)
    assert result.text == "ok" and result.prompt_tokens == len(prompt)
    assert lm.prefilled == [len(prompt) - 14, 1, 1]
    assert kv_length(past) == 14


def test_past_must_leave_a_prompt_token(model: TinyGPT) -> None:
    prompt = [1, 2, 3]
    _, past = model.prefill(prompt)
    with pytest.raises(ValueError, match="past covers 3 tokens"):
        generate(model, TOKENIZER, prompt, SamplingParams(max_tokens=1), past=past)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, TOKENIZER, [], SamplingParams(max_tokens=1))


def test_prompt_longer_than_context_is_an_error(model: TinyGPT) -> None:
    with pytest.raises(ValueError, match="max_context"):
        generate(model, TOKENIZER, [1] * 129, SamplingParams(max_tokens=1))


def test_greedy_text_is_the_decoded_tokens(model: TinyGPT) -> None:
    result = generate(model, TOKENIZER, TOKENIZER.encode("Hello"), SamplingParams(max_tokens=20))
    assert result.prompt_tokens == 5
    assert result.text == TOKENIZER.decode(result.tokens)
    assert result.finish_reason == "length" or result.tokens != ()


def test_seeded_sampling_is_reproducible(model: TinyGPT) -> None:
    prompt = TOKENIZER.encode("Once upon a time")
    outputs = [
        generate(model, TOKENIZER, prompt, SamplingParams(32, temperature=3.0, seed=s)).tokens
        for s in (1, 1, 2, 3)
    ]
    assert outputs[0] == outputs[1]
    assert len(set(outputs)) == 3


def test_seeded_sampling_is_reproducible_across_processes(model: TinyGPT) -> None:
    code = (
        "from serve_app.models import *\n"
        "m = TinyGPT.from_seed(TinyGPTConfig(n_layers=2, d_model=64, n_heads=4, "
        "max_context=128), seed=0)\n"
        "p = SamplingParams(32, temperature=3.0, seed=1)\n"
        "print(list(generate(m, ByteTokenizer(), ByteTokenizer().encode('abc'), p).tokens))\n"
    )
    here = generate(model, TOKENIZER, TOKENIZER.encode("abc"), SamplingParams(32, 3.0, seed=1))
    assert python_output(code) == str(list(here.tokens))


def test_unseeded_sampling_differs(model: TinyGPT) -> None:
    params = SamplingParams(max_tokens=32, temperature=3.0)
    runs = {generate(model, TOKENIZER, [65, 66], params).tokens for _ in range(3)}
    assert len(runs) > 1


def test_sampling_leaves_the_global_rng_alone(model: TinyGPT) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    generate(model, TOKENIZER, [65], SamplingParams(max_tokens=8, temperature=1.0))
    assert torch.equal(torch.rand(3), expected)


def test_tiny_top_p_is_greedy(model: TinyGPT) -> None:
    prompt = TOKENIZER.encode("nucleus")
    greedy = generate(model, TOKENIZER, prompt, SamplingParams(max_tokens=16))
    narrow = SamplingParams(max_tokens=16, temperature=5.0, top_p=1e-9, seed=0)
    assert generate(model, TOKENIZER, prompt, narrow).tokens == greedy.tokens


def test_pick_token_nucleus() -> None:
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3]))
    generator = torch.Generator().manual_seed(0)

    def draws(top_p: float) -> set[int]:
        params = SamplingParams(max_tokens=1, temperature=1.0, top_p=top_p)
        return {pick_token(logits, params, generator) for _ in range(300)}

    assert draws(0.5) == {1}
    assert draws(0.8) == {1, 2}
    assert draws(1.0) == {0, 1, 2}


def test_greedy_pick_takes_the_lowest_id_on_ties_and_no_randomness() -> None:
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert pick_token(torch.tensor([0.0, 2.0, 2.0]), SamplingParams(max_tokens=1), generator) == 1
    assert torch.equal(generator.get_state(), state)


def test_stops_at_eos() -> None:
    result = scripted("hi", SamplingParams(max_tokens=10))
    assert (result.text, result.tokens, result.finish_reason) == ("hi", (104, 105), "stop")


def test_stops_at_max_tokens() -> None:
    result = scripted("hello world", SamplingParams(max_tokens=3))
    assert (result.text, len(result.tokens), result.finish_reason) == ("hel", 3, "length")


@pytest.mark.parametrize(
    ("stop", "text"),
    [
        ((".",), "hello world"),
        (("wor",), "hello "),
        (("xyz", " w", "ld"), "hello"),
        (("é",), "hello world. caf"),
        (("never",), "hello world. café"),
    ],
)
def test_stop_strings(stop: tuple[str, ...], text: str) -> None:
    result = scripted("hello world. café", SamplingParams(max_tokens=50, stop=stop))
    assert (result.text, result.finish_reason) == (text, "stop")  # the script ends in EOS
    # Tokens keep what spelt the stop string; the text does not.
    assert TOKENIZER.decode(result.tokens).startswith(result.text)


def test_stops_when_the_context_is_full() -> None:
    result = scripted("hello world", SamplingParams(max_tokens=50), max_context=6)
    assert (result.text, result.finish_reason) == ("hell", "length")
    full = scripted("hello", SamplingParams(max_tokens=50), max_context=2)
    assert (full.tokens, full.finish_reason) == ((), "length")


def test_real_model_stops_when_the_context_is_full(model: TinyGPT) -> None:
    prompt = list(range(100, 220))
    result = generate(model, TOKENIZER, prompt, SamplingParams(max_tokens=50))
    assert (len(result.tokens), result.finish_reason) == (SMALL.max_context - 120, "length")


def streamed(script: bytes, params: SamplingParams) -> tuple[list[str], Generation]:
    """Generate the bytes of `script` (a scripted model) and collect the streamed pieces."""
    pieces: list[str] = []
    prompt = TOKENIZER.encode("p")
    lm = ScriptedLM(len(prompt), list(script), max_context=256)
    generation = generate(lm, TOKENIZER, prompt, params, on_text=pieces.append)
    return pieces, generation


@pytest.mark.parametrize(
    ("script", "stop"),
    [
        ("x.é tail".encode(), (".é",)),  # the stop's second character arrives in two bytes
        ("a \u7528\u6237".encode(), (" \u7528",)),  # a space held back, then a stop takes it
        (b"hello world, stop here", ("stop",)),
        ("caf\u00e9 \u00e9t\u00e9".encode(), ()),
    ],
)
def test_streamed_pieces_spell_the_answer_and_are_never_taken_back(script, stop) -> None:
    params = SamplingParams(max_tokens=64, temperature=0.0, stop=stop)
    pieces, generation = streamed(script, params)
    assert "".join(pieces) == generation.text
    assert list(generation.pieces) == [len(p) for p in pieces]


def test_random_streams_spell_their_answers() -> None:
    rng = random.Random(7)
    alphabet = "ab .\n\u00e9\u7528"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 12)))
        stop = tuple(
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 4)))
            for _ in range(rng.randrange(0, 3))
        )
        pieces, generation = streamed(text.encode(), SamplingParams(max_tokens=64, stop=stop))
        assert "".join(pieces) == generation.text, (text, stop)


def test_a_generation_asked_to_stop_raises() -> None:
    prompt = TOKENIZER.encode("p")
    lm = ScriptedLM(len(prompt), list(b"abcdefgh"), max_context=256)
    with pytest.raises(GenerationStopped):
        generate(lm, TOKENIZER, prompt, SamplingParams(max_tokens=8), should_stop=lambda: True)
