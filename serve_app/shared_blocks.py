"""Prefix blocks shared between replicas: from the owner peer (block by block, streamed in one
call) and through Redis (in aligned chunks of many blocks, one pipelined round trip).

A block travels as a codec envelope of kind `kv-block` holding one tensor (the block's keys and
values, shaped as the prefix cache stores them) and the block's hash in its metadata. The
receiver checks the envelope (checksum, HMAC), that the hash is the one it asked for and that
the tensor has exactly the shape and dtype its own model produces, before inserting it: a block
that fails any check ends the fetched run, and the rest of the prompt is prefilled locally.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch

from cluster.block_hashes import BlockHash, PrefixScope
from cluster.codec import CodecError, decode, encode
from cluster.peer import PeerClient
from cluster.prefix_cache import PrefixCache
from cluster.redis_store import RedisStore, redis_key

logger = logging.getLogger(__name__)

BLOCK_KIND = "kv-block"


def encode_block(
    kv: torch.Tensor, block_hash: BlockHash, scope: PrefixScope, secret: bytes | None
) -> bytes:
    """The envelope of one block of `scope`'s chain (signed when there is a `secret`)."""
    return encode(
        BLOCK_KIND,
        scope.model_id,
        scope.model_version,
        created_at=time.time(),
        tensors={"kv": kv},
        meta={"hash": block_hash.hex()},
        secret=secret,
    )


def decode_block(
    blob: bytes,
    block_hash: BlockHash,
    shape: torch.Size,
    dtype: torch.dtype,
    secret: bytes | None,
) -> torch.Tensor:
    """The tensor of a block envelope, checked against what was asked; raises CodecError."""
    envelope = decode(blob, secret=secret, max_bytes=64 * 1024 * 1024, expect_kind=BLOCK_KIND)
    if envelope.meta.get("hash") != block_hash.hex():
        raise CodecError("header", "block hash differs from the one requested")
    kv = envelope.tensors.get("kv")
    if kv is None or kv.shape != shape or kv.dtype != dtype:
        raise CodecError("layout", "block tensor has an unexpected shape or dtype")
    return kv


async def fetch_prefix_from_owner(
    cache: PrefixCache,
    hashes: Sequence[BlockHash],
    usable: int,
    extra: object,
    peer: PeerClient,
    owner_address: str,
    block_shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    timeout_s: float,
    secret: bytes | None,
) -> int:
    """Copy into `cache` the owner's blocks that continue the locally cached run of `hashes`.

    Only the first `usable` hashes are considered (at least one prompt token must be
    prefilled). Returns how many blocks were added; every failure just adds fewer.
    """
    start = cache.cached_run(hashes[:usable])
    wanted = list(hashes[start:usable])
    if not wanted:
        return 0
    blobs = await peer.get_blocks(owner_address, wanted, timeout_s)
    blocks: list[torch.Tensor] = []
    for block_hash, blob in zip(wanted, blobs, strict=True):
        if blob is None:
            break
        try:
            blocks.append(decode_block(blob, block_hash, block_shape, dtype, secret).to(device))
        except CodecError as exc:
            logger.warning("a peer sent an invalid prefix block: %s", exc)
            break
    if not blocks:
        return 0
    parent = hashes[start - 1] if start else None
    return cache.insert(wanted[: len(blocks)], blocks, parent=parent, extra=extra)


CHUNK_KIND = "kv-chunk"


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
    secret: bytes | None,
) -> bytes:
    """One envelope holding consecutive blocks (stacked) and their hashes."""
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
    block_shape: torch.Size,
    dtype: torch.dtype,
    secret: bytes | None,
) -> list[torch.Tensor]:
    """The blocks of a chunk envelope, checked against the hashes asked for; raises CodecError."""
    envelope = decode(blob, secret=secret, max_bytes=256 * 1024 * 1024, expect_kind=CHUNK_KIND)
    if envelope.meta.get("hashes") != [h.hex() for h in hashes]:
        raise CodecError("header", "chunk holds other blocks than the ones requested")
    kv = envelope.tensors.get("kv")
    if kv is None or kv.shape != (len(hashes), *block_shape) or kv.dtype != dtype:
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
    secret: bytes | None,
) -> int:
    """Write the chunks of the prompt's blocks that hold any block past `already_shared`.

    Reads the blocks from the local cache (they were stored there by the prefill); stops at the
    first one evicted meanwhile. Returns how many chunks were written.
    """
    items = []
    for start, end in chunk_ranges(len(hashes), chunk_blocks):
        if end <= already_shared:
            continue
        found = [cache.block_kv(h) for h in hashes[start:end]]
        if any(f is None for f in found):
            break
        kvs = [f[0] for f in found if f is not None]
        blob = encode_chunk(kvs, hashes[start:end], scope, secret)
        items.append((chunk_key(namespace, scope, hashes[end - 1]), blob))
    if items and await redis.set_many(items):
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
    secret: bytes | None,
) -> list[list[torch.Tensor]]:
    """The blocks of the chunks `ranges` of `hashes` (see `chunk_ranges`), read from Redis.

    One round trip. Each chunk is decoded and checked as soon as it arrives, while Redis sends
    the next (`RedisStore.get_many_decoded`). Returns the leading run of chunks that were found
    and valid (the blocks of each, in order): a missing or invalid chunk ends the run.
    """
    keys = [chunk_key(namespace, scope, hashes[end - 1]) for _, end in ranges]
    run = 0  # chunks decoded so far, all valid and without a gap

    def decode(index: int, blob: bytes) -> list[torch.Tensor] | None:
        nonlocal run
        if index != run:  # past a miss or an invalid chunk nothing is used: skip the work
            return None
        start, end = ranges[index]
        try:
            blocks = decode_chunk(blob, hashes[start:end], block_shape, dtype, secret)
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
    secret: bytes | None,
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
    added = 0
    for (s, e), kvs in zip(ranges, chunks, strict=False):
        first = max(start, s)
        parent = hashes[first - 1] if first else None
        inserted = cache.insert(
            hashes[first:e], [kv.to(device) for kv in kvs[first - s :]], parent=parent, extra=scope
        )
        added += inserted
        if inserted < e - first:
            break
    return added
