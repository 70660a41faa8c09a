"""Which replica should answer a key: rendezvous (highest-random-weight) hashing.

Every router ranks the replicas of a key the same way, in every process, so repeated requests
meet the replica that cached their answer. When a replica joins or leaves, only the keys it
wins or held move.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def affinity_score(key: str, member_id: str) -> int:
    """A 64-bit score of `member_id` for `key`, the same in every process."""
    digest = hashlib.blake2b(
        member_id.encode(), digest_size=8, key=key.encode()[:64], person=b"raycache-rank"
    )
    return int.from_bytes(digest.digest(), "big")


def rank_members(key: str, member_ids: Iterable[str]) -> list[str]:
    """`member_ids` from most to least preferred for `key` (ties broken by id)."""
    return sorted(member_ids, key=lambda m: (-affinity_score(key, m), m))
