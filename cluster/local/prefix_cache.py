"""The replica-local prefix cache: key/value tensors of prompt blocks, by chained block hash.

A block holds the keys and values of `block_size` consecutive prompt tokens in every layer, as
one contiguous tensor shaped `(n_layers, 2, n_heads, block_size, head_dim)` (index 0 of the
second axis is K, 1 is V). Turning a run of blocks back into a model's `past` is then a single
`torch.cat` along the token axis, whose per-layer K and V are contiguous views.

Blocks form a forest: each block names its parent (the block before it in its prompt), which
stays cached while the block is cached. Since a hash covers its whole prefix
(`cluster.block_hashes`), the blocks of a prompt that are cached are a leading run of its hashes.

Memory is bounded by `max_bytes` (tensor bytes). When it is full, a new block evicts the least
recently used block that is a leaf (no cached children), unreferenced and unpinned; evicting a
leaf can make its parent a leaf. If no block can be evicted the new block is not cached: the
budget is never exceeded and a referenced or pinned block never leaves.

A lookup (`longest_prefix`) takes a reference on each block it returns; the caller must
`release` the match (or use it as a context manager). Invalidated blocks that are still
referenced leave the index at once, so no new lookup finds them, but their tensors stay valid
(and their bytes counted) until the last reference is released.

Tensors are never modified in place: the cache stores copies (`kv_blocks` clones) and hands
out only new tensors (`assemble_kv` concatenates), so cached blocks never alias the live cache
of a generation. One lock guards all state; recency is a logical clock, not wall time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeAlias

import torch

from cluster.block_hashes import BlockHash, PrefixScope

__all__ = [
    "KVCache",
    "PrefixCache",
    "PrefixCacheStats",
    "PrefixMatch",
    "assemble_kv",
    "kv_blocks",
    "of_model",
    "of_tenant",
]

KVCache: TypeAlias = tuple[tuple[torch.Tensor, torch.Tensor], ...]
"""A model's cache: one (key, value) pair per layer, each `(n_heads, seq_len, head_dim)`.

The same shape as `serve_app.models.KVCache`, restated because `cluster` never imports
`serve_app`.
"""

ExtraPredicate: TypeAlias = Callable[[object | None], bool]
"""Decides from a chain's first-block `extra` whether `invalidate` drops the chain."""


def kv_blocks(past: KVCache, start: int, end: int, block_size: int) -> list[torch.Tensor]:
    """The blocks of `past` covering token positions `[start, end)`, as new tensors.

    Each is shaped `(n_layers, 2, n_heads, block_size, head_dim)`, contiguous, on the device of
    `past`, and owns its memory (no view of `past` or of another block), so the cache's byte
    count is what it really holds. `start` and `end - start` must be multiples of
    `block_size`, and `end` at most the length of `past`.
    """
    length = past[0][0].shape[1] if past else 0
    if block_size < 1 or start % block_size or (end - start) % block_size:
        raise ValueError(f"[{start}, {end}) is not made of whole blocks of {block_size}")
    if not 0 <= start <= end <= length:
        raise ValueError(f"[{start}, {end}) is outside the {length} cached positions")
    n_layers = len(past)
    blocks = []
    for a in range(start, end, block_size):
        b = a + block_size
        # One copy per block: stack K, V of every layer, then view as (layers, 2, ...).
        stacked = torch.stack([t[:, a:b] for layer in past for t in layer])
        blocks.append(stacked.view(n_layers, 2, *stacked.shape[1:]))
    return blocks


def assemble_kv(
    blocks: Sequence[torch.Tensor], device: torch.device | str | None = None
) -> KVCache | None:
    """The model `past` covering `blocks` in order, on `device`; None for no blocks.

    One `torch.cat` over all blocks (then one transfer when `device` differs); each layer's K
    and V are contiguous views of that new tensor, never of a cached block.
    """
    if not blocks:
        return None
    full = torch.cat(tuple(blocks), dim=3)
    if device is not None:
        full = full.to(device)
    return tuple((layer[0], layer[1]) for layer in full.unbind(0))


def of_model(model_id: str, model_version: str | None = None) -> ExtraPredicate:
    """An `invalidate` predicate for chains of `model_id` (only `model_version`, if given)."""

    def matches(extra: object | None) -> bool:
        return (
            isinstance(extra, PrefixScope)
            and extra.model_id == model_id
            and (model_version is None or extra.model_version == model_version)
        )

    return matches


def of_tenant(tenant: str) -> ExtraPredicate:
    """An `invalidate` predicate for chains of `tenant`."""

    def matches(extra: object | None) -> bool:
        return isinstance(extra, PrefixScope) and extra.tenant == tenant

    return matches


@dataclass(frozen=True)
class PrefixCacheStats:
    """A consistent snapshot of a prefix cache's contents and counters."""

    blocks: int
    """Blocks that lookups can find."""
    bytes: int
    """Tensor bytes held, including invalidated blocks that requests still reference."""
    pinned_blocks: int
    referenced_blocks: int
    """Blocks (findable or invalidated) that at least one request holds."""
    hit_blocks: int
    """Blocks returned by lookups."""
    miss_blocks: int
    """Hashes looked up but not found (everything after the first missing one counts)."""
    queried_tokens: int
    """Prompt tokens whose prefix was looked up."""
    cached_tokens: int
    """Prompt tokens whose keys and values came from the cache."""
    inserted_blocks: int
    rejected_blocks: int
    """Blocks offered to `insert` but not cached: no room, or their parent was gone."""
    evictions: int
    invalidated_blocks: int

    @property
    def hit_ratio(self) -> float:
        """Cached over queried tokens; 0.0 before the first lookup."""
        return self.cached_tokens / self.queried_tokens if self.queried_tokens else 0.0


@dataclass(eq=False)
class _Block:
    hash: BlockHash
    parent: BlockHash | None
    kv: torch.Tensor
    nbytes: int
    extra: object | None
    """The `extra` of its chain's first block (the whole tree shares it)."""
    last_access: int
    children: int = 0
    refs: int = 0
    pinned: bool = False
    linked: bool = True
    """False once invalidated: out of the index, alive only while referenced."""


class PrefixMatch:
    """The cached leading blocks of a lookup; holds a reference on each until released.

    The tensors stay valid (and the blocks in the cache) until `release`, even if the blocks
    are invalidated meanwhile. Use as a context manager, or call `release()` in a `finally`.
    """

    __slots__ = ("_blocks", "_cache", "_released", "block_size", "blocks", "hashes")

    def __init__(self, cache: PrefixCache, blocks: tuple[_Block, ...]) -> None:
        self._cache = cache
        self._blocks = blocks
        self._released = False
        self.block_size = cache.block_size
        self.hashes: tuple[BlockHash, ...] = tuple(block.hash for block in blocks)
        """The matched hashes: a leading run of those looked up."""
        self.blocks: tuple[torch.Tensor, ...] = tuple(block.kv for block in blocks)
        """Their tensors, `(n_layers, 2, n_heads, block_size, head_dim)` each; read only."""

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_tokens(self) -> int:
        """Prompt tokens covered by the match."""
        return len(self._blocks) * self.block_size

    def kv_cache(self, device: torch.device | str | None = None) -> KVCache | None:
        """The matched prefix as a model `past` on `device` (see `assemble_kv`)."""
        if self._released:
            raise RuntimeError("this match was released; its blocks may be gone")
        return assemble_kv(self.blocks, device)

    def release(self) -> None:
        """Drop the references; a second call does nothing."""
        self._cache.release(self)

    def __enter__(self) -> PrefixMatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class PrefixCache:
    """Blocks of `block_size` tokens within `max_bytes`; see the module docstring.

    One cache can serve several models: their chains differ from the first block on (the
    model and version are in its `extra`), and each block carries its own shape.
    """

    def __init__(self, block_size: int, max_bytes: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes!r}")
        self.block_size = block_size
        self.max_bytes = max_bytes
        self._blocks: dict[BlockHash, _Block] = {}
        self._detached: set[_Block] = set()
        # Lazy min-heap of eviction candidates, (key, tiebreak, hash): an entry is live only
        # while its block is still cached, evictable and keyed the same; others are skipped.
        self._candidates: list[tuple[int, int, BlockHash]] = []
        self._tiebreak = itertools.count()
        self._clock = 0
        self._bytes = 0
        self._hit_blocks = 0
        self._miss_blocks = 0
        self._queried_tokens = 0
        self._cached_tokens = 0
        self._inserted = 0
        self._rejected = 0
        self._evictions = 0
        self._invalidated = 0
        self._lock = threading.Lock()

    # -- lookups -------------------------------------------------------------------------

    def longest_prefix(
        self,
        hashes: Sequence[BlockHash],
        *,
        prompt_tokens: int | None = None,
        counted: bool = True,
    ) -> PrefixMatch:
        """The cached blocks of the longest leading run of `hashes`, each now referenced.

        Marks them most recently used and counts the lookup: `prompt_tokens` (default: the
        tokens of `hashes`) as queried, the match as cached; not when `counted` is false (a
        lookup no request made). Release the match when done.
        """
        with self._lock:
            self._clock += 1
            found: list[_Block] = []
            for h in hashes:
                block = self._blocks.get(h)
                if block is None:
                    break
                block.refs += 1
                block.last_access = self._clock
                found.append(block)
            if not counted:
                return PrefixMatch(self, tuple(found))
            self._hit_blocks += len(found)
            self._miss_blocks += len(hashes) - len(found)
            self._cached_tokens += len(found) * self.block_size
            queried = len(hashes) * self.block_size if prompt_tokens is None else prompt_tokens
            self._queried_tokens += queried
            return PrefixMatch(self, tuple(found))

    def release(self, match: PrefixMatch) -> None:
        """Drop `match`'s references; blocks it kept alive may now be evicted or freed."""
        with self._lock:
            if match._released:
                return
            match._released = True
            for block in match._blocks:
                block.refs -= 1
                if block.refs == 0 and not block.linked:
                    self._detached.discard(block)
                    self._bytes -= block.nbytes
                else:
                    self._offer(block)

    def cached_run(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading `hashes` are cached; changes nothing (no reference, no stats)."""
        with self._lock:
            n = 0
            for h in hashes:
                if h not in self._blocks:
                    break
                n += 1
            return n

    def block_kv(self, block_hash: BlockHash) -> tuple[torch.Tensor, object | None] | None:
        """The keys and values of one cached block and its chain's `extra`, for another
        replica; changes nothing.

        Blocks are never written after insertion, so the tensor stays valid to read even if
        the block is evicted meanwhile.
        """
        with self._lock:
            block = self._blocks.get(block_hash)
            return None if block is None else (block.kv, block.extra)

    def __contains__(self, block_hash: object) -> bool:
        """Whether a lookup would find `block_hash`; changes nothing."""
        return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    # -- updates -------------------------------------------------------------------------

    def insert(
        self,
        hashes: Sequence[BlockHash],
        kv: Sequence[torch.Tensor],
        *,
        parent: BlockHash | None,
        extra: object | None = None,
        pin: bool = False,
    ) -> int:
        """Cache the chain `hashes` (tensors `kv`, one per hash) after block `parent`.

        `parent` is the hash just before `hashes[0]` in the prompt (None when `hashes[0]` is a
        first block) and must be cached, or nothing is. `extra` is the chain's first-block
        `extra`; a continued chain inherits its parent's (`ValueError` if a different one is
        given). Blocks already cached are kept as they are (and marked used), so inserting is
        idempotent. Insertion stops at the first block for which no room can be made. With
        `pin`, every block of `hashes` that is cached when the call returns is pinned (and its
        ancestors can no longer become leaves). Returns how many of `hashes` are cached now.
        """
        if len(hashes) != len(kv):
            raise ValueError(f"{len(hashes)} hashes but {len(kv)} blocks")
        with self._lock:
            self._clock += 1
            if parent is not None:
                anchor = self._blocks.get(parent)
                if anchor is None:
                    self._rejected += len(hashes)
                    return 0
                if extra is not None and anchor.extra != extra:
                    raise ValueError(
                        f"extra {extra!r} differs from its parent's chain extra {anchor.extra!r}"
                    )
            else:
                anchor = None
            cached = 0
            for h, tensor in zip(hashes, kv, strict=True):
                block = self._blocks.get(h)
                if block is None:
                    block = self._add(h, anchor, tensor, extra)
                    if block is None:
                        self._rejected += len(hashes) - cached
                        break
                else:
                    block.last_access = self._clock
                block.pinned = block.pinned or pin
                anchor = block
                cached += 1
            if anchor is not None:
                # Only the chain's last block can be a new leaf; the others have a child now.
                self._offer(anchor)
            return cached

    def pin(self, hashes: Sequence[BlockHash]) -> int:
        """Make the cached leading run of `hashes` unevictable; returns its length.

        Pinned blocks still count against `max_bytes` and are still dropped by `invalidate`.
        """
        with self._lock:
            n = 0
            for h in hashes:
                block = self._blocks.get(h)
                if block is None:
                    break
                block.pinned = True
                n += 1
            return n

    def invalidate(self, predicate: ExtraPredicate) -> int:
        """Drop every block whose chain's first-block `extra` satisfies `predicate`, with all
        its descendants, pinned or not.

        Referenced blocks leave the index too (no lookup finds them) but stay valid for their
        holders until released. Returns the number of blocks dropped.
        """
        with self._lock:
            doomed: list[_Block] = []
            doomed_hashes: set[BlockHash] = set()
            # Dict order puts every parent before its children, so whole subtrees go.
            for block in self._blocks.values():
                if block.parent in doomed_hashes or predicate(block.extra):
                    doomed.append(block)
                    doomed_hashes.add(block.hash)
            for block in doomed:
                del self._blocks[block.hash]
                block.linked = False
                if block.refs:
                    self._detached.add(block)
                else:
                    self._bytes -= block.nbytes
                if block.parent is not None and block.parent not in doomed_hashes:
                    parent = self._blocks[block.parent]
                    parent.children -= 1
                    self._offer(parent)
            self._invalidated += len(doomed)
            return len(doomed)

    def clear(self) -> int:
        """Drop every block (as `invalidate` does); counters are kept."""
        return self.invalidate(lambda _extra: True)

    # -- observation ---------------------------------------------------------------------

    def stats(self) -> PrefixCacheStats:
        """A snapshot of the contents and counters."""
        with self._lock:
            linked_refs = sum(1 for block in self._blocks.values() if block.refs)
            return PrefixCacheStats(
                blocks=len(self._blocks),
                bytes=self._bytes,
                pinned_blocks=sum(1 for block in self._blocks.values() if block.pinned),
                referenced_blocks=linked_refs + len(self._detached),
                hit_blocks=self._hit_blocks,
                miss_blocks=self._miss_blocks,
                queried_tokens=self._queried_tokens,
                cached_tokens=self._cached_tokens,
                inserted_blocks=self._inserted,
                rejected_blocks=self._rejected,
                evictions=self._evictions,
                invalidated_blocks=self._invalidated,
            )

    def check_integrity(self) -> None:
        """Raise `AssertionError` naming the first broken invariant; for tests.

        Bytes equal the sum over held blocks and stay within budget; references are >= 0 and
        invalidated blocks are held only while referenced; every parent is cached; child counts
        match; a chain shares one extra; every evictable block has a live eviction entry.
        """
        with self._lock:
            children: dict[BlockHash, int] = dict.fromkeys(self._blocks, 0)
            for h, block in self._blocks.items():
                _require(block.hash == h and block.linked, f"block {h.hex()} indexed wrongly")
                _require(block.refs >= 0, f"block {h.hex()} has refs {block.refs}")
                _require(block.last_access <= self._clock, f"block {h.hex()} is from the future")
                _require(
                    block.nbytes == block.kv.numel() * block.kv.element_size(),
                    f"block {h.hex()} miscounts its bytes",
                )
                if block.parent is not None:
                    parent = self._blocks.get(block.parent)
                    _require(parent is not None, f"block {h.hex()} lost its parent")
                    assert parent is not None
                    _require(parent.extra == block.extra, f"block {h.hex()} changed extra")
                    children[block.parent] += 1
            for h, block in self._blocks.items():
                _require(
                    block.children == children[h],
                    f"block {h.hex()} counts {block.children} children, has {children[h]}",
                )
            for block in self._detached:
                _require(not block.linked and block.refs > 0, "a freed block is still held")
                _require(
                    self._blocks.get(block.hash) is not block, "an invalidated block is linked"
                )
            held = sum(b.nbytes for b in self._blocks.values())
            held += sum(b.nbytes for b in self._detached)
            _require(self._bytes == held, f"bytes {self._bytes} != held {held}")
            _require(self._bytes <= self.max_bytes, f"bytes {self._bytes} > {self.max_bytes}")
            live = {(key, h) for key, _, h in self._candidates}
            for h, block in self._blocks.items():
                if self._evictable(block):
                    _require(
                        (self._eviction_key(block), h) in live,
                        f"evictable block {h.hex()} is not an eviction candidate",
                    )

    # -- internals (the lock is held) ----------------------------------------------------

    @staticmethod
    def _eviction_key(block: _Block) -> int:
        """Smallest leaves first: least recently used."""
        return block.last_access

    @staticmethod
    def _evictable(block: _Block) -> bool:
        return block.children == 0 and block.refs == 0 and not block.pinned

    def _offer(self, block: _Block) -> None:
        """Record `block` as an eviction candidate if it is one now."""
        if block.linked and self._evictable(block):
            entry = (self._eviction_key(block), next(self._tiebreak), block.hash)
            heapq.heappush(self._candidates, entry)
            if len(self._candidates) > 2 * len(self._blocks) + 64:
                self._compact()

    def _compact(self) -> None:
        self._candidates = [
            (self._eviction_key(block), next(self._tiebreak), h)
            for h, block in self._blocks.items()
            if self._evictable(block)
        ]
        heapq.heapify(self._candidates)

    def _evict_one(self) -> bool:
        """Evict the first evictable leaf by `_eviction_key`; False if there is none."""
        while self._candidates:
            key, _, h = heapq.heappop(self._candidates)
            block = self._blocks.get(h)
            if block is None or not self._evictable(block) or self._eviction_key(block) != key:
                continue
            del self._blocks[h]
            block.linked = False
            self._bytes -= block.nbytes
            self._evictions += 1
            if block.parent is not None:
                parent = self._blocks[block.parent]
                parent.children -= 1
                self._offer(parent)
            return True
        return False

    def _add(
        self, h: BlockHash, parent: _Block | None, kv: torch.Tensor, extra: object | None
    ) -> _Block | None:
        """Link a new block under `parent`, evicting to make room; None if there is none."""
        nbytes = kv.numel() * kv.element_size()
        if nbytes > self.max_bytes:
            return None
        if self._bytes + nbytes > self.max_bytes:
            if parent is not None:
                parent.refs += 1  # so that making room cannot evict the block we attach to
            try:
                while self._bytes + nbytes > self.max_bytes:
                    if not self._evict_one():
                        return None
            finally:
                if parent is not None:
                    parent.refs -= 1
                    self._offer(parent)  # making room may have discarded its candidate entry
        block = _Block(
            hash=h,
            parent=parent.hash if parent is not None else None,
            kv=kv,
            nbytes=nbytes,
            extra=parent.extra if parent is not None else extra,
            last_access=self._clock,
        )
        self._blocks[h] = block
        self._bytes += nbytes
        self._inserted += 1
        if parent is not None:
            parent.children += 1
        return block


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)
