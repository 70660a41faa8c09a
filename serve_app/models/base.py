"""The interface between a causal language model and the code that caches its state.

A prefix cache stores the `KVCache` of a prompt's prefix and later hands it back as `past`,
so a model only has to compute the suffix. That works only if a model honours the contract
below: positions continue after `past`, and `past` is never modified in place (a cached entry
may be shared by concurrent requests).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol, TypeAlias, runtime_checkable

import torch

KVCache: TypeAlias = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""One (key, value) pair per layer; each tensor is `(kv_heads, seq_len, head_dim)`.

A single sequence, so there is no batch dimension; `seq_len` is the same in every layer.
"""


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of `module`'s parameters and buffers (shared tensors counted once)."""
    seen: dict[int, int] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        seen[tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)] = (
            tensor.numel() * tensor.element_size()
        )
    return sum(seen.values())


@dataclass(frozen=True)
class TransformerShape:
    """The shape of a built-in transformer (TinyGPT, TinyEncoder): every field a positive int,
    `d_model` a multiple of `n_heads`."""

    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    max_context: int
    mlp_ratio: int

    def __post_init__(self) -> None:
        kind = type(self).__name__
        for name, value in asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{kind}.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"{kind}.d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )


def kv_length(past: KVCache | None) -> int:
    """How many tokens `past` covers (0 for None or an empty cache)."""
    return past[0][0].shape[1] if past else 0


@runtime_checkable
class ModelWeights(Protocol):
    """What every served model tells about itself: its vocabulary and context, and where and
    how large its weights are (what a model pool accounts for)."""

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to `vocab_size - 1` (a causal LM's logits have this length)."""
        ...

    @property
    def max_context(self) -> int:
        """Most tokens of one sequence (for a causal LM: past plus new tokens)."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the weights live and the model computes."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (of a causal LM's `KVCache` tensors too)."""
        ...

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights (parameters and buffers) take on `device`."""
        ...


@runtime_checkable
class CausalLM(ModelWeights, Protocol):
    """A decoder-only language model that computes one sequence incrementally; its logits are
    always float32."""

    @property
    def n_layers(self) -> int:
        """Number of (key, value) pairs in a `KVCache` of this model."""
        ...

    def kv_block_shape(self, block_size: int) -> torch.Size:
        """The shape of `block_size` tokens of a `KVCache` as a prefix cache stores them:
        `(n_layers, 2, kv_heads, block_size, head_dim)` (keys, then values)."""
        ...

    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """Run `tokens` (at least one) after the sequence that `past` covers.

        The new tokens take positions `kv_length(past)` onward. Returns the logits for each new
        position, shape `(len(tokens), vocab_size)`, row `i` predicting the token after
        `tokens[i]`; and a new `KVCache` covering `past` followed by `tokens`. Neither `tokens`
        nor `past` is modified. Raises `ValueError` for an empty `tokens`, an id outside the
        vocabulary, a `past` of the wrong shape, or when `kv_length(past) + len(tokens)` would
        exceed `max_context`.
        """
        ...

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Run one token after `past`: `prefill([token], past)` with logits shape `(vocab_size,)`.

        Same contract as `prefill`: `past` is not modified, the returned cache covers
        `past + [token]`, and `ValueError` is raised when that would exceed `max_context`.
        """
        ...
