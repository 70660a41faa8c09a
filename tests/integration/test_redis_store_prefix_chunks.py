"""The store's streamed multi-get as a replica uses it: prefix chunks read and decoded."""

from __future__ import annotations

import random
import threading
import uuid

import pytest
import torch

from cluster.block_hashes import BlockHash, PrefixScope, prompt_block_hashes
from cluster.codec import MAGIC
from cluster.local.prefix_cache import PrefixCache
from cluster.secret import ClusterSecret
from cluster.sharing import tiered_prefix
from cluster.sharing.redis_store import RedisStore
from cluster.sharing.tiered_prefix import (
    chunk_key,
    chunk_ranges,
    fetch_chunks_from_redis,
    fetch_prefix_from_redis,
    store_prefix_in_redis,
)

pytestmark = pytest.mark.integration

BLOCK, CHUNK = 4, 3
SHAPE = torch.Size((2, 2, 1, BLOCK, 8))  # layers, K and V, heads, tokens, dims
SCOPE = PrefixScope("tenant", "tiny-gpt", "1")
SECRET = ClusterSecret(b"prefix chunk tests' cluster secret")


class InsertThreads(PrefixCache):
    """A prefix cache that records the threads blocks are inserted from."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()

    def insert(self, *args, **kwargs) -> int:
        self.threads.add(threading.current_thread().name)
        return super().insert(*args, **kwargs)


async def stored(url: str) -> tuple[RedisStore, str, list[BlockHash], list[torch.Tensor]]:
    """A store and the namespace under which it holds the chunks of a 10-block prefix (4
    chunks, the last one short)."""
    rng = random.Random(3)
    hashes = prompt_block_hashes([rng.randrange(256) for _ in range(10 * BLOCK)], BLOCK, SCOPE)
    blocks = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    writer = PrefixCache(BLOCK, max_bytes=1 << 24)
    assert writer.insert(hashes, blocks, parent=None, extra=SCOPE) == 10
    store = RedisStore(url, socket_timeout_s=2.0, connect_timeout_s=2.0)
    namespace = f"chunks{uuid.uuid4().hex[:8]}"  # the Redis server is the session's
    assert await store_prefix_in_redis(store, writer, hashes, 0, SCOPE, namespace, CHUNK, SECRET)
    return store, namespace, hashes, blocks


async def fetch(
    store: RedisStore,
    namespace: str,
    hashes: list[BlockHash],
    scope: PrefixScope = SCOPE,
    secret: ClusterSecret = SECRET,
):
    ranges = chunk_ranges(len(hashes), CHUNK)
    return await fetch_chunks_from_redis(
        store, hashes, ranges, scope, namespace, SHAPE, torch.float32, secret
    )


@pytest.mark.asyncio
async def test_every_chunk_comes_back_as_the_blocks_that_were_stored(redis_server):
    store, namespace, hashes, blocks = await stored(redis_server.url)
    try:
        chunks = await fetch(store, namespace, hashes)
        assert [len(chunk) for chunk in chunks] == [3, 3, 3, 1]
        fetched = [block for chunk in chunks for block in chunk]
        assert all(torch.equal(a, b) for a, b in zip(fetched, blocks, strict=True))
        assert store.stats().fetches == 1

        reader = InsertThreads(BLOCK, max_bytes=1 << 24)
        added = await fetch_prefix_from_redis(
            store, reader, hashes, 10, SCOPE, namespace, CHUNK, SHAPE, torch.float32,
            torch.device("cpu"), SECRET,
        )  # fmt: skip
        assert added == 10 and reader.cached_run(hashes) == 10
        reader.check_integrity()
        # Copying MiBs into the pool would hold every other request on the event loop.
        assert threading.main_thread().name not in reader.threads
    finally:
        await store.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
async def test_a_missing_or_corrupt_chunk_ends_the_run_and_later_ones_are_not_decoded(
    redis_server, monkeypatch, damage
):
    store, namespace, hashes, _ = await stored(redis_server.url)
    second = chunk_key(namespace, SCOPE, hashes[5])
    admin = redis_server.client()
    if damage == "missing":
        admin.delete(second)
    else:
        value = bytearray(admin.get(second))
        value[-1] ^= 0xFF  # the payload's last byte: the MAC fails
        assert bytes(value[:4]) == MAGIC
        admin.set(second, bytes(value))
    admin.close()
    decoded = []
    decode_chunk = tiered_prefix.decode_chunk

    def counting(blob, *args):
        decoded.append(len(blob))
        return decode_chunk(blob, *args)

    monkeypatch.setattr(tiered_prefix, "decode_chunk", counting)
    try:
        chunks = await fetch(store, namespace, hashes)
        assert [len(chunk) for chunk in chunks] == [3]
        assert len(decoded) == (1 if damage == "missing" else 2)  # nothing after the gap
        assert store.stats().hits == (3 if damage == "missing" else 4)
    finally:
        await store.close()


@pytest.mark.asyncio
async def test_chunks_moved_to_another_scope_or_signed_under_another_secret_are_misses(
    redis_server,
):
    store, namespace, hashes, _ = await stored(redis_server.url)
    admin = redis_server.client()
    other_version = PrefixScope(SCOPE.tenant, SCOPE.model_id, "2")
    # The first chunk copied where version 2 of the model would look for it.
    first = admin.get(chunk_key(namespace, SCOPE, hashes[2]))
    admin.set(chunk_key(namespace, other_version, hashes[2]), first)
    # The second chunk's bytes put under the third chunk's key.
    admin.set(
        chunk_key(namespace, SCOPE, hashes[8]), admin.get(chunk_key(namespace, SCOPE, hashes[5]))
    )
    admin.close()
    try:
        assert await fetch(store, namespace, hashes, scope=other_version) == []
        assert [len(chunk) for chunk in await fetch(store, namespace, hashes)] == [3, 3]
        other = ClusterSecret(b"the secret of another cluster")
        assert await fetch(store, namespace, hashes, secret=other) == []
    finally:
        await store.close()
