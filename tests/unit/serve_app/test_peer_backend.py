"""What a replica serves its peers and accepts from them: answers stored only under the key
they record, blocks served as signed envelopes."""

import asyncio

import torch

from cluster.block_hashes import PrefixScope, prompt_block_hashes
from cluster.keys import ResultKey
from cluster.prefix_cache import PrefixCache
from cluster.result_cache import ResultCache
from cluster.secret import ClusterSecret
from serve_app.answers import AnswerIdentity, encode_answer
from serve_app.models import Generation
from serve_app.peer_backend import ResultPeerBackend
from serve_app.shared_blocks import decode_block

SECRET = ClusterSecret(b"peer backend tests' cluster secret")
GENERATION = Generation(prompt_tokens=5, tokens=(104, 105), text="hi", finish_reason="length")
IDENTITY = AnswerIdentity(key="ab" * 32, tenant="t", model="m", version="7")


def backend(prefix: PrefixCache | None = None) -> tuple[ResultPeerBackend, ResultCache]:
    cache = ResultCache(max_bytes=1 << 20, max_entries=100)
    return ResultPeerBackend(cache, prefix, SECRET), cache


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


def test_blocks_are_served_as_envelopes_of_their_scope():
    scope = PrefixScope("salt", "tiny-gpt", "1")
    shape = torch.Size((1, 2, 1, 4, 8))
    hashes = prompt_block_hashes(list(range(8)), 4, scope)
    blocks = [torch.randn(shape) for _ in hashes]
    prefix = PrefixCache(4, max_bytes=1 << 20)
    assert prefix.insert(hashes, blocks, parent=None, extra=scope) == 2
    peer, _ = backend(prefix)
    served = asyncio.run(peer.get_blocks([hashes[1], b"\x00" * 32, hashes[0]]))
    assert served[1] is None
    for blob, block_hash, block in [
        (served[0], hashes[1], blocks[1]),
        (served[2], hashes[0], blocks[0]),
    ]:
        assert blob is not None
        assert torch.equal(
            decode_block(blob, block_hash, scope, shape, torch.float32, SECRET), block
        )
