"""The interface between a causal language model and the code that caches its state.

A prefix cache stores the `KVCache` of a prompt's prefix and later hands it back as `past`,
so a model only has to compute the suffix. That works only if a model honours the contract
below: positions continue after `past`, and `past` is never modified in place (a cached entry
may be shared by concurrent requests).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def kv_length(past: KVCache | None) -> int:
    """How many tokens `past` covers (0 for None or an empty cache)."""
    return past[0][0].shape[1] if past else 0


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model that computes one sequence incrementally."""

    @property
    def vocab_size(self) -> int:
        """Length of each logits vector."""
        ...

    @property
    def max_context(self) -> int:
        """Most tokens a sequence may hold: past plus new tokens."""
        ...

    @property
    def n_layers(self) -> int:
        """Number of (key, value) pairs in a `KVCache` of this model."""
        ...

    @property
    def device(self) -> torch.device:
        """Where the weights, logits and returned `KVCache` tensors live."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the `KVCache` tensors (logits are always float32)."""
        ...

    @property
    def weight_bytes(self) -> int:
        """Bytes the weights (parameters and buffers) take on `device`."""
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
