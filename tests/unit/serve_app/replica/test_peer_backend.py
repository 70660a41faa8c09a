"""What a replica serves its peers and accepts from them: answers stored only under the key
they record, the cached run of a prefix served as signed chunks."""

import asyncio

import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.keys import ResultKey
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.tiered_prefix import decode_chunk
from serve_app.models import Generation
from serve_app.replica.answers import AnswerIdentity, encode_answer
from serve_app.replica.peer_backend import ResultPeerBackend

SECRET = ClusterSecret(b"peer backend tests' cluster secret")
GENERATION = Generation(prompt_tokens=5, tokens=(104, 105), text="hi", finish_reason="length")
IDENTITY = AnswerIdentity(key="ab" * 32, tenant="t", model="m", version="7")


def backend(
    prefix: PrefixCache | None = None, chunk_bytes: int = 1 << 20
) -> tuple[ResultPeerBackend, ResultCache]:
    cache = ResultCache(max_bytes=1 << 20, max_entries=100)
    return ResultPeerBackend(cache, prefix, SECRET, chunk_bytes=chunk_bytes), cache


def test_an_answer_is_stored_only_under_the_key_it_records():
    peer, cache = backend()
    blob = encode_answer(GENERATION, IDENTITY, SECRET)
    moved = "cd" * 32
    asyncio.run(peer.put_results([(IDENTITY.key, blob), (moved, blob), ("ef" * 32, b"junk")]))
    assert cache.peek(ResultKey(IDENTITY.key)) == blob
    assert cache.peek(ResultKey(moved)) is None
    assert peer.rejected == 2


def test_answers_signed_under_another_secret_are_not_stored():
    peer, cache = backend()
    other = ClusterSecret(b"the secret of another cluster")
    asyncio.run(peer.put_results([(IDENTITY.key, encode_answer(GENERATION, IDENTITY, other))]))
    assert cache.peek(ResultKey(IDENTITY.key)) is None and peer.rejected == 1


def test_the_cached_run_of_a_prefix_is_served_as_chunks_of_its_scope():
    scope = PrefixScope("salt", "tiny-gpt", "1")
    shape = torch.Size((1, 2, 1, 4, 8))
    hashes = prompt_block_hashes(list(range(20)), 4, scope)
    blocks = [torch.randn(shape) for _ in hashes]
    prefix = PrefixCache(4, max_bytes=1 << 20)
    assert prefix.insert(hashes[:4], blocks[:4], parent=None, extra=scope) == 4
    block_bytes = shape.numel() * 4
    peer, _ = backend(prefix, chunk_bytes=3 * block_bytes + 1)
    # Four of the five are cached: chunks of three and one, and nothing past the gap.
    served = asyncio.run(peer.get_prefix(hashes))
    assert len(served) == 2
    first = decode_chunk(served[0], hashes[:3], scope, shape, torch.float32, SECRET)
    second = decode_chunk(served[1], hashes[3:4], scope, shape, torch.float32, SECRET)
    assert all(map(torch.equal, [*first, *second], blocks[:4]))
    # A run that does not start with a cached block is nothing.
    assert asyncio.run(peer.get_prefix([b"\x00" * 32, *hashes])) == []


def test_a_block_larger_than_a_chunk_is_a_chunk_of_its_own():
    scope = PrefixScope("salt", "tiny-gpt", "1")
    shape = torch.Size((1, 2, 1, 4, 8))
    hashes = prompt_block_hashes(list(range(8)), 4, scope)
    prefix = PrefixCache(4, max_bytes=1 << 20)
    blocks = [torch.randn(shape) for _ in hashes]
    assert prefix.insert(hashes, blocks, parent=None, extra=scope) == 2
    peer, _ = backend(prefix, chunk_bytes=1)
    assert len(asyncio.run(peer.get_prefix(hashes))) == 2
