"""A replica copying a prompt's prefix blocks from their owner: a real `PeerServer` over the
replica's own backend (`ResultPeerBackend`), on loopback, no Ray.

The blocks arrive bit-exact after the reader's own cached run, in chunks; a chunk signed under
another secret, holding other blocks, or of another scope ends the run, and nothing is
inserted from it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
import pytest_asyncio
import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.peer import PeerClient, PeerServer
from cluster.sharing.tiered_prefix import encode_chunk, fetch_prefix_from_owner
from serve_app.replica.peer_backend import ResultPeerBackend

pytestmark = pytest.mark.integration

SECRET = ClusterSecret(b"prefix from owner tests' cluster secret")
SCOPE = PrefixScope("tenant-salt", "tiny-gpt", "1", generation=3)
BLOCK = 4
SHAPE = torch.Size((2, 2, 1, BLOCK, 8))
BLOCK_BYTES = SHAPE.numel() * 4
HASHES = prompt_block_hashes(list(range(10 * BLOCK)), BLOCK, SCOPE)
BLOCKS = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(i)) for i in range(10)]


@pytest_asyncio.fixture
async def owner() -> AsyncIterator[tuple[PeerServer, PrefixCache]]:
    prefix = PrefixCache(BLOCK, max_bytes=1 << 24)
    assert prefix.insert(HASHES, BLOCKS, parent=None, extra=SCOPE) == 10
    backend = ResultPeerBackend(
        ResultCache(max_bytes=1 << 20, max_entries=8), prefix, SECRET, chunk_bytes=3 * BLOCK_BYTES
    )
    server = PeerServer(backend, SECRET.peer)
    await server.start("127.0.0.1", 0)
    yield server, prefix
    await server.stop(0)


async def fetch(reader: PrefixCache, address: str, scope: PrefixScope = SCOPE) -> int:
    client = PeerClient(SECRET.peer)
    try:
        return await fetch_prefix_from_owner(
            reader, HASHES, 10, scope, client, address, SHAPE, torch.float32,
            torch.device("cpu"), 2.0, SECRET,
        )  # fmt: skip
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_the_owners_blocks_after_the_cached_run_arrive_bit_exact(owner) -> None:
    server, _ = owner
    assert server.blocks_address is not None
    reader = PrefixCache(BLOCK, max_bytes=1 << 24)
    assert reader.insert(HASHES[:2], BLOCKS[:2], parent=None, extra=SCOPE) == 2
    # The eight that follow, in chunks of three, three and two.
    assert await fetch(reader, server.blocks_address) == 8
    assert reader.cached_run(HASHES) == 10
    for block_hash, block in zip(HASHES, BLOCKS, strict=True):
        entry = reader.block_kv(block_hash)
        assert entry is not None and entry[1] == SCOPE
        assert torch.equal(entry[0].view(torch.int32), block.view(torch.int32))
    reader.check_integrity()


@pytest.mark.asyncio
async def test_blocks_of_another_generation_are_not_taken(owner) -> None:
    server, _ = owner
    assert server.blocks_address is not None
    # The same label republished: the reader's chain has other hashes, the owner holds none.
    republished = SCOPE._replace(generation=4)
    reader = PrefixCache(BLOCK, max_bytes=1 << 24)
    client = PeerClient(SECRET.peer)
    try:
        hashes = prompt_block_hashes(list(range(10 * BLOCK)), BLOCK, republished)
        added = await fetch_prefix_from_owner(
            reader, hashes, 10, republished, client, server.blocks_address, SHAPE,
            torch.float32, torch.device("cpu"), 2.0, SECRET,
        )  # fmt: skip
    finally:
        await client.close()
    assert added == 0 and reader.cached_run(hashes) == 0


class ForgingBackend:
    """An owner that answers with the given chunks, whatever was asked."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None] * len(keys)

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        return self.chunks

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        return None


GOOD = encode_chunk(BLOCKS[:2], HASHES[:2], SCOPE, SECRET)
BAD_CHUNKS = {
    "signed under another secret": encode_chunk(
        BLOCKS[2:4], HASHES[2:4], SCOPE, ClusterSecret(b"the secret of another cluster")
    ),
    "other blocks than the next ones": encode_chunk(BLOCKS[3:5], HASHES[3:5], SCOPE, SECRET),
    "another version's scope": encode_chunk(
        BLOCKS[2:4], HASHES[2:4], SCOPE._replace(model_version="2"), SECRET
    ),
    "not an envelope": b"\x00" * 64,
}


@pytest.mark.parametrize("case", sorted(BAD_CHUNKS))
@pytest.mark.asyncio
async def test_a_chunk_that_does_not_answer_ends_the_run(case: str) -> None:
    later = encode_chunk(BLOCKS[4:6], HASHES[4:6], SCOPE, SECRET)  # valid, but past the fault
    server = PeerServer(ForgingBackend([GOOD, BAD_CHUNKS[case], later]), SECRET.peer)
    await server.start("127.0.0.1", 0)
    assert server.blocks_address is not None
    reader = PrefixCache(BLOCK, max_bytes=1 << 24)
    try:
        assert await fetch(reader, server.blocks_address) == 2
    finally:
        await server.stop(0)
    assert reader.cached_run(HASHES) == 2
