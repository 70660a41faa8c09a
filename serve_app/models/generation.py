"""Text generation over any `CausalLM`: prefill the uncached part of a prompt, then decode.

`generate` takes the prompt's cached prefix as `past`; given the same prompt and deterministic
parameters it returns the same tokens with or without that prefix, which is what makes a
prefix cache (and a result cache) safe.

It also hands out the text as it grows (`on_text`), for streaming: in pieces that only ever
extend what was handed out, so that the pieces put together are the answer's text. A piece
leaves out the end of the text that may still change: a character whose bytes are not all
decoded yet, trailing whitespace (a tokenizer's decoding may still join it to what follows),
and a tail that could be the beginning of a stop string. The pieces are a function of the tokens
alone, so an answer served from a cache can be streamed in the same pieces (`Generation.pieces`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from serve_app.models.base import CausalLM, KVCache, kv_length
from serve_app.models.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

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
    pieces: tuple[int, ...] = ()
    """The lengths (in characters) of the pieces `on_text` received, in order; they add up to
    `len(text)`."""


class GenerationStopped(Exception):
    """`generate` was asked to stop (`should_stop`) before it finished."""


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
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Generation:
    """Complete `prompt` with `model`.

    `past`, when given, must be the model's `KVCache` of `prompt[:kv_length(past)]`; only the
    rest of the prompt is prefilled, and at least one prompt token must be left to produce the
    first logits (`ValueError` otherwise). `past` is not modified.

    Stops at end-of-sequence or once the text contains a stop string (finish "stop"), or after
    `max_tokens` tokens or when prompt plus completion fill `model.max_context` (finish
    "length"). Raises `ValueError` for an empty prompt or one longer than `max_context`.

    `on_text(piece)` receives the text as it grows (see the module docstring), the last piece
    before `generate` returns. `should_stop()` is asked before each token; when it is true,
    `GenerationStopped` is raised.
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
    pieces = _Pieces(params.stop, on_text)
    tokens: list[int] = []
    text = ""
    finish: FinishReason = "length"
    while len(tokens) < params.max_tokens and len(prompt) + len(tokens) < model.max_context:
        if should_stop is not None and should_stop():
            raise GenerationStopped(f"stopped after {len(tokens)} tokens")
        if tokens:
            next_logits, cache = model.decode_step(tokens[-1], cache)
        token = pick_token(next_logits, params, generator)
        if token in tokenizer.eos_token_ids:
            finish = "stop"
            break
        tokens.append(token)
        text = tokenizer.decode(tokens)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
            break
        pieces.grow(text)
    pieces.end(text)
    return Generation(len(prompt), tuple(tokens), text, finish, tuple(pieces.lengths))


class _Pieces:
    """Hands out a growing text in pieces that never need taking back (module docstring)."""

    def __init__(self, stop: tuple[str, ...], on_text: Callable[[str], None] | None) -> None:
        self._stop = stop
        self._on_text = on_text
        self._sent = ""
        self.lengths: list[int] = []

    def grow(self, text: str) -> None:
        """`text` is the whole text so far, with no stop string in it."""
        stable = text
        while stable != (shorter := stable.rstrip().rstrip("\ufffd")):
            stable = shorter
        # Past the unstable end: what a stop string could still begin with is held back too.
        end = len(stable) - _stop_overlap(stable, self._stop)
        if end > len(self._sent) and text.startswith(self._sent):
            self._send(text[len(self._sent) : end])

    def end(self, text: str) -> None:
        """`text` is the final text: send what is left of it."""
        if not text.startswith(self._sent):
            logger.warning("a tokenizer rewrote text it had decoded; the stream differs from it")
        elif len(text) > len(self._sent):
            self._send(text[len(self._sent) :])

    def _send(self, piece: str) -> None:
        self._sent += piece
        self.lengths.append(len(piece))
        if self._on_text is not None:
            self._on_text(piece)


def _stop_overlap(text: str, stop: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins some stop string."""
    longest = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found, default=None)
