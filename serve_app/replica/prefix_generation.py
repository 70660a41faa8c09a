"""Generation that reuses the cached keys and values of a prompt's prefix.

    cache = PrefixCache(block_size=16, max_bytes=...)            # one per replica
    scope = PrefixScope(tenant, model_id, model_version, generation)  # the chain's `extra`
    generation, cached_tokens = generate_with_prefix_cache(
        model, tokenizer, prompt_tokens, params, cache, scope)

The prompt's full blocks are hashed (`cluster.block_hashes`), the longest cached run of them
becomes `past`, and `generate` prefills only the rest. The prompt's full blocks that were not
cached are then stored, so the next prompt sharing the prefix starts further on.

Only prompt blocks are stored, never blocks of generated tokens. Their keys and values come
from one-token decode steps, whose rounding differs from the prefill that a later prompt
containing them would run, so only prompt blocks keep "a block is what this prompt's own
prefill computes, up to chunking" (chunking is what `generate`'s tests show changes no token).
It also bounds what one request writes (its prompt), and lets the blocks be stored right after
the prefill, before decoding, instead of holding the prompt's cache until the answer is done.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from cluster.block_hashes import BlockHash, HashFn, blake2b_256, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache, PrefixMatch, kv_blocks
from serve_app.models import CausalLM, Generation, KVCache, SamplingParams, Tokenizer, generate

__all__ = [
    "cache_prompt_prefix",
    "generate_with_prefix_cache",
    "lookup_prompt_prefix",
    "warm_up_prefix",
]


def lookup_prompt_prefix(
    cache: PrefixCache,
    prompt_tokens: Sequence[int],
    extra: object | None,
    hash_fn: HashFn = blake2b_256,
    hashes: Sequence[BlockHash] | None = None,
) -> tuple[list[BlockHash], PrefixMatch]:
    """The hashes of every full block of the prompt (`hashes` when the caller computed them
    already, with `extra` and `hash_fn`), and its longest usable cached prefix.

    At least one prompt token must be prefilled to get the logits of the first completion
    token, so at most `(len(prompt_tokens) - 1) // block_size` blocks are looked up: a
    block-aligned prompt whose blocks are all cached reuses all but its last. The match holds
    references; release it.
    """
    chain = (
        prompt_block_hashes(prompt_tokens, cache.block_size, extra, hash_fn)
        if hashes is None
        else list(hashes)
    )
    usable = max(len(prompt_tokens) - 1, 0) // cache.block_size
    match = cache.longest_prefix(chain[:usable], prompt_tokens=len(prompt_tokens))
    return chain, match


def generate_with_prefix_cache(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    cache: PrefixCache,
    extra: object | None,
    hash_fn: HashFn = blake2b_256,
    hashes: Sequence[BlockHash] | None = None,
    on_text: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[Generation, int]:
    """`generate(model, tokenizer, prompt_tokens, params, on_text=..., should_stop=...)`,
    reusing and filling `cache`.

    `extra` is the chain's scope, normally a `PrefixScope` (tenant, model, version, generation):
    prompts share blocks only under equal `extra`. `hashes`: the prompt's block hashes, when
    the caller computed them already (with `extra` and `hash_fn`). Returns the generation (the
    same as without a cache) and how many prompt tokens came from the cache. Raises what
    `generate` raises; the lookup's references are released in every case.
    """
    prompt = list(prompt_tokens)
    hashes, match = lookup_prompt_prefix(cache, prompt, extra, hash_fn, hashes)
    with match:
        store = _PromptBlockStore(cache, hashes, match, extra)
        past = match.kv_cache(model.device)
        generation = generate(
            _OnPromptPrefill(model, store),
            tokenizer,
            prompt,
            params,
            past,
            on_text=on_text,
            should_stop=should_stop,
        )
        return generation, match.num_tokens


def cache_prompt_prefix(
    model: CausalLM,
    tokens: Sequence[int],
    cache: PrefixCache,
    extra: object | None,
    hashes: Sequence[BlockHash],
) -> int:
    """Cache the full blocks of `tokens` (their `hashes`, under `extra`), prefilling only what
    follows their longest cached run, as a prompt of these tokens would. Returns how many
    tokens were cached now (0 when every full block already was, or none fits in the cache).

    For a chat turn: its prompt's blocks are cached, and this adds the answer's, as the next
    turn sends them. Like prompt blocks, they come from a prefill, never from decode steps.
    """
    size = cache.block_size
    match = cache.longest_prefix(list(hashes), counted=False)
    with match:
        start = match.num_blocks
        if start == len(hashes):
            return 0
        end = len(hashes) * size
        _, kv = model.prefill(list(tokens[start * size : end]), match.kv_cache(model.device))
        blocks = kv_blocks(kv, start * size, end, size)
        parent = hashes[start - 1] if start else None
        return cache.insert(list(hashes[start:]), blocks, parent=parent, extra=extra) * size


def warm_up_prefix(
    model: CausalLM,
    prompt_tokens: Sequence[int],
    cache: PrefixCache,
    extra: object | None,
    pin: bool = True,
    hash_fn: HashFn = blake2b_256,
) -> int:
    """Prefill a declared prefix (e.g. a system prompt) and cache its full blocks.

    With `pin` they are never evicted (until invalidated: after a model update, warm up again
    under the new version's `extra`). Returns the tokens now cached; fewer than the prefix's
    full blocks hold when `max_bytes` has no room for them, 0 for a prefix shorter than a
    block. The trailing partial block is not cached.
    """
    hashes = prompt_block_hashes(prompt_tokens, cache.block_size, extra, hash_fn)
    if not hashes:
        return 0
    end = len(hashes) * cache.block_size
    _, past = model.prefill(list(prompt_tokens[:end]))
    blocks = kv_blocks(past, 0, end, cache.block_size)
    cached = cache.insert(hashes, blocks, parent=None, extra=extra, pin=pin)
    return cached * cache.block_size


class _PromptBlockStore:
    """Stores the prompt's full blocks that the match did not cover, from the prompt's cache."""

    def __init__(
        self,
        cache: PrefixCache,
        hashes: list[BlockHash],
        match: PrefixMatch,
        extra: object | None,
    ) -> None:
        self._cache = cache
        self._hashes = hashes
        self._first = match.num_blocks
        self._extra = extra

    def __call__(self, prompt_kv: KVCache) -> None:
        # Blocks another request stored meanwhile need no copy: skip the cached run.
        start = self._first + self._cache.cached_run(self._hashes[self._first :])
        if start == len(self._hashes):
            return
        size = self._cache.block_size
        blocks = kv_blocks(prompt_kv, start * size, len(self._hashes) * size, size)
        self._cache.insert(
            self._hashes[start:],
            blocks,
            parent=self._hashes[start - 1] if start else None,
            extra=self._extra,
        )


class _OnPromptPrefill:
    """A `CausalLM` that hands the cache of its first `prefill` (the prompt's) to `callback`."""

    def __init__(self, model: CausalLM, callback: Callable[[KVCache], None]) -> None:
        self._model = model
        self._callback: Callable[[KVCache], None] | None = callback

    @property
    def vocab_size(self) -> int:
        return self._model.vocab_size

    @property
    def max_context(self) -> int:
        return self._model.max_context

    @property
    def n_layers(self) -> int:
        return self._model.n_layers

    @property
    def device(self) -> torch.device:
        return self._model.device

    @property
    def dtype(self) -> torch.dtype:
        return self._model.dtype

    @property
    def weight_bytes(self) -> int:
        return self._model.weight_bytes

    def kv_block_shape(self, block_size: int) -> torch.Size:
        return self._model.kv_block_shape(block_size)

    def prefill(
        self, tokens: Sequence[int] | torch.Tensor, past: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        logits, kv = self._model.prefill(tokens, past)
        callback, self._callback = self._callback, None
        if callback is not None:
            callback(kv)
        return logits, kv

    def decode_step(self, token: int, past: KVCache) -> tuple[torch.Tensor, KVCache]:
        return self._model.decode_step(token, past)
