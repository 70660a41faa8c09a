"""What a replica serves to its peers: its local result cache, read and written as envelopes.

Reads do not count as this replica's hits or misses (they are the asking replica's). Writes
come from another process, so each value is verified (checksum, HMAC, well-formed answer) before
it is stored, tagged with what the envelope says it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cluster.codec import CodecError
from cluster.keys import ResultKey
from cluster.result_cache import ResultCache
from serve_app.answers import answer_tags

logger = logging.getLogger(__name__)


class ResultPeerBackend:
    """A `cluster.peer.PeerBackend` over one replica's result cache."""

    def __init__(self, cache: ResultCache, secret: bytes | None) -> None:
        self._cache = cache
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
        # Prefix blocks are not shared between replicas yet: every block is a miss.
        return [None] * len(hashes)

    async def put_blocks(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        return None
