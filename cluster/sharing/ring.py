"""Consistent hashing with virtual nodes and weights: which member owns a key.

Each member is placed on a 64-bit ring at `vnodes_per_weight * weight` points (rounded, at least
one), each point the BLAKE2b hash of the member id and the point's index. A key is owned by the
member of the first point clockwise from the key's own hash; `owners(key, n)` walks on to the
next distinct members (replicas of a key, or fall-backs). Placement depends only on the member
ids and weights, never on insertion order or on the process, so every replica computes the same
owner from the same snapshot. Adding or removing a member moves only the keys between its
points and their predecessors: about 1/N of them.

A `Ring` is immutable; a membership change builds a new one from the new weights, so a snapshot
can be shared between threads and swapped atomically.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_VNODES_PER_WEIGHT = 160


def _point(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def key_point(key: str | bytes) -> int:
    """The ring position of a key."""
    return _point(key.encode() if isinstance(key, str) else key)


@dataclass(frozen=True)
class Ring:
    """An immutable ring over `weights` (member id -> weight > 0)."""

    weights: Mapping[str, float] = field(default_factory=dict)
    vnodes_per_weight: int = DEFAULT_VNODES_PER_WEIGHT
    version: int = 0
    _points: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _owners: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vnodes_per_weight < 1:
            raise ValueError("vnodes_per_weight must be >= 1")
        placed: list[tuple[int, str]] = []
        for member, weight in self.weights.items():
            if not weight > 0:
                raise ValueError(f"weight of {member!r} must be > 0, got {weight}")
            count = max(1, round(self.vnodes_per_weight * weight))
            prefix = member.encode() + b"\x00"
            placed.extend((_point(prefix + str(i).encode()), member) for i in range(count))
        # Ties between points (vanishingly rare) are broken by member id, deterministically.
        placed.sort()
        object.__setattr__(self, "_points", tuple(p for p, _ in placed))
        object.__setattr__(self, "_owners", tuple(m for _, m in placed))

    def __len__(self) -> int:
        return len(self.weights)

    def __contains__(self, member: object) -> bool:
        return member in self.weights

    def owner(self, key: str | bytes) -> str | None:
        """The member owning `key`; None on an empty ring."""
        if not self._points:
            return None
        index = bisect.bisect_right(self._points, key_point(key))
        return self._owners[index % len(self._owners)]

    def owners(self, key: str | bytes, n: int) -> list[str]:
        """Up to `n` distinct members for `key`, the owner first, then the next clockwise."""
        if not self._points or n <= 0:
            return []
        wanted = min(n, len(self.weights))
        start = bisect.bisect_right(self._points, key_point(key))
        found: list[str] = []
        for step in range(len(self._owners)):
            member = self._owners[(start + step) % len(self._owners)]
            if member not in found:
                found.append(member)
                if len(found) == wanted:
                    break
        return found
