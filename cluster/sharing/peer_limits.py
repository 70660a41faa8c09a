"""The bounds of the peer service, on both of its transports (`cluster.sharing.peer`, gRPC, for
results; `cluster.sharing.peer_blocks`, a plain stream, for prefix blocks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

MiB: Final = 1024 * 1024
_WIRE_BOUNDS: Final = {
    "max_keys": 0xFFFF,  # a u16 count
    "max_key_bytes": 0xFFFF,  # a u16 length
    "max_value_bytes": 0xFFFFFFFE,  # a u32 length; 0xFFFFFFFF marks a miss
}


@dataclass(frozen=True)
class PeerLimits:
    """Bounds that the server and the client enforce; both sides default to the same values."""

    max_message_bytes: int = 8 * MiB
    """One gRPC message, sent or received."""
    max_keys: int = 256
    """Keys or hashes in one request; more is refused (INVALID_ARGUMENT)."""
    max_key_bytes: int = 1024
    """Length of one key (UTF-8) or hash; longer is refused (INVALID_ARGUMENT)."""
    max_value_bytes: int = 64 * MiB
    """One result or chunk of prefix blocks; a larger one is not sent and not accepted."""
    max_batch_bytes: int = 256 * MiB
    """All values of one block-stream answer, together."""
    max_concurrent_rpcs: int = 256
    """Server: gRPC calls in progress at once (beyond, RESOURCE_EXHAUSTED), and block-stream
    connections open at once (beyond, closed at once)."""
    max_concurrent_streams: int = 128
    """Server: HTTP/2 streams of one gRPC client connection at once; beyond, they queue."""
    replay_memory: int = 1 << 16
    """Server: nonces of accepted credentials remembered (about 200 bytes each)."""
    server_deadline_s: float = 5.0
    """Server: the longest any call may take there, whatever the client's deadline."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            kinds = (int, float) if name == "server_deadline_s" else (int,)
            if not isinstance(value, kinds) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"PeerLimits.{name} must be a positive number, got {value!r}")
        # What the block stream's fields can carry (cluster/sharing/peer_blocks.py).
        for name, most in _WIRE_BOUNDS.items():
            if getattr(self, name) > most:
                raise ValueError(f"PeerLimits.{name} must be at most {most}")


DEFAULT_LIMITS: Final = PeerLimits()
