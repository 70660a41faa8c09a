"""The contract every eviction policy keeps, and the registry that names them.

A policy decides which keys stay resident under a capacity; it holds no values. The cache that
owns a policy stores values beside it and drops the value of every key the policy evicts. Sizes
are "charges" in whatever unit the owner chose (bytes for the result cache, 1 per object in the
simulator); `capacity` is in the same unit.

The protocol is the whole conversation:

    if key in policy:  policy.hit(key)                      # a hit
    else:              evicted = policy.insert(key, charge)  # a miss, offered for admission

`insert` may decline the newcomer (admission policies such as W-TinyLFU do): the newcomer is
then among the keys it returns, so the owner must check `key in policy` before storing a value.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol, runtime_checkable

Key = Hashable


@runtime_checkable
class EvictionPolicy(Protocol):
    """Residency of keys within `capacity` charge units."""

    capacity: int

    def __contains__(self, key: object) -> bool:
        """Whether `key` is resident. Changes nothing."""
        ...

    def __len__(self) -> int:
        """Number of resident keys."""
        ...

    @property
    def used(self) -> int:
        """Sum of the charges of resident keys; never above `capacity` after a call returns."""
        ...

    def hit(self, key: Key) -> None:
        """Record an access to resident `key`. The caller guarantees `key in self`."""
        ...

    def insert(self, key: Key, charge: int = 1) -> list[Key]:
        """Record a miss on non-resident `key` and offer it for admission.

        Returns every key that is no longer resident because of this call, in eviction order;
        `key` itself is among them when it was not admitted (declined, or `charge` exceeds
        `capacity`). The caller guarantees `key not in self` and `charge >= 1`.
        """
        ...

    def remove(self, key: Key) -> None:
        """Forget `key` (invalidated or expired); no-op when it is not resident."""
        ...

    def evict_one(self) -> Key | None:
        """Evict the key this policy would evict next and return it; None when empty.

        For owners that enforce a bound the policy does not know (an entry count).
        """
        ...

    def check_integrity(self) -> None:
        """Raise AssertionError when internal bookkeeping is inconsistent (tests call this)."""
        ...


PolicyFactory = Callable[..., EvictionPolicy]

_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy constructible by `name` in `make_policy`."""

    def decorate(factory: PolicyFactory) -> PolicyFactory:
        if name in _REGISTRY:
            raise ValueError(f"policy {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def policy_names() -> list[str]:
    """Names `make_policy` accepts."""
    return sorted(_REGISTRY)


def make_policy(name: str, capacity: int, **options: Any) -> EvictionPolicy:
    """A new, empty policy `name` with `capacity` charge units; ValueError for an unknown name."""
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}") from None
    return factory(capacity, **options)
