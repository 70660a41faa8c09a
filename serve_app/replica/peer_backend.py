"""What a replica serves to its peers: its result cache and its prefix blocks, as envelopes
(a chunk of consecutive blocks per envelope).

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
from cluster.keys import ResultKey
from cluster.local.prefix_cache import PrefixCache
from cluster.local.result_cache import ResultCache
from cluster.secret import ClusterSecret
from cluster.sharing.tiered import StaleValue
from cluster.sharing.tiered_prefix import encode_chunk, run_off_loop
from cluster.versions.invalidation import InvalidationRules
from serve_app.replica.answers import answer_tags

logger = logging.getLogger(__name__)


class ResultPeerBackend:
    """A `cluster.sharing.peer.PeerBackend` over one replica's result cache."""

    def __init__(
        self,
        cache: ResultCache,
        prefix: PrefixCache | None,
        secret: ClusterSecret,
        rules: InvalidationRules | None = None,
        chunk_bytes: int = 1024 * 1024,
    ) -> None:
        self._cache = cache
        self._prefix = prefix
        self._secret = secret
        self._rules = rules
        self._chunk_bytes = chunk_bytes
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

    async def get_prefix(self, hashes: Sequence[bytes]) -> list[bytes]:
        """The cached run of `hashes` from the first, as chunk envelopes of as many blocks as
        fit in `chunk_bytes` (at least one each), encoded in a worker thread: a run of blocks
        is MiBs to copy and sign. The run ends at the first block not cached here, or of
        another scope than the first."""
        pieces: list[list[tuple[torch.Tensor, BlockHash]]] = []
        piece_bytes = 0
        scope: PrefixScope | None = None
        for block_hash in hashes:
            entry = self._prefix.block_kv(BlockHash(block_hash)) if self._prefix else None
            if entry is None or not isinstance(entry[1], PrefixScope):
                break
            if scope is not None and entry[1] != scope:
                break
            scope = entry[1]
            kv = entry[0]
            size = kv.numel() * kv.element_size()
            if not pieces or piece_bytes + size > self._chunk_bytes:
                pieces.append([])
                piece_bytes = 0
            pieces[-1].append((kv, BlockHash(block_hash)))
            piece_bytes += size
        if scope is None:
            return []
        secret, chunk_scope = self._secret, scope
        return await run_off_loop(
            lambda: [
                encode_chunk([kv for kv, _ in piece], [h for _, h in piece], chunk_scope, secret)
                for piece in pieces
            ]
        )
