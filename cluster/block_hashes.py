"""Chained hashes of a prompt's token blocks: the keys of the prefix KV cache.

A prompt is cut into blocks of `block_size` tokens and block `i` is named by
`h_i = H(h_{i-1}, tokens_i, extra_i)`. Because each hash covers its parent, equal hashes mean
equal prefixes, so the longest run of leading hashes found in a cache is the longest cached
prefix. `extra` rides on the first block only and holds the `PrefixScope` (tenant, model id,
model version): chains of different tenants, models or versions differ from their first block
on and never share a block. Only full blocks are hashed; a block's key/value tensors depend on
every token before it, so a partial block could never be reused by a longer prompt.

Everything here is pure: the hash function is passed in (BLAKE2b-256 by default; a keyed one
such as `keyed_blake2b_256(secret)` makes hashes unpredictable to whoever lacks the secret).
Python's `hash()` is never used: it is seeded per process, and blocks are shared between
processes through peers and Redis.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import NamedTuple, NewType

from cluster.keys import canonical_bytes

__all__ = [
    "BLOCK_HASH_BYTES",
    "BlockHash",
    "HashFn",
    "PrefixScope",
    "blake2b_256",
    "hash_block_tokens",
    "keyed_blake2b_256",
    "prompt_block_hashes",
]

BlockHash = NewType("BlockHash", bytes)
"""The raw digest naming one block (32 bytes with the default hash).

Bytes rather than hex: half the size as a dict key and no encoding on the hot path; use
`.hex()` where a readable key is needed (Redis, logs).
"""

HashFn = Callable[[bytes], bytes]
"""Digest of a block's encoding; must be collision resistant (a cryptographic hash)."""

BLOCK_HASH_BYTES = 32

# Version tag of the encoding below: a change here must change the tag, because hashes are
# shared with other processes and stored in Redis.
_DOMAIN = b"raycache.prefix-block.v1\x00"
_ROOT = b"R"
_CHILD = b"P"
_NO_EXTRA = canonical_bytes(None)


class PrefixScope(NamedTuple):
    """The `extra` of a chain's first block: who may share its blocks.

    A tuple, so `canonical_bytes` encodes it as `[tenant, model_id, model_version,
    generation]`; named fields, so invalidation predicates read well.
    """

    tenant: str
    """The tenant's id or per-tenant salt; tenants never share blocks."""
    model_id: str
    model_version: str
    """Version of the weights whose keys and values the blocks hold."""
    generation: int = 0
    """The publication of that version (`cluster.versions.records`): a label republished with other
    weights is a new generation, so the old weights' blocks never match its prompts."""


def blake2b_256(data: bytes) -> bytes:
    """The default `HashFn`: unkeyed BLAKE2b with a 32-byte digest."""
    return hashlib.blake2b(data, digest_size=BLOCK_HASH_BYTES).digest()


def keyed_blake2b_256(secret: bytes) -> HashFn:
    """A `HashFn` keyed with `secret` (at most 64 bytes), e.g. the cluster secret."""
    if len(secret) > 64:
        raise ValueError(f"a BLAKE2b key holds at most 64 bytes, got {len(secret)}")

    def digest(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=BLOCK_HASH_BYTES, key=secret).digest()

    return digest


def hash_block_tokens(
    hash_fn: HashFn,
    parent: BlockHash | None,
    tokens: Sequence[int],
    extra: object | None,
) -> BlockHash:
    """The hash of the block `tokens` following the block `parent` (None: the first block).

    The encoding is injective: domain tag, root marker or length-prefixed parent, token count,
    tokens as big-endian uint32, then `canonical_bytes(extra)`. Raises `ValueError` for a token
    outside [0, 2**32) and `TypeError` for an `extra` that `canonical_bytes` cannot encode.
    """
    return _digest(hash_fn, parent, _pack(tokens), len(tokens), _encode_extra(extra))


def prompt_block_hashes(
    tokens: Sequence[int],
    block_size: int,
    extra: object | None,
    hash_fn: HashFn = blake2b_256,
) -> list[BlockHash]:
    """The hashes of every full block of `tokens`, `extra` on the first one.

    Equal to chaining `hash_block_tokens` block by block, only faster (the tokens are packed
    once). A trailing partial block is not hashed, so a prompt shorter than `block_size` gets
    no hashes.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size!r}")
    n_blocks = len(tokens) // block_size
    packed = _pack(tokens[: n_blocks * block_size])
    stride = 4 * block_size
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for i in range(n_blocks):
        block = packed[i * stride : (i + 1) * stride]
        encoded_extra = _encode_extra(extra) if i == 0 else _NO_EXTRA
        parent = _digest(hash_fn, parent, block, block_size, encoded_extra)
        hashes.append(parent)
    return hashes


def _pack(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f">{len(tokens)}I", *tokens)
    except struct.error:
        raise ValueError("token ids must be ints in [0, 2**32)") from None


def _encode_extra(extra: object | None) -> bytes:
    return _NO_EXTRA if extra is None else canonical_bytes(extra)


def _digest(
    hash_fn: HashFn, parent: BlockHash | None, packed: bytes, count: int, encoded_extra: bytes
) -> BlockHash:
    if parent is None:
        head = _DOMAIN + _ROOT
    else:
        head = _DOMAIN + _CHILD + struct.pack(">H", len(parent)) + parent
    return BlockHash(hash_fn(head + struct.pack(">I", count) + packed + encoded_extra))
