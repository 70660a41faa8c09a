"""In-memory stand-ins for the Redis tier and the peer network, for unit tests of the replica
core: the same calls as `RedisStore` and `PeerClient`, over a dict and over other cores'
`ResultPeerBackend`s in the same process. The values they carry are the real encoded bytes,
checked by the real decoders."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from cluster.sharing.peer import PeerBackend
from cluster.sharing.peer_limits import PeerLimits

_T = TypeVar("_T")


@dataclass
class _RedisStats:
    breaker_state: str = "closed"
    errors: int = 0


class MemoryRedis:
    """What `RedisStore` does, in a dict: no TTLs, no failures unless `down` is set."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.down = False

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [None if self.down else self.values.get(key) for key in keys]

    async def get_many_decoded(
        self, keys: Sequence[str], decode: Callable[[int, bytes], _T]
    ) -> list[_T | None]:
        values = await self.get_many(keys)
        return [None if value is None else decode(i, value) for i, value in enumerate(values)]

    async def set_many(
        self, items: Sequence[tuple[str, bytes]], ttl_s: float | None = None
    ) -> bool:
        if self.down:
            return False
        self.values.update(items)
        return True

    async def delete_many(self, keys: Sequence[str]) -> int:
        return sum(self.values.pop(key, None) is not None for key in keys)

    def stats(self) -> _RedisStats:
        return _RedisStats()

    async def close(self) -> None:
        pass


class InProcessPeers:
    """What `PeerClient` does, calling the `PeerBackend` registered under each address."""

    def __init__(self) -> None:
        self.backends: dict[str, PeerBackend] = {}
        self.limits = PeerLimits()
        self.calls: list[tuple[str, str]] = []

    async def get_results(
        self, address: str, keys: Sequence[str], timeout_s: float = 0.2
    ) -> list[bytes | None]:
        self.calls.append(("get_results", address))
        backend = self.backends.get(address)
        return list(await backend.get_results(keys)) if backend else [None] * len(keys)

    async def put_results(
        self, address: str, items: Sequence[tuple[str, bytes]], timeout_s: float = 1.0
    ) -> bool:
        self.calls.append(("put_results", address))
        backend = self.backends.get(address)
        if backend is None:
            return False
        await backend.put_results(items)
        return True

    async def get_prefix(
        self,
        address: str,
        hashes: Sequence[bytes],
        decode: Callable[[bytes], _T | None],
        timeout_s: float = 0.5,
    ) -> list[_T]:
        self.calls.append(("get_prefix", address))
        backend = self.backends.get(address)
        found: list[_T] = []
        for blob in await backend.get_prefix(hashes) if backend else []:
            value = decode(blob)
            if value is None:
                break
            found.append(value)
        return found

    async def close(self) -> None:
        pass


def untyped(value: Any) -> Any:
    """`value` where a `RedisStore` or `PeerClient` is expected (the same calls, duck-typed)."""
    return value
