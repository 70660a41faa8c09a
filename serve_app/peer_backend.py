"""What a replica serves to its peers: its result cache and its prefix blocks, as envelopes.

Reads do not count as this replica's hits or misses (they are the asking replica's). Writes
come from another process, so each value is verified (MAC, well-formed answer, recorded under
the key it is stored at, not covered by an invalidation rule) before it is stored, tagged with
what the envelope says it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from cluster.block_hashes import BlockHash, PrefixScope
from cluster.codec import CodecError
from cluster.invalidation import InvalidationRules
from cluster.keys import ResultKey
from cluster.prefix_cache import PrefixCache
from cluster.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.tiered import StaleValue
from serve_app.answers import answer_tags
from serve_app.shared_blocks import encode_block, run_off_loop

logger = logging.getLogger(__name__)


class ResultPeerBackend:
    """A `cluster.peer.PeerBackend` over one replica's result cache."""

    def __init__(
        self,
        cache: ResultCache,
        prefix: PrefixCache | None,
        secret: ClusterSecret,
        rules: InvalidationRules | None = None,
    ) -> None:
        self._cache = cache
        self._prefix = prefix
        self._secret = secret
        self._rules = rules
        self.rejected = 0
        """Answers refused: invalid, recorded under another key, or invalidated."""

    async def get_results(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._cache.peek(ResultKey(key)) for key in keys]

    async def put_results(self, items: Sequence[tuple[str, bytes]]) -> None:
        for key, value in items:
            try:
                tags = answer_tags(value, self._secret, key, self._rules)
            except (CodecError, StaleValue) as exc:
                self.rejected += 1
                logger.warning("a peer sent an invalid answer for %s (%s); not stored", key, exc)
                continue
            self._cache.put(ResultKey(key), value, tags)

    async def get_blocks(self, hashes: Sequence[bytes]) -> list[bytes | None]:
        """The envelope of each cached block asked for (None where absent), encoded in a
        worker thread: a run of blocks is MiBs to copy and sign."""
        found: list[tuple[torch.Tensor, BlockHash, PrefixScope] | None] = []
        for block_hash in hashes:
            entry = self._prefix.block_kv(BlockHash(block_hash)) if self._prefix else None
            if entry is None or not isinstance(entry[1], PrefixScope):
                found.append(None)
            else:
                found.append((entry[0], BlockHash(block_hash), entry[1]))
        if not any(found):
            return [None] * len(found)
        secret = self._secret
        return await run_off_loop(
            lambda: [None if f is None else encode_block(*f, secret) for f in found]
        )
