"""What a replica serves to its peers: its result cache and its prefix blocks, as envelopes.

Reads do not count as this replica's hits or misses (they are the asking replica's). Writes
come from another process, so each value is verified (checksum, HMAC, well-formed answer) before
it is stored, tagged with what the envelope says it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cluster.block_hashes import BlockHash, PrefixScope
from cluster.codec import CodecError
from cluster.keys import ResultKey
from cluster.prefix_cache import PrefixCache
from cluster.result_cache import ResultCache
from serve_app.answers import answer_tags
from serve_app.shared_blocks import encode_block

logger = logging.getLogger(__name__)


class ResultPeerBackend:
    """A `cluster.peer.PeerBackend` over one replica's result cache."""

    def __init__(
        self, cache: ResultCache, prefix: PrefixCache | None, secret: bytes | None
    ) -> None:
        self._cache = cache
        self._prefix = prefix
        self._secret = secret
        self.rejected = 0

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._cache.peek(ResultKey(key)) for key in keys]

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        for key, value in items:
            try:
                tags = answer_tags(value, self._secret)
            except CodecError:
                self.rejected += 1
                logger.warning("a peer sent an invalid answer for %s; not stored", key)
                continue
            self._cache.put(ResultKey(key), value, tags)

    async def get_blocks(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        blobs: list[bytes | None] = []
        for block_hash in hashes:
            found = self._prefix.block_kv(BlockHash(block_hash)) if self._prefix else None
            if found is None or not isinstance(found[1], PrefixScope):
                blobs.append(None)
                continue
            kv, scope = found
            blobs.append(encode_block(kv, BlockHash(block_hash), scope, self._secret))
        return blobs

    async def put_blocks(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        return None
