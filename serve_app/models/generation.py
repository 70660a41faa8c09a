"""Text generation over any `CausalLM`: prefill the uncached part of a prompt, then decode.

`generate` takes the prompt's cached prefix as `past`; given the same prompt and deterministic
parameters it returns the same tokens with or without that prefix, which is what makes a
prefix cache (and a result cache) safe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from serve_app.models.base import CausalLM, KVCache, kv_length
from serve_app.models.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to choose each completion token and when to stop."""

    max_tokens: int
    """Most completion tokens to produce (>= 1)."""
    temperature: float = 0.0
    """0 picks the most likely token (greedy); higher values flatten the distribution."""
    top_p: float = 1.0
    """Sample only from the smallest set of likeliest tokens whose probability reaches this."""
    seed: int | None = None
    """Seed of the sampler; with one, sampling is reproducible across processes."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings in the text."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {self.stop!r}")

    @property
    def is_deterministic(self) -> bool:
        """Whether the same prompt always yields the same completion (greedy, or seeded)."""
        return self.temperature == 0.0 or self.seed is not None


@dataclass(frozen=True)
class Generation:
    """A completed generation."""

    prompt_tokens: int
    tokens: tuple[int, ...]
    """Every token produced, including those that spelt a stop string; never end-of-sequence."""
    text: str
    """The decoded completion, cut before the first stop string."""
    finish_reason: FinishReason
    """Why it ended: "stop" at end-of-sequence or a stop string; "length" at max_tokens or a
    full context."""


def _sampler(seed: int | None) -> torch.Generator:
    """A private CPU generator: seeded, or from fresh OS randomness when `seed` is None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token given one position's `logits` (shape `(vocab,)`).

    Greedy (temperature 0) takes the argmax, lowest id on ties, and leaves `generator` alone.
    Otherwise it samples from the temperature-scaled distribution restricted to the top-p
    nucleus. Sampling runs on the CPU in float64 so a seed gives the same tokens on any device.
    """
    logits = logits.detach().to(device="cpu", dtype=torch.float64)
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    # Keep a token while the mass before it is below top_p; so the likeliest always stays.
    keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < params.top_p
    choice = torch.multinomial(sorted_probs * keep, num_samples=1, generator=generator)
    return int(order[choice])


def generate(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    params: SamplingParams,
    past: KVCache | None = None,
) -> Generation:
    """Complete `prompt` with `model`.

    `past`, when given, must be the model's `KVCache` of `prompt[:kv_length(past)]`; only the
    rest of the prompt is prefilled, and at least one prompt token must be left to produce the
    first logits (`ValueError` otherwise). `past` is not modified.

    Stops at end-of-sequence or once the text contains a stop string (finish "stop"), or after
    `max_tokens` tokens or when prompt plus completion fill `model.max_context` (finish
    "length"). Raises `ValueError` for an empty prompt or one longer than `max_context`.
    """
    prompt = list(prompt)
    n_past = kv_length(past)
    if not prompt:
        raise ValueError("prompt must hold at least one token")
    if n_past > len(prompt) - 1:
        raise ValueError(
            f"past covers {n_past} tokens; at most {len(prompt) - 1} of this "
            f"{len(prompt)}-token prompt may be cached"
        )
    logits, cache = model.prefill(prompt[n_past:], past)
    next_logits = logits[-1]
    generator = _sampler(params.seed)
    tokens: list[int] = []
    text = ""
    while len(tokens) < params.max_tokens and len(prompt) + len(tokens) < model.max_context:
        if tokens:
            next_logits, cache = model.decode_step(tokens[-1], cache)
        token = pick_token(next_logits, params, generator)
        if token in tokenizer.eos_token_ids:
            return Generation(len(prompt), tuple(tokens), text, "stop")
        tokens.append(token)
        text = tokenizer.decode(tokens)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            return Generation(len(prompt), tuple(tokens), text[:cut], "stop")
    return Generation(len(prompt), tuple(tokens), text, "length")


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found, default=None)
