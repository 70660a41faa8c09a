"""The prefix block cache: longest prefix, references, leaf-first LRU, budget, pins, invalidation.

`check_integrity()` runs after every operation that changes the cache.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Sequence

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cluster.block_hashes import BlockHash, PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import (
    PrefixCache,
    PrefixMatch,
    assemble_kv,
    kv_blocks,
    of_model,
    of_tenant,
)

BS = 2
SCOPE = PrefixScope("acme", "tiny-gpt", "1")
OTHER = PrefixScope("globex", "tiny-gpt", "1")


def block_of(tokens: Sequence[int]) -> torch.Tensor:
    """A fake block, `(layers=1, 2, heads=1, BS, head_dim=1)`, whose values are its tokens."""
    values = torch.tensor(list(tokens), dtype=torch.float32)
    return torch.stack((values, -values)).view(1, 2, 1, len(tokens), 1)


BLOCK_BYTES = block_of([0] * BS).numel() * 4


def chain(
    tokens: Sequence[int], scope: object = SCOPE
) -> tuple[list[BlockHash], list[torch.Tensor]]:
    hashes = prompt_block_hashes(tokens, BS, scope)
    blocks = [block_of(tokens[i * BS : (i + 1) * BS]) for i in range(len(hashes))]
    return hashes, blocks


def put(cache: PrefixCache, tokens: Sequence[int], scope: object = SCOPE, pin: bool = False) -> int:
    """Cache the full blocks of `tokens` as generation does (after the cached run) or, to pin
    them, as warm-up does (the whole chain); returns how many are cached."""
    hashes, blocks = chain(tokens, scope)
    if pin:
        stored = cache.insert(hashes, blocks, parent=None, extra=scope, pin=True)
        cache.check_integrity()
        return stored
    with cache.longest_prefix(hashes) as match:
        n = match.num_blocks
        parent = hashes[n - 1] if n else None  # the last matched block
        stored = cache.insert(hashes[n:], blocks[n:], parent=parent, extra=scope)
    cache.check_integrity()
    return n + stored


def cached_blocks(cache: PrefixCache, tokens: Sequence[int], scope: object = SCOPE) -> int:
    return cache.cached_run(prompt_block_hashes(tokens, BS, scope))


def test_longest_prefix_finds_the_leading_cached_run_and_references_it() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=100 * BLOCK_BYTES)
    assert put(cache, [1, 2, 3, 4, 5, 6]) == 3
    hashes, _ = chain([1, 2, 3, 4, 9, 9, 5, 6])
    with cache.longest_prefix(hashes) as match:
        cache.check_integrity()
        assert match.hashes == tuple(hashes[:2]) and match.num_tokens == 4
        assert [b.flatten().tolist()[:BS] for b in match.blocks] == [[1, 2], [3, 4]]
        assert cache.stats().referenced_blocks == 2
    assert cache.stats().referenced_blocks == 0
    match.release()  # a second release changes nothing
    cache.check_integrity()
    assert cache.stats().referenced_blocks == 0
    with pytest.raises(RuntimeError, match="released"):
        match.kv_cache()


def test_references_stack_per_lookup() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=100 * BLOCK_BYTES)
    put(cache, [1, 2])
    hashes, _ = chain([1, 2])
    first, second = cache.longest_prefix(hashes), cache.longest_prefix(hashes)
    first.release()
    assert cache.stats().referenced_blocks == 1
    second.release()
    assert cache.stats().referenced_blocks == 0
    cache.check_integrity()


def test_stats_count_blocks_and_tokens() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=100 * BLOCK_BYTES)
    put(cache, [1, 2, 3, 4])  # one lookup of 2 blocks: both missing
    hashes, _ = chain([1, 2, 3, 4, 5, 6])
    cache.longest_prefix(hashes, prompt_tokens=7).release()
    stats = cache.stats()
    assert (stats.hit_blocks, stats.miss_blocks) == (2, 3)
    assert (stats.queried_tokens, stats.cached_tokens) == (4 + 7, 4)
    assert stats.hit_ratio == 4 / 11
    assert (stats.blocks, stats.bytes, stats.inserted_blocks) == (2, 2 * BLOCK_BYTES, 2)
    assert PrefixCache(BS, 0).stats().hit_ratio == 0.0


def test_insert_is_idempotent_and_needs_its_parent() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=100 * BLOCK_BYTES)
    hashes, blocks = chain([1, 2, 3, 4])
    assert cache.insert(hashes, blocks, parent=None, extra=SCOPE) == 2
    assert cache.insert(hashes, blocks, parent=None, extra=SCOPE) == 2
    assert cache.stats().bytes == 2 * BLOCK_BYTES and cache.stats().inserted_blocks == 2
    orphan, orphan_blocks = chain([7, 7, 8, 8])
    assert cache.insert(orphan[1:], orphan_blocks[1:], parent=orphan[0], extra=SCOPE) == 0
    assert orphan[1] not in cache and cache.stats().rejected_blocks == 1
    with pytest.raises(ValueError, match="differs"):
        cache.insert(orphan[1:], orphan_blocks[1:], parent=hashes[0], extra=OTHER)
    with pytest.raises(ValueError, match="2 hashes but 1 blocks"):
        cache.insert(hashes, blocks[:1], parent=None)
    cache.check_integrity()


def test_eviction_takes_least_recently_used_leaves_first() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=3 * BLOCK_BYTES)
    put(cache, [1, 1])  # a0: the oldest, but it will have a child
    put(cache, [5, 5])  # c0
    hashes, blocks = chain([1, 1, 2, 2])
    cache.insert(hashes[1:], blocks[1:], parent=hashes[0], extra=SCOPE)  # a1 under a0
    cache.check_integrity()
    put(cache, [6, 6])  # full: the leaves are c0 and a1; c0 is older
    assert cached_blocks(cache, [5, 5]) == 0 and cached_blocks(cache, [1, 1, 2, 2]) == 2
    put(cache, [7, 7])  # leaves a1 and [6 6]: a1 is older; a0 becomes a leaf
    assert cached_blocks(cache, [1, 1, 2, 2]) == 1
    put(cache, [8, 8])  # a0 now goes before [6 6] and [7 7]
    assert cached_blocks(cache, [1, 1]) == 0
    assert all(cached_blocks(cache, [t, t]) == 1 for t in (6, 7, 8))
    assert cache.stats().evictions == 3


def test_a_lookup_makes_blocks_recent() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=2 * BLOCK_BYTES)
    put(cache, [1, 1])
    put(cache, [2, 2])
    cache.longest_prefix(chain([1, 1])[0]).release()
    put(cache, [3, 3])
    assert cached_blocks(cache, [1, 1]) == 1 and cached_blocks(cache, [2, 2]) == 0


def test_referenced_blocks_are_never_evicted() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=2 * BLOCK_BYTES)
    put(cache, [1, 1, 2, 2])
    match = cache.longest_prefix(chain([1, 1, 2, 2])[0])
    assert put(cache, [3, 3]) == 0  # nothing evictable: not cached, budget kept
    assert cache.stats().rejected_blocks == 1 and cache.stats().evictions == 0
    match.release()
    assert put(cache, [3, 3]) == 1
    assert cached_blocks(cache, [1, 1, 2, 2]) == 1  # the leaf went, its parent stayed


def test_a_chain_longer_than_the_budget_keeps_its_head() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=3 * BLOCK_BYTES)
    assert put(cache, [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]) == 3
    assert cached_blocks(cache, [1, 1, 2, 2, 3, 3, 4, 4]) == 3
    assert cache.stats().rejected_blocks == 2 and cache.stats().evictions == 0


def test_a_block_larger_than_the_budget_is_not_cached() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=BLOCK_BYTES - 1)
    assert put(cache, [1, 1]) == 0 and cache.stats().bytes == 0


def test_pinned_blocks_survive_pressure() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=3 * BLOCK_BYTES)
    assert put(cache, [1, 1, 2, 2], pin=True) == 2
    for t in range(3, 10):
        assert put(cache, [t, t]) == 1  # only the one unpinned slot turns over
    assert cached_blocks(cache, [1, 1, 2, 2]) == 2
    assert cache.stats().pinned_blocks == 2
    cache.check_integrity()


def test_pin_covers_the_cached_leading_run() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=3 * BLOCK_BYTES)
    put(cache, [1, 1, 2, 2])
    assert cache.pin(chain([1, 1, 2, 2, 3, 3])[0]) == 2  # the cached leading run
    assert cache.stats().pinned_blocks == 2
    cache.check_integrity()
    for t in range(3, 10):
        assert put(cache, [t, t]) == 1  # only the one unpinned slot turns over
    assert cached_blocks(cache, [1, 1, 2, 2]) == 2
    cache.check_integrity()


def test_invalidation_spares_the_request_holding_a_block() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=10 * BLOCK_BYTES)
    put(cache, [1, 1, 2, 2])
    put(cache, [1, 1, 2, 2], scope=OTHER)
    put(cache, [1, 1, 3, 3], pin=True)
    held = cache.longest_prefix(chain([1, 1, 2, 2])[0])
    assert cache.invalidate(of_tenant("acme")) == 3  # pinned blocks go too
    cache.check_integrity()
    assert cached_blocks(cache, [1, 1, 2, 2]) == 0
    assert cached_blocks(cache, [1, 1, 2, 2], scope=OTHER) == 2
    stats = cache.stats()
    assert (stats.blocks, stats.bytes, stats.referenced_blocks) == (2, 4 * BLOCK_BYTES, 2)
    past = held.kv_cache()  # still valid for its holder
    assert past is not None and past[0][0].flatten().tolist() == [1, 1, 2, 2]
    assert put(cache, [1, 1, 2, 2]) == 2  # a fresh copy can be cached beside it
    held.release()
    cache.check_integrity()
    assert cache.stats().bytes == 4 * BLOCK_BYTES and cache.stats().invalidated_blocks == 3


def test_invalidate_by_model_and_version() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=10 * BLOCK_BYTES)
    v1, v2 = SCOPE, SCOPE._replace(model_version="2")
    other_model = SCOPE._replace(model_id="other")
    for scope in (v1, v2, other_model, None):
        put(cache, [1, 1], scope=scope)
    assert cache.invalidate(of_model("tiny-gpt", "1")) == 1
    assert cached_blocks(cache, [1, 1], scope=v2) == 1
    assert cache.invalidate(of_model("tiny-gpt")) == 1
    assert cached_blocks(cache, [1, 1], scope=other_model) == 1
    assert cache.clear() == 2 and len(cache) == 0
    cache.check_integrity()


def test_kv_blocks_and_assemble_kv_round_trip() -> None:
    torch.manual_seed(0)
    layers, heads, length, dim, size = 3, 2, 11, 4, 4
    past = tuple((torch.randn(heads, length, dim), torch.randn(heads, length, dim)) for _ in "abc")
    blocks = kv_blocks(past, 4, 8 + 0, size) + kv_blocks(past, 8, 8, size)
    assert len(blocks) == 1 and blocks[0].shape == (layers, 2, heads, size, dim)
    blocks = kv_blocks(past, 0, 8, size)
    assert all(b.is_contiguous() for b in blocks)
    storages = {b.untyped_storage().data_ptr() for b in blocks}
    storages |= {t.untyped_storage().data_ptr() for layer in past for t in layer}
    assert len(storages) == len(blocks) + 2 * layers  # no block aliases another or the past
    assembled = assemble_kv(blocks, "cpu")
    assert assembled is not None and len(assembled) == layers
    for (k, v), (k0, v0) in zip(assembled, past, strict=True):
        assert k.is_contiguous() and v.is_contiguous()
        assert torch.equal(k, k0[:, :8]) and torch.equal(v, v0[:, :8])
    assert assemble_kv([]) is None
    for start, end in ((1, 5), (0, 6), (8, 12), (4, 0)):
        with pytest.raises(ValueError):
            kv_blocks(past, start, end, size)


def test_concurrent_requests_keep_the_cache_consistent() -> None:
    cache = PrefixCache(block_size=BS, max_bytes=12 * BLOCK_BYTES)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(200):
                tokens = [rng.randrange(3) for _ in range(2 * rng.randint(1, 5))]
                if rng.random() < 0.05:
                    cache.invalidate(of_tenant("acme"))
                else:
                    put(cache, tokens)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    cache.check_integrity()
    assert cache.stats().referenced_blocks == 0


PROMPTS = st.lists(st.integers(0, 2), min_size=BS, max_size=6 * BS)
SCOPES = st.sampled_from([SCOPE, OTHER])


class CacheMachine(RuleBasedStateMachine):
    """Random operations against a model of what must stay cached."""

    def __init__(self) -> None:
        super().__init__()
        self.cache = PrefixCache(block_size=BS, max_bytes=7 * BLOCK_BYTES)
        self.held: list[tuple[PrefixMatch, PrefixScope, list[int]]] = []
        self.pinned: dict[BlockHash, PrefixScope] = {}

    @rule(tokens=PROMPTS, scope=SCOPES, pin=st.booleans())
    def generate(self, tokens: list[int], scope: PrefixScope, pin: bool) -> None:
        hashes = prompt_block_hashes(tokens, BS, scope)
        n = put(self.cache, tokens, scope, pin)
        if pin:
            self.pinned.update(dict.fromkeys(hashes[:n], scope))

    @rule(tokens=PROMPTS, scope=SCOPES)
    def insert_from_the_root(self, tokens: list[int], scope: PrefixScope) -> None:
        hashes, blocks = chain(tokens, scope)
        self.cache.insert(hashes, blocks, parent=None, extra=scope)

    @rule(tokens=PROMPTS, scope=SCOPES)
    def hold(self, tokens: list[int], scope: PrefixScope) -> None:
        match = self.cache.longest_prefix(prompt_block_hashes(tokens, BS, scope))
        self.held.append((match, scope, tokens))

    @precondition(lambda self: self.held)
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        match, _, _ = self.held.pop(index % len(self.held))
        match.release()

    @rule(tokens=PROMPTS, scope=SCOPES)
    def pin(self, tokens: list[int], scope: PrefixScope) -> None:
        hashes = prompt_block_hashes(tokens, BS, scope)
        n = self.cache.pin(hashes)
        self.pinned.update(dict.fromkeys(hashes[:n], scope))

    @rule(scope=SCOPES)
    def invalidate(self, scope: PrefixScope) -> None:
        self.cache.invalidate(of_tenant(scope.tenant))
        self.pinned = {h: s for h, s in self.pinned.items() if s != scope}
        self.held = [
            (match, s if s != scope else None, tokens)  # type: ignore[misc]
            for match, s, tokens in self.held
        ]

    @rule(skip=st.integers(0, 5))
    def invalidate_one_tree(self, skip: int) -> None:
        """A predicate true once: the whole tree of the block it accepted must go."""
        calls = iter(range(1000))
        self.cache.invalidate(lambda _extra: next(calls) == skip)
        self.pinned = {h: s for h, s in self.pinned.items() if h in self.cache}
        self.held = [
            (match, s if all(h in self.cache for h in match.hashes) else None, tokens)  # type: ignore[misc]
            for match, s, tokens in self.held
        ]

    @invariant()
    def consistent(self) -> None:
        self.cache.check_integrity()
        assert self.cache.stats().bytes <= self.cache.max_bytes
        for h in self.pinned:
            assert h in self.cache, "a pinned block was evicted"
        for match, scope, tokens in self.held:
            if scope is not None:  # not invalidated since the lookup
                assert all(h in self.cache for h in match.hashes), "a held block was evicted"
            for i, block in enumerate(match.blocks):  # the content is always the right one
                assert block[0, 0, 0, :, 0].tolist() == tokens[i * BS : (i + 1) * BS]

    def teardown(self) -> None:
        for match, _, _ in self.held:
            match.release()
        self.cache.check_integrity()
        assert self.cache.stats().referenced_blocks == 0


CacheMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheMachine = CacheMachine.TestCase
