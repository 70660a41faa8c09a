"""The lookup path of prefix blocks beyond the local cache (`TieredPrefix`): from the owner peer
(its block stream, one exchange for the run of blocks), then through Redis (in aligned chunks of
many blocks, one pipelined round trip), with the Redis key layout of those chunks.

Blocks travel in chunks: a codec envelope of kind `kv-chunk` holding consecutive blocks stacked
(keys and values, shaped as the prefix cache stores them) and their hashes in its metadata, one
signature to check for many blocks. The receiver checks the envelope (MAC under the cluster
secret), that the hashes are the ones it asked for next, that the model and version are its
scope's, and that the tensor has exactly the shape and dtype its own model produces, before
inserting it: a chunk that fails any check ends the fetched run, and the rest of the prompt is
prefilled locally. The chained block hash binds the tenant and the weights' generation as well.

Encoding copies and signs MiBs: `encode_chunk` and the decoders are pure and safe in any thread.
The async functions here encode shares in a thread of lower scheduler priority than
generation (`run_in_background`: a stack of the blocks, a copy, the MAC); chunks are decoded on
the loop as each arrives, from Redis or from the owner, while the next is on its way (see
`fetch_chunks_from_redis`). Fetched blocks are copied to the model's device and inserted into
the cache in `run_off_loop`'s worker threads, at the priority of the request waiting for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TypeVar

import torch

from cluster.block_hashes import BlockHash, HashFn, PrefixScope, blake2b_256, prompt_block_hashes
from cluster.codec import CodecError, Envelope, decode, encode
from cluster.local.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from cluster.sharing.peer import PeerClient
from cluster.sharing.redis_store import RedisStore, redis_key
from cluster.sharing.write_budget import TenantWriteBudget

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

CHUNK_KIND = "kv-chunk"
# Our own threads, not the loop's default executor: generation runs there, and sharing a prefix
# must not wait behind it (nor fill it). Two: torch's copies release the GIL.
_WORKERS: Final = ThreadPoolExecutor(max_workers=2, thread_name_prefix="raycache-codec")
# How many chunks a replica remembers Redis holds (a hash and a dict slot each).
MAX_CHUNKS_REMEMBERED: Final = 16384
# The scheduler priority (nice) of the thread that encodes shares, above the generation's 0.
SHARING_NICENESS: Final = 10


def _yield_to_generation() -> None:
    """Lower this thread's scheduler priority (Linux schedules threads one by one): encoding
    a share is background work, and takes the cores only when generation leaves them."""
    with contextlib.suppress(AttributeError, OSError):  # no per-thread priority here
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), SHARING_NICENESS)


# One thread for writes that no request waits for, at a lower priority than generation.
_SHARING: Final = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="raycache-share", initializer=_yield_to_generation
)


async def run_off_loop(work: Callable[[], _T]) -> _T:
    """The result of `work()` run in this module's worker threads (encoding, decoding)."""
    return await asyncio.get_running_loop().run_in_executor(_WORKERS, work)


async def run_in_background(work: Callable[[], _T]) -> _T:
    """The result of `work()` run in the sharing thread, which yields the cores to generation
    (encoding blocks for Redis: no request waits for it)."""
    return await asyncio.get_running_loop().run_in_executor(_SHARING, work)


def _own_copy(kv: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`kv` on `device` in storage of its own: a block decoded from a chunk is a view of the
    whole chunk, which would stay alive (uncounted by the cache's byte budget) while any one of
    its blocks is cached."""
    return kv.to(device=device, copy=True)


def _check_scope(envelope: Envelope, scope: PrefixScope) -> None:
    if (envelope.model, envelope.version) != (scope.model_id, scope.model_version):
        raise CodecError("identity", "blocks of another model or version than requested")


async def fetch_prefix_from_owner(
    cache: PrefixCache,
    hashes: Sequence[BlockHash],
    usable: int,
    scope: PrefixScope,
    peer: PeerClient,
    owner_address: str,
    block_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    timeout_s: float,
    secret: ClusterSecret,
) -> int:
    """Copy into `cache` the owner's blocks that continue the locally cached run of `hashes`;
    `owner_address` is the owner's `PeerServer.blocks_address`.

    Only the first `usable` hashes are considered (at least one prompt token must be
    prefilled), and of those at most the peer limits' `max_keys`. The owner sends chunks of
    consecutive blocks; each is checked as it arrives (signature, the hashes it must hold next,
    scope, layout), and the first that fails ends the run. The blocks are inserted with `scope`
    as their chain's extra, in a worker thread. Returns how many blocks were added; every
    failure just adds fewer.
    """
    start = cache.cached_run(hashes[:usable])
    wanted = list(hashes[start:usable])[: peer.limits.max_keys]
    if not wanted:
        return 0
    taken = 0  # blocks of `wanted` decoded so far

    def decode(blob: bytes) -> list[torch.Tensor] | None:
        nonlocal taken
        try:
            blocks = decode_leading_chunk(blob, wanted[taken:], scope, block_shape, dtype, secret)
        except CodecError as exc:
            logger.warning("a peer sent an invalid prefix chunk: %s", exc)
            return None
        taken += len(blocks)
        return blocks

    chunks = await peer.get_prefix(owner_address, wanted, decode, timeout_s)
    blocks = [block for chunk in chunks for block in chunk]
    if not blocks:
        return 0

    def insert() -> int:
        parent = hashes[start - 1] if start else None
        on_device = [_own_copy(kv, device) for kv in blocks]
        return cache.insert(wanted[: len(blocks)], on_device, parent=parent, extra=scope)

    # A copy to the model's device and into the cache's pool: MiBs, off the event loop.
    return await run_off_loop(insert)


def chunk_ranges(blocks: int, chunk_blocks: int) -> list[tuple[int, int]]:
    """The aligned chunks of a run of `blocks` blocks: [start, end) pairs, the last one short.

    Alignment makes chunks of different prompts that share a prefix coincide, so a later prompt
    finds every whole chunk of the shared part.
    """
    return [(s, min(s + chunk_blocks, blocks)) for s in range(0, blocks, chunk_blocks)]


def encode_chunk(
    kvs: Sequence[torch.Tensor],
    hashes: Sequence[BlockHash],
    scope: PrefixScope,
    secret: ClusterSecret,
) -> bytes:
    """One envelope holding consecutive blocks (stacked) and their hashes, signed under
    `secret`. Copies and hashes every byte: run it off the event loop (`run_off_loop`)."""
    return encode(
        CHUNK_KIND,
        scope.model_id,
        scope.model_version,
        created_at=time.time(),
        tensors={"kv": torch.stack([kv.cpu() for kv in kvs])},
        meta={"hashes": [h.hex() for h in hashes]},
        secret=secret,
    )


def decode_chunk(
    blob: bytes,
    hashes: Sequence[BlockHash],
    scope: PrefixScope,
    block_shape: torch.Size,
    dtype: torch.dtype,
    secret: ClusterSecret,
) -> list[torch.Tensor]:
    """The blocks of a chunk envelope, checked against the hashes and scope asked for; raises
    CodecError. Copies and hashes every byte: large chunks belong off the event loop."""
    blocks = decode_leading_chunk(blob, hashes, scope, block_shape, dtype, secret)
    if len(blocks) != len(hashes):
        raise CodecError("identity", "chunk holds other blocks than the ones requested")
    return blocks


def decode_leading_chunk(
    blob: bytes,
    hashes: Sequence[BlockHash],
    scope: PrefixScope,
    block_shape: torch.Size,
    dtype: torch.dtype,
    secret: ClusterSecret,
) -> list[torch.Tensor]:
    """The blocks of a chunk envelope that holds the first one or more of `hashes`, checked
    against them and `scope`; raises CodecError."""
    envelope = decode(blob, secret=secret, max_bytes=256 * 1024 * 1024, expect_kind=CHUNK_KIND)
    _check_scope(envelope, scope)
    held = envelope.meta.get("hashes")
    if (
        not isinstance(held, list)
        or not 1 <= len(held) <= len(hashes)
        or held != [h.hex() for h in hashes[: len(held)]]
    ):
        raise CodecError("identity", "chunk holds other blocks than the ones requested")
    kv = envelope.tensors.get("kv")
    if kv is None or kv.shape != (len(held), *block_shape) or kv.dtype != dtype:
        raise CodecError("layout", "chunk tensor has an unexpected shape or dtype")
    return list(kv.unbind(0))


def chunk_key(namespace: str, scope: PrefixScope, last: BlockHash) -> str:
    """The Redis key of the chunk of `scope`'s chain that ends with block `last`."""
    return redis_key(namespace, scope.model_id, scope.model_version, "kv", last.hex())


async def store_prefix_in_redis(
    redis: RedisStore,
    cache: PrefixCache,
    hashes: Sequence[BlockHash],
    already_shared: int,
    scope: PrefixScope,
    namespace: str,
    chunk_blocks: int,
    secret: ClusterSecret,
) -> int:
    """Write the chunks of the prompt's blocks that hold any block past `already_shared`.

    Reads the blocks from the local cache (they were stored there by the prefill); stops at the
    first one evicted meanwhile. The chunks are encoded in a worker thread. Returns how many
    chunks were written.
    """
    runs: list[tuple[list[torch.Tensor], Sequence[BlockHash]]] = []
    for start, end in chunk_ranges(len(hashes), chunk_blocks):
        if end <= already_shared:
            continue
        found = [cache.block_kv(h) for h in hashes[start:end]]
        if any(f is None for f in found):
            break
        runs.append(([f[0] for f in found if f is not None], hashes[start:end]))
    if not runs:
        return 0
    blobs = await run_in_background(
        lambda: [encode_chunk(kvs, run, scope, secret) for kvs, run in runs]
    )
    items = [
        (chunk_key(namespace, scope, run[-1]), blob)
        for (_, run), blob in zip(runs, blobs, strict=True)
    ]
    if await redis.set_many(items):
        return len(items)
    return 0


async def fetch_chunks_from_redis(
    redis: RedisStore,
    hashes: Sequence[BlockHash],
    ranges: Sequence[tuple[int, int]],
    scope: PrefixScope,
    namespace: str,
    block_shape: torch.Size,
    dtype: torch.dtype,
    secret: ClusterSecret,
) -> list[list[torch.Tensor]]:
    """The blocks of the chunks `ranges` of `hashes` (see `chunk_ranges`), read from Redis.

    One round trip. Each chunk is decoded and checked as soon as it arrives, while Redis sends
    the next (`RedisStore.get_many_decoded`): the MAC of a 2 MiB chunk holds the event loop
    about 0.4 ms. Returns the leading run of chunks that were found and valid (the blocks of
    each, in order): a missing or invalid chunk ends the run, and no chunk after it is decoded.
    """
    # Verifying on the loop, between reads, is what overlaps with the transfer: Poly1305 holds
    # the GIL, so a worker thread adds a hand-over per chunk and overlaps nothing (measured
    # 10-20% slower in benchmarks.redis_bandwidth; keyed BLAKE3, which releases the GIL, was
    # no faster in a thread either, on 2 cores shared with redis-server).
    keys = [chunk_key(namespace, scope, hashes[end - 1]) for _, end in ranges]
    run = 0  # chunks decoded so far, all valid and without a gap

    def decode(index: int, blob: bytes) -> list[torch.Tensor] | None:
        nonlocal run
        if index != run:  # past a miss or an invalid chunk nothing is used: skip the work
            return None
        start, end = ranges[index]
        try:
            blocks = decode_chunk(blob, hashes[start:end], scope, block_shape, dtype, secret)
        except CodecError as exc:
            logger.warning("an invalid prefix chunk in Redis: %s", exc)
            return None
        run += 1
        return blocks

    chunks = []
    for blocks in await redis.get_many_decoded(keys, decode):
        if blocks is None:
            break
        chunks.append(blocks)
    return chunks


async def fetch_prefix_from_redis(
    redis: RedisStore,
    cache: PrefixCache,
    hashes: Sequence[BlockHash],
    usable: int,
    scope: PrefixScope,
    namespace: str,
    chunk_blocks: int,
    block_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    secret: ClusterSecret,
) -> int:
    """Copy into `cache` the chunks in Redis that continue the locally cached run of `hashes`.

    One pipelined round trip fetches every aligned chunk past the cached run (and a short last
    chunk ending exactly at `usable`). Returns how many blocks were added.
    """
    start = cache.cached_run(hashes[:usable])
    ranges = [(s, e) for s, e in chunk_ranges(usable, chunk_blocks) if e > start]
    if not ranges:
        return 0
    chunks = await fetch_chunks_from_redis(
        redis, hashes, ranges, scope, namespace, block_shape, dtype, secret
    )
    if not chunks:
        return 0

    def insert() -> int:
        added = 0
        for (s, e), kvs in zip(ranges, chunks, strict=False):
            first = max(start, s)
            parent = hashes[first - 1] if first else None
            blocks = [_own_copy(kv, device) for kv in kvs[first - s :]]
            inserted = cache.insert(hashes[first:e], blocks, parent=parent, extra=scope)
            added += inserted
            if inserted < e - first:
                break
        return added

    # A copy to the model's device and into the cache's pool: MiBs, off the event loop.
    return await run_off_loop(insert)


@dataclass(frozen=True)
class PromptChain:
    """The prefix blocks of one prompt under one scope: the hashes of its full blocks, and how
    many of them may come from a cache (`usable`: at least one prompt token is prefilled, to
    get the logits of the first completion token)."""

    scope: PrefixScope
    hashes: tuple[BlockHash, ...]
    usable: int

    @classmethod
    def of(
        cls,
        prompt_tokens: Sequence[int],
        block_size: int,
        scope: PrefixScope,
        hash_fn: HashFn = blake2b_256,
    ) -> PromptChain:
        hashes = prompt_block_hashes(prompt_tokens, block_size, scope, hash_fn)
        usable = max(len(prompt_tokens) - 1, 0) // block_size
        return cls(scope, tuple(hashes), usable)


@dataclass(frozen=True)
class BlockLayout:
    """What a model's blocks must be to be used: `kv_block_shape(block_size)`, dtype, and the
    device they are copied to."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


@dataclass
class PrefixTierCounters:
    """Blocks this replica took from other tiers than its own cache, and the fetches that asked
    for them: one per tier asked, whether it had blocks or not (only a prompt whose local run
    stops short of its usable blocks asks)."""

    from_peers: int = 0
    from_redis: int = 0
    peer_fetches: int = 0
    peer_seconds: float = 0.0
    """Seconds of the peer fetches: the exchange, the checks and the copy into the cache."""
    redis_fetches: int = 0
    redis_seconds: float = 0.0
    """Seconds of the Redis fetches, measured as `peer_seconds`."""

    def add(self, other: PrefixTierCounters) -> None:
        """Count `other`'s blocks and fetches here too."""
        self.from_peers += other.from_peers
        self.from_redis += other.from_redis
        self.peer_fetches += other.peer_fetches
        self.peer_seconds += other.peer_seconds
        self.redis_fetches += other.redis_fetches
        self.redis_seconds += other.redis_seconds


class TieredPrefix:
    """The lookup path of prefix blocks beyond the local cache: the owner replica's block
    stream, then Redis; and the background share of a prompt's new blocks to Redis.

    `fetch` extends the locally cached run of a prompt's chain, so that the prefill that
    follows finds it in `cache`; every failure of a tier only leaves more to prefill.
    `share` hands the store of the blocks worth writing (see there) to `enqueue` (the result
    tier's bounded background queue).
    """

    def __init__(
        self,
        cache: PrefixCache,
        secret: ClusterSecret,
        namespace: str,
        peer: PeerClient | None,
        redis: RedisStore | None,
        redis_chunk_blocks: int,
        peer_timeout_s: float,
        enqueue: Callable[[Callable[[], Awaitable[object]]], bool],
        share_new_tokens: int = 1024,
        write_budget: TenantWriteBudget | None = None,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.cache = cache
        self._write_budget = write_budget
        self._share_new_tokens = share_new_tokens
        # The chunks (by their last block) this replica wrote to Redis or read from it.
        self._in_redis: OrderedDict[BlockHash, None] = OrderedDict()
        self._secret = secret
        self._namespace = namespace
        self._peer = peer
        self._redis = redis
        self._chunk_blocks = redis_chunk_blocks
        self._peer_timeout_s = peer_timeout_s
        self._enqueue = enqueue
        self._timer = timer
        self.counters = PrefixTierCounters()

    async def fetch(
        self, chain: PromptChain, layout: BlockLayout, owner_blocks_address: str | None
    ) -> PrefixTierCounters:
        """Copy into the cache what the owner (at its block stream's address, when another
        replica owns the prompt), then Redis, hold of `chain` past the local run; returns how
        many blocks came from each, and the fetches that asked for them."""
        fetched = PrefixTierCounters()
        if owner_blocks_address and self._peer is not None and self._lacks_blocks(chain):
            started = self._timer()
            fetched.from_peers = await fetch_prefix_from_owner(
                self.cache,
                chain.hashes,
                usable=chain.usable,
                scope=chain.scope,
                peer=self._peer,
                owner_address=owner_blocks_address,
                block_shape=layout.shape,
                dtype=layout.dtype,
                device=layout.device,
                timeout_s=self._peer_timeout_s,
                secret=self._secret,
            )
            fetched.peer_fetches, fetched.peer_seconds = 1, self._timer() - started
        if self._redis is not None and self._lacks_blocks(chain):
            started = self._timer()
            before = self.cache.cached_run(chain.hashes[: chain.usable])
            fetched.from_redis = await fetch_prefix_from_redis(
                self._redis,
                self.cache,
                chain.hashes,
                usable=chain.usable,
                scope=chain.scope,
                namespace=self._namespace,
                chunk_blocks=self._chunk_blocks,
                block_shape=layout.shape,
                dtype=layout.dtype,
                device=layout.device,
                secret=self._secret,
            )
            fetched.redis_fetches, fetched.redis_seconds = 1, self._timer() - started
            for _, end in chunk_ranges(chain.usable, self._chunk_blocks):
                if end > before and end <= before + fetched.from_redis:
                    self._remember_in_redis(chain.hashes[end - 1])
        self.counters.add(fetched)
        return fetched

    def _lacks_blocks(self, chain: PromptChain) -> bool:
        """Whether the local run of `chain` stops short of its usable blocks: only then does
        a tier get asked (the fetch functions return at once otherwise)."""
        return self.cache.cached_run(chain.hashes[: chain.usable]) < chain.usable

    def share(self, chain: PromptChain, reused_tokens: int, computed_tokens: int) -> bool:
        """Write to Redis, in the background, the chunks of `chain` that are worth a write;
        True when a write was queued.

        A block is worth writing on its second use: the chunks within the first
        `reused_tokens` (found in a cache by this request) that Redis does not hold yet, as
        far as this replica knows (it wrote them, or read them there). Blocks used once are
        not written (a prompt nobody repeats costs no encoding and no Redis memory), unless
        this request computed at least `share_new_tokens` (`computed_tokens`): a prefill that
        long costs more than the write, so every chunk goes at once. Nothing is written when
        the tenant's write budget cannot pay for it.
        """
        if self._redis is None:
            return False
        cache = self.cache
        blocks = len(chain.hashes)
        if computed_tokens >= self._share_new_tokens:
            ranges = chunk_ranges(blocks, self._chunk_blocks)
        else:
            # Whole chunks only: a chunk cut where this prompt's reuse ends is keyed by this
            # prompt's own next blocks, and only this very prompt would ever read it.
            reused = reused_tokens // cache.block_size
            ranges = [(s, e) for s, e in chunk_ranges(blocks, self._chunk_blocks) if e <= reused]
        unshared = [(s, e) for s, e in ranges if chain.hashes[e - 1] not in self._in_redis]
        if not unshared:
            return False
        first, last = unshared[0][0], unshared[-1][1]
        budget = self._write_budget
        if budget is not None and not budget.take(
            chain.scope.tenant, self._bytes(chain, first, last)
        ):
            return False
        redis = self._redis
        queued = self._enqueue(
            lambda: store_prefix_in_redis(
                redis,
                cache,
                chain.hashes[:last],
                already_shared=first,
                scope=chain.scope,
                namespace=self._namespace,
                chunk_blocks=self._chunk_blocks,
                secret=self._secret,
            )
        )
        if queued:
            for _, end in unshared:
                self._remember_in_redis(chain.hashes[end - 1])
        return queued

    def _bytes(self, chain: PromptChain, start: int, end: int) -> int:
        """Tensor bytes of the blocks [start, end) of `chain` (every block has one shape)."""
        found = self.cache.block_kv(chain.hashes[start])
        return 0 if found is None else found[0].nbytes * (end - start)

    def _remember_in_redis(self, chunk_end: BlockHash) -> None:
        """Note that Redis holds the chunk ending at block `chunk_end` (bounded: the oldest
        note goes first, and a chunk forgotten is at worst written again)."""
        in_redis = self._in_redis
        in_redis[chunk_end] = None
        in_redis.move_to_end(chunk_end)
        if len(in_redis) > MAX_CHUNKS_REMEMBERED:
            in_redis.popitem(last=False)
