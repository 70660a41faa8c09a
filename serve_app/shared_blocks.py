"""Prefix blocks shared between replicas: their envelope, and fetching a run from the owner.

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
