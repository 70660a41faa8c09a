"""The cluster secret, and the keys derived from it for each job it does.

Every replica of one deployment holds the same secret: configured by the operator
(`RAYCACHE_HMAC_SECRET`), or generated once per Ray cluster (`cluster.secret_actor`). Each use
gets its own key, derived with keyed BLAKE2b, so a key that leaks from one use (a peer call
token seen on the wire, say) gives nothing for another:

    values    signs every envelope written to Redis or sent to a peer
    keys      keys result keys and prefix-block hashes (no cache oracle without it)
    peer      authenticates replica-to-replica calls
    records   signs version and invalidation records kept in Redis
    tenant:*  the per-tenant salt that stands for the tenant in keys and block hashes

`key_id` names the secret without revealing it, so a value signed under another secret (a
rotation, another cluster on the same Redis) can be told from a forged one.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from typing import Final

__all__ = ["MIN_SECRET_CHARS", "ClusterSecret", "SecretError", "is_placeholder"]

MIN_SECRET_CHARS: Final = 16
_GENERATED_BYTES: Final = 32
# Words that only a template's stand-in contains; a secret holding one was never replaced.
_PLACEHOLDER_WORDS: Final = ("replace", "change-me", "changeme", "placeholder", "example")


class SecretError(ValueError):
    """A configured secret is too short or is a template's placeholder."""


def is_placeholder(text: str) -> bool:
    """Whether `text` is a template's stand-in for a secret (a manifest nobody filled in)."""
    lowered = text.lower()
    return any(word in lowered for word in _PLACEHOLDER_WORDS)


@dataclass(frozen=True)
class ClusterSecret:
    """The secret material and its derived keys (all 32 bytes)."""

    material: bytes = field(repr=False)
    values: bytes = field(init=False, repr=False)
    keys: bytes = field(init=False, repr=False)
    peer: bytes = field(init=False, repr=False)
    records: bytes = field(init=False, repr=False)
    key_id: bytes = field(init=False)
    """8 bytes that name this secret; safe to store and show."""

    def __post_init__(self) -> None:
        if len(self.material) < MIN_SECRET_CHARS:
            raise SecretError(f"a cluster secret needs at least {MIN_SECRET_CHARS} bytes")
        for purpose in ("values", "keys", "peer", "records"):
            object.__setattr__(self, purpose, self.derive(purpose))
        object.__setattr__(self, "key_id", self.derive("key-id")[:8])

    @classmethod
    def generate(cls) -> ClusterSecret:
        """A new random secret."""
        return cls(secrets.token_bytes(_GENERATED_BYTES))

    @classmethod
    def from_text(cls, text: str) -> ClusterSecret:
        """An operator's configured secret; raises `SecretError` for a short or placeholder one."""
        if len(text) < MIN_SECRET_CHARS:
            raise SecretError(f"the cluster secret needs at least {MIN_SECRET_CHARS} characters")
        if is_placeholder(text):
            raise SecretError(
                "the cluster secret is still a placeholder; set a random one "
                "(for example `openssl rand -hex 32`)"
            )
        return cls(text.encode())

    def derive(self, purpose: str) -> bytes:
        """The 32-byte key of `purpose`; distinct purposes give unrelated keys."""
        # BLAKE2b takes keys of at most 64 bytes: longer material is digested first.
        key = self.material if len(self.material) <= 64 else hashlib.blake2b(self.material).digest()
        return hashlib.blake2b(purpose.encode(), key=key, digest_size=32).digest()

    def tenant_salt(self, tenant: str) -> str:
        """What stands for `tenant` in result keys and block hashes (hex): without the secret,
        a tenant's name does not give its keys."""
        return self.derive("tenant:" + tenant).hex()
